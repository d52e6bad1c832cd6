"""One pass of the suite over one model: the base pass stores its log-probabilities, later passes
compare against them.

The base's log-softmax rows of every scored token are kept on disk (float32 .npy, memory-mapped), so
each quantized model is run once and compared window by window; memory holds one window of logits.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from predictor.errors import MismatchError, UsageError
from predictor.measure.distortion import DistortionAccumulator, log_softmax, summarize_tokens, token_stats
from predictor.measure.tasks import Suite, build_arithmetic, build_mc_items, build_sequences

__all__ = ["evaluate_base", "evaluate_quant", "paired_accuracy"]


def _mc_scores(engine, items: list[dict]) -> dict[str, list]:
    pred, pred_norm = [], []
    for it in items:
        ll = []
        for c, rows in zip(it["choices"], engine.score_choices(it["prefix"], it["choices"])):
            lp = log_softmax(rows)
            ll.append(float(lp[np.arange(len(c)), c].astype(np.float64).sum()))
        ll_arr = np.array(ll)
        pred.append(int(ll_arr.argmax()))
        pred_norm.append(int((ll_arr / np.array(it["n_bytes"], dtype=np.float64)).argmax()))
    return {"ids": [it["id"] for it in items], "gold": [it["gold"] for it in items],
            "pred": pred, "pred_norm": pred_norm}


def _arith_scores(engine, items: list[dict]) -> dict[str, list]:
    correct = []
    for it in items:
        rows = engine.score(it["prefix"], it["answer"])
        correct.append(bool((rows.argmax(axis=-1) == np.array(it["answer"])).all()))
    return {"ids": [it["id"] for it in items], "kind": [it["kind"] for it in items], "correct": correct}


def _sequence_key(seqs) -> list[list[int]]:
    return [[len(p), len(c), int(sum(c) % 1000003)] for p, c in seqs]


def evaluate_base(engine, suite: Suite, work: Path, *, items_dir=None,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Run the base model; writes work/base_<set>.npy (log-probs) and returns the base summary."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"suite": suite.as_dict(), "n_vocab": engine.n_vocab, "sets": {}, "mc": {}}
    for name, seqs in build_sequences(engine, suite, items_dir).items():
        total = sum(len(c) for _, c in seqs)
        path = work / f"base_{name}.npy"
        tmp = work / f"base_{name}.part.npy"
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(total, engine.n_vocab))
        o, nll = 0, []
        for k, (p, c) in enumerate(seqs):
            if progress:
                progress(f"base {name} {k + 1}/{len(seqs)}")
            lp = log_softmax(engine.score(p, c))
            mm[o:o + len(c)] = lp
            nll.append(-lp[np.arange(len(c)), c].astype(np.float64))
            o += len(c)
        mm.flush()
        del mm
        tmp.replace(path)
        nll_all = np.concatenate(nll) if nll else np.zeros(0)
        out["sets"][name] = {"n_sequences": len(seqs), "n_tokens": total, "key": _sequence_key(seqs),
                             "ppl": math.exp(nll_all.mean()) if total else None}
    for task, items in build_mc_items(engine, suite, items_dir).items():
        if progress:
            progress(f"base {task} ({len(items)} items)")
        out["mc"][task] = _mc_scores(engine, items)
    arith = build_arithmetic(engine, suite)
    if arith:
        out["arith"] = _arith_scores(engine, arith)
    out["tokens_evaluated"] = engine.n_evaluated
    out["seconds"] = time.perf_counter() - t0
    (work / "base.json").write_text(json.dumps(out))
    return out


def evaluate_quant(engine, suite: Suite, work: Path, base: dict, *, items_dir=None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Run a quantized model on the suite (or a prefix of the base's suite) and compare with the base."""
    t0 = time.perf_counter()
    n0 = engine.n_evaluated
    if engine.n_vocab != base["n_vocab"]:
        raise MismatchError(f"vocabulary of {engine.n_vocab} tokens differs from the base's {base['n_vocab']}")
    out: dict = {"sets": {}, "mc": {}}
    for name, seqs in build_sequences(engine, suite, items_dir).items():
        b = base["sets"].get(name)
        if b is None or _sequence_key(seqs) != b["key"][: len(seqs)]:
            raise UsageError(f"the base pass has no matching '{name}' sequences — rerun the base with this suite")
        mm = np.load(work / f"base_{name}.npy", mmap_mode="r")
        acc = DistortionAccumulator()
        o = 0
        for k, (p, c) in enumerate(seqs):
            if progress:
                progress(f"{name} {k + 1}/{len(seqs)}")
            rows = engine.score(p, c)
            acc.add(token_stats(np.asarray(mm[o:o + len(c)]), rows, np.asarray(c)))
            o += len(c)
        del mm
        out["sets"][name] = summarize_tokens(acc.arrays())
        out["sets"][name]["n_sequences"] = len(seqs)
    for task, items in build_mc_items(engine, suite, items_dir).items():
        if progress:
            progress(f"{task} ({len(items)} items)")
        q = _mc_scores(engine, items)
        b = base["mc"][task]
        n = len(q["ids"])
        if q["ids"] != b["ids"][:n]:
            raise UsageError(f"the base pass scored other {task} items — rerun the base with this suite")
        gold = np.array(q["gold"])
        out["mc"][task] = {
            "acc": paired_accuracy(np.array(b["pred"][:n]) == gold, np.array(q["pred"]) == gold),
            "acc_norm": paired_accuracy(np.array(b["pred_norm"][:n]) == gold, np.array(q["pred_norm"]) == gold),
            "agree_pred_pct": 100.0 * float(np.mean(np.array(b["pred"][:n]) == np.array(q["pred"]))),
        }
    arith = build_arithmetic(engine, suite)
    if arith:
        q = _arith_scores(engine, arith)
        b = base["arith"]
        n = len(q["correct"])
        out["arith"] = {"exact_match": paired_accuracy(np.array(b["correct"][:n]), np.array(q["correct"]))}
    out["tokens_evaluated"] = engine.n_evaluated - n0
    out["seconds"] = time.perf_counter() - t0
    return out


def paired_accuracy(base_correct: np.ndarray, quant_correct: np.ndarray) -> dict:
    """Accuracies (percent), their binomial standard errors, and the paired difference.

    The paired standard error of quant - base is sd(d_i)/sqrt(n) over per-item differences d_i in
    {-1, 0, 1}; it is far smaller than the unpaired one when the two models mostly agree."""
    b = np.asarray(base_correct, dtype=np.float64)
    q = np.asarray(quant_correct, dtype=np.float64)
    n = int(b.size)
    if n == 0:
        return {"n": 0}
    d = q - b
    se = lambda p: 100.0 * math.sqrt(p * (1 - p) / n)  # noqa: E731
    return {
        "n": n,
        "base": 100.0 * float(b.mean()),
        "base_stderr": se(float(b.mean())),
        "quant": 100.0 * float(q.mean()),
        "quant_stderr": se(float(q.mean())),
        "delta": 100.0 * float(d.mean()),
        "delta_stderr_paired": 100.0 * float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "n_base_only": int(((b == 1) & (q == 0)).sum()),
        "n_quant_only": int(((b == 0) & (q == 1)).sum()),
    }
