"""Old against new for each change of issue 30, in one process, the variants alternated; then a profile.

    python benchmarks/context_ab.py --device cuda --markdown benchmarks/gpu/context_ab.md \\
        --profile benchmarks/gpu/context_profile.md                            # LDM-4 CelebA-HQ shapes, bf16
    TRITON_INTERPRET=1 python benchmarks/context_ab.py --device cpu --dry-run  # tiny shapes, seconds (tests)

Sections (each a Markdown table; median of ``--repeats`` rounds after ``--warmup``, one call of every variant per
round, so load changes hit all alike):

1. **exact W2**: ``w2_exact`` with the torch subset DP (``method="dp"``, ~110 kernels) against the fused Triton
   kernel (``method="fused"``, core/w2_kernel.py) on the context term's sets: ``B H W S`` sets of ``K = 8`` predicted
   and target points with the validity mask of ``gather_neighbors`` (strides 1, 2, 3). Agreement printed beside:
   the share of identical matchings and the largest W2^2 difference.
2. **noise**: the decoder's draws ``(S, B n, Q, L)`` in the autocast dtype, ``randn_per_image`` as it was at commit
   8b395ff (one new CUDA generator per image, an fp32 stack, then a cast) against today's; bitwise agreement printed.
3. **context term**: ``ContextPrediction`` forward and backward at the preset's shapes (features ``(B, F, H, W)``,
   targets ``(B, D, H, W)``): old (DP, old noise), new (fused W2, new noise), new with the split weight gradient
   (``StrideLinear.weight_grad_chunks``); each variant's loss printed (old and new are the same function of the
   same draws). On a CPU the context term's W2 stays SciPy's, so only the noise differs there.
4. **training step** of ``paper-celebahq256-conprediff`` at batch 48 (the UNet too): its baseline, the context
   term old and new (benchmarks/overhead.py's ``step_times``, variants alternated step by step).
5. ``--profile``: one profiled call of the context term per variant (after the timed ones), the top kernels by self
   device time (self CPU time on a CPU).

``--dry-run`` shrinks everything (batch 2, 8 x 8, F = 8) to check the code path on a CPU; its numbers mean nothing.
Without CUDA and without ``TRITON_INTERPRET=1`` the fused kernel's variants are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import core.objective as objective  # noqa: E402
import core.wasserstein as wasserstein  # noqa: E402
from core.config import ContextConfig  # noqa: E402
from core.context import StrideLinear  # noqa: E402
from core.neighborhood import gather_neighbors  # noqa: E402
from core.w2_kernel import assignment_fused, interpreting, triton_available  # noqa: E402

SHAPES = {"ldm4": {"batch": 48, "features": 224, "size": 64, "channels": 3},  # paper-celebahq256-conprediff
          "dry": {"batch": 2, "features": 8, "size": 8, "channels": 3}}
SPLIT_CHUNKS = 64


def randn_per_image_before(gens, shape, device, dtype=torch.float32, dim=0):
    """``core.objective.randn_per_image`` at commit 8b395ff (the reference of the noise section), fp32 then cast as
    the objective did."""
    device = torch.device(device)
    if device.type == "cuda" and all(g.device.type == "cpu" for g in gens):
        seeds = [int(torch.randint(0, 2**62, (1,), generator=g)) for g in gens]
        gens = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    out = torch.stack([torch.randn(*shape, generator=g, device=g.device, dtype=torch.float32) for g in gens], dim)
    return out.to(device).to(dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def alternate(variants: dict, device: str, repeats: int, warmup: int) -> dict[str, tuple[float, object]]:
    """``{name: (median seconds, last result)}`` of ``variants = {name: fn}``, one call of each per round."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    last: dict[str, object] = {}
    for i in range(warmup + repeats):
        for name, fn in variants.items():
            sync(device)
            t0 = time.perf_counter()
            last[name] = fn()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(ts), last[name]) for name, ts in times.items()}


@contextlib.contextmanager
def implementation(fused: bool, new_noise: bool, split: int = 0):
    """The context term's code as of before (``False, False``) or after the changes, restored on exit."""
    saved = (wasserstein.FUSED_AUTO, objective.randn_per_image, StrideLinear.weight_grad_chunks)
    wasserstein.FUSED_AUTO = fused
    objective.randn_per_image = saved[1] if new_noise else randn_per_image_before
    StrideLinear.weight_grad_chunks = split
    try:
        yield
    finally:
        wasserstein.FUSED_AUTO, objective.randn_per_image, StrideLinear.weight_grad_chunks = saved


