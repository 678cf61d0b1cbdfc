"""Issue 18's field reports, each as the repro that failed before its fix (tiny settings, CPU)."""

import io
import json
import os
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import ConfigError, DataConfig, RunConfig, apply_overrides
from core.data import DataError, decode_image
from core.runlog import JsonlError, append_jsonl, read_jsonl, read_provenance
from tests.conftest import ROOT

# The issue's settings: a tiny 2-level UNet, checkpoints every 2 steps, 5 sampling steps.
ISSUE = ["model.block_out_channels=[8,8]", "model.norm_num_groups=4", "train.batch_size=8", "train.checkpoint_every=2",
         "train.warmup_steps=1", "diffusion.sampling_steps=5", "data.num_examples=64", "context.enabled=false",
         "train.log_every=1"]


def tiny_config(*extra: str) -> RunConfig:
    return RunConfig.from_dict(apply_overrides({"name": "mini-digits16-baseline-s0"}, ISSUE + list(extra)))


# ---------------------------------------------------------------- 1. derived artifacts know their checkpoint


def test_continued_run_is_exported_sampled_and_recorded_again(tmp_path):
    from core.sample import provenance_path
    from core.train import train
    from eval.records import load_records
    from core.sample import load_pngs as load_samples
    from experiments.evaluate import evaluate_unconditional
    from experiments.presets import Preset

    preset = Preset("mini-digits16-baseline", "mini", "baseline", "digits16", {})
    run, records = tmp_path / "run", tmp_path / "rec.jsonl"
    samples = run / "samples" / "ddim-5-noclip"

    def evaluate(cfg):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            evaluate_unconditional("unconditional", preset, cfg, run, "mini", 8, records, step_time=False)
        return load_samples(sorted(samples.glob("*.png"))), (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    # The issue's repro at half the steps: train to 2, evaluate; continue to 4, evaluate again.
    train(tiny_config("train.steps=2"), run)
    images4, weights4 = evaluate(tiny_config("train.steps=2"))
    assert read_provenance(run / "pipeline")["checkpoint"] == 2
    train(tiny_config("train.steps=4"), run, allow_config_change=True)
    assert read_provenance(run / "pipeline")["checkpoint"] == 4
    images8, weights8 = evaluate(tiny_config("train.steps=4"))
    assert weights8 != weights4, "pipeline/ still holds the step-2 EMA"
    assert json.loads(provenance_path(samples).read_text())["pipeline"]["checkpoint"] == 4
    assert not torch.equal(images4, images8), "the step-2 samples were reused for checkpoint 4"
    recs = {(r["checkpoint"], r["metric"]): r for r in load_records(records)}
    assert recs[(2, "fd_digits")]["value"] != recs[(4, "fd_digits")]["value"]
    # The checkpoint-4 record measures the checkpoint-4 samples.
    from eval.metrics import digits_proxy_metrics
    from core.data import ImageData

    real = ImageData(DataConfig(split="train"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = digits_proxy_metrics(images8, real.images(range(len(real))))
    assert recs[(4, "fd_digits")]["value"] == pytest.approx(fresh["fd_digits"])
    # 7. 8 samples are too few for comparable proxies: the record says so.
    assert "small sample: n=8" in recs[(4, "fd_digits")]["note"]
    # Re-running the same evaluation appends nothing.
    n_lines = len(records.read_text().splitlines())
    evaluate(tiny_config("train.steps=4"))
    assert len(records.read_text().splitlines()) == n_lines


class FakeState:
    """accelerate's PartialState for one of ``world`` processes run as threads (barrier = threading.Barrier)."""

    def __init__(self, rank: int, world: int, barrier=None):
        self.process_index, self.num_processes, self.is_main_process = rank, world, rank == 0
        self.barrier = barrier

    def wait_for_everyone(self):
        if self.barrier is not None:
            self.barrier.wait(timeout=20)


def render_constant(value):
    def render(keys):
        return np.full((len(keys), 4, 4, 1), value, np.uint8)
    return render


def test_sample_folder_of_another_provenance_is_drawn_again(tmp_path):
    from core.sample import write_missing_pngs

    out = tmp_path / "samples" / "ddim-5-noclip"
    out.mkdir(parents=True)
    save = Image.fromarray(np.zeros((4, 4), np.uint8))
    save.save(out / "000000.png")  # a folder from before provenance existed: unknown origin
    with pytest.warns(UserWarning, match="unknown provenance"):
        write_missing_pngs(out, range(3), 2, render_constant(10), FakeState(0, 1), {"pipeline": {"checkpoint": 4}})
    assert all(np.asarray(Image.open(out / f"{k:06d}.png")).max() == 10 for k in range(3))
    write_missing_pngs(out, range(3), 2, render_constant(99), FakeState(0, 1), {"pipeline": {"checkpoint": 4}})
    assert np.asarray(Image.open(out / "000001.png")).max() == 10  # same provenance: reused
    with pytest.warns(UserWarning, match="checkpoint.: 4"):
        write_missing_pngs(out, range(3), 2, render_constant(20), FakeState(0, 1), {"pipeline": {"checkpoint": 8}})
    assert all(np.asarray(Image.open(out / f"{k:06d}.png")).max() == 20 for k in range(3))


def test_distributed_ranks_list_missing_pngs_consistently(tmp_path):
    """Rank 1 lists the folder late (after rank 0 wrote its share): without a barrier between listing and
    writing, it skips keys rank 0 left to it and some PNGs are never written."""
    import time

    from core.sample import write_missing_pngs

    out, barrier, errors = tmp_path / "s", threading.Barrier(2), []
    ready = threading.Event()

    def rank(r):
        try:
            if r == 1:
                ready.wait(5)
                time.sleep(0.2)
            else:
                ready.set()
            write_missing_pngs(out, range(8), 8, render_constant(r + 1), FakeState(r, 2, barrier))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    [t.start() for t in threads]
    [t.join(30) for t in threads]
    assert not errors, errors
    assert sorted(p.name for p in out.glob("*.png")) == [f"{k:06d}.png" for k in range(8)]
    # Keys split by rank: even keys by rank 0, odd keys by rank 1.
    assert [int(np.asarray(Image.open(out / f"{k:06d}.png")).max()) for k in range(8)] == [1, 2] * 4


# ---------------------------------------------------------------- 3. decode what a viewer shows

VIEW = np.full((16, 16), 255, np.uint8)  # what a viewer shows: white, a black diagonal stroke, a grey block
for i in range(16):
    VIEW[i, max(0, i - 1): i + 2] = 0
VIEW[10:14, 2:6] = 128


def encode(img: Image.Image, fmt: str, **kw) -> dict:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return {"bytes": buf.getvalue(), "path": f"test.{fmt.lower()}"}


def decoded(item, channels=1):
    return ((decode_image(item, 16, channels) + 1) * 127.5).round().numpy()


def variants():
    """(mode, image) pairs whose displayed content is VIEW (every mode PIL writes to PNG/JPEG/WebP)."""
    black_on_clear = np.zeros((16, 16, 4), np.uint8)  # black ink, alpha = ink coverage, transparent elsewhere
    black_on_clear[..., 3] = 255 - VIEW
    black_on_clear[..., :3] = 0
    # grey block: ink 128 at alpha 255 (composited -> 128)
    black_on_clear[10:14, 2:6] = (128, 128, 128, 255)
    rgba = Image.fromarray(black_on_clear, "RGBA")
    la = Image.fromarray(np.stack([black_on_clear[..., 0], black_on_clear[..., 3]], -1), "LA")
    grey = Image.fromarray(VIEW, "L")
    pal = grey.convert("P")
    pal_t = Image.fromarray(np.where(VIEW == 255, 0, np.where(VIEW == 0, 1, 2)).astype(np.uint8), "P")
    pal_t.putpalette([7, 7, 7, 0, 0, 0, 128, 128, 128])  # index 0 (a dark grey) is transparent
    pal_t.info["transparency"] = 0
    wide = Image.fromarray(VIEW.astype(np.uint16) * 257)  # I;16, full 16-bit range
    pa = Image.fromarray(black_on_clear[..., 0], "L").convert("P").convert("PA")  # (PIL's LA -> PA drops alpha)
    pa.putalpha(Image.fromarray(black_on_clear[..., 3], "L"))
    return [("1", grey.point(lambda v: 255 if v > 200 else 0).convert("1")), ("L", grey), ("LA", la),
            ("P", pal), ("P+transparency", pal_t), ("RGB", grey.convert("RGB")), ("RGBA", rgba),
            ("I;16", wide), ("PA", pa), ("CMYK", grey.convert("CMYK"))]


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_mode_decodes_to_what_a_viewer_shows(fmt):
    view = VIEW.astype(np.float64)
    tried = 0
    for mode, img in variants():
        kw = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
        try:
            item = encode(img, fmt, **({"transparency": 0} if mode == "P+transparency" and fmt == "PNG" else {}), **kw)
        except (OSError, ValueError, KeyError):
            continue  # PIL does not write this mode to this format
        if fmt == "WEBP" and mode == "I;16":
            continue  # PIL's WebP encoder clips 16-bit values to 255: the file itself shows another picture
        tried += 1
        expect = np.where(view > 200, 255, 0) if mode == "1" else view
        for channels in (1, 3):
            got = decoded(item, channels)
            tol = 40 if fmt == "JPEG" else 1  # JPEG rings around the 1-px stroke; lossless formats are exact
            err = np.abs(got - expect[None]).mean()
            assert err <= (8 if fmt == "JPEG" else 0.5), (fmt, mode, channels, err)
            assert np.abs(np.median(got - expect[None])) <= tol, (fmt, mode, channels)
    assert tried >= {"PNG": 8, "JPEG": 3, "WEBP": 8}[fmt]


def test_unreadable_modes_name_the_file_and_mode():
    item = encode(Image.fromarray(np.full((16, 16), 1e6, np.float32), "F"), "TIFF")
    with pytest.raises(DataError, match=r"test.tiff: mode F"):
        decode_image(item, 16, 1)


def test_exif_orientation_is_applied():
    shown = np.full((16, 16), 255, np.uint8)
    shown[:6, :6] = 0  # black top-left corner, as displayed
    stored = Image.fromarray(shown, "L").transpose(Image.Transpose.ROTATE_90)  # what a camera writes with tag 6
    exif = Image.Exif()
    exif[0x0112] = 6
    item = encode(stored, "JPEG", exif=exif.tobytes(), quality=100)
    got = decoded(item)[0]
    assert got[:6, :6].mean() < 30 and got[10:, 10:].mean() > 225 and got[:6, 10:].mean() > 225


# ---------------------------------------------------------------- 4. crash-damaged append-only logs


def test_partial_last_line_is_dropped_with_a_warning_and_damage_elsewhere_names_the_line(tmp_path):
    path = tmp_path / "stats.jsonl"
    for step in range(1, 5):
        append_jsonl(path, {"step": step, "loss": 0.123456789, "lr": 0.001, "step_time": 0.0123456789})
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.warns(UserWarning, match=r"stats.jsonl:\d: dropped a partial last line"):
        assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3]
    with pytest.warns(UserWarning, match="stats.jsonl: dropped a partial last line"):
        append_jsonl(path, {"step": 9})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 9]  # appended after the cut, not glued to it
    path.write_text(path.read_text().replace('"step": 2', '"step": 2,,'))
    with pytest.raises(JsonlError, match=r"stats.jsonl:2: not a JSON line"):
        read_jsonl(path)


def test_append_jsonl_completes_short_writes_and_rolls_back_failed_ones(tmp_path, monkeypatch):
    import os

    import core.runlog as runlog

    path = tmp_path / "r.jsonl"
    append_jsonl(path, {"a": 1})
    real_write = os.write
    monkeypatch.setattr(runlog.os, "write", lambda fd, b: real_write(fd, b[:5]))  # 5 bytes per call
    append_jsonl(path, {"b": 2})
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]
    calls = []

    def full_disk(fd, b):
        if calls:
            raise OSError(28, "No space left on device")
        calls.append(1)
        return real_write(fd, b[:3])

    monkeypatch.setattr(runlog.os, "write", full_disk)
    with pytest.raises(OSError, match="r.jsonl: appending a record failed after 3 of"):
        append_jsonl(path, {"c": 3})
    monkeypatch.undo()
    assert read_jsonl(path) == [{"a": 1}, {"b": 2}]


