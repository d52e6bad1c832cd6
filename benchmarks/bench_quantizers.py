"""Throughput of our quantizers, side by side with gguf.quants on the types both support.

    python benchmarks/bench_quantizers.py [--rows 1024] [--cols 4096] [--repeat 3]

Prints M weights/s for ours (without and with an importance vector) and for gguf.quants, and the
ratio ours / gguf (> 1 means we are faster). Same input matrix, same process, best of --repeat.
"""

from __future__ import annotations

import argparse
import time

import gguf
import gguf.quants
import numpy as np

from predictor import quant
from predictor.errors import UsageError


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--types", nargs="*", default=None)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((args.rows, args.cols), dtype=np.float32) * 0.02).astype(np.float32)
    imatrix = np.exp(rng.standard_normal(args.cols)).astype(np.float32) * 0.05
    n = x.size
    types = args.types or [t for t in quant.supported_types() if t not in ("F32", "F16")]
    print(f"input {args.rows}x{args.cols} float32 ({n / 1e6:.1f}M weights), best of {args.repeat}")
    print(f"{'type':<8} {'ours':>9} {'ours+imat':>10} {'gguf':>9} {'ours/gguf':>10}  (M weights/s)")
    for t in types:
        try:
            ours = n / best_time(lambda: quant.quantize(x, t), args.repeat) / 1e6
        except UsageError:  # IQ2_XXS, IQ2_XS, IQ1_S: ggml requires an imatrix
            ours = None
        ours_i = n / best_time(lambda: quant.quantize(x, t, imatrix=imatrix), args.repeat) / 1e6
        gtype = getattr(gguf.GGMLQuantizationType, t, None)
        g = ratio = None
        if gtype is not None:
            try:
                ref = gguf.quants.quantize(x, gtype)
                same = np.array_equal(ref.view(np.uint8).reshape(args.rows, -1), quant.quantize(x, t))
                g = n / best_time(lambda: gguf.quants.quantize(x, gtype), args.repeat) / 1e6
                ratio = ours / g if ours else None
                if not same:
                    print(f"  note: gguf.quants bytes differ from ours for {t} (gguf has no exact path)")
            except NotImplementedError:
                pass
        gs = f"{g:>9.2f}" if g else f"{'-':>9}"
        rs = f"{ratio:>9.2f}x" if ratio else f"{'-':>10}"
        os_ = f"{ours:>9.2f}" if ours else f"{'-':>9}"
        print(f"{t:<8} {os_} {ours_i:>10.2f} {gs} {rs}")


if __name__ == "__main__":
    main()
