"""The experiments: one registry that the runners, ``eval.tables``, ``eval.figures`` and the tests read.

An experiment is a package of this folder whose ``__init__.py`` exports ``PRESETS`` (its rows, :class:`Preset`) and,
when ``eval.tables`` renders its table, ``TABLE``: the :class:`eval.tables.TableSpec` of its ``table.yaml`` beside it
(title, comparisons, borrowed rows, the paper's baseline row, its bar figure). Adding an experiment is its package
(``PRESETS``, ``TABLE``, ``__main__.py``), its paper numbers (``eval/paper_numbers.csv``) and a README line; nothing
else names it.

Why ``table.yaml`` and not a Python object only: ``eval`` imports nothing from ``experiments`` (core <- eval <-
experiments, ``tests/test_layers.py``), yet ``python -m eval.tables`` and ``python -m eval.figures`` regenerate the
tables and figures on their own; they read the same ``table.yaml`` files as data (:func:`eval.tables.table_specs`),
and the experiments' own code hands its specs in (:func:`table_specs`).

    python -m experiments            # lists the experiments, their presets per scale, their tables and figures
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass

from eval.tables import TableSpec


@dataclass(frozen=True)
class Experiment:
    """One experiment package: ``name`` (records' ``experiment`` field; ``python -m experiments.<name>``), its
    ``presets``, its docstring ``doc``, its ``table`` (None: ``eval.tables`` renders none, e.g. the scaling
    experiment, whose report writes its own) and ``smoke_in_ci``: whether ``tests/test_experiments.py`` runs every
    preset at smoke scale (False where the package says why not: ``SMOKE_IN_CI = False``)."""

    name: str
    presets: list
    doc: str
    table: TableSpec | None = None
    smoke_in_ci: bool = True

    @property
    def scales(self) -> list[str]:
        """The scales its presets cover (smoke aside), in first-preset order."""
        return list(dict.fromkeys(p.scale for p in self.presets))


def discover(package: str = "experiments") -> dict[str, Experiment]:
    """Every subpackage of ``package`` that exports ``PRESETS``, by name (sorted).

    Raises ``ValueError`` when a package's ``TABLE`` is declared for another name than its own (a copied
    ``table.yaml`` loaded from the wrong folder).
    """
    found = {}
    for info in sorted(pkgutil.iter_modules(importlib.import_module(package).__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{package}.{info.name}")
        if not hasattr(module, "PRESETS"):
            continue  # a helper package (experiments.data prepares datasets)
        table = getattr(module, "TABLE", None)
        if table is not None and table.name != info.name:
            raise ValueError(f"{package}.{info.name}.TABLE is table {table.name!r}; its table.yaml must sit in its "
                             "own package folder")
        found[info.name] = Experiment(info.name, list(module.PRESETS), module.__doc__ or "", table,
                                      getattr(module, "SMOKE_IN_CI", True))
    return found


def table_specs(experiments: dict[str, Experiment] | None = None) -> dict[str, TableSpec]:
    """{name: TableSpec} of the experiments that have a table (default: :data:`EXPERIMENTS`), in registry order:
    what :func:`eval.tables.write_tables` and :func:`eval.figures.write_figures` take as ``specs``."""
    experiments = EXPERIMENTS if experiments is None else experiments
    return {name: e.table for name, e in experiments.items() if e.table is not None}


EXPERIMENTS: dict[str, Experiment] = discover()
