import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ContextConfig, ModelConfig

_spec = importlib.util.spec_from_file_location("overhead", Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py")
overhead = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(overhead)


def test_experiment_variants_are_the_presets_context_terms():
    model, size, channels, batch, diffusion, variants = overhead.experiment_variants("decoding_ablation")
    assert list(variants) == ["baseline", "explicit", "conprediff", "sinkhorn", "sliced"]
    assert variants["baseline"] is None
    assert variants["explicit"].decoder == "explicit" and variants["sinkhorn"].solver == "sinkhorn"
    assert (size, channels, batch) == (16, 1, 64) and model.block_out_channels == (32, 64, 64)
    assert diffusion.beta_schedule == "squaredcos_cap_v2"


def test_step_times_alternate_every_variant():
    model = ModelConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4)
    ctx = ContextConfig(latent_dim=4, hidden_dim=8, depth=1)
    times = overhead.step_times(model, 8, 1, 2, {"baseline": None, "conprediff": ctx}, "cpu", steps=2, warmup=1)
    assert set(times) == {"baseline", "conprediff"}
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in times.values())


def _load(name):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _check_rows(rows):
    for r in rows:
        assert r["baseline_s_per_step"] > 0 and r["s_per_step"] > 0
        assert abs(r["ratio"] - r["s_per_step"] / r["baseline_s_per_step"]) < 1e-9
        assert abs(r["images_per_s"] - r["batch"] / r["s_per_step"]) < 1e-6
        hours = r["s_per_step"] / r["batch"] * r["train_steps"] * r["global_batch"] / 3600
        assert abs(r["gpu_hours"] - hours) < 1e-6 * hours
        if r["variant"] == "baseline":
            assert r["s_per_step"] == r["baseline_s_per_step"]


def test_paper_scale_tiny_times_every_paper_preset(tmp_path):
    import importlib as il

    import torch

    paper_scale = _load("paper_scale")
    threads = torch.get_num_threads()
    try:
        rows = paper_scale.main(["--tiny", "--steps", "1", "--warmup", "0", "--threads", "1", "--json",
                                 str(tmp_path / "r.json"), "--markdown", str(tmp_path / "r.md")])
    finally:
        torch.set_num_threads(threads)
    folders = (Path(__file__).resolve().parents[1] / "experiments").glob("*/__init__.py")
    expected = {(d.parent.name, p.name) for d in folders
                for p in getattr(il.import_module(f"experiments.{d.parent.name}"), "PRESETS", []) if p.scale == "paper"}
    assert {(r["experiment"], r["preset"]) for r in rows} == expected
    _check_rows(rows)
    by_name = {r["preset"]: r for r in rows}
    assert by_name["paper-coco256-conprediff"]["input"].endswith("latents + text 4x32")
    assert by_name["paper-celebahq256-conprediff"]["train_steps"] == 410_000
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["meta"]["tiny"] and len(saved["rows"]) == len(rows)
    assert (tmp_path / "r.md").read_text().count("| paper-") == len(rows)


def test_paper_scale_latent_grids_and_batch_patterns():
    paper_scale = _load("paper_scale")
    from experiments.text_to_image import PRESETS as T2I
    from experiments.unconditional import PRESETS as UNCOND

    celeba = next(p for p in UNCOND if p.name == "paper-celebahq256-conprediff").run_config(0)
    coco = next(p for p in T2I if p.name == "paper-coco256-conprediff").run_config(0)
    assert paper_scale.input_shape(celeba) == {"channels": 3, "size": 64, "text_tokens": 0, "kind": "latents"}
    assert paper_scale.input_shape(coco)["size"] == 32 and paper_scale.input_shape(coco)["text_tokens"] == 77
    assert paper_scale.batch_for("paper-coco256-conprediff", "paper-celebahq256-*=48,paper-coco256-*=32") == 32
    assert paper_scale.batch_for("paper-ffhq256-conprediff", "paper-celebahq256-*=48,paper-coco256-*=32") is None
    assert paper_scale.batch_for("anything", "16") == 16
    with pytest.raises(SystemExit, match="PATTERN=B"):
        paper_scale.batch_for("x", "x=big")


def test_gpu_session_script_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu_session.sh --tiny runs every step of the GPU session on the CPU and writes its outputs."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_session.sh"), "--tiny"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "paper_scale_bf16.json").read_text())["rows"]
    assert {r["preset"] for r in rows} == {"paper-celebahq256-ldm4-baseline", "paper-celebahq256-conprediff",
                                           "paper-coco256-ldm-kl8-baseline", "paper-coco256-conprediff"}
    _check_rows(rows)
    profile = (tmp_path / "profile_bf16.md").read_text()
    assert "| context: W2 solve | - | - | " in profile and "| step: backward |" in profile
    ab = (tmp_path / "context_ab.md").read_text()
    assert "| fused Triton kernel (method='fused') |" in ab and "100.000000% identical matchings" in ab, ab
    assert "bitwise equal: True" in ab and "| conprediff, new context term |" in ab, ab
    losses = {line.split("|")[3] for line in ab.splitlines() if line.startswith(("| old (", "| new ("))}
    assert len(losses) == 1, ab  # old and new context terms: the same loss from the same draws
    assert "## new (fused W2, new noise)" in (tmp_path / "context_profile.md").read_text()
    assert "| layer 2 weight grad, split-64 |" in (tmp_path / "decoder_bmm.md").read_text()
    w2 = (tmp_path / "w2_exact.md").read_text().splitlines()
    jv = [line.split("|") for line in w2 if "w2_exact 'jv'" in line]
    assert [int(c[1]) for c in jv] == [24, 48] and all(float(c[5]) < 1e-5 for c in jv)
