"""Field reports 4, 5 and 9 (non-finite values, damaged checkpoints, sampler settings), each as the repro that failed
before its fix: tiny settings, CPU, seconds each."""

import json
import os
import shutil
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from core.config import ConfigError, DiffusionConfig, RunConfig, apply_overrides
from core.models import build_scheduler, sampler_name, sampling_scheduler
from core.sample import NonFiniteSampleError, denoise
from tests.conftest import TINY


def tiny_config(*extra: str) -> RunConfig:
    return RunConfig.from_dict(apply_overrides({"name": "mini-digits16-baseline-s0"}, TINY + ["context.enabled=false",
                                                                                              *extra]))


class Recorder:
    """A 'UNet' for an all-zero data set: it predicts exactly the noise in x_t (eps = x_t / sqrt(1 - alpha-bar_t)),
    records the timesteps it is called at, and from call ``nan_from`` on returns NaN."""

    config = SimpleNamespace(in_channels=1, sample_size=4)
    alphas_cumprod = build_scheduler(DiffusionConfig()).alphas_cumprod  # diffusers' default linear schedule

    def __init__(self, nan_from: int | None = None):
        self.nan_from, self.calls = nan_from, []

    def __call__(self, x, t, **kwargs):
        self.calls.append(int(t))
        eps = x / (1 - self.alphas_cumprod[int(t)]) ** 0.5
        if self.nan_from is not None and len(self.calls) >= self.nan_from:
            eps = torch.full_like(x, float("nan"))
        return SimpleNamespace(sample=eps)


def checkpoint_weights_finite(path) -> bool:
    model = load_file(path / "model.safetensors")
    ema = torch.load(path / "custom_checkpoint_1.pkl", weights_only=False)["shadow_params"]
    return all(torch.isfinite(t).all() for t in [*model.values(), *ema])


# ---------------------------------------------------------------- 4. non-finite values never pass silently


def test_diverged_export_stops_sampling_naming_seeds_and_pipeline_and_records_nothing(tmp_path):
    """Report 4: an export trained with train.lr=3e37 train.max_grad_norm=0 train.steps=1 train.warmup_steps=0 samples
    100% NaN; to_uint8 wrote black PNGs and the run recorded metrics as if fine."""
    from core.train import train
    from experiments.evaluate import evaluate_unconditional
    from experiments.presets import Preset

    cfg = tiny_config("train.lr=3e37", "train.max_grad_norm=0", "train.steps=1", "train.warmup_steps=0",
                      "diffusion.sampling_steps=5")
    run, records = tmp_path / "run", tmp_path / "records.jsonl"
    train(cfg, run)  # its weights are finite (about 3e37): the export is written
    preset = Preset("mini-digits16-baseline", "mini", "baseline", "digits16", {})
    with warnings.catch_warnings(), pytest.raises(NonFiniteSampleError) as err:
        warnings.simplefilter("ignore")
        evaluate_unconditional("unconditional", preset, cfg, run, "mini", 8, records, step_time=False)
    message = str(err.value)
    assert "\n" not in message
    assert str(run / "pipeline") in message and str(run / "samples" / "ddim-5-noclip") in message
    assert "seed(s) 0, 1, 2, 3, 4, 5, 6, 7" in message and "no PNG written" in message
    assert not list((run / "samples" / "ddim-5-noclip").glob("*.png"))
    assert not records.exists() or not records.read_text().strip()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_denoise_stops_at_the_first_non_finite_step(sampler):
    """Report 4 (DDPM/DDIM path): NaN from the UNet at its 3rd call stops denoise there, naming the step."""
    scheduler = sampling_scheduler(build_scheduler(DiffusionConfig()), sampler)
    unet = Recorder(nan_from=3)
    with pytest.raises(NonFiniteSampleError, match=r"t=940 \(step 3 of 50\).*2 of 2 images") as err:
        denoise(unet, scheduler, [7, 8], 50)
    assert len(unet.calls) == 3 and err.value.rows == [0, 1]


