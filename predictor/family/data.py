"""Training data for the family: prose, Python code and generated arithmetic, with held-out splits.

Sources
  * prose — the three Project Gutenberg novels copied (gzipped) to training_data/family/corpus/gutenberg,
    cut at the `*** START OF` / `*** END OF` lines, CRLF -> LF (as `measure`'s item builder does);
  * code — the Python standard library source of the running interpreter (sysconfig "stdlib"),
    without tests, site-packages, generated tables (encodings, pydoc_data) and build files;
  * math — arithmetic and word problems generated with exact answers, in the "Q: ...\\nA: n\\n" form
    `measure` scores.

Held out (never trained on)
  * prose: every passage of training_data/eval_items/prose.jsonl (found by exact text) and the last
    5% of each book (our validation text);
  * code: every file named in training_data/eval_items/code.jsonl and the files whose crc32(relative
    path) % 20 == 0 (validation);
  * math: the first 200 problems of `measure`'s arithmetic generator (suite seed 0, the default; 200
    is the 'large' suite) and our validation problems (500); training problems equal to any of these
    are redrawn.

A batch is `batch_size` sequences of n_ctx + 1 tokens, each starting with BOS; which source a
sequence comes from, and where, is drawn from a generator seeded by (seed, step), so a resumed run
sees exactly the data it would have seen.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from predictor.errors import InputFileError, UsageError
from predictor.family.tokenizer import BOS_ID, encode

__all__ = ["DataConfig", "Corpus", "load_corpus", "default_corpus_dir", "math_problem", "math_text",
           "heldout_math_questions", "validation_math", "stdlib_code_files"]

_REPO = Path(__file__).resolve().parents[2]
VAL_PROSE_FRACTION = 0.05
VAL_CODE_MOD = 20
N_HARNESS_MATH = 200  # the 'large' suite's count; the 1-digit x 2-digit products have only 720 problems
N_VAL_MATH = 500


def default_corpus_dir() -> Path:
    return _REPO / "training_data" / "family" / "corpus"


def default_items_dir() -> Path:
    return _REPO / "training_data" / "eval_items"


@dataclass(frozen=True)
class DataConfig:
    mix: dict = field(default_factory=lambda: {"prose": 0.4, "code": 0.3, "math": 0.3})
    corpus_dir: str | None = None  # default training_data/family/corpus
    items_dir: str | None = None  # default training_data/eval_items
    max_code_file_bytes: int = 200_000

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        known = {"mix", "corpus_dir", "items_dir", "max_code_file_bytes"}
        if set(d) - known:
            raise UsageError(f"unknown data setting(s) {sorted(set(d) - known)}; known: {sorted(known)}")
        cfg = cls(**d)
        if set(cfg.mix) - {"prose", "code", "math"} or not all(v >= 0 for v in cfg.mix.values()) \
                or sum(cfg.mix.values()) <= 0:
            raise UsageError(f"data mix {cfg.mix}: use non-negative weights for prose, code and math")
        return cfg


# -- math ---------------------------------------------------------------------------------------

_NAMES = ("Tom", "Anna", "Li", "Sara", "Omar", "Mia", "Ben", "Zoe", "Ravi", "Emma", "Noah", "Ivy")
_ITEMS = ("apple", "book", "coin", "marble", "pencil", "stamp", "card", "shell", "sticker", "egg")


def math_problem(rng: np.random.Generator) -> tuple[str, int]:
    """One problem: (question text after "Q: ", exact integer answer)."""
    # three in four are bare arithmetic (including every kind `measure` asks), one in four word problems
    kind = int(rng.integers(0, 7)) if rng.random() < 0.75 else int(rng.integers(7, 11))
    if kind <= 6:
        if kind == 0:
            a, b = rng.integers(10, 100, size=2); op = "+"
        elif kind == 1:
            a, b = rng.integers(100, 1000, size=2); op = "+"
        elif kind == 2:
            a, b = sorted(rng.integers(10, 100, size=2))[::-1]; op = "-"
        elif kind == 3:
            a, b = sorted(rng.integers(100, 1000, size=2))[::-1]; op = "-"
        elif kind == 4:
            a, b = rng.integers(2, 10), rng.integers(10, 100); op = "*"
        elif kind == 5:
            a, b = rng.integers(2, 10, size=2); op = "*"
        else:
            b, q = rng.integers(2, 10), rng.integers(2, 20); a, op = b * q, "/"
        a, b = int(a), int(b)
        ans = {"+": a + b, "-": a - b, "*": a * b, "/": a // max(b, 1)}[op]
        return f"What is {a} {op} {b}?", ans
    name, item = _NAMES[int(rng.integers(len(_NAMES)))], _ITEMS[int(rng.integers(len(_ITEMS)))]
    if kind == 7:
        a, b = (int(x) for x in rng.integers(2, 60, size=2))
        return f"{name} has {a} {item}s and gets {b} more. How many {item}s does {name} have now?", a + b
    if kind == 8:
        a, b = sorted(int(x) for x in rng.integers(2, 90, size=2))[::-1]
        return f"{name} had {a} {item}s and gave away {b}. How many {item}s are left?", a - b
    if kind == 9:
        a, b = int(rng.integers(2, 10)), int(rng.integers(2, 13))
        return f"There are {a} boxes with {b} {item}s in each box. How many {item}s are there in all?", a * b
    b, q = int(rng.integers(2, 10)), int(rng.integers(2, 13))
    return f"{b * q} {item}s are shared equally among {b} friends. How many {item}s does each friend get?", q


class _StubEngine:
    """Stands in for llama.cpp so `measure`'s own arithmetic generator yields its question texts."""

    def tokenize(self, text: str, **_):
        return [text]

    prefix_tokens = tokenize


