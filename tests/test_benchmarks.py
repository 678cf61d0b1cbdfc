import importlib.util
from pathlib import Path

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
