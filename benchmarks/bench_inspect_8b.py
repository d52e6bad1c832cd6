"""`inspect` on a generated Llama-3-8B-shaped BF16 model: time, peak memory, sampling accuracy, and
our exact pass side by side with llama.cpp's own quantizer.

    python benchmarks/bench_inspect_8b.py [--dir /tmp/qp_bench] [--skip-llama]

Steps (each printed as it finishes):
1. writes (once) a 32-layer, hidden 4096, FFN 14336, GQA 8/32, vocab 128256 BF16 safetensors model
   (4 shards, ~16 GB) with predictor.fixtures.hf.write_tiny_llama;
2. `quantpredict inspect MODEL --format json` for all standard presets, sampled: wall time and the
   child's peak RSS;
3. the same shapes with 2 layers and vocab 32000 (so an exact pass is affordable): sampled vs
   `--exact` relative RMSE per preset (difference in percent of the exact value);
4. on that 2-layer model, converted to a BF16 GGUF: `llama_cpp.llama_model_quantize` (2 threads) vs
   our exact pass of the same preset (`inspect --exact -p P`), seconds and ratio ours / llama.cpp.
   Needs llama-cpp-python importable by --llama-python (a separate venv is fine).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from predictor.fixtures.hf import write_tiny_llama

SHAPE = dict(hidden=4096, ffn=14336, n_heads=32, n_kv_heads=8)
EXACT_PRESETS = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "Q8_0"]


def run_inspect(model: Path, *extra: str) -> tuple[dict, float, float]:
    """Run the CLI in a child process; return its JSON, wall seconds and peak RSS (GiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "inspect", str(model), "--format", "json", *extra],
        check=True, capture_output=True, text=True,
    )
    wall = time.perf_counter() - t0
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far; report it with that caveat
    return json.loads(out.stdout), wall, max(peak_kib, before) / 1024**2


def ensure_model(folder: Path, n_layers: int, vocab: int) -> Path:
    if (folder / "config.json").exists():
        return folder
    t0 = time.perf_counter()
    write_tiny_llama(folder, n_layers=n_layers, vocab=vocab, dtype="BF16", n_shards=4 if n_layers > 4 else 1,
                     seed=8, **SHAPE)
    print(f"  wrote {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return folder


def write_gguf_copy(model: Path, out: Path) -> Path:
    """BF16 GGUF with llama hparams (all llama_model_quantize reads besides the tensors)."""
    if out.exists():
        return out
    import gguf

    from predictor.io import open_model

    with open_model(model) as r:
        m = r.metadata
        w = gguf.GGUFWriter(str(out), "llama")
        w.add_block_count(m.n_layers)
        w.add_context_length(8192)
        w.add_embedding_length(m.hidden_size)
        w.add_feed_forward_length(m.ffn_size)
        w.add_head_count(m.n_heads)
        w.add_head_count_kv(m.n_kv_heads)
        w.add_rope_dimension_count(m.hidden_size // m.n_heads)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(m.vocab_size)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
        for t in r.tensors:
            x = r.read_tensor(t.name)
            bits = (x.view(np.uint32) >> 16).astype(np.uint16)  # exact: values came from BF16
            if x.ndim == 1:
                w.add_tensor(t.name, x.astype(np.float32))
            else:
                w.add_tensor(t.name, bits, raw_shape=x.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out


LLAMA_SNIPPET = """
import sys, time, llama_cpp
ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
p = llama_cpp.llama_model_quantize_default_params()
p.nthread = 2
p.ftype = ftype
t0 = time.perf_counter()
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p)
print(time.perf_counter() - t0 if rc == 0 else -1)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/qp_bench")
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--skip-llama", action="store_true")
    ap.add_argument("--llama-python", default=sys.executable, help="python that can import llama_cpp")
    ap.add_argument("--exact-presets", nargs="*", default=EXACT_PRESETS)
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} cores", flush=True)

    if not args.skip_8b:
        print("1. generate the 8B-shaped model", flush=True)
        big = ensure_model(root / "llama3-8b-shape", 32, 128256)
        print("2. inspect, all standard presets, sampled", flush=True)
        rep, wall, rss = run_inspect(big)
        n = rep["model"]["n_params"]
        print(f"  {n / 1e9:.2f}B params, {len(rep['presets'])} presets: {wall:.1f} s wall, peak RSS {rss:.2f} GiB")

    print("3. sampled vs exact error on a 2-layer model of the same tensor shapes (vocab 32000)", flush=True)
    small = ensure_model(root / "llama3-8b-shape-2L", 2, 32000)
    sampled, t_s, _ = run_inspect(small, *sum((["-p", p] for p in args.exact_presets), []))
    exact, t_e, rss_e = run_inspect(small, "--exact", *sum((["-p", p] for p in args.exact_presets), []))
    print(f"  sampled {t_s:.1f} s, exact {t_e:.1f} s (peak RSS {rss_e:.2f} GiB)")
    print(f"  {'preset':<8} {'exact':>9} {'sampled':>9} {'±se':>8} {'diff %':>7}")
    for a, b in zip(exact["presets"], sampled["presets"]):
        d = 100 * (b["rel_rmse"] - a["rel_rmse"]) / a["rel_rmse"]
        print(f"  {a['preset']:<8} {a['rel_rmse']:>9.5f} {b['rel_rmse']:>9.5f} {b['rel_rmse_se']:>8.5f} {d:>+7.2f}")

    if args.skip_llama:
        return
    print("4. exact pass vs llama.cpp's quantizer (llama_model_quantize, 2 threads), same 2-layer model", flush=True)
    gg = write_gguf_copy(small, root / "llama3-8b-shape-2L.bf16.gguf")
    print(f"  {'preset':<8} {'llama.cpp s':>11} {'ours s':>8} {'ours/llama':>10}")
    for p in args.exact_presets:
        out = root / f"out-{p}.gguf"
        r = subprocess.run([args.llama_python, "-c", LLAMA_SNIPPET, str(gg), str(out), p],
                           capture_output=True, text=True)
        try:
            t_llama = float(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            print(f"  {p}: llama.cpp failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        out.unlink(missing_ok=True)
        _, t_ours, _ = run_inspect(small, "--exact", "-p", p)
        print(f"  {p:<8} {t_llama:>11.1f} {t_ours:>8.1f} {t_ours / t_llama:>9.2f}x")


if __name__ == "__main__":
    main()