def heldout_math_questions() -> set[str]:
    """Question texts never trained on: `measure`'s problems (seed 0) and our validation set."""
    out = {q for q, _ in validation_math()}
    try:
        from dataclasses import replace  # noqa: PLC0415

        from predictor.measure.tasks import build_arithmetic, get_suite  # noqa: PLC0415
    except ImportError:  # pragma: no cover - the harness ships with the package
        return out
    suite = replace(get_suite("tiny"), arithmetic=N_HARNESS_MATH, seed=0)
    for row in build_arithmetic(_StubEngine(), suite):
        q = row["prefix"][-1]
        out.add(q[len("Q: "):q.index("\nA:")])
    return out


def validation_math(n: int = N_VAL_MATH) -> list[tuple[str, int]]:
    rng = np.random.default_rng([1, 31337])
    seen, out = set(), []
    while len(out) < n:
        q, a = math_problem(rng)
        if q not in seen:
            seen.add(q)
            out.append((q, a))
    return out


def math_text(rng: np.random.Generator, n_bytes: int, exclude: set[str]) -> str:
    """Q/A lines until the text has at least n_bytes bytes; questions in `exclude` are redrawn."""
    parts, size = [], 0
    while size < n_bytes:
        q, a = math_problem(rng)
        if q in exclude:
            continue
        s = f"Q: {q}\nA: {a}\n"
        parts.append(s)
        size += len(s)
    return "".join(parts)


# -- prose and code -----------------------------------------------------------------------------

def _book_body(text: str) -> str:
    a, b = text.find("*** START OF"), text.find("*** END OF")
    body = text[text.find("\n", a) + 1:b] if a >= 0 and b > a else text
    return re.sub(r"\r\n", "\n", body)


def _read_items(items_dir: Path, name: str) -> list[dict]:
    path = items_dir / f"{name}.jsonl"
    if not path.is_file():
        return []
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except (OSError, json.JSONDecodeError) as e:
        raise InputFileError(path, f"unreadable evaluation items ({e})", "restore the file from git") from None


def _cut(body: str, spans: list[tuple[int, int]]) -> list[str]:
    """The text between the excluded spans."""
    out, pos = [], 0
    for s, e in sorted(spans):
        if s > pos:
            out.append(body[pos:s])
        pos = max(pos, e)
    out.append(body[pos:])
    return [t for t in out if t]


