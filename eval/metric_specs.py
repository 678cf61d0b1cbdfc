"""The metrics records carry, one spec each: name, direction, and what a record of it names as its backend.

:data:`METRICS` is the one list that evaluation (``experiments.evaluate``, ``experiments.inpainting.evaluate``), the
tables (arrows and verdicts: :func:`higher_is_better`), the scaling report and ``eval.context_stats.record_beside``
read. How each is computed lives with its backend (:mod:`eval.metrics`, :mod:`eval.context_stats`,
:mod:`eval.protocols`); the spec says which.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib.metadata import version


@dataclass(frozen=True)
class MetricSpec:
    """A metric, or a family of them (``pattern``, fnmatch: ``fid*_cleanfid`` is ``fid50k_cleanfid``, ...).

    ``higher_is_better``: its direction (tables' arrows, verdicts' better/worse). ``computed_by``: the function
    that measures it. ``backend``: the record's ``backend`` text from the measurement's context (keyword arguments,
    e.g. ``resolution``), or None where the function that measures it writes its own (the paper protocols, whose
    text names their weights' files).
    """

    pattern: str
    higher_is_better: bool
    computed_by: str
    backend: Callable[..., str] | None = None


def _digits(resolution: int, **_) -> str:
    return f"digits classifier r{resolution} + clean-fid {version('clean-fid')} + torch-fidelity {version('torch-fidelity')}"


def _context(after_run: bool = False, **_) -> str:
    return (f"eval.context_stats (dilated rings, sorted sets) + clean-fid {version('clean-fid')} frechet_distance"
            + ("; measured after the run from its sample folder" if after_run else ""))


def _fixed(text: str) -> Callable[..., str]:
    return lambda **_: text


METRICS: tuple[MetricSpec, ...] = (
    # Mini scale, the digits proxies (eval.metrics.digits_proxy_metrics).
    MetricSpec("fd_digits", False, "eval.metrics.digits_proxy_metrics", _digits),
    MetricSpec("kid_digits", False, "eval.metrics.digits_proxy_metrics", _digits),
    MetricSpec("precision_digits", True, "eval.metrics.digits_proxy_metrics", _digits),
    MetricSpec("recall_digits", True, "eval.metrics.digits_proxy_metrics", _digits),
    MetricSpec("confident_digits", True, "eval.metrics.digits_proxy_metrics", _digits),
    MetricSpec("prompt_acc", True, "eval.metrics.digits_proxy_metrics", _digits),
    # The mechanism metric: neighbourhood statistics of the samples against the training images.
    MetricSpec("fd_context_s*", False, "eval.context_stats.fd_context", _context),
    # Cost, its own Holm family in the tables.
    MetricSpec("step_time_s", False, "experiments.evaluate.median_step_time", _fixed(
        "median of stats.jsonl step_time over the second half of training (wall clock, this machine)")),
    # Inpainting (experiments.inpainting.evaluate).
    MetricSpec("mse_hole", False, "eval.metrics.masked_mse", _fixed("numpy, pixels in [-1, 1], hole region only")),
    MetricSpec("psnr_hole", True, "eval.metrics.psnr", _fixed("numpy, pixels in [-1, 1], hole region only")),
    MetricSpec("percep_digits", False, "eval.metrics.perceptual_distance_digits",
               _fixed("digits classifier conv maps (LPIPS-style proxy)")),
    MetricSpec("lpips_alex", False, "eval.metrics.lpips_alex"),
    # Paper scale (eval.protocols: the record names the package and its weights).
    MetricSpec("fid*", False, "eval.protocols.record_unconditional"),
    MetricSpec("precision_k*", True, "eval.protocols.record_unconditional"),
    MetricSpec("recall_k*", True, "eval.protocols.record_unconditional"),
    # Older names, kept for the records that carry them.
    MetricSpec("acc*", True, "(older records)"),
    MetricSpec("prompt_acc*", True, "(older records)"),
    MetricSpec("precision*", True, "(older records)"),
    MetricSpec("recall*", True, "(older records)"),
    MetricSpec("psnr*", True, "(older records)"),
    MetricSpec("confident*", True, "(older records)"),
)


def metric_spec(metric: str) -> MetricSpec | None:
    """The first spec of :data:`METRICS` whose pattern matches ``metric``, or None."""
    return next((s for s in METRICS if fnmatchcase(metric, s.pattern)), None)


def higher_is_better(metric: str) -> bool:
    """The metric's direction; a metric no spec knows is lower-is-better (a distance or a cost)."""
    spec = metric_spec(metric)
    return spec is not None and spec.higher_is_better


def backend(metric: str, **context) -> str:
    """The ``backend`` text a record of ``metric`` carries, from the measurement's ``context`` (e.g.
    ``resolution=16`` for the digits proxies, ``after_run=True`` for a context statistic measured later). Raises
    KeyError for a metric without a spec or whose records write their own backend."""
    spec = metric_spec(metric)
    if spec is None or spec.backend is None:
        raise KeyError(f"{metric}: no backend text in eval.metric_specs.METRICS (its protocol writes its own)")
    return spec.backend(**context)
