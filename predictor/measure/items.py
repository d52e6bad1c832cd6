"""Evaluation items for `measure`: built once (seeded) from the evaluation data sets, stored in the repo.

`build_eval_items(data_dir, out_dir)` draws a seeded random subset of each data set and writes it as
JSONL under `training_data/eval_items/` (a fresh clone has no ../shared). Each file is already in
random order, so a suite that uses the first n items of a file uses a seeded random sample, and a
larger suite extends a smaller one. `load_items(name)` reads a file back with bounds checks.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import os
import re
import sysconfig
from pathlib import Path

import numpy as np

from predictor.errors import InputFileError

__all__ = ["ITEM_FILES", "build_eval_items", "default_items_dir", "load_items"]

# file stem -> (number of items kept in the repo, what it is)
ITEM_FILES = {
    "arc_easy": (300, "ARC-Easy test questions"),
    "arc_challenge": (300, "ARC-Challenge test questions"),
    "hellaswag": (300, "HellaSwag validation tasks"),
    "mmlu": (300, "MMLU test questions (all 57 subjects, sampled uniformly over questions)"),
    "gsm8k": (100, "GSM8K test problems with worked answers"),
    "humaneval": (60, "HumanEval problems with canonical solutions"),
    "mbpp": (60, "MBPP (sanitized) problems with reference code"),
    "prose": (24, "3000-character passages of three Project Gutenberg novels"),
    "code": (24, "3000-character excerpts of Python 3.11 standard-library modules"),
}
MAX_ITEMS_FILE_BYTES = 16 * 1024 * 1024
_SEED = 20261128


def default_items_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "training_data" / "eval_items"


def load_items(name: str, items_dir: str | os.PathLike | None = None) -> list[dict]:
    path = Path(items_dir or default_items_dir()) / f"{name}.jsonl"
    if not path.is_file():
        raise InputFileError(path, "evaluation items not found",
                             "use a checkout that has training_data/eval_items, or rebuild them with "
                             "python -m predictor.measure.items DATA_DIR")
    if path.stat().st_size > MAX_ITEMS_FILE_BYTES:
        raise InputFileError(path, f"larger than {MAX_ITEMS_FILE_BYTES} bytes", "keep item files small")
    items = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputFileError(path, f"line {i} is not JSON ({e.msg})", "rebuild the item files") from None
    return items


# -- building ---------------------------------------------------------------------------------

def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _pick(rng: np.random.Generator, n_total: int, n: int) -> list[int]:
    return [int(i) for i in rng.permutation(n_total)[:n]]


def _arc(data: Path, split_file: str, n: int, rng) -> list[dict]:
    rows = _jsonl(data / "arc" / split_file)
    out = []
    for i in _pick(rng, len(rows), n):
        r = rows[i]
        labels = list(r["choices"]["label"])
        out.append({"id": r["id"], "question": r["question"], "choices": list(r["choices"]["text"]),
                    "gold": labels.index(r["answerKey"])})
    return out


def _hellaswag(data: Path, n: int, rng) -> list[dict]:
    with bz2.open(data / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    tasks = [lines[k:k + 6] for k in range(0, len(lines) - 5, 6)]
    out = []
    for i in _pick(rng, len(tasks), n):
        t = tasks[i]
        out.append({"id": f"hellaswag-val-{i}", "context": t[0], "choices": t[2:6], "gold": int(t[1])})
    return out


def _mmlu(data: Path, n: int, rng) -> list[dict]:
    rows = []
    for path in sorted((data / "mmlu" / "test").glob("*_test.csv")):
        subject = path.name[: -len("_test.csv")]
        with open(path, encoding="utf-8", newline="") as f:
            for k, r in enumerate(csv.DictReader(f)):
                rows.append({"id": f"{subject}-{k}", "subject": subject, "question": r["question"],
                             "choices": [r[f"choice{j}"] for j in range(4)], "gold": int(r["answer"])})
    return [rows[i] for i in _pick(rng, len(rows), n)]


def _gsm8k(data: Path, n: int, rng) -> list[dict]:
    rows = _jsonl(data / "gsm8k" / "test.jsonl")
    return [{"id": f"gsm8k-test-{i}", "question": rows[i]["question"], "answer": rows[i]["answer"]}
            for i in _pick(rng, len(rows), n)]


def _humaneval(data: Path, n: int, rng) -> list[dict]:
    with gzip.open(data / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"id": rows[i]["task_id"], "prompt": rows[i]["prompt"], "solution": rows[i]["canonical_solution"]}
            for i in _pick(rng, len(rows), n)]


def _mbpp(data: Path, n: int, rng) -> list[dict]:
    rows = json.loads((data / "mbpp" / "sanitized-mbpp.json").read_text(encoding="utf-8"))
    return [{"id": f"mbpp-{rows[i]['task_id']}", "prompt": rows[i]["prompt"], "test": rows[i]["test_list"][0],
             "code": rows[i]["code"]} for i in _pick(rng, len(rows), n)]


def _passages(text: str, n: int, size: int, rng, source: str) -> list[dict]:
    starts = sorted(_pick(rng, max(1, len(text) - size), n * 4))
    out, last_end = [], -1
    for s in starts:
        nl = text.find("\n", s)  # start at a line start, so no passage begins mid-word
        s = nl + 1 if 0 <= nl < s + 400 else s
        if s <= last_end:
            continue
        out.append({"source": source, "offset": s, "text": text[s:s + size]})
        last_end = s + size
        if len(out) == n:
            break
    return out


def _prose(data: Path, n: int, rng) -> list[dict]:
    out = []
    books = sorted((data / "gutenberg").glob("pg*.txt"))
    for k, path in enumerate(books):
        text = path.read_text(encoding="utf-8")
        a, b = text.find("*** START OF"), text.find("*** END OF")
        body = text[text.find("\n", a) + 1 : b] if a >= 0 and b > a else text
        body = re.sub(r"\r\n", "\n", body)
        m = n // len(books) + (1 if k < n % len(books) else 0)
        out += _passages(body, m, 3000, rng, f"gutenberg/{path.name}")
    order = rng.permutation(len(out))
    return [dict(out[i], id=f"prose-{j}") for j, i in enumerate(order)]


def _code(n: int, rng) -> list[dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if not p.name.startswith("test") and p.stat().st_size > 8000)
    out = []
    # generated, machine-specific modules (build paths and flags) are not representative code
    order = [int(i) for i in rng.permutation(len(files)) if not files[i].name.startswith("_sysconfigdata")][:n]
    for j, i in enumerate(order):
        text = files[i].read_text(encoding="utf-8", errors="replace")
        got = _passages(text, 1, 3000, rng, f"python{sysconfig.get_python_version()}/Lib/{files[i].name}")
        out += [dict(g, id=f"code-{j}") for g in got]
    return out


def build_eval_items(data_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, seed: int = _SEED) -> dict[str, int]:
    """Write the seeded item subsets; returns item counts per file."""
    data = Path(data_dir)
    out = Path(out_dir or default_items_dir())
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, (n, _) in ITEM_FILES.items():
        rng = np.random.default_rng([seed, list(ITEM_FILES).index(name)])
        if name in ("arc_easy", "arc_challenge"):
            rows = _arc(data, "ARC-Easy-test.jsonl" if name == "arc_easy" else "ARC-Challenge-test.jsonl", n, rng)
        elif name == "hellaswag":
            rows = _hellaswag(data, n, rng)
        elif name == "mmlu":
            rows = _mmlu(data, n, rng)
        elif name == "gsm8k":
            rows = _gsm8k(data, n, rng)
        elif name == "humaneval":
            rows = _humaneval(data, n, rng)
        elif name == "mbpp":
            rows = _mbpp(data, n, rng)
        elif name == "prose":
            rows = _prose(data, n, rng)
        else:
            rows = _code(n, rng)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


if __name__ == "__main__":
    import sys

    print(build_eval_items(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