def test_resume_after_a_cut_stats_file_uses_the_intact_checkpoint(tmp_path):
    from core.train import train

    run = tmp_path / "run"
    train(tiny_config("train.steps=2", "train.checkpoint_every=1"), run, stop_after=1)
    stats = run / "stats.jsonl"
    stats.write_bytes(stats.read_bytes()[:-40])  # the step-1 line, cut as a crash or a full disk leaves it
    with pytest.warns(UserWarning, match="stats.jsonl:1: dropped a partial last line"):
        train(tiny_config("train.steps=2", "train.checkpoint_every=1"), run)
    assert [r["step"] for r in read_jsonl(run / "stats.jsonl")] == [2]
    assert read_provenance(run / "pipeline")["checkpoint"] == 2


def test_records_are_appended_once(tmp_path):
    from eval.records import append_record, load_records

    rec = json.loads((ROOT / "tests" / "fixtures" / "records.jsonl").read_text().splitlines()[0])
    path = tmp_path / "r.jsonl"
    assert append_record(rec, path)
    with pytest.warns(UserWarning, match="already present"):
        assert not append_record(dict(rec, value=rec["value"] + 1), path)
    assert append_record(dict(rec, checkpoint=rec["checkpoint"] + 1), path)
    assert len(load_records(path)) == 2
    lines = path.read_text().splitlines()  # a superseded measurement may be made again
    path.write_text(json.dumps(dict(json.loads(lines[0]), superseded="fixture")) + "\n" + lines[1] + "\n")
    assert append_record(rec, path)
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    path.write_text(path.read_text()[:-30])  # a crash mid-append
    with pytest.warns(UserWarning, match="partial last line"):
        assert len(load_records(path)) == 1