def test_repaint_stops_at_the_first_non_finite_step():
    """Report 4 (RePaint path): the inpainting sampler stops at the first NaN step, naming the rows."""
    from core.inpaint import repaint

    config = build_scheduler(DiffusionConfig()).config
    unet = Recorder(nan_from=2)
    with pytest.raises(NonFiniteSampleError, match="RePaint step") as err:
        repaint(unet, config, torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), [0, 1], steps=10, jump_length=2,
                jump_n_sample=2)
    assert len(unet.calls) == 2 and err.value.rows == [0, 1]


def test_discrete_sampler_stops_at_non_finite_logits_with_a_clear_error():
    """Report 4 (discrete path): NaN logits reached torch.multinomial's raw 'probability tensor contains inf, nan'."""
    from core.discrete import MaskReplaceDiffusion

    def denoiser(x, t):
        logits = torch.zeros(len(x), 4, *x.shape[1:])
        logits[1] = float("nan")
        return logits

    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    with pytest.raises(NonFiniteSampleError, match="logits at t=9.*1 of 2 images") as err:
        MaskReplaceDiffusion(4, 10).sample(denoiser, (2, 4, 4), gens)
    assert err.value.rows == [1]


def test_latent_decode_to_non_finite_images_writes_no_png(tmp_path):
    """Report 4 (latent path): a finite UNet and a decoder giving NaN stop before any PNG, naming the pipeline."""
    from core.config import ModelConfig
    from core.models import Autoencoder, build_unet
    from core.sample import sample_pipeline
    from core.train import export_pipeline
    from experiments.smoke import make_random_autoencoder

    vae = Autoencoder(str(make_random_autoencoder(tmp_path / "vae", 1)))
    torch.nn.init.constant_(vae.model.decoder.conv_out.bias, float("nan"))
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(block_out_channels=(8, 8), norm_num_groups=4), 4, vae.latent_channels)
    pipe = export_pipeline(unet, None, sampling_scheduler(build_scheduler(DiffusionConfig()), "ddpm"),
                           tmp_path / "pipeline", vae, step=1)
    out = tmp_path / "samples"
    with pytest.raises(NonFiniteSampleError, match=r"sampling .*pipeline into .*samples stopped: .*autoencoder's "
                                                   r"decoding.*seed\(s\) 3, 4"):
        sample_pipeline(pipe, out, [3, 4], "ddim", 5)
    assert not list(out.glob("*.png"))


def test_non_finite_weights_are_never_checkpointed_exported_or_called_intact(tmp_path, monkeypatch):
    """Report 4: weights that turned non-finite with a finite loss were checkpointed, and the loss guard then called
    that checkpoint "intact"; EMA weights that are not finite were exported."""
    from diffusers.training_utils import EMAModel

    from core.config import ModelConfig
    from core.models import build_unet
    from core.train import NonFiniteWeightsError, export_pipeline, list_checkpoints, train

    real_step, steps = torch.optim.AdamW.step, []

    def poisoned(self, *args, **kwargs):  # the second update leaves one weight tensor NaN (an overflow in it)
        out = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 2:
            self.param_groups[0]["params"][0].data.fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned)
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        train(tiny_config("train.steps=4", "train.checkpoint_every=1"), run)
    message = str(err.value)
    assert isinstance(err.value, NonFiniteWeightsError) and "after step 2" in message
    assert "checkpoint-2 was not written" in message
    assert f"the last checkpoint, {run / 'checkpoints' / 'checkpoint-1'}, is intact" in message
    assert [s for s, _ in list_checkpoints(run)] == [1]
    assert all(checkpoint_weights_finite(p) for _, p in list_checkpoints(run))
    assert not (run / "pipeline").exists()
    monkeypatch.undo()

    unet = build_unet(ModelConfig(block_out_channels=(8, 8), norm_num_groups=4), 8, 1)
    ema = EMAModel(unet.parameters())
    ema.shadow_params[0].fill_(float("inf"))
    with pytest.raises(NonFiniteWeightsError, match=r"refusing to export .*export: the \(EMA\) weights of checkpoint 7 are not finite"):
        export_pipeline(unet, ema, sampling_scheduler(build_scheduler(DiffusionConfig()), "ddpm"), tmp_path / "export",
                        step=7)
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------- 5. damaged checkpoints


