"""Issue 27's field reports (round 2), each as the repro that failed before its fix (tiny settings, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from core.runlog import read_jsonl
from tests.conftest import ROOT

# The TINY settings.
TINY = ["model.block_out_channels=[8,8]", "model.norm_num_groups=4", "train.batch_size=8", "diffusion.sampling_steps=2",
        "train.log_every=1", "train.warmup_steps=1"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def sets(*overrides: str) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def runner(*argv: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.unconditional", *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# ---------------------------------------------------------------- 1. a record names the trained model it measured


@pytest.fixture(scope="module")
def first_model(tmp_path_factory):
    """The issue's first command: the mini baseline, 4 steps, recorded into R1/rec.jsonl."""
    r1 = tmp_path_factory.mktemp("R1")
    argv = ["--presets", "mini-digits16-baseline", "--runs-dir", str(r1), "--records", str(r1 / "rec.jsonl"),
            "--num-samples", "8", *sets(*TINY, "train.steps=4", "train.checkpoint_every=2")]
    runner(*argv)
    return r1, argv


def test_records_carry_the_model_they_measured(first_model):
    from core.config import RunConfig, load_yaml
    from core.runlog import read_provenance
    from core.train import training_config_sha256

    r1, _ = first_model
    run = r1 / "mini-digits16-baseline-s0"
    recs = read_jsonl(r1 / "rec.jsonl")
    assert recs
    cfg = RunConfig.from_dict(load_yaml((run / "config.yaml").read_text()))
    for r in recs:
        assert r["train_config_sha256"] == training_config_sha256(cfg)
        assert r["weights_sha256"] == read_provenance(run / "pipeline")["sha256"]
        assert r["overrides"] == {"model.block_out_channels": [8, 8], "model.norm_num_groups": 4,
                                  "train.batch_size": 8, "train.steps": 4, "train.warmup_steps": 1}


def test_another_trained_model_is_refused_before_compute(first_model, tmp_path):
    r1, argv = first_model
    before = (r1 / "rec.jsonl").read_text()
    argv2 = [a if a != str(r1) else str(tmp_path / "R2") for a in argv] + sets("train.lr=0.05")
    t0 = time.time()
    proc = runner(*argv2, check=False, timeout=120)
    assert proc.returncode != 0
    assert "another trained model" in proc.stderr and "train.lr" in proc.stderr and "supersede" in proc.stderr
    assert not (tmp_path / "R2" / "mini-digits16-baseline-s0" / "checkpoints").exists(), "it trained first"
    assert time.time() - t0 < 60
    assert (r1 / "rec.jsonl").read_text() == before


def test_sampling_keys_and_logging_keys_are_the_same_model():
    from core.config import RunConfig, apply_overrides
    from core.train import training_config_sha256

    base = RunConfig.from_dict(apply_overrides({}, TINY))
    same = RunConfig.from_dict(apply_overrides({"name": "other"}, TINY + [
        "diffusion.sampler=ddpm", "diffusion.sampling_steps=250", "train.log_every=7", "train.checkpoint_every=3"]))
    other = RunConfig.from_dict(apply_overrides({}, TINY + ["train.lr=0.05"]))
    assert training_config_sha256(base) == training_config_sha256(same)
    assert training_config_sha256(base) != training_config_sha256(other)


def test_a_retrained_draw_of_the_same_config_is_refused_at_evaluation(first_model, tmp_path):
    """Same config, other weights (a retrained draw on another machine): told apart by the export's hash."""
    import shutil

    from core.config import RunConfig, load_yaml
    from eval.records import OtherModelError
    from experiments.evaluate import evaluate_unconditional
    from experiments.unconditional import PRESETS

    r1, _ = first_model
    run = tmp_path / "run"
    shutil.copytree(r1 / "mini-digits16-baseline-s0", run)
    prov = json.loads((run / "pipeline" / "provenance.json").read_text())
    (run / "pipeline" / "provenance.json").write_text(json.dumps({**prov, "sha256": "0" * 16}))
    cfg = RunConfig.from_dict(load_yaml((run / "config.yaml").read_text()))
    preset = next(p for p in PRESETS if p.name == "mini-digits16-baseline")
    with pytest.raises(OtherModelError, match="weights"):
        evaluate_unconditional("unconditional", preset, cfg, run, "mini", 8, r1 / "rec.jsonl", step_time=False)