def stdlib_code_files(max_bytes: int = 200_000) -> list[tuple[str, Path]]:
    """(relative path, file) of the non-test standard library modules, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip_dirs = {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "turtledemo",
                 "__pycache__", "config-3.11-x86_64-linux-gnu"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if set(parts[:-1]) & skip_dirs or parts[-1].startswith(("test_", "_sysconfigdata")):
            continue
        if any(d.startswith("config-") for d in parts[:-1]) or p.stat().st_size > max_bytes:
            continue
        out.append((rel, p))
    return out


@dataclass
class Corpus:
    """Token streams per source (uint16, BOS-free) plus the offsets a window may start at."""

    streams: dict[str, np.ndarray]
    starts: dict[str, np.ndarray]
    val_streams: dict[str, np.ndarray]
    math_exclude: set[str]
    provenance: dict

    @classmethod
    def from_texts(cls, train: dict[str, list[str]], val: dict[str, list[str]], *, math_exclude: set[str],
                   provenance: dict | None = None) -> "Corpus":
        streams, starts, vals = {}, {}, {}
        for name, texts in train.items():
            if not texts:
                continue
            joined = "\n\n\n".join(texts)
            tok = encode(joined).astype(np.uint16)
            nl = np.flatnonzero(tok == encode("\n")[0]) + 1  # windows begin at a line start
            starts[name] = nl if nl.size else np.array([0])
            streams[name] = tok
        for name, texts in val.items():
            if texts:
                vals[name] = encode("\n\n\n".join(texts)).astype(np.uint16)
        return cls(streams, starts, vals, math_exclude, provenance or {})

    def batch(self, mix: dict, seed: int, step: int, batch_size: int, n_ctx: int) -> np.ndarray:
        """(batch_size, n_ctx + 1) int64 tokens for training step `step`, deterministic."""
        rng = np.random.default_rng([seed, 7, step])
        names = [n for n in ("prose", "code", "math") if mix.get(n, 0) > 0 and (n == "math" or n in self.streams)]
        if not names:
            raise UsageError("the data mix selects no source that has text")
        p = np.array([mix[n] for n in names], dtype=np.float64)
        which = rng.choice(len(names), size=batch_size, p=p / p.sum())
        out = np.empty((batch_size, n_ctx + 1), dtype=np.int64)
        out[:, 0] = BOS_ID
        for r in range(batch_size):
            name = names[which[r]]
            if name == "math":
                toks = encode(math_text(rng, n_ctx, self.math_exclude))[:n_ctx]
            else:
                s = self.streams[name]
                st = self.starts[name]
                st = st[st <= max(0, s.size - n_ctx)]
                i = int(st[rng.integers(st.size)]) if st.size else 0
                toks = s[i:i + n_ctx]
                if toks.size < n_ctx:  # tiny corpora (tests): wrap around
                    toks = np.resize(s, n_ctx)
            out[r, 1:] = toks
        return out

    def val_batches(self, n_ctx: int, n_per_source: int = 8) -> dict[str, np.ndarray]:
        """Fixed validation windows per source (BOS + n_ctx tokens), evenly spaced."""
        out = {}
        for name, s in self.val_streams.items():
            if s.size <= n_ctx:
                continue
            offs = np.linspace(0, s.size - n_ctx, n_per_source).astype(np.int64)
            rows = np.stack([np.concatenate([[BOS_ID], s[o:o + n_ctx]]) for o in offs]).astype(np.int64)
            out[name] = rows
        rng = np.random.default_rng([2, 99])
        if self.math_exclude:
            rows = []
            vm = validation_math()
            for _ in range(n_per_source):
                idx = rng.permutation(len(vm))
                text = "".join(f"Q: {vm[i][0]}\nA: {vm[i][1]}\n" for i in idx)
                rows.append(np.concatenate([[BOS_ID], encode(text)[:n_ctx]]))
            out["math"] = np.stack(rows).astype(np.int64)
        return out


def _sha(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else p.encode("utf-8"))
    return h.hexdigest()[:16]


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read the prose and code sources and apply the held-out splits (see the module docstring)."""
    corpus_dir = Path(cfg.corpus_dir) if cfg.corpus_dir else default_corpus_dir()
    items_dir = Path(cfg.items_dir) if cfg.items_dir else default_items_dir()
    books = sorted((corpus_dir / "gutenberg").glob("pg*.txt.gz"))
    if not books:
        raise InputFileError(corpus_dir / "gutenberg", "no pg*.txt.gz books found",
                             "use a checkout with training_data/family/corpus, or pass data.corpus_dir")
    eval_prose = [it["text"] for it in _read_items(items_dir, "prose")]
    train, val = {"prose": [], "code": []}, {"prose": [], "code": []}
    n_cut = 0
    raw_hash = []
    for path in books:
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                body = _book_body(f.read())
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise InputFileError(path, f"unreadable gzipped text ({e})", "restore the file from git") from None
        raw_hash.append(body)
        n_val = int(len(body) * VAL_PROSE_FRACTION)
        val["prose"].append(body[-n_val:])
        body = body[:-n_val]
        spans = []
        for t in eval_prose:
            k = body.find(t)
            if k >= 0:
                spans.append((k, k + len(t)))
        n_cut += len(spans)
        train["prose"] += _cut(body, spans)
    eval_code = {Path(it["source"]).name for it in _read_items(items_dir, "code")}
    n_code = {"train": 0, "val": 0, "eval": 0}
    code_hash = []
    for rel, p in stdlib_code_files(cfg.max_code_file_bytes):
        text = p.read_text(encoding="utf-8", errors="replace")
        code_hash += [rel, text]
        if "/" not in rel and p.name in eval_code:
            n_code["eval"] += 1
        elif zlib.crc32(rel.encode()) % VAL_CODE_MOD == 0:
            val["code"].append(text)
            n_code["val"] += 1
        else:
            train["code"].append(text)
            n_code["train"] += 1
    prov = {"books": [p.name for p in books], "prose_sha": _sha(raw_hash), "prose_eval_passages_cut": n_cut,
            "n_prose_eval_passages": len(eval_prose), "code_root": sysconfig.get_paths()["stdlib"],
            "code_files": n_code, "code_sha": _sha(code_hash)}
    corpus = Corpus.from_texts(train, val, math_exclude=heldout_math_questions(), provenance=prov)
    prov["train_tokens"] = {k: int(v.size) for k, v in corpus.streams.items()}
    prov["val_tokens"] = {k: int(v.size) for k, v in corpus.val_streams.items()}
    return corpus