def test_resume_skips_a_damaged_checkpoint_and_rotation_keeps_the_intact_one(tmp_path, capsys):
    """Report 5: checkpoint-4's model.safetensors cut to half its size blocked resume with a raw
    'SafetensorError: Error while deserializing header', naming neither checkpoint-4 nor the intact checkpoint-2."""
    from core.runlog import read_jsonl
    from core.train import CheckpointError, list_checkpoints, train

    base = ["train.steps=6", "train.checkpoint_every=2"]
    run = tmp_path / "run"
    train(tiny_config(*base), run, stop_after=4)
    first = {r["step"]: r["loss"] for r in read_jsonl(run / "stats.jsonl")}
    both = tmp_path / "both"
    shutil.copytree(run, both)
    weights = run / "checkpoints" / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()

    # Keep one checkpoint, every step: the damaged (newer) checkpoint-4 must not outrank the new checkpoint-3.
    keep_one = tiny_config(*base, "train.checkpoint_every=1", "train.checkpoints_total_limit=1")
    train(keep_one, run, allow_config_change=True, stop_after=1)
    log = capsys.readouterr().out
    assert f"skipped {run / 'checkpoints' / 'checkpoint-4'} (SafetensorError: Error while deserializing header" in log
    assert f"resumed from {run / 'checkpoints' / 'checkpoint-2'} (step 2)" in log
    assert [s for s, _ in list_checkpoints(run)] == [3]
    assert checkpoint_weights_finite(run / "checkpoints" / "checkpoint-3")
    assert (run / "checkpoints" / "damaged-checkpoint-4").is_dir()  # kept for inspection, never listed
    train(keep_one, run, allow_config_change=True)
    resumed = {r["step"]: r["loss"] for r in read_jsonl(run / "stats.jsonl")}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    assert [resumed[s] for s in (1, 2, 3, 4)] == [first[s] for s in (1, 2, 3, 4)]  # exact resume from checkpoint-2
    assert json.loads((run / "pipeline" / "provenance.json").read_text())["checkpoint"] == 6

    # None loads: one line naming every checkpoint and why; nothing trained, moved or deleted.
    for name, file in (("checkpoint-4", "model.safetensors"), ("checkpoint-2", "optimizer.bin")):
        path = both / "checkpoints" / name / file
        path.write_bytes(path.read_bytes()[:100])
    before = (both / "stats.jsonl").read_bytes()
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(*base), both)
    message = str(err.value)
    assert "\n" not in message and "checkpoint-4 (SafetensorError" in message and "checkpoint-2 (" in message
    assert [s for s, _ in list_checkpoints(both)] == [2, 4] and (both / "stats.jsonl").read_bytes() == before


def test_checkpoint_files_are_fsynced_before_the_marker_and_rename_with_one_mode(tmp_path, monkeypatch):
    """Report 5: a crash could leave a complete-looking checkpoint half written (nothing fsynced before the done
    marker and the rename), and model.safetensors was written 0600 beside 0644 files."""
    from core.train import DONE_MARKER, train

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run = tmp_path / "run"
    train(tiny_config("train.steps=2", "train.checkpoint_every=2"), run)
    monkeypatch.undo()
    tmp, final = run / "checkpoints" / "tmp-checkpoint-2", run / "checkpoints" / "checkpoint-2"
    rename = events.index(("replace", str(tmp), str(final)))
    synced = {e[1] for e in events[:rename] if e[0] == "fsync"}
    files = {str(tmp / p.relative_to(final)) for p in final.rglob("*")}
    assert str(tmp / DONE_MARKER) in files
    assert files | {str(tmp)} <= synced, sorted(files - synced)
    marker_synced = events.index(("fsync", str(tmp / DONE_MARKER)))
    assert all(events.index(("fsync", f)) < marker_synced for f in files if not f.endswith(DONE_MARKER))
    assert ("fsync", str(run / "checkpoints")) in events[rename:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in final.iterdir()}
    assert len(set(modes.values())) == 1, modes
    assert len({p.stat().st_mode & 0o777 for p in (run / "pipeline").rglob("*") if p.is_file()}) == 1


# ---------------------------------------------------------------- 9. sampler settings honoured or refused