def test_a_measured_run_whose_folder_is_gone_is_skipped_not_retrained(first_model, tmp_path):
    """Re-running a grid on a machine without the run folders (a fresh checkout, a deleted runs/) used to train the
    run again, then stop at evaluation: the new draw's weights are not the ones its records measured (on a GPU, never
    bit-identical). Now the runner says so before any compute and skips it; with the folder present it resumes."""
    import shutil

    r1, argv = first_model
    shutil.copy(r1 / "rec.jsonl", tmp_path / "rec.jsonl")
    before = (tmp_path / "rec.jsonl").read_text()
    moved = [str(tmp_path / "runs") if a == str(r1) else str(tmp_path / "rec.jsonl") if a == str(r1 / "rec.jsonl")
             else a for a in argv]
    t0 = time.time()
    proc = runner(*moved, timeout=120)
    assert "seed 0: skipped" in proc.stdout and "holds no export or checkpoint" in proc.stdout
    assert "supersede" in proc.stdout and "--where preset=mini-digits16-baseline" in proc.stdout
    assert not (tmp_path / "runs" / "mini-digits16-baseline-s0" / "checkpoints").exists(), "it trained"
    assert time.time() - t0 < 60
    assert (tmp_path / "rec.jsonl").read_text() == before
    shutil.copytree(r1 / "mini-digits16-baseline-s0", tmp_path / "runs" / "mini-digits16-baseline-s0")
    assert "skipped" not in runner(*moved, timeout=120).stdout  # its folder back: an ordinary finished run


def test_legacy_records_stand_for_the_preset_config():
    """Records older than the model fields measured their preset's own config."""
    from eval.records import check_same_model, recorded, same_model

    legacy = {"experiment": "unconditional", "preset": "p", "seed": 0, "scale": "mini", "checkpoint": 2000,
              "metric": "fd_digits"}
    assert same_model(legacy, {"train_config_sha256": "a", "weights_sha256": "b", "overrides": {}})
    assert not same_model(legacy, {"train_config_sha256": "a", "weights_sha256": "b", "overrides": {"train.lr": 1}})
    assert not same_model(legacy, {"weights_sha256": "b"})  # overrides unknown: not assumed to be the preset's
    assert recorded([legacy], metric="fd_digits", checkpoint=2000, overrides={}, train_config_sha256="a")
    with pytest.raises(ValueError, match="another trained model"):
        check_same_model([legacy], {"train_config_sha256": "a", "overrides": {"train.lr": 1}}, "rec.jsonl",
                         preset="p", seed=0)


def test_committed_records_keep_their_tables(tmp_path):
    """No committed table changes: the model fields are absent from every committed record, and the tables
    regenerate byte for byte (tests/test_tables.py checks the latter for every table)."""
    recs = read_jsonl(ROOT / "results" / "records.jsonl")
    legacy = [r for r in recs if "train_config_sha256" not in r]
    assert legacy, "committed records lost their legacy form"


# ---------------------------------------------------------------- 2. one owner per run directory