def test_supersede_marks_only_current_matching_records_and_refuses_vague_requests(tmp_path):
    from eval.records import RecordError, load_records, main, supersede

    rec = json.loads((ROOT / "tests" / "fixtures" / "records.jsonl").read_text().splitlines()[0])
    old = dict(rec, experiment="inpainting", sampler="repaint-50-j5-r5-noclip")
    recs = [dict(old, seed=0), dict(old, seed=1), dict(old, sampler="repaint-50-j5-r5-eta1-noclip"),
            dict(old, seed=2, superseded="clipped")]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    before = path.read_text().splitlines()
    for kwargs, match in (({"note": " ", "experiment": "inpainting"}, "needs a note"), ({"note": "x"}, "at least one"),
                          ({"note": "x", "samplr": "a"}, "unknown record field"),
                          ({"note": "x", "sampler": "ddim-50-clip"}, "no current record matches")):
        with pytest.raises(RecordError, match=match):
            supersede(path=path, **kwargs)
    assert path.read_text().splitlines() == before
    main(["supersede", "--records", str(path), "--where", "experiment=inpainting",
          "--where", "sampler=repaint-50-j5-r5-noclip", "--note", "eta 0; replaced by eta 1"])
    got = load_records(path)
    assert [r.get("superseded") for r in got] == ["eta 0; replaced by eta 1"] * 2 + [None, "clipped"]
    assert path.read_text().splitlines()[2:] == before[2:]  # untouched lines keep their bytes
    assert not list(tmp_path.glob("*.rewrite"))


