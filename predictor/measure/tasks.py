"""The evaluation suite: which token sequences and items a model is scored on, and how.

Every score is a teacher-forced log-likelihood read from one pass of the model (no sampling):
  * distortion sets (prose, code, and the reference solutions of GSM8K / HumanEval / MBPP): the
    logits predicting each scored token, compared with the base model's (KLD, top-1, PPL);
  * multiple choice (ARC-Easy/Challenge, HellaSwag, MMLU): lm-eval style — the choice with the
    highest log-likelihood (acc) or log-likelihood per byte of the choice text (acc_norm) wins;
  * generated arithmetic with exact answers: exact match under greedy decoding, which is the same
    as every answer token (and the closing newline) being the model's top-1 given the prompt.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

import numpy as np

from predictor.errors import UsageError
from predictor.measure.items import load_items

__all__ = ["Suite", "SUITES", "get_suite", "DISTORTION_SETS", "MC_TASKS", "build_sequences",
           "build_mc_items", "build_arithmetic"]

DISTORTION_SETS = ("prose", "code", "gsm8k", "humaneval", "mbpp")
MC_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "mmlu")
TASK_NAMES = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge", "hellaswag": "HellaSwag",
              "mmlu": "MMLU", "arithmetic": "Arithmetic"}
DATASET_NAMES = {
    "prose": "Project Gutenberg novels (3 books, seeded passages)",
    "code": "Python 3.11 standard library source (seeded excerpts)",
    "gsm8k": "GSM8K test reference solutions (teacher-forced)",
    "humaneval": "HumanEval canonical solutions (teacher-forced)",
    "mbpp": "MBPP sanitized reference code (teacher-forced)",
}


@dataclass(frozen=True)
class Suite:
    """How many items of each kind one evaluation uses (the first n of each seeded item file)."""

    name: str
    n_ctx: int = 512  # window of prose/code passages, and the context size
    warmup: int = 64  # prose/code tokens given as context before scoring starts
    prose: int = 0
    code: int = 0
    gsm8k: int = 0
    humaneval: int = 0
    mbpp: int = 0
    arithmetic: int = 0
    arc_easy: int = 0
    arc_challenge: int = 0
    hellaswag: int = 0
    mmlu: int = 0
    seed: int = 0  # arithmetic problems

    def as_dict(self) -> dict:
        return asdict(self)


SUITES = {
    # CI: a few of everything, tiny windows
    "tiny": Suite("tiny", n_ctx=512, warmup=16, prose=2, code=1, gsm8k=2, humaneval=1, mbpp=1,
                  arithmetic=4, arc_easy=3, hellaswag=2, mmlu=2),
    # Sized for a 135M model on one shared CPU core (~130 tokens/s, ~2 min a run). HellaSwag (1.6 s an
    # item: long contexts and endings) and MMLU (at chance below ~1B parameters) are left to "large".
    "standard": Suite("standard", prose=3, code=3, gsm8k=8, humaneval=5, mbpp=6, arithmetic=40,
                      arc_easy=150, arc_challenge=50),
    # more items, for faster machines
    "large": Suite("large", n_ctx=1024, warmup=128, prose=12, code=12, gsm8k=40, humaneval=30, mbpp=40,
                   arithmetic=200, arc_easy=300, arc_challenge=300, hellaswag=300, mmlu=300),
}


def get_suite(name: str) -> Suite:
    s = SUITES.get(name)
    if s is None:
        raise UsageError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}")
    return s


def distortion_only(s: Suite) -> Suite:
    return replace(s, arithmetic=0, arc_easy=0, arc_challenge=0, hellaswag=0, mmlu=0)


# -- sequences ---------------------------------------------------------------------------------

def _gsm8k_answer(answer: str) -> str:
    return re.sub(r"<<[^>]*>>", "", answer)  # calculator annotations are not natural text


def build_sequences(engine, suite: Suite, items_dir=None) -> dict[str, list[tuple[list[int], list[int]]]]:
    """(prefix tokens, scored continuation tokens) per distortion set, deterministic."""
    out: dict[str, list[tuple[list[int], list[int]]]] = {}
    for name in DISTORTION_SETS:
        n = getattr(suite, name)
        if not n:
            continue
        seqs = []
        for it in load_items(name, items_dir)[:n]:
            if name in ("prose", "code"):
                toks = engine.prefix_tokens(it["text"])[: suite.n_ctx]
                if len(toks) <= suite.warmup + 1:
                    continue
                seqs.append((toks[: suite.warmup], toks[suite.warmup:]))
            else:
                if name == "gsm8k":
                    prefix, cont = f"Question: {it['question']}\nAnswer:", " " + _gsm8k_answer(it["answer"])
                elif name == "humaneval":
                    prefix, cont = it["prompt"], it["solution"]
                else:
                    prefix, cont = f'"""\n{it["prompt"]}\n{it["test"]}\n"""\n', it["code"]
                p = engine.prefix_tokens(prefix)
                c = engine.tokenize(cont)
                room = suite.n_ctx - len(p)
                if room < 8:
                    continue
                seqs.append((p, c[:room]))
        out[name] = seqs
    return out


def _mc_context(task: str, it: dict) -> tuple[str, list[str]]:
    if task in ("arc_easy", "arc_challenge"):
        return f"Question: {it['question']}\nAnswer:", [" " + c for c in it["choices"]]
    if task == "hellaswag":
        return it["context"], [" " + c for c in it["choices"]]
    subject = it["subject"].replace("_", " ")
    lines = [f"The following is a multiple choice question about {subject}.", "", it["question"].strip()]
    lines += [f"{'ABCD'[k]}. {c}" for k, c in enumerate(it["choices"])]
    return "\n".join(lines) + "\nAnswer:", [" A", " B", " C", " D"]


def build_mc_items(engine, suite: Suite, items_dir=None) -> dict[str, list[dict]]:
    """Per task: [{id, prefix tokens, choice token lists, choice byte lengths, gold}]."""
    out = {}
    for task in MC_TASKS:
        n = getattr(suite, task)
        if not n:
            continue
        rows = []
        for it in load_items(task, items_dir)[:n]:
            ctx, choices = _mc_context(task, it)
            p = engine.prefix_tokens(ctx)
            cs = [engine.tokenize(c) for c in choices]
            if len(p) + max(len(c) for c in cs) > suite.n_ctx or not all(cs):
                continue
            rows.append({"id": it["id"], "prefix": p, "choices": cs,
                         "n_bytes": [len(c.encode("utf-8")) for c in choices], "gold": int(it["gold"])})
        if rows:
            out[task] = rows
    return out


_ARITH_SHOTS = "Q: What is 12 + 7?\nA: 19\nQ: What is 45 - 18?\nA: 27\nQ: What is 6 * 8?\nA: 48\n"


def build_arithmetic(engine, suite: Suite) -> list[dict]:
    """Seeded arithmetic problems with exact answers: 2- and 3-digit sums, differences, small products."""
    rng = np.random.default_rng([suite.seed, 7])
    shots = engine.prefix_tokens(_ARITH_SHOTS)
    rows = []
    for k in range(suite.arithmetic):
        kind = k % 4
        if kind == 0:
            a, b = rng.integers(10, 100, size=2); op, ans = "+", a + b
        elif kind == 1:
            a, b = rng.integers(100, 1000, size=2); op, ans = "+", a + b
        elif kind == 2:
            a, b = sorted(rng.integers(10, 100, size=2))[::-1]; op, ans = "-", a - b
        else:
            a, b = rng.integers(2, 10), rng.integers(10, 100); op, ans = "*", a * b
        q = engine.tokenize(f"Q: What is {a} {op} {b}?\nA:")
        rows.append({"id": f"arith-{k}", "prefix": shots + q, "answer": engine.tokenize(f" {ans}\n"),
                     "kind": ["add2", "add3", "sub2", "mul"][kind]})
    return rows