def test_duplicate_seeds_train_one_run(tmp_path):
    runner("--presets", "mini-digits16-baseline", "--seeds", "0,0", "--jobs", "2", "--runs-dir", str(tmp_path),
           "--records", str(tmp_path / "rec.jsonl"), "--num-samples", "8",
           *sets(*TINY, "train.steps=6", "train.checkpoint_every=2"))
    rows = read_jsonl(tmp_path / "mini-digits16-baseline-s0" / "stats.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert len(list((tmp_path / "logs").glob("*.log"))) == 1


def train_cmd(run_dir, *overrides):
    return [sys.executable, "-m", "core.train", "--run-dir", str(run_dir), *sets(*TINY, "data.num_examples=64",
                                                                                 *overrides)]


def hold_lock(run):
    """A process holding ``run``'s lock until killed."""
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                               "from core.runlog import RunLock; l = RunLock(sys.argv[2]).__enter__(); "
                               "print('held', flush=True); time.sleep(600)", str(ROOT), str(run)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_trainer_of_a_run_waits_for_the_first(tmp_path):
    run = tmp_path / "run"
    holder = hold_lock(run)
    second = subprocess.Popen(train_cmd(run, "train.steps=4", "train.checkpoint_every=2"), cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = second.stderr.readline()
    assert f"waiting for {run}: in use by pid {holder.pid}" in line
    time.sleep(2)
    assert not (run / "config.yaml").exists(), "it trained while another process held the run"
    holder.kill()
    holder.wait()
    second.communicate(timeout=300)
    assert second.returncode == 0
    assert [r["step"] for r in read_jsonl(run / "stats.jsonl")] == [1, 2, 3, 4]


def test_a_crashed_holder_leaves_no_lock(tmp_path):
    from core.runlog import RunLock, RunLockedError

    run = tmp_path / "run"
    holder = hold_lock(run)
    with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
        RunLock(run, wait=False).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(run, wait=False), RunLock(run, wait=False):  # re-entrant within a process
        pass
    with RunLock(run, wait=False):
        pass


# ---------------------------------------------------------------- issue 26.5: pilot runs never look like paper rows


def test_a_pilot_paper_run_is_kept_out_of_the_paper_block(tmp_path):
    """``--num-samples 4 --set train.steps=3`` on a paper preset recorded fid4_cleanfid 428.8 and the table printed
    it in the paper-scale block as "this repository", beside the paper's number."""
    from eval.tables import write_tables

    base = dict(experiment="unconditional", benchmark="celebahq256", method="conprediff", scale="paper",
                preset="paper-celebahq256-conprediff", seed=0, metric="fid4_cleanfid", value=428.8, n_samples=4,
                checkpoint=3, ema=True, sampler="ddim-200-noclip", reference="r", backend="b", git_commit="x", time="t",
                train_config_sha256="a", weights_sha256="b", overrides={"train.steps": 3, "train.batch_size": 2})
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(base) + "\n")
    write_tables(path, tmp_path / "tables")
    text = (tmp_path / "tables" / "unconditional.md").read_text()
    paper_block = text.split("## Paper scale")[1].split("## Scale:")[0]
    assert "428.8" not in paper_block
    assert "## Scale: paper (pilot runs: not the paper presets' numbers)" in text
    assert "Pilot: trained with the preset's training keys overridden (train.batch_size=2, train.steps=3)" in text
    assert "428.8" in text.split("## Scale: paper (pilot")[1]


# ---------------------------------------------------------------- issue 26.2: evaluation size can be set


def test_a_batch_out_of_gpu_memory_is_split_into_the_same_images():
    import numpy as np
    import torch

    from core.sample import render_fitting

    calls = []

    def render(batch):
        calls.append(len(batch))
        if len(batch) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return np.stack([np.full((2, 2, 1), k, np.uint8) for k in batch])

    with pytest.warns(UserWarning, match="ran out of GPU memory"):
        out = render_fitting(render, list(range(7)))
    assert out[:, 0, 0, 0].tolist() == list(range(7))
    assert max(c for c in calls if c <= 2) == 2

    def never(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(torch.OutOfMemoryError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        render_fitting(never, [0, 1])


def test_sampling_batch_reaches_the_sampler(first_model, monkeypatch):
    import core.sample
    from core.config import RunConfig, apply_overrides, load_yaml
    from experiments.evaluate import evaluate_unconditional
    from experiments.unconditional import PRESETS

    r1, _ = first_model
    run = r1 / "mini-digits16-baseline-s0"
    seen = []
    real = core.sample.write_missing_pngs
    monkeypatch.setattr(core.sample, "write_missing_pngs", lambda *a, **k: seen.append(a[2]) or real(*a, **k))
    cfg = RunConfig.from_dict(apply_overrides(load_yaml((run / "config.yaml").read_text()),
                                              ["diffusion.sampling_batch=3", "diffusion.sampler=ddpm"]))
    preset = next(p for p in PRESETS if p.name == "mini-digits16-baseline")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate_unconditional("unconditional", preset, cfg, run, "mini", 8, r1 / "other-rec.jsonl", step_time=False,
                               overrides={})
    assert seen == [3]


def test_inpainting_takes_its_image_count_and_repaint_settings_from_the_command():
    from experiments.presets import with_eval_options
    from experiments.inpainting import PRESETS

    p = next(p for p in PRESETS if p.name == "paper-celebahq256-pixel-conprediff")
    assert p.num_samples == 100 and "num_images" not in p.extra
    q = with_eval_options(p, ["steps=20", "jump_length=2", "eta=1"])
    assert (q.extra["steps"], q.extra["jump_length"], q.extra["eta"]) == (20, 2, 1) and p.extra["steps"] == 250
    for bad, message in (("stepz=3", "no such evaluation option"), ("steps=x", "expected a int"), ("steps", "KEY=VALUE")):
        with pytest.raises(ValueError, match=message):
            with_eval_options(p, [bad])


# ---------------------------------------------------------------- issue 26.4: metric weights checked, not only found


def test_a_wrong_inception_file_is_refused_in_one_line(tmp_path, monkeypatch):
    """A TorchScript without clean-fid's interface passed --check, then eval.fid_ref died with an AttributeError."""
    import torch

    from eval import metrics

    monkeypatch.setenv(metrics.WEIGHTS_ENV, str(tmp_path))

    class NotInception(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    torch.jit.script(NotInception()).save(str(tmp_path / metrics.INCEPTION_FILE))
    problem = metrics.inception_problem()
    assert problem and "without clean-fid's `layers` interface" in problem and "\n" not in problem
    assert metrics.INCEPTION_URL in problem
    (tmp_path / metrics.INCEPTION_FILE).write_bytes(b"not a model")
    assert "not a TorchScript file" in metrics.inception_problem()


def test_a_hub_weights_file_must_have_the_hash_its_name_carries(tmp_path, monkeypatch):
    """A random file (or state dict) saved under torchvision's AlexNet name was used silently."""
    import hashlib

    import torch

    from eval import metrics

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    wrong = tmp_path / "hub" / "checkpoints" / metrics.ALEXNET_FILE
    torch.save({"features.0.weight": torch.zeros(64, 3, 11, 11)}, wrong)
    problem = metrics.alexnet_problem()
    assert problem and "the name says 7be5be79" in problem and metrics.ALEXNET_URL in problem
    assert metrics.hub_hash_prefix(metrics.TF_INCEPTION_FILE) == "6726825d"
    assert metrics.weights_identity(wrong) == f"{metrics.ALEXNET_FILE} sha256 {hashlib.sha256(wrong.read_bytes()).hexdigest()[:16]}"


# ---------------------------------------------------------------- issue 26.3: latent exports load as what they are


def test_a_vq_latent_export_loads_as_an_ldm_pipeline_that_returns_images(tmp_path):
    """The LDM-4 export's model_index.json said DDPMPipeline: stock diffusers returned latents as "images"."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline, LDMPipeline, VQModel

    from core.config import RunConfig, apply_overrides
    from core.sample import sample_pipeline
    from core.train import train

    torch.manual_seed(0)
    VQModel(in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4, latent_channels=3,
            num_vq_embeddings=16, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(tmp_path / "vq")
    cfg = RunConfig.from_dict(apply_overrides({"name": "ldm"}, [
        "backbone=latent", f"model.vae={tmp_path / 'vq'}", "model.latent_scale=1.0", "model.block_out_channels=[8,8]",
        "model.norm_num_groups=4", "train.batch_size=4", "train.steps=2", "train.warmup_steps=1",
        "train.checkpoint_every=2", "data.num_examples=8", "data.resolution=16", "train.log_every=1"]))
    run = tmp_path / "run"
    train(cfg, run)
    pipe = DiffusionPipeline.from_pretrained(run / "pipeline")
    assert isinstance(pipe, LDMPipeline) and isinstance(pipe.vqvae, VQModel)
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 1)  # the data resolution and channels, not the 8x8x3 latents
    assert np.isfinite(images).all()
    paths = sample_pipeline(run / "pipeline", tmp_path / "samples", range(2), "ddim", 2)  # our sampler reads it too
    assert len(paths) == 2
    env = json.loads((run / "env.json").read_text())
    assert env["loaded_weights"]["model.vae"]["path"] == str((tmp_path / "vq").resolve())
    assert len(env["loaded_weights"]["model.vae"]["sha256"]) == 16


# ---------------------------------------------------------------- issue 26.6: cluster defaults that fit


def test_sigterm_saves_a_checkpoint_at_the_current_step_and_the_run_resumes(tmp_path):
    """A preempted SLURM job lost up to checkpoint_every steps; now SIGTERM saves at the end of the step."""
    run = tmp_path / "run"
    cmd = train_cmd(run, "train.steps=40", "train.checkpoint_every=1000")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_jsonl(run / "stats.jsonl") if (run / "stats.jsonl").exists() else []) < 3:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM after step" in err
    from core.train import list_checkpoints

    (step, _), = list_checkpoints(run)
    assert 3 <= step < 40  # a checkpoint where it stopped, though checkpoint_every is 1000
    subprocess.run(cmd, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    assert [r["step"] for r in read_jsonl(run / "stats.jsonl")] == list(range(1, 41))


def test_wall_clock_checkpoints_and_threads_per_process(tmp_path):
    from core.train import train
    from core.config import RunConfig, apply_overrides
    from experiments.cluster import RunWorker

    run = tmp_path / "run"
    train(RunConfig.from_dict(apply_overrides({}, TINY + ["data.num_examples=64", "train.steps=4",
                                                          "train.checkpoint_every=1000", "train.checkpoint_minutes=1e-6",
                                                          "train.checkpoints_total_limit=10"])), run)
    assert sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir()) == [1, 2, 3, 4]
    assert RunWorker("unconditional", [], gpus=8, cpus=32).threads() == 4
    assert RunWorker("unconditional", [], gpus=0, cpus=8).threads() == 8


# ---------------------------------------------------------------- 3. what a resume pins


def test_a_resume_keeps_every_segment_and_refuses_other_data(tmp_path, monkeypatch):
    """A resume after a code change went on silently and env.json kept only the new commit."""
    from core.config import ConfigError, RunConfig, apply_overrides
    from core.train import train
    from experiments.smoke import make_fake_imagefolder

    folder = make_fake_imagefolder(tmp_path / "faces", 1)
    cfg = RunConfig.from_dict(apply_overrides({}, TINY + [f"data.source={folder}", "train.steps=4",
                                                          "train.checkpoint_every=2", "train.batch_size=4"]))
    run = tmp_path / "run"
    monkeypatch.setenv("CONPREDIFF_GIT_COMMIT", "aaaa")
    train(cfg, run, stop_after=2)
    monkeypatch.setenv("CONPREDIFF_GIT_COMMIT", "bbbb-dirty")
    from PIL import Image

    Image.new("L", (24, 24)).save(folder / "train" / "extra.png")  # one more training image
    with open(folder / "train" / "metadata.jsonl", "a") as f:
        f.write(json.dumps({"file_name": "extra.png", "caption": "x"}) + "\n")
    with pytest.raises(ConfigError, match="training data changed since the last segment.*16 images.*17 images"):
        train(cfg, run)
    (folder / "train" / "extra.png").unlink()
    lines = (folder / "train" / "metadata.jsonl").read_text().splitlines()[:-1]
    (folder / "train" / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    train(cfg, run)
    env = json.loads((run / "env.json").read_text())
    assert [s["git_commit"] for s in env["segments"]] == ["aaaa", "bbbb-dirty"]
    assert [s["from_step"] for s in env["segments"]] == [0, 2]
    assert env["segments"][0]["data"]["source"] == str(folder.resolve()) and env["segments"][0]["data"]["num_images"] == 16
    assert "code changed since the last segment: commit aaaa -> bbbb-dirty" in env["segments"][1]["notes"][0]
    assert "resume: code changed" in (run / "log.txt").read_text()


def test_split_run_name_inverts_run_name():
    """Figures and the scaling report read a run's preset and seed back from its name through one function."""
    from core.runlog import run_name, split_run_name

    assert split_run_name(run_name("mini-digits16-conprediff-t-uniform-0.5", 12)) == (
        "mini-digits16-conprediff-t-uniform-0.5", 12)
    with pytest.raises(ValueError, match="not a run name"):
        split_run_name("mini-digits16-baseline")