def test_an_append_waiting_on_a_rewrite_lands_in_the_new_file(tmp_path):
    """rewrite_jsonl renames a new file over the old one; an appender that opened the old file and waited for its
    lock must append to the new file, not to the unlinked old one (where its record would be lost)."""
    from core.runlog import _open_locked, rewrite_jsonl

    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"a": 1}) + "\n")
    fd = _open_locked(path, os.O_RDONLY)  # a rewrite in progress holds the lock
    appender = threading.Thread(target=append_jsonl, args=(path, {"a": 2}))
    appender.start()
    time.sleep(0.3)  # the appender has opened the old file and waits on its lock
    tmp = tmp_path / "new"
    tmp.write_text(json.dumps({"a": 1, "superseded": "x"}) + "\n")
    os.replace(tmp, path)
    os.close(fd)
    appender.join(5)
    assert [r["a"] for r in read_jsonl(path)] == [1, 2]
    assert rewrite_jsonl(path, lambda r: dict(r, b=0) if r["a"] == 2 else None) == 1
    assert read_jsonl(path) == [{"a": 1, "superseded": "x"}, {"a": 2, "b": 0}]


def test_inpainting_records_what_it_measures_at_every_scale(monkeypatch):
    """Paper scale measured lpips_alex but checked for percep_digits, so a resumed evaluation re-measured."""
    import eval.metrics
    from experiments.inpainting.evaluate import inpainting_metrics, metric_names

    done, truth = torch.rand(2, 1, 16, 16) * 2 - 1, torch.rand(2, 1, 16, 16) * 2 - 1
    known = torch.ones(2, 1, 16, 16)
    known[..., 4:8, 4:8] = 0
    monkeypatch.setattr(eval.metrics, "lpips_alex", lambda device: (lambda a, b: torch.zeros(len(a))))
    cfg = RunConfig()
    for scale in ("mini", "paper"):
        assert set(inpainting_metrics(done, truth, known, scale)) == set(metric_names(scale, cfg, 1)), scale


