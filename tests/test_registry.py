"""One registry of experiments (STYLE.md "Layers and registries"): an experiment declares its own table and figure,
and adding one is its package; eval names none."""

import json
import textwrap
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TOY_TABLE = """\
title: A toy experiment (not in the paper)
comparisons:
  - [variant-b, variant-a]
borrowed:
  - source: unconditional
    methods: {conprediff: conprediff}
figure:
  file: toy.png
  title: Toy variants
  order: [variant-b, variant-a]
"""


def toy_package(root: Path, package: str) -> Path:
    """``root/package/toy``: an experiment package as a new one would be written (PRESETS, TABLE, table.yaml)."""
    toy = root / package / "toy"
    toy.mkdir(parents=True)
    (root / package / "__init__.py").write_text("")
    (toy / "table.yaml").write_text(TOY_TABLE)
    (toy / "__init__.py").write_text(textwrap.dedent('''\
        """A toy experiment: two variants against the unconditional baseline."""
        from pathlib import Path

        from eval.tables import read_table_spec
        from experiments.presets import Preset
        from experiments.presets import MINI, merge

        PRESETS = [Preset(f"mini-digits16-{m}", "mini", m, "digits16", merge(MINI, context={"enabled": True}))
                   for m in ("variant-a", "variant-b")]
        TABLE = read_table_spec(Path(__file__).with_name("table.yaml"))
        '''))
    return root / package


def toy_records(path: Path) -> Path:
    base = json.loads((FIXTURES / "records.jsonl").read_text().splitlines()[0])
    recs = [dict(base, experiment=e, method=m, seed=s, value=v + s * d)
            for e, m, v, d in (("unconditional", "baseline", 10.0, 0.5), ("unconditional", "conprediff", 9.0, 0.4),
                               ("toy", "baseline", 10.0, 0.5), ("toy", "variant-a", 12.0, 0.3),
                               ("toy", "variant-b", 8.0, 0.6)) for s in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_a_registered_toy_experiment_gets_its_table_and_figure(tmp_path, monkeypatch):
    from eval.figures import write_figures
    from eval.tables import main, write_tables
    from experiments.registry import discover, table_specs

    folder = toy_package(tmp_path, "toy_experiments")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = discover("toy_experiments")
    assert list(registry) == ["toy"] and [p.method for p in registry["toy"].presets] == ["variant-a", "variant-b"]
    specs = {**table_specs(registry)}
    records = toy_records(tmp_path / "records.jsonl")

    written = {p.name: p for p in write_tables(records, tmp_path / "tables", specs=specs)}
    assert set(written) == {"toy.md", "toy.csv", "verdicts.md"}
    md = written["toy.md"].read_text()
    assert md.startswith("# A toy experiment (not in the paper)\n")
    # its own comparison (variant-b vs variant-a) besides each variant vs the baseline, and the borrowed row
    assert "| digits16 | fd_digits ↓ | variant-b | variant-a |" in md
    assert "Rows conprediff are the `unconditional` table's records" in md
    assert "| digits16 | conprediff | fd_digits ↓ |" in md
    made, _ = write_figures(records, tmp_path / "figures", specs=specs)
    assert tmp_path / "figures" / "toy.png" in made

    # `python -m eval.tables` reads the same table.yaml as data, importing nothing of the package
    main(["--records", str(records), "--out", str(tmp_path / "cli"), "--specs", str(folder)])
    assert (tmp_path / "cli" / "toy.md").read_text() == md


def test_the_registry_and_eval_read_the_same_specs():
    """Each experiment's TABLE is its table.yaml, which is what `python -m eval.tables` reads on its own."""
    from eval.tables import table_specs as from_files
    from experiments.registry import EXPERIMENTS, table_specs

    assert table_specs() == from_files()
    assert set(table_specs()) == {name for name, e in EXPERIMENTS.items() if e.table is not None}
    assert "data" not in EXPERIMENTS  # a helper package, no PRESETS


def test_a_table_spec_refuses_unknown_keys(tmp_path):
    from eval.tables import TableError, read_table_spec

    (tmp_path / "x").mkdir()
    path = tmp_path / "x" / "table.yaml"
    path.write_text("title: t\nextra_comparisons: []\n")
    with pytest.raises(TableError, match="extra_comparisons"):
        read_table_spec(path)
    path.write_text("title: t\nborrowed:\n  - {source: y, method: {a: b}}\n")
    with pytest.raises(TableError, match="table.yaml"):
        read_table_spec(path)
    path.write_text("title: t\nfigure: {file: x.png, title: t, kind: pie}\n")
    with pytest.raises(TableError, match="pie"):
        read_table_spec(path)


def test_one_metric_spec_per_recorded_metric_with_the_old_directions_and_backends():
    """eval.metric_specs.METRICS is the one list tables, evaluation and record_beside read: every metric in a
    committed records file has a spec, each direction is the one the tables' prefix rule gave, and the backend texts
    are the ones records were written with."""
    from importlib.metadata import version

    from eval.metric_specs import backend, higher_is_better, metric_spec
    from eval.records import ROOT

    def prefix_rule(metric):  # the tables' rule before the specs
        return any(metric.startswith(p) or metric.split("_")[0] == p
                   for p in ("acc", "prompt_acc", "precision", "recall", "psnr", "confident"))

    recorded = {json.loads(line)["metric"] for path in [*(ROOT / "results").rglob("records.jsonl"),
                                                       FIXTURES / "records.jsonl"]
                for line in path.read_text().splitlines() if line.strip()}
    others = {"fid50k_cleanfid", "fid30k_torchfidelity", "precision_k3_torchfidelity", "recall_k3_torchfidelity",
              "lpips_alex", "accuracy", "prompt_acc_top1", "made_up_distance"}
    assert all(metric_spec(m) is not None for m in recorded), sorted(m for m in recorded if metric_spec(m) is None)
    for m in recorded | others:
        assert higher_is_better(m) == prefix_rule(m), m
    clean, fidelity = version("clean-fid"), version("torch-fidelity")
    assert backend("fd_digits", resolution=16) == f"digits classifier r16 + clean-fid {clean} + torch-fidelity {fidelity}"
    assert backend("step_time_s") == ("median of stats.jsonl step_time over the second half of training "
                                      "(wall clock, this machine)")
    context = f"eval.context_stats (dilated rings, sorted sets) + clean-fid {clean} frechet_distance"
    assert backend("fd_context_s123") == context
    assert backend("fd_context_s123", after_run=True) == context + "; measured after the run from its sample folder"
    assert backend("psnr_hole") == backend("mse_hole") == "numpy, pixels in [-1, 1], hole region only"
    assert backend("percep_digits") == "digits classifier conv maps (LPIPS-style proxy)"
    with pytest.raises(KeyError):
        backend("fid50k_cleanfid")