def autocast_for(device: str, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def w2_section(shape: dict, device: str, dtype: torch.dtype, repeats: int, warmup: int, fused: bool) -> list[str]:
    b, size, c = shape["batch"], shape["size"], shape["channels"]
    g = torch.Generator(device=device).manual_seed(0)
    target, valid = gather_neighbors(torch.randn(b, c, size, size, generator=g, device=device), (1, 2, 3))
    s, k = valid.shape[-2:]
    target = target.reshape(-1, k, c)
    valid = valid.expand(b, size, size, s, k).reshape(-1, k)
    pred = torch.randn(target.shape, generator=g, device=device).to(dtype)  # the decoder's output under autocast
    variants = {"torch subset DP (method='dp')": lambda: wasserstein.w2_exact(pred, target, valid, method="dp")}
    if fused:
        variants["fused Triton kernel (method='fused')"] = lambda: wasserstein.w2_exact(pred, target, valid,
                                                                                        method="fused")
    res = alternate(variants, device, repeats, warmup)
    lines = [f"## exact W2: {len(target):,} sets of K = {k}, D = {c}, pred {str(dtype).removeprefix('torch.')}, "
             f"target float32, gather_neighbors' mask (strides 1, 2, 3); {device}", "",
             "| solver | ms | agreement with the DP |", "|---|---|---|"]
    ref = res["torch subset DP (method='dp')"][1]
    for name, (sec, w) in res.items():
        agree = "reference"
        if w is not ref:
            cost = wasserstein._masked_cost(wasserstein.pairwise_sq_dists(pred, target), valid)
            same = (assignment_fused(pred, target, valid) == wasserstein.assignment_subset_dp(cost)).all(1)
            agree = (f"{same.float().mean().item():.6%} identical matchings, max |W2^2 diff| "
                     f"{(w - ref).abs().max().item():.2e}")
        lines.append(f"| {name} | {sec * 1e3:.2f} | {agree} |")
    return lines + [""]


def noise_section(shape: dict, device: str, dtype: torch.dtype, repeats: int, warmup: int) -> list[str]:
    b, size = shape["batch"], shape["size"]
    ctx = ContextConfig()
    draw = (len(ctx.strides), size * size, 8, ctx.latent_dim)
    gens = lambda: objective.image_generators(0, 1, range(b))  # noqa: E731
    variants = {"before (new generator per image, fp32 stack, cast)":
                lambda: randn_per_image_before(gens(), draw, device, dtype, dim=1),
                "now (one re-seeded generator, drawn in dtype)":
                lambda: objective.randn_per_image(gens(), draw, device, dtype, dim=1)}
    res = alternate(variants, device, repeats, warmup)
    (old_s, old), (new_s, new) = res.values()
    return [f"## noise: {b} images x {draw} in {str(dtype).removeprefix('torch.')}, stacked on dim 1; {device}", "",
            "| variant | ms |", "|---|---|", *(f"| {n} | {s * 1e3:.2f} |" for n, (s, _) in res.items()), "",
            f"bitwise equal: {torch.equal(old, new)}", ""]


def context_variants(fused: bool) -> dict[str, tuple[bool, bool, int]]:
    out = {"old (DP, old noise)": (False, False, 0)}
    if fused:
        out["new (fused W2, new noise)"] = (True, True, 0)
        out[f"new + split weight grad ({SPLIT_CHUNKS})"] = (True, True, SPLIT_CHUNKS)
    else:
        out["new noise (no fused kernel here)"] = (False, True, 0)
    return out


def context_section(shape: dict, device: str, dtype: torch.dtype, repeats: int, warmup: int, fused: bool,
                    profile_rows: int) -> tuple[list[str], list[str]]:
    b, f, size, c = shape["batch"], shape["features"], shape["size"], shape["channels"]
    torch.manual_seed(0)
    module = objective.ContextPrediction(ContextConfig(enabled=True), f, c).to(device)
    feats = torch.randn(b, f, size, size, device=device, requires_grad=True)
    target = torch.randn(b, c, size, size, device=device)
    autocast = autocast_for(device, dtype)

    def call(impl, step=0):
        with implementation(*impl):
            with autocast:
                loss, _ = module(feats, target, objective.image_generators(0, step, range(b)))
            loss.backward()
        module.zero_grad(set_to_none=True)
        feats.grad = None
        return loss.detach()

    variants = context_variants(fused)
    res = alternate({name: (lambda impl=impl: call(impl)) for name, impl in variants.items()}, device, repeats, warmup)
    lines = [f"## context term forward + backward: features ({b}, {f}, {size}, {size}), targets ({b}, {c}, {size}, "
             f"{size}), autocast {str(dtype).removeprefix('torch.')}; {device}", "",
             "| variant | ms | loss |", "|---|---|---|",
             *(f"| {n} | {s * 1e3:.2f} | {loss.item():.6f} |" for n, (s, loss) in res.items()), ""]
    cuda = device.startswith("cuda")
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    prof_lines = [f"# context term profile: features ({b}, {f}, {size}, {size}), {str(dtype).removeprefix('torch.')}, "
                  f"{device}; top {profile_rows} kernels by self {'device' if cuda else 'CPU'} time", ""]
    for name, impl in variants.items():
        with torch.profiler.profile(activities=activities) as prof:
            call(impl, step=1)
            sync(device)
        prof_lines += [f"## {name}", "", prof.key_averages().table(sort_by=sort, row_limit=profile_rows), ""]
    return lines, prof_lines


def step_section(device: str, precision: str, repeats: int, warmup: int, dry: bool, fused: bool) -> list[str]:
    """A whole training step (forward, backward, AdamW) of ``paper-celebahq256-conprediff`` at batch 48 (its
    baseline, the context term old and new), alternated step by step as benchmarks/paper_scale.py times it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import paper_scale
    from overhead import step_times

    group = paper_scale.group_presets(paper_scale.paper_presets(["paper-celebahq256-conprediff"]),
                                      None if dry else "48", dry)[0]
    ctx_cfg = next(v for v in group.variants.values() if v is not None)
    old, new = "conprediff, old context term", f"conprediff, new context term{'' if fused else ' (no fused W2 here)'}"
    variants = {"baseline": None, old: ctx_cfg, new: ctx_cfg}
    wrap = {old: lambda: implementation(False, False), new: lambda: implementation(fused, True)}
    times = step_times(group.cfg.model, group.shape["size"], group.shape["channels"], group.batch, variants, device,
                       repeats, warmup, group.cfg.diffusion, precision=precision, wrap=wrap)
    base = statistics.median(times["baseline"])
    return [f"## training step: {group.shape['size']}x{group.shape['size']}x{group.shape['channels']} "
            f"{group.shape['kind']}, batch {group.batch}, {precision}; {device}", "",
            "| variant | s/step | ratio to baseline |", "|---|---|---|",
            *(f"| {n} | {statistics.median(ts):.4f} | {statistics.median(ts) / base:.3f}x |"
              for n, ts in times.items()),
            ""]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes, one round: the code path on a CPU")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sections", default="w2,noise,context,step",
                        help="comma-separated subset of w2, noise, context, step")
    parser.add_argument("--profile-rows", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--profile", type=Path, help="write the context term's profile here")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        args.repeats, args.warmup = 1, 0
    shape = SHAPES["dry" if args.dry_run else "ldm4"]
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    fused = triton_available() and (args.device.startswith("cuda") or interpreting())
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    dry = " (DRY RUN: tiny shapes, not a measurement)" if args.dry_run else ""
    lines: list[str] = []
    header = [f"# issue 30, old against new: torch {torch.__version__}, {where}, median of {args.repeats} rounds after "
             f"{args.warmup} warm-up, variants alternated{dry}"
             f"{'' if fused else '; fused kernel left out (needs CUDA or TRITON_INTERPRET=1)'}", ""]
    sections = set(args.sections.split(","))

    def emit(more: list[str]) -> None:  # print each section as it is done and keep the file current
        lines.extend(more)
        print("\n".join(more), flush=True)
        if args.markdown:
            args.markdown.parent.mkdir(parents=True, exist_ok=True)
            args.markdown.write_text("\n".join(lines) + "\n")

    emit(header)
    if "w2" in sections:
        emit(w2_section(shape, args.device, dtype, args.repeats, args.warmup, fused))
    if "noise" in sections:
        emit(noise_section(shape, args.device, dtype, args.repeats, args.warmup))
    if "context" in sections:
        more, prof_lines = context_section(shape, args.device, dtype, args.repeats, args.warmup, fused,
                                           args.profile_rows)
        if args.profile:
            args.profile.parent.mkdir(parents=True, exist_ok=True)
            args.profile.write_text("\n".join(prof_lines) + "\n")
        emit(more)
    if "step" in sections:
        try:  # the UNet needs diffusers (carried as a wheel on the GPU machine: gpu_session.sh)
            emit(step_section(args.device, args.precision, args.repeats, args.warmup, args.dry_run, fused))
        except ImportError as e:
            emit([f"## training step: skipped ({e})", ""])
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
