"""Paper scale without GPUs or downloads: presets equal to the cited baselines' configs, weights loaded the way
diffusers users pass them (tiny models saved locally), offline errors, and the preflight that stops a paper run
before any training, naming every missing input."""

import importlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from core.config import ConfigError, DiffusionConfig, ModelConfig, RunConfig
from core.hub import WeightsUnavailableError, is_hub_id
from core.models import Autoencoder, build_scheduler, build_unet, sampler_name
from experiments.registry import EXPERIMENTS as REGISTRY
from tests.conftest import ROOT, TINY
from tests.test_train import ENV, run_train, stats

LDM4 = {  # CompVis configs/latent-diffusion/{celebahq,ffhq}-ldm-vq-4.yaml + README (SPEC section 5)
    "paper-celebahq256-ldm4-baseline": dict(batch=48, eta=0.0),
    "paper-celebahq256-conprediff": dict(batch=48, eta=0.0),
    "paper-ffhq256-ldm4-baseline": dict(batch=42, eta=1.0),
    "paper-ffhq256-conprediff": dict(batch=42, eta=1.0),
}
# every experiment with paper-scale presets (experiments.registry)
EXPERIMENTS = [name for name, e in REGISTRY.items() if "paper" in e.scales]


def attention_modules(unet):
    from diffusers.models.attention_processor import Attention

    return [m for m in unet.modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("name", sorted(LDM4))
def test_ldm4_presets_equal_compvis_configs(name):
    from experiments.unconditional import PRESETS

    cfg = {p.name: p for p in PRESETS}[name].run_config(0)
    want = LDM4[name]
    # Betas: CompVis make_beta_schedule("linear"), linspace(sqrt(linear_start), sqrt(linear_end), T)**2, in float64.
    compvis = torch.linspace(0.0015**0.5, 0.0195**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(build_scheduler(cfg.diffusion).betas.double(), compvis, rtol=1e-6, atol=0)
    # UNet 224 x (1,2,3,4), 2 res blocks, attention at latent 32/16/8 (levels 1-3 of 64) and mid, 32 channels per head.
    m = cfg.model
    assert m.block_out_channels == (224, 448, 672, 896) and m.layers_per_block == 2
    assert [64 // 2**i for i, a in enumerate(m.attention) if a] == [32, 16, 8] and m.mid_attention
    with torch.device("meta"):
        unet = build_unet(m, 64, 3)
    attn = attention_modules(unet)
    assert len(attn) == 3 * 2 + 3 * 3 + 1  # down: 2 per level, up: 3 per level, mid: 1
    assert {a.inner_dim // a.heads for a in attn} == {32}
    assert sorted({a.heads for a in attn}) == [448 // 32, 672 // 32, 896 // 32]
    # Batch, lr = 2e-6 x batch, constant, AdamW defaults, no clipping; VQ-f4 pinned, latents unscaled.
    t = cfg.train
    assert (t.batch_size, t.lr, t.warmup_steps, t.weight_decay, t.max_grad_norm) == (
        want["batch"], pytest.approx(2e-6 * want["batch"]), 0, 0.01, 0.0)
    assert (m.vae, m.vae_subfolder, m.latent_scale) == ("CompVis/ldm-celebahq-256", "vqvae", 1.0)
    assert len(m.vae_revision) == 40 and int(m.vae_revision, 16) >= 0
    # Sampling: DDIM with eta 0 (CelebA-HQ) / 1 (FFHQ), named in the records' sampler; CelebA-HQ with 500 steps as
    # LDM's Table 1 labels its 5.11 ("500-s") and 200 (CompVis's README) as a second block, FFHQ with 200 ("200-s").
    d = cfg.diffusion
    steps = 500 if "celebahq" in name else 200
    assert (d.sampler, d.sampling_steps, d.eta) == ("ddim", steps, want["eta"])
    assert {p.name: p for p in PRESETS}[name].extra_samplers == (({"sampling_steps": 200},) if steps == 500 else ())
    # LDM's DDIM timesteps (200 steps: 996, 991, ..., 1; leading spacing, offset 1; SPEC section 6), in the sampler.
    assert (d.timestep_spacing, d.steps_offset) == ("leading", 1)
    assert sampler_name(d) == (f"ddim-{steps}-eta1-offset1-noclip" if want["eta"] else f"ddim-{steps}-offset1-noclip")


def test_head_semantics_of_both_unet_classes():
    """UNet2DModel's attention_head_dim is a head width; UNet2DConditionModel's is a head count (diffusers #2011)."""
    with torch.device("meta"):
        cond = build_unet(ModelConfig(block_out_channels=(32, 64), attention=(True, True), norm_num_groups=8,
                                      cross_attention_dim=16, text_encoder="x", head_channels=None, num_heads=8), 8, 4)
        width = build_unet(ModelConfig(block_out_channels=(32, 64), attention=(True, True), norm_num_groups=8,
                                       cross_attention_dim=16, text_encoder="x", head_channels=16), 8, 4)
    assert {a.heads for a in attention_modules(cond)} == {8}
    assert {a.inner_dim // a.heads for a in attention_modules(width)} == {16}
    t2i = importlib.import_module("experiments.text_to_image").PRESETS[-1].run_config(0)
    assert t2i.model.num_heads == 8 and t2i.model.text_encoder_revision and len(t2i.model.text_encoder_revision) == 40
    assert torch.allclose(build_scheduler(t2i.diffusion).betas.double(),
                          torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2, rtol=1e-6)
    with pytest.raises(ConfigError, match="head_channels"):
        ModelConfig(block_out_channels=(32, 48), attention=(False, True), head_channels=32).validate()
    with pytest.raises(ConfigError, match="only for the cross-attention UNet"):
        ModelConfig(head_channels=None, num_heads=4).validate()
    with pytest.raises(ConfigError, match="eta"):
        DiffusionConfig(sampler="ddpm", eta=1.0).validate()


def test_ddim_eta_reaches_the_scheduler_and_stays_per_seed():
    from core.models import sampling_scheduler
    from core.sample import denoise

    class ZeroEps(torch.nn.Module):
        config = type("C", (), {"in_channels": 1, "sample_size": 4})()

        def forward(self, x, t):
            return type("O", (), {"sample": torch.zeros_like(x)})()

    ddim = sampling_scheduler(build_scheduler(DiffusionConfig()), "ddim")
    still, noisy = denoise(ZeroEps(), ddim, [0, 1], 5), denoise(ZeroEps(), ddim, [0, 1], 5, eta=1.0)
    assert not torch.allclose(still, noisy)
    assert torch.allclose(denoise(ZeroEps(), ddim, [1], 5, eta=1.0)[0], noisy[1])  # image 1 depends on seed 1 only


def test_global_batch_not_divisible_by_processes_gives_the_one_process_run(tmp_path):
    """FFHQ's 42 on 8 GPUs, in small: batch 5 on 2 processes (3 + 2), each mean weighted by its share."""
    from core.config import apply_overrides
    from core.train import process_shares, train

    assert process_shares(RunConfig.from_dict({"train": {"batch_size": 42}}), 8) == [6, 6, 5, 5, 5, 5, 5, 5]
    overrides = TINY + ["train.batch_size=5", "train.steps=2", "train.checkpoint_every=2", "data.num_examples=16"]
    one, two = tmp_path / "one", tmp_path / "two"
    train(RunConfig.from_dict(apply_overrides({}, overrides)), one)  # in-process: one process
    ENV["ACCELERATE_USE_CPU"] = "1"
    try:
        run_train(two, overrides, launcher=("torchrun", "--nproc_per_node", "2", "--master_port", "29541"))
    finally:
        ENV.pop("ACCELERATE_USE_CPU")
    assert "global batch 5 = 3+2 x 1" in (two / "log.txt").read_text()
    for r1, r2 in zip(stats(one), stats(two), strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4)
        assert r2["point_loss"] == pytest.approx(r1["point_loss"], rel=1e-4)


# ---------------------------------------------------------------------------- weights: hub id or folder


def tiny_clip(tmp_path, full: bool):
    """A random CLIP (full two-tower CLIPModel, or its text tower) and a CLIP tokenizer, saved by transformers."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    if full:
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=8, patch_size=4),
            projection_dim=16))
    else:
        model = CLIPTextModel(CLIPTextConfig(**text))
    folder = tmp_path / ("clip-full" if full else "clip-text")
    model.save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)
    return folder, model


@pytest.mark.parametrize("full", [True, False], ids=["CLIPModel", "CLIPTextModel"])
def test_clip_checkpoints_load_as_the_text_encoder(tmp_path, full):
    """A full CLIPModel folder (openai/clip-vit-large-patch14's layout) crashed AutoModel ('CLIPConfig' has no
    hidden_size); both layouts load as CLIPTextModel with the trained text weights and CLIP's 77 tokens."""
    from core.text import TextEncoder

    folder, saved = tiny_clip(tmp_path, full)
    enc = TextEncoder(str(folder))
    assert type(enc.model).__name__ == "CLIPTextModel" and enc.dim == 32 and enc.max_length == 77
    def token_embedding(model):
        return next(v for k, v in model.state_dict().items() if k.endswith("token_embedding.weight"))

    assert torch.equal(token_embedding(enc.model), token_embedding(saved))  # the saved weights, not a fresh init
    states = enc.encode(["a cat", "", "a cat"])
    assert states.shape == (3, 77, 32) and torch.equal(states[0], states[2]) and not torch.equal(states[0], states[1])


def test_autoencoder_from_a_folder_with_subfolder_and_latent_scale(tmp_path):
    from diffusers import VQModel

    VQModel(block_out_channels=(8,), norm_num_groups=4, latent_channels=3, num_vq_embeddings=16,
            down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).save_pretrained(tmp_path / "repo" / "vqvae")
    default = Autoencoder(str(tmp_path / "repo"), subfolder="vqvae")
    assert default.is_vq and default.scale == pytest.approx(0.18215)  # diffusers' fill-in for a missing value
    ldm = Autoencoder(str(tmp_path / "repo"), subfolder="vqvae", scale=1.0)
    assert ldm.scale == 1.0 and ldm.model.config.scaling_factor == 1.0  # an exported vae/ keeps it
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(ldm.encode(x), default.encode(x) / 0.18215, atol=1e-5)


def test_offline_hub_ids_and_missing_folders_fail_fast_naming_the_fix(tmp_path, monkeypatch):
    from core.text import TextEncoder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert is_hub_id("CompVis/ldm-celebahq-256") and not is_hub_id("data/weights/ldm-vq-f4") and not is_hub_id("./a/b")
    t0 = time.time()
    with pytest.raises(WeightsUnavailableError) as vae:
        Autoencoder("conprediff-tests/no-such-vae", revision="0" * 40, subfolder="vqvae")
    with pytest.raises(WeightsUnavailableError) as text:
        TextEncoder("conprediff-tests/no-such-clip", revision="1" * 40)
    assert time.time() - t0 < 10
    for err, name in ((vae, "no-such-vae"), (text, "no-such-clip")):
        msg = str(err.value)
        assert f"conprediff-tests/{name}" in msg and "HF_HUB_OFFLINE=1" in msg and "hf download" in msg
        assert f"data/weights/{name}" in msg
    assert "--include 'vqvae/*'" in str(vae.value) and "revision " + "0" * 40 in str(vae.value)
    with pytest.raises(WeightsUnavailableError, match="no config.json in .*missing-folder"):
        Autoencoder(str(tmp_path / "missing-folder"))


# ---------------------------------------------------------------------------- preflight


@pytest.fixture
def bare_machine(tmp_path, monkeypatch):
    """No prepared data (cwd without data/), no metric weights, no FID statistics, offline."""
    import eval.fid_ref

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("CONPREDIFF_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))
    monkeypatch.setattr(eval.fid_ref, "REF_DIR", tmp_path / "fid_refs")
    return tmp_path


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_paper_preset_stops_before_training_naming_every_missing_input(experiment, bare_machine, monkeypatch,
                                                                             capsys):
    from experiments import runner, runs

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runs, "train", no_training)
    module = importlib.import_module(f"experiments.{experiment}")
    paper = [p for p in module.PRESETS if p.scale == "paper"]
    with pytest.raises(SystemExit) as stop:
        runner.main(experiment, module.PRESETS, module.__doc__, ["--scale", "paper", "--seeds", "0",
                                                                  "--runs-dir", str(bare_machine / "runs")])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "nothing was trained" in out and not (bare_machine / "runs").exists()
    for preset in paper:
        cfg = preset.run_config(0)
        assert preset.name in out and f"dataset {cfg.data.source!r}" in out
        if cfg.data.source.startswith("data/"):
            assert "python -m experiments.data" in out
        if cfg.backbone == "latent":
            assert f"autoencoder {cfg.model.vae}" in out
        if cfg.model.text_encoder:
            assert f"text encoder {cfg.model.text_encoder}" in out
    if experiment == "inpainting":
        assert "held-out test images" in out and "alexnet-owt-7be5be79.pth" in out
    else:
        assert "inception-2015-12-05.pt" in out and "python -m eval.fid_ref" in out
    if experiment == "text_to_image":
        assert "evaluation prompts data/coco2014val_30k.jsonl" in out


def test_the_preflight_report_is_printed_once_under_a_multi_process_launch(bare_machine, monkeypatch, capsys):
    """`accelerate launch --num_processes 8` runs the command 8 times: only rank 0 prints the report (it was printed
    8 times), every rank stops with status 1; with --check the report does not tell the user to add --check."""
    from experiments import runner
    from experiments.unconditional import PRESETS

    argv = ["--scale", "paper", "--presets", "paper-celebahq256-ldm4-baseline", "--runs-dir", str(bare_machine / "runs")]
    for rank, check in (("1", []), ("0", []), ("0", ["--check"])):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as stop:
            runner.main("unconditional", PRESETS, "", argv + check)
        out = capsys.readouterr().out
        assert stop.value.code == 1
        assert ("preflight:" in out) == (rank == "0")
        if rank == "0":
            assert ("add --check" in out) == (not check) and "Provide them and re-run" in out


def test_check_passes_once_every_input_is_there(bare_machine, monkeypatch, capsys):
    """--check with a prepared folder, a local autoencoder, the Inception file and FID statistics: exit 0, no training."""
    from experiments import runner, runs, smoke
    from experiments.unconditional import PRESETS

    for split in ("train", "test"):
        (bare_machine / "data" / "celebahq256" / split).mkdir(parents=True)
        from PIL import Image

        Image.new("RGB", (8, 8)).save(bare_machine / "data" / "celebahq256" / split / "0.png")
    vae = smoke.make_random_autoencoder(bare_machine / "vae", 3)
    (bare_machine / "weights").mkdir()
    # Stand-ins that pass the identity checks: a TorchScript with clean-fid's interface, and torch-fidelity's file
    # with its sha256 read as the prefix its name carries (the real files are not on this machine).
    import eval.metrics

    class FakeInception(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Identity()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.layers(x).mean((1, 2, 3))[:, None].expand(-1, 2048)

    torch.jit.script(FakeInception()).save(str(bare_machine / "weights" / "inception-2015-12-05.pt"))
    (bare_machine / "torch-hub" / "checkpoints").mkdir(parents=True)
    (bare_machine / "torch-hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").write_bytes(b"stub")
    monkeypatch.setattr(eval.metrics, "file_sha256", lambda path: "6726825d" + "0" * 56)
    (bare_machine / "fid_refs").mkdir()
    np.savez(bare_machine / "fid_refs" / "celebahq256.npz", mu=np.zeros(2), sigma=np.eye(2))
    monkeypatch.setattr(runs, "train", lambda *a, **k: (_ for _ in ()).throw(AssertionError("training started")))
    runner.main("unconditional", PRESETS, "", ["--scale", "paper", "--presets", "paper-celebahq256-ldm4-baseline",
                                               "--check", "--set", f"model.vae={vae}", "--set", "model.vae_revision=null",
                                               "--set", "model.vae_subfolder=null"])
    assert "every input of paper-celebahq256-ldm4-baseline is present" in capsys.readouterr().out


def test_done_when_command_exits_nonzero_fast_without_training(tmp_path):
    """The issue's command, as a user types it, on a machine without the inputs."""
    env = {**ENV, "CONPREDIFF_WEIGHTS": str(tmp_path / "weights"), "TORCH_HOME": str(tmp_path / "torch")}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "experiments.unconditional", "--scale", "paper", "--presets",
                           "paper-celebahq256-conprediff", "--seeds", "0", "--runs-dir", str(tmp_path / "runs")],
                          cwd=tmp_path, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60
    assert "dataset 'data/celebahq256'" in proc.stdout and "CompVis/ldm-celebahq-256" in proc.stdout
    assert "inception-2015-12-05.pt" in proc.stdout and not (tmp_path / "runs").exists()


def test_torchfidelity_fid_of_a_folder_against_itself_is_zero(tmp_path):
    """The legacy-Inception FID backend (fid50k_torchfidelity): identical sets give ~0, different sets do not."""
    from pathlib import Path

    from PIL import Image

    from eval.metrics import TF_INCEPTION_FILE, fid_torchfidelity

    if not (Path(torch.hub.get_dir()) / "checkpoints" / TF_INCEPTION_FILE).exists():
        pytest.skip(f"torch-fidelity's Inception weights {TF_INCEPTION_FILE} are not in torch.hub's cache")
    for name, shift in (("a", 0), ("b", 0), ("c", 90)):
        (tmp_path / name).mkdir()
        for i in range(24):
            arr = np.clip(np.random.default_rng(i).integers(0, 160, (64, 64, 3)) + shift, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(tmp_path / name / f"{i}.png")
    assert abs(fid_torchfidelity(tmp_path / "a", tmp_path / "b", "cpu")) < 1e-3
    assert fid_torchfidelity(tmp_path / "a", tmp_path / "c", "cpu") > 1
