"""The context decoder's matrix products, forward and backward, timed one by one (core/context.py).

    python benchmarks/decoder_bmm.py --device cuda --size ldm4 --dtype bf16   # the LDM-4 CelebA-HQ step's shapes
    python benchmarks/decoder_bmm.py --size small --threads 1                 # a CPU size, seconds

``ContextDecoder`` at ``N`` points, ``S`` strides, ``Q`` samples: the heads ``(N, F) @ (F, 2 S L)``, then per
``StrideLinear`` layer ``(S, M, a) @ (S, a, b)`` with ``M = N Q`` rows (``L -> H -> H -> D``). Autograd runs, per
layer, the forward product, the input gradient ``(S, M, b) @ (S, b, a)`` and the weight gradient
``(S, a, M) @ (S, M, b)``, which reduces over all ``M`` rows into a small ``a x b`` output (at the LDM-4 config
``M`` = 48 x 64 x 64 x 8 = 1,572,864). Each row of the table times one product (median of ``--repeats`` after
``--warmup``) with its TFLOP/s and GB/s (operands read once, output written once).

Candidates for the weight gradient: ``split-C`` cuts the reduction into C chunks, ``(S C, a, M / C) @
(S C, M / C, b)`` then a sum over C (a hand-made split-K, more blocks for the GPU when the output is tiny); each is
checked against autograd's weight gradient (fp32 reference, relative error printed) before it is timed; it is
``core.context.weight_grad_split``, which ``StrideLinear.weight_grad_chunks`` switches on.
``--sizes`` take ``ldm4`` (batch 48, 64 x 64 latents, F = 224, S = 3, Q = 8, L = 32, H = 64, D = 3, the preset
``paper-celebahq256-conprediff``), ``small`` (batch 2, 16 x 16) or ``N:F:S:Q:L:H:D``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core.context import weight_grad_split  # noqa: E402

SIZES = {"ldm4": (48 * 64 * 64, 224, 3, 8, 32, 64, 3), "small": (2 * 16 * 16, 32, 3, 8, 32, 64, 3)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPLITS = (8, 64)


def parse_size(text: str) -> tuple[int, ...]:
    if text in SIZES:
        return SIZES[text]
    parts = text.split(":")
    if len(parts) != 7 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(SIZES)} or N:F:S:Q:L:H:D (positive integers)")
    return tuple(int(p) for p in parts)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, device: str, repeats: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def products(size: tuple[int, ...], device: str, dtype: torch.dtype):
    """``[(name, shape text, flops, bytes, fn)]`` for every product of the decoder's forward and backward, and the
    weight-gradient candidates with their relative error against autograd's."""
    n, f, s, q, lat, hid, d = size
    m = n * q
    gen = torch.Generator(device=device).manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen, device=device, dtype=dtype)  # noqa: E731
    esize = torch.finfo(dtype).bits // 8
    rows = []
    feats, heads_w = rand(n, f), rand(f, 2 * s * lat)
    grad_heads = rand(n, 2 * s * lat)
    rows += [
        ("heads forward", f"({n}, {f}) @ ({f}, {2 * s * lat})", 2 * n * f * 2 * s * lat,
         (n * f + f * 2 * s * lat + n * 2 * s * lat) * esize, lambda: feats @ heads_w),
        ("heads input grad", f"({n}, {2 * s * lat}) @ ({2 * s * lat}, {f})", 2 * n * f * 2 * s * lat,
         (n * f + f * 2 * s * lat + n * 2 * s * lat) * esize, lambda: grad_heads @ heads_w.t()),
        ("heads weight grad", f"({f}, {n}) @ ({n}, {2 * s * lat})", 2 * n * f * 2 * s * lat,
         (n * f + f * 2 * s * lat + n * 2 * s * lat) * esize, lambda: feats.t() @ grad_heads),
    ]
    checks = []
    for i, (a, b) in enumerate(zip([lat, hid, hid], [hid, hid, d])):
        x, w, g = rand(s, m, a), rand(s, a, b), rand(s, m, b)
        flops, nbytes = 2 * s * m * a * b, (s * m * a + s * a * b + s * m * b) * esize
        rows += [
            (f"layer {i} forward", f"({s}, {m}, {a}) @ ({s}, {a}, {b})", flops, nbytes,
             lambda x=x, w=w: torch.bmm(x, w)),
            (f"layer {i} input grad", f"({s}, {m}, {b}) @ ({s}, {b}, {a})", flops, nbytes,
             lambda g=g, w=w: torch.bmm(g, w.transpose(1, 2))),
            (f"layer {i} weight grad", f"({s}, {a}, {m}) @ ({s}, {m}, {b})", flops, nbytes,
             lambda x=x, g=g: torch.bmm(x.transpose(1, 2), g)),
        ]
        ref = torch.bmm(x.float().transpose(1, 2), g.float())
        for c in SPLITS:
            err = ((weight_grad_split(x, g, c).float() - ref).norm() / ref.norm()).item()
            base = ((torch.bmm(x.transpose(1, 2), g).float() - ref).norm() / ref.norm()).item()
            checks.append((i, c, err, base))
            rows.append((f"layer {i} weight grad, split-{c}", f"{s * c} x ({a}, {m // c}) @ ({m // c}, {b}) + sum",
                         flops, nbytes, lambda x=x, g=g, c=c: weight_grad_split(x, g, c)))
    return rows, checks


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default=None, help="comma-separated: ldm4, small or N:F:S:Q:L:H:D "
                        "(default: ldm4 on CUDA, small on CPU)")
    parser.add_argument("--dtype", default=None, choices=DTYPES, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    sizes = [parse_size(t) for t in (args.sizes or ("ldm4" if cuda else "small")).split(",")]
    where = torch.cuda.get_device_name(args.device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    lines, out = [], []
    for size in sizes:
        n, f, s, q, lat, hid, d = size
        rows, checks = products(size, args.device, dtype)
        lines += [f"## decoder products: N = {n} points, F = {f}, S = {s}, Q = {q}, L = {lat}, H = {hid}, D = {d}; "
                  f"{str(dtype).removeprefix('torch.')}, {where}, median of {args.repeats} after {args.warmup}", "",
                  "| product | shape | ms | TFLOP/s | GB/s |", "|---|---|---|---|---|"]
        for name, shape, flops, nbytes, fn in rows:
            sec = timed(fn, args.device, args.repeats, args.warmup)
            out.append({"size": size, "product": name, "shape": shape, "ms": sec * 1e3})
            lines.append(f"| {name} | {shape} | {sec * 1e3:.3f} | {flops / sec / 1e12:.2f} | "
                         f"{nbytes / sec / 1e9:.1f} |")
        lines += ["", "weight-gradient candidates against fp32 autograd (relative Frobenius error; autograd's own "
                  "in this dtype beside it): " + ", ".join(f"layer {i} split-{c} {e:.1e} ({b:.1e})"
                                                       for i, c, e, b in checks), ""]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)
    return out


if __name__ == "__main__":
    main()
