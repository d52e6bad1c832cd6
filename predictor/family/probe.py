"""Math accuracy of a family model under each preset, where exact match cannot show it.

The family models are too small to solve `measure`'s arithmetic (exact match 0–2% at the base), so
this probe scores the answers teacher-forced on the family's own held-out problems
(`validation_math`, "Q: ...\\nA: n\\n"): the share of answers whose every token is the top-1
prediction, the share of answer tokens that are, and the answer's mean negative log-likelihood —
graded signals that move long before exact match would. Beside them, the KL divergence from the base
on held-out prose and code windows, so math damage and prose distortion come from one forward pass.

Weights are exactly what llama-quantize would write (our quantizers, the preset's real type mix,
with or without an imatrix); the forward pass is our float32 numpy llama (`LlamaNumpy`), so unlike
llama.cpp it does not quantize activations to 8 bits: these KLDs sit below `measure`'s at Q8_0.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from predictor.family.data import DataConfig, load_corpus, validation_math
from predictor.family.tokenizer import BOS_ID, encode
from predictor.measure.distortion import kl_divergence, log_softmax

PROBE_PRESETS = ("Q8_0", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K")
# With an imatrix: Q2_K again, then the presets past it, where distortion reaches collapse.
PROBE_IMATRIX_PRESETS = ("Q2_K", "IQ2_XXS", "IQ1_S")
N_MATH = 200
N_WINDOWS = 4
WINDOW = 256


def _items(n_math: int) -> list[tuple[list[int], list[int]]]:
    return [([BOS_ID, *encode(f"Q: {q}\nA: ").tolist()], encode(f"{a}\n").tolist())
            for q, a in validation_math()[:n_math]]


def _score(fwd, items, windows: dict[str, np.ndarray]) -> dict:
    """Log-probs of every window token and of every answer position (teacher-forced)."""
    win = {name: [log_softmax(fwd.forward(row[:-1]), np.float64) for row in rows] for name, rows in windows.items()}
    ans = []
    for prompt, answer in items:
        lp = log_softmax(fwd.forward(prompt + answer[:-1]), np.float64)[len(prompt) - 1:]
        ans.append(lp)
    return {"windows": win, "answers": ans}


def _compare(base: dict | None, cur: dict, items) -> dict:
    out: dict = {}
    exact, tok_ok, nll, akld = [], [], [], []
    for i, (_, answer) in enumerate(items):
        lp = cur["answers"][i]
        pred = lp.argmax(axis=-1)
        exact.append(bool(np.all(pred == answer)))
        tok_ok.extend((pred == answer).tolist())
        nll.append(float(-lp[np.arange(len(answer)), answer].mean()))
        if base is not None:
            akld.append(float(kl_divergence(base["answers"][i], lp).mean()))
    out["math_exact_pct"] = 100.0 * float(np.mean(exact))
    out["math_exact_se"] = 100.0 * float(np.std(exact) / np.sqrt(len(exact)))
    out["math_token_acc_pct"] = 100.0 * float(np.mean(tok_ok))
    out["math_answer_nll"] = float(np.mean(nll))
    if base is not None:
        out["kld_math_answers"] = float(np.mean(akld))
        for name, rows in cur["windows"].items():
            out[f"kld_{name}"] = float(np.mean([kl_divergence(b, c).mean() for b, c in zip(base["windows"][name], rows)]))
    return out


def probe_model(gguf_path: str | os.PathLike, *, presets=PROBE_PRESETS, imatrix_path: str | os.PathLike | None = None,
                imatrix_presets=PROBE_IMATRIX_PRESETS, n_math: int = N_MATH, n_windows: int = N_WINDOWS,
                window: int = WINDOW, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Rows: the base, each of `presets` without an imatrix, then (given one) each of
    `imatrix_presets` with it. BLAS runs single-threaded: these matrices are tiny, and threads
    spinning against other jobs made it ~20x slower on a busy 2-core machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _probe(gguf_path, presets, imatrix_path, imatrix_presets, n_math, n_windows, window, progress)


def _probe(gguf_path, presets, imatrix_path, imatrix_presets, n_math, n_windows, window, progress) -> list[dict]:
    from predictor.io.imatrix import read_imatrix
    from predictor.measure.imatrix import LlamaNumpy
    from predictor.measure.writer import open_base_gguf, plan_tensor_types, write_gguf
    from predictor.quant.recipes import get_preset

    base = open_base_gguf(gguf_path)
    items = _items(n_math)
    val = load_corpus(DataConfig()).val_batches(window, n_windows)
    windows = {k: v for k, v in val.items() if k in ("prose", "code")}
    imat = read_imatrix(imatrix_path) if imatrix_path else None
    runs = [(p, False) for p in presets] + ([(p, True) for p in imatrix_presets] if imat is not None else [])
    if progress:
        progress("base")
    base_scores = _score(LlamaNumpy(base), items, windows)
    rows = [{"preset": "base", "imatrix": "no", **_compare(None, base_scores, items)}]
    with tempfile.TemporaryDirectory(prefix="qp-probe-") as tmp:
        for preset, use in runs:
            if progress:
                progress(f"{preset}{' imatrix' if use else ''}")
            types = plan_tensor_types(base, preset, has_imatrix=use)
            path = Path(tmp) / f"{preset}-{int(use)}.gguf"
            written = write_gguf(base, path, types, file_type=get_preset(preset).ftype, imatrix=imat if use else None)
            rows.append({"preset": preset, "imatrix": "yes" if use else "no", "bits_per_weight": written.bits_per_weight,
                         **_compare(base_scores, _score(LlamaNumpy(open_base_gguf(path)), items, windows), items)})
            path.unlink()
    for r in rows:
        r.update(n_math=len(items), n_windows=n_windows, window=window)
    return rows


def write_probe_rows(out_csv: str | os.PathLike, model_id: str, rows: list[dict]) -> None:
    """Put `rows` (of `probe_model`) into OUT_CSV under `model_id`, replacing that model's earlier
    rows and keeping the others; written to a temporary name, then renamed."""
    import polars as pl

    new = pl.DataFrame([{"model": model_id, **r} for r in rows])
    out = Path(out_csv)
    if out.is_file():
        new = pl.concat([pl.read_csv(out).filter(pl.col("model") != model_id), new], how="diagonal_relaxed")
    tmp = out.with_name(out.name + ".part")
    new.write_csv(tmp)
    tmp.replace(out)
