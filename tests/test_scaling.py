"""The scaling experiment: continued runs equal straight ones; the trend test against a hand computation."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.config import RunConfig, apply_overrides
from tests.conftest import TINY


def cfg(steps: int) -> RunConfig:
    return RunConfig.from_dict(apply_overrides({"name": "run"}, TINY + [
        f"train.steps={steps}", "train.checkpoint_every=2", "context.enabled=true", "diffusion.sampling_steps=2"]))


def weights(run_dir):
    return load_file(run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_a_continued_run_is_the_run_trained_straight(tmp_path):
    """The 5,000- and 12,500-step cells continue shorter runs: the same weights as training straight there."""
    from core.runlog import read_jsonl
    from core.train import train
    from experiments.runs import continue_from

    straight, short, longer = tmp_path / "straight", tmp_path / "short", tmp_path / "longer"
    train(cfg(6), straight)
    train(cfg(4), short)
    continue_from(short, longer, 4)
    train(cfg(6), longer)
    a, b = weights(straight), weights(longer)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_jsonl(longer / "stats.jsonl")] == list(range(1, 7))
    assert [r["loss"] for r in read_jsonl(longer / "stats.jsonl")] == [r["loss"] for r in read_jsonl(straight / "stats.jsonl")]
    with pytest.raises(FileNotFoundError, match="no complete checkpoint at step 3"):
        continue_from(short, tmp_path / "other", 3)


def test_scaling_presets_differ_only_where_named():
    from core.train import training_config
    from experiments.scaling import PRESETS, preset_name
    from experiments.unconditional import PRESETS as UNCONDITIONAL

    mini = {p.name: p for p in UNCONDITIONAL}["mini-digits16-conprediff"].run_config(0)
    by_name = {p.name: p for p in PRESETS}
    grid = by_name[preset_name(32, 2000, "conprediff")].run_config(0)
    diff = {k for k, v in training_config(grid).items() if training_config(mini).get(k) != v}
    assert diff == set(), diff  # the mini-width 2,000-step cell trains the unconditional mini row's model
    assert grid.diffusion.sampler == "ddpm" and grid.diffusion.sampling_steps == 250 and not grid.diffusion.clip_sample
    assert by_name[preset_name(32, 12500, "baseline")].continues == preset_name(32, 5000, "baseline")
    assert by_name[preset_name(64, 2000, "baseline")].run_config(0).model.block_out_channels == (64, 128, 128)
    assert len(PRESETS) == 20 and sum(p.scale == "mini" for p in PRESETS) == 10
    # one table cell per (width, budget, arm): eval.tables pools by benchmark, method and steps
    cells = {(p.benchmark, p.method, p.extra["steps"]) for p in PRESETS}
    assert len(cells) == 20


def test_the_gpu_grid_is_the_mini_gpu_row_scaled():
    """The mini-gpu grid's width-64, 1,500-step cell trains the unconditional mini-gpu row's model (sampled with
    DDPM-250); its budgets continue each other; its widths change the channels only."""
    from core.train import training_config
    from experiments.scaling import GPU_GRID, PRESETS, preset_name
    from experiments.scaling.report import effective_ema_decay, unet_parameters
    from experiments.unconditional import PRESETS as UNCONDITIONAL

    row = {p.name: p for p in UNCONDITIONAL}["mini-gpu-digits32-baseline"].run_config(0)
    by_name = {p.name: p for p in PRESETS}
    cell = by_name[preset_name(64, 1500, "baseline", GPU_GRID)]
    assert cell.scale == "mini-gpu" and cell.benchmark == "digits32/c64"
    assert {k for k, v in training_config(cell.run_config(0)).items() if training_config(row).get(k) != v} == set()
    assert cell.run_config(0).diffusion.sampling_steps == 250
    assert by_name[preset_name(64, 9375, "conprediff", GPU_GRID)].continues == preset_name(64, 3750, "conprediff",
                                                                                           GPU_GRID)
    wide = by_name[preset_name(128, 1500, "baseline", GPU_GRID)].run_config(0)
    assert wide.model.block_out_channels == (128, 256, 256) and wide.model.layers_per_block == 2
    assert wide.data.resolution == 32 and wide.train.batch_size == 128
    assert unet_parameters(64, GPU_GRID) == 6_072_065  # the mini-gpu row's 6.07 M (RESULTS.md)
    # diffusers' EMA warm-up, as the table's header states it: (n) / (9 + n) at the n-th update, capped at 0.999
    assert effective_ema_decay(0.999, 2000) == pytest.approx(2000 / 2009) and effective_ema_decay(0.999, 12500) == 0.999

def test_trend_is_the_t_test_of_per_seed_slopes():
    """Against a hand computation: slopes by the normal equations, t = mean / (sd / sqrt(n))."""
    from scipy import stats

    from experiments.scaling.report import trend

    gaps = {0: {2000: 3.0, 5000: 1.0, 12500: 0.5}, 1: {2000: 2.0, 5000: 1.5, 12500: 0.2},
            2: {2000: 4.0, 5000: 0.5, 12500: 0.9}, 3: {2000: 1.0}}  # seed 3 lacks points: left out
    t = trend(gaps)
    assert t.seeds == (0, 1, 2)
    x = np.log2([2000, 5000, 12500])
    slopes = []
    for s in (0, 1, 2):
        y = np.array([gaps[s][k] for k in (2000, 5000, 12500)])
        slopes.append(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    mean, se = np.mean(slopes), np.std(slopes, ddof=1) / math.sqrt(3)
    assert t.slope == pytest.approx(mean)
    assert t.p == pytest.approx(2 * stats.t.sf(abs(mean / se), df=2))
    assert t.ci_low == pytest.approx(mean - stats.t.ppf(0.975, 2) * se)
    assert t.points == (2000, 5000, 12500)
    assert math.isnan(trend({0: {1: 1.0, 2: 2.0}}).p)  # one seed: no test


def test_trend_waits_for_a_grid_point_still_being_measured():
    """A point that fewer seeds have (a cell in progress) is left out of the trend, not the seeds without it: width 64
    with seed 0 alone emptied the width trend (n/a) that widths 16 and 32 gave with three seeds."""
    from experiments.scaling.report import trend

    gaps = {0: {1: 3.0, 4: 1.0, 16: 0.5}, 1: {1: 2.0, 4: 1.5}, 2: {1: 4.0, 4: 0.5}}
    t = trend(gaps)
    assert (t.points, t.seeds) == ((1, 4), (0, 1, 2))
    slopes = [(gaps[s][4] - gaps[s][1]) / 2 for s in (0, 1, 2)]  # log2(4) - log2(1) = 2
    assert t.slope == pytest.approx(np.mean(slopes))
    gaps[1][16], gaps[2][16] = 0.4, 0.9  # the point complete: every seed's slope uses all three
    assert trend(gaps).points == (1, 4, 16)


def test_report_renders_from_records(tmp_path):
    """Synthetic records of two seeds at every cell: the table pairs them and the trends are computed."""
    import json

    from experiments.scaling import PRESETS
    from experiments.scaling.report import write

    recs = []
    for p in PRESETS:
        for seed in (0, 1):
            for sampler in ("ddpm-250-noclip", "ddim-50-noclip"):
                value = 2.0 + (1.0 + 0.2 * seed if p.method == "conprediff" else 0.0) * 2000 / p.extra["steps"] + 0.1 * seed
                recs.append(dict(experiment="scaling", benchmark=p.benchmark, method=p.method, scale="mini",
                                 preset=p.name, seed=seed, metric="fd_digits", value=value, n_samples=1000,
                                 checkpoint=p.extra["steps"], ema=True, sampler=sampler, reference="r", backend="b",
                                 git_commit="x", time="t", train_config_sha256="a", weights_sha256="b", overrides={}))
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    table, fig, gpu_table, gpu_fig = write(path, tmp_path)  # the mini-gpu grid has records too: its own table
    from eval.tables import write_tables

    write_tables(path, tmp_path / "all-tables")  # the other tables and the verdicts list take these records too
    assert "| scaling | mini | ddpm-250-noclip, 12,500, 1,000 | digits16/c32 | conprediff | baseline |" in (
        tmp_path / "all-tables" / "verdicts.md").read_text()
    text = table.read_text()
    assert "| fd_digits ↓ | 32 | 12,500 | 2.05 ± 0.071 | 2.226 ± 0.093 | +0.176 [" in text
    assert fig.exists() and fig.stat().st_size > 10_000
    # the gap falls with the budget: a negative slope per doubling on both axes' fd_digits rows
    assert "Trend along steps" in text and "| fd_digits | -0.3495 [-0.7532, 0.05421] | 0.058 |" in text
    assert "digits32" not in text and gpu_table.name == "scaling-mini-gpu.md" and gpu_fig.exists()
    gpu = gpu_table.read_text()
    assert "(32x32 digits, mini-gpu)" in gpu and "effective decay 0.994 at 1,500 steps, 0.9976 at 3,750, 0.999 at 9,375" in gpu
    assert "| fd_digits ↓ | 64 | 9,375 |" in gpu and "| fd_digits ↓ | 128 | 1,500 |" in gpu and "12,500" not in gpu


def test_the_figure_draws_a_one_seed_grid_point_without_a_ci():
    """A budget measured on one seed so far (12,500 steps, seed 0) is drawn, with n = 1 and no CI or SD, instead of
    vanishing from the gap panel while the level panel shows it (the figure used to drop gaps of fewer than 2 seeds)."""
    from experiments.scaling.report import PRIMARY, points_along

    v = {(PRIMARY, "fd_digits", 32, steps, method): {s: 1.0 + s + (0.5 + 0.1 * s) * (method == "conprediff")
                                                      for s in seeds}
         for steps, seeds in ((2000, (0, 1, 2)), (5000, (0, 1, 2)), (12500, (0,)))
         for method in ("baseline", "conprediff")}
    drawn = points_along(v, "fd_digits", "steps", {})
    assert [(x, n) for x, *_, n in drawn["gap"]] == [(2000, 3), (5000, 3), (12500, 1)]
    x, gap, low, high, _ = drawn["gap"][2]
    assert gap == pytest.approx(0.5) and math.isnan(low) and math.isnan(high)
    assert not math.isnan(drawn["gap"][0][2])
    assert drawn["baseline"][2][:2] == (12500, 1.0) and math.isnan(drawn["baseline"][2][2])
    assert drawn["baseline"][0][2] == pytest.approx(1.0)  # SD of 1, 2, 3
    v[(PRIMARY, "fd_digits", 32, 12500, "baseline")][1] = 100.0  # a seed one arm has yet: not in the gap
    assert points_along(v, "fd_digits", "steps", {})["gap"][2][1] == pytest.approx(0.5)
    width = points_along(v, "fd_digits", "width", {16: 1, 32: 2, 64: 4})  # x: the given parameter counts
    assert [(x, n) for x, *_, n in width["gap"]] == [(2, 3)] and width["gap"][0][1:] == drawn["gap"][0][1:]


def test_the_committed_scaling_table_is_regenerated_from_the_committed_records(tmp_path):
    from eval.records import RECORDS, ROOT
    from experiments.scaling.report import TABLE, write

    committed = ROOT / "tables" / TABLE
    if not committed.exists():
        pytest.skip("no scaling records committed yet (tables/scaling.md is written when they are)")
    table, _ = write(RECORDS, tmp_path)
    assert table.read_text() == committed.read_text(), "run python -m experiments.scaling.report"


def test_the_table_says_whether_a_continued_run_continues_the_recorded_one(tmp_path):
    """A 5,000-step run whose 2,000-step run was retrained (its folder gone) continues the recorded run only if the
    retrain repeats it: the table compares the two logged loss curves up to 2,000 steps."""
    import json

    from experiments.scaling import preset_name
    from experiments.scaling.report import continuations, write

    curves = tmp_path / "results" / "curves" / "scaling"
    curves.mkdir(parents=True)
    loss = {k: 1.0 / k for k in range(50, 2001, 50)}

    def curve(name: str, seed: int, rows: dict) -> None:
        (curves / f"{name}-s{seed}.jsonl").write_text("".join(json.dumps({"step": k, "loss": v}) + "\n"
                                                              for k, v in rows.items()))

    for seed, factor in ((0, 1.0), (1, 1 + 3e-7), (2, 1.5)):  # the same run, float rounding, another draw
        curve(preset_name(32, 2000, "baseline"), seed, loss)
        curve(preset_name(32, 5000, "baseline"), seed, {**{k: v * factor for k, v in loss.items()}, 2050: 9.0})
    curve(preset_name(32, 12500, "baseline"), 3, loss)  # its 5,000-step run is not here: not compared
    got = {c.seed: c for c in continuations(curves)}
    assert set(got) == {0, 1, 2} and all(c.compared == 40 and c.shorter == 2000 for c in got.values())
    assert got[0].max_rel_diff == 0 and got[1].max_rel_diff == pytest.approx(3e-7) and got[2].max_rel_diff == pytest.approx(0.5)
    rec = dict(experiment="scaling", benchmark="digits16/c32", method="baseline", scale="mini",
               preset=preset_name(32, 2000, "baseline"), seed=0, metric="fd_digits", value=1.0, n_samples=1000,
               checkpoint=2000, ema=True, sampler="ddpm-250-noclip", reference="r", backend="b", git_commit="x",
               time="t", overrides={})
    (tmp_path / "records.jsonl").write_text(json.dumps(rec) + "\n")
    table, _ = write(tmp_path / "records.jsonl", tmp_path)
    assert "| baseline | 1 | 5,000 | 2,000 | 40 | 3e-07 |" in table.read_text()


def test_a_continued_run_says_when_the_run_it_continues_is_retrained(tmp_path):
    """Measured and gone: a 5,000-step run is skipped; one whose 2,000-step source is measured and gone is trained
    (after its source) with a line saying so; a folder holding the step's checkpoint counts as present."""
    import json

    from experiments.evaluate import measured_models_gone
    from experiments.scaling import PRESETS, preset_name

    by_name = {p.name: p for p in PRESETS}
    short, longer = by_name[preset_name(32, 2000, "baseline")], by_name[preset_name(32, 5000, "baseline")]
    rec = dict(experiment="scaling", scale="mini", sampler="ddpm-250-noclip", metric="fd_digits", value=1.0,
               benchmark="digits16/c32", method="baseline", n_samples=1000, ema=True, reference="r", backend="b",
               git_commit="x", time="t")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(dict(rec, preset=p.name, seed=s, checkpoint=p.extra["steps"])) + "\n"
                               for p, s in ((short, 0), (short, 1), (longer, 1))))
    tasks = [(longer, 0), (longer, 1)]
    configs = {(p.name, s): p.run_config(s) for p, s in tasks}
    skip, notes = measured_models_gone("scaling", tasks, configs, "mini", records, tmp_path / "runs",
                                       {short.name: 2000})
    assert list(skip) == [(longer.name, 1)] and "supersede" in skip[longer.name, 1]
    assert len(notes) == 1 and notes[0].startswith(f"{longer.name} seed 0: continues {short.name} seed 0")
    ckpt = tmp_path / "runs" / f"{short.name}-s0" / "checkpoints" / "checkpoint-2000"
    ckpt.mkdir(parents=True)
    from core.train import DONE_MARKER

    (ckpt / DONE_MARKER).touch()
    assert measured_models_gone("scaling", tasks, configs, "mini", records, tmp_path / "runs", {short.name: 2000})[1] == []


def test_the_report_writes_beside_the_records_it_reads(tmp_path):
    """A look at another records file (a device call's output) writes its grids' tables beside it, never the committed
    ones; a grid without records gets no table; a mistyped path is an error, not an empty grid."""
    import json

    from experiments.scaling import GPU_GRID, preset_name
    from experiments.scaling.report import main, write

    rec = dict(experiment="scaling", benchmark="digits32/c64", method="baseline", scale="mini-gpu",
               preset=preset_name(64, 1500, "baseline", GPU_GRID), seed=0, metric="fd_digits", value=1.0,
               n_samples=1000, checkpoint=1500, ema=True, sampler="ddpm-250-noclip", reference="r", backend="b",
               git_commit="x", time="t", overrides={})
    records = tmp_path / "out" / "records.jsonl"
    records.parent.mkdir()
    records.write_text(json.dumps(rec) + "\n")
    written = write(records)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "out/tables/scaling-mini-gpu.md", "out/figures/scaling-mini-gpu.png"]
    with pytest.raises(FileNotFoundError, match="no such records file"):
        write(tmp_path / "typo.jsonl")
    with pytest.raises(SystemExit):
        main(["--records", str(tmp_path / "typo.jsonl")])