# ---------------------------------------------------------------- 5/6. settings honoured, checked before compute


@pytest.mark.parametrize("key,value", [("train.mixed_precision", "no"), ("data.source", "off"), ("name", "007"),
                                       ("data.split", "train"), ("model.vae", "yes")])
def test_string_settings_keep_their_spelling(key, value):
    d = apply_overrides({}, [f"{key}={value}"])
    section, _, leaf = key.rpartition(".")
    assert (d[section] if section else d)[leaf] == value
    if key == "train.mixed_precision":
        assert RunConfig.from_dict(d).train.mixed_precision == "no"
    assert apply_overrides({}, ["model.vae=null"])["model"]["vae"] is None
    assert apply_overrides({}, ["train.steps=5"])["train"]["steps"] == 5


def test_yaml_files_read_no_as_a_string(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\n  steps: 3\ndiffusion:\n  clip_sample: true\n")
    cfg = RunConfig.from_yaml(path)
    assert cfg.train.mixed_precision == "no" and cfg.diffusion.clip_sample is True
    path.write_text("diffusion:\n  clip_sample: yes\n")
    with pytest.raises(ConfigError, match="diffusion.clip_sample: expected bool .true or false."):
        RunConfig.from_yaml(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is applied on a GPU")
def test_fp16_on_cpu_is_refused_before_compute(tmp_path):
    from core.train import train

    with pytest.raises(ConfigError, match="train.mixed_precision='fp16'.*'bf16'"):
        train(tiny_config("train.mixed_precision=fp16"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resolution_must_fit_the_unet_and_the_autoencoder():
    with pytest.raises(ConfigError, match="data.resolution: 18 .*3-level UNet"):
        RunConfig.from_dict(apply_overrides({}, ["data.resolution=18", "model.block_out_channels=[8,8,8]",
                                                  "model.norm_num_groups=4"]))
    RunConfig.from_dict(apply_overrides({}, ["data.resolution=20", "model.block_out_channels=[8,8,8]",
                                              "model.norm_num_groups=4"]))
    from core.train import check_latent_size

    cfg = RunConfig.from_dict(apply_overrides({}, ["backbone=latent", "model.vae=/x", "data.resolution=24",
                                                   "model.block_out_channels=[8,8,8]", "model.norm_num_groups=4"]))
    with pytest.raises(ConfigError, match="data.resolution=24 gives a 6x6 latent.*multiple of 16"):
        check_latent_size(cfg, 4)
    with pytest.raises(ConfigError, match="downsampling factor 5"):
        check_latent_size(cfg, 5)
    check_latent_size(cfg, 2)


def test_sample_counts_the_metrics_cannot_use_are_refused_before_sampling(tmp_path):
    from experiments.evaluate import evaluate_unconditional
    from experiments.presets import Preset

    with pytest.raises(ValueError, match="precision_digits needs >= 4"):
        evaluate_unconditional("unconditional", Preset("p", "mini", "baseline", "digits16", {}), RunConfig(),
                               tmp_path / "no-run", "mini", 3, tmp_path / "r.jsonl")
    from experiments.runner import main
    from experiments.unconditional import PRESETS

    with pytest.raises(SystemExit):
        main("unconditional", PRESETS, "", ["--presets", "mini-digits16-baseline", "--num-samples", "3",
                                            "--runs-dir", str(tmp_path), "--records", str(tmp_path / "r.jsonl")])
    assert not (tmp_path / "mini-digits16-baseline-s0").exists()


def test_small_samples_warn():
    from eval.metrics import SMALL_SAMPLE_MIN, digits_proxy_metrics

    x = torch.rand(8, 1, 16, 16) * 2 - 1
    with pytest.warns(UserWarning, match="small sample: n=8"):
        digits_proxy_metrics(x, torch.rand(64, 1, 16, 16) * 2 - 1)
    assert all(v > 8 for v in SMALL_SAMPLE_MIN.values())