def visited(cfg: DiffusionConfig) -> list[int]:
    """The timesteps ``denoise`` calls the UNet at for ``cfg``'s sampler."""
    scheduler = sampling_scheduler(build_scheduler(cfg), cfg.sampler, cfg.clip_sample, cfg.timestep_spacing,
                                   cfg.steps_offset)
    unet = Recorder()
    denoise(unet, scheduler, [0], cfg.sampling_steps, eta=cfg.eta)
    return unet.calls


def test_presets_visit_their_sources_timesteps():
    """Report 9: the paper's LDM-4 presets sampled diffusers' default 995, ..., 0 where LDM's DDIM visits 996, ..., 1
    (SPEC section 6); the mini presets keep what their committed results were drawn with, under the same names."""
    from experiments.scaling import DDPM_250
    from experiments.unconditional import PRESETS

    for preset in PRESETS:
        d = preset.run_config(0).diffusion
        if preset.scale == "paper" and "celebahq" in preset.name:  # 500 steps (LDM Table 1), 200 as a second block
            assert visited(d) == list(range(999, 0, -2)), preset.name  # 999, 997, ..., 1: 500 steps
            assert sampler_name(d) == "ddim-500-offset1-noclip"
            second = DiffusionConfig(**{**vars(d), **preset.extra_samplers[0]})
            assert visited(second) == list(range(996, 0, -5)) and sampler_name(second) == "ddim-200-offset1-noclip"
        elif preset.scale == "paper":
            assert visited(d) == list(range(996, 0, -5)), preset.name  # 996, 991, ..., 1: 200 steps
            assert sampler_name(d).startswith("ddim-200-") and "-offset1-" in sampler_name(d)
        else:
            assert visited(d) == list(range(980, -1, -20)), preset.name  # 980, 960, ..., 0
            assert sampler_name(d) == "ddim-50-noclip"
    d = DiffusionConfig(**DDPM_250)  # the scaling experiment's primary sampler
    assert visited(d) == list(range(996, -1, -4)) and sampler_name(d) == "ddpm-250-noclip"


def test_one_step_ddim_is_refused_before_compute_or_honoured_with_trailing_spacing():
    """Report 9: diffusion.sampling_steps=1 with DDIM passed validation and returned the initial noise (its only
    timestep was 0)."""
    from core.train import SAMPLING_KEYS, training_config

    with pytest.raises(ConfigError, match=r"diffusion.sampling_steps=1 .*timestep 0, starting in the lower half.*"
                                          r"trailing"):
        RunConfig.from_dict({"diffusion": {"sampling_steps": 1}})
    with pytest.raises(ConfigError, match="outside the schedule's 0..999"):  # t = 1000 would index past the table
        RunConfig.from_dict({"diffusion": {"sampler": "ddpm", "sampling_steps": 1000, "steps_offset": 1}})
    with pytest.raises(ConfigError, match="steps_offset=1 is applied with timestep_spacing='leading' only"):
        RunConfig.from_dict({"diffusion": {"timestep_spacing": "trailing", "steps_offset": 1}})
    unet = Recorder()
    with pytest.raises(ValueError, match="timestep 0"):  # the sampler itself, e.g. from the command line
        denoise(unet, sampling_scheduler(build_scheduler(DiffusionConfig()), "ddim"), [0], 1)
    assert unet.calls == []
    one = RunConfig.from_dict({"diffusion": {"sampling_steps": 1, "timestep_spacing": "trailing"}}).diffusion
    assert visited(one) == [999] and sampler_name(one) == "ddim-1-trailing-noclip"
    scheduler = sampling_scheduler(build_scheduler(one), "ddim", None, "trailing")
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    out = denoise(Recorder(), scheduler, [0], 1)
    assert out.abs().max() < 1e-3 < noise.abs().max()  # the data (all zeros), not the initial noise
    # Sampling keys: a finished run samples under another spacing; the trained model's identity is unchanged.
    assert {"diffusion.timestep_spacing", "diffusion.steps_offset"} <= set(SAMPLING_KEYS)
    assert not {"diffusion.timestep_spacing", "diffusion.steps_offset"} & set(training_config(RunConfig()))
