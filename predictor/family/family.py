"""The family definition: named sizes, shared defaults, and one entry per model.

A family file (training_data/family/family.json) is
  {"sizes": {SIZE: {model settings}}, "defaults": {"seed", "data", "train"},
   "models": [{"name", "size", "tokens_per_param" | "train": {"tokens"}, optional "seed", "data",
               "train" overrides, "notes"}]}
`expand_family` turns each entry into a full RunConfig; train.tokens = tokens_per_param x parameters
(all parameters, embeddings included). `train_family` trains the models in file order, skipping
finished ones; a lock file per model lets a second worker (another process) take the next model.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path
from typing import Callable

from predictor.errors import InputFileError, UsageError
from predictor.family.model import ModelConfig, count_params
from predictor.family.train import RunConfig, run_status, train_run

__all__ = ["read_family", "expand_family", "train_family", "rebuild_command"]

MAX_FAMILY_BYTES = 1 << 20


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "mix" else v
    return out


def read_family(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise InputFileError(p, "file not found", "check the path")
    if p.stat().st_size > MAX_FAMILY_BYTES:
        raise InputFileError(p, f"larger than {MAX_FAMILY_BYTES} bytes", "a family file is a small JSON document")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputFileError(p, f"not valid JSON ({e})", "fix the JSON syntax") from None
    if not isinstance(doc, dict):
        raise InputFileError(p, "top level is not a JSON object", "see training_data/family/README.md")
    return doc


def expand_family(doc: dict, *, source: str = "family file") -> list[RunConfig]:
    """Full run configs, in file order. A document without "models" is one model config."""
    if "models" not in doc:
        return [RunConfig.from_dict(doc)]
    sizes, defaults = doc.get("sizes", {}), doc.get("defaults", {})
    out, seen = [], set()
    for entry in doc["models"]:
        e = dict(entry)
        name = e.get("name")
        if not name or name in seen:
            raise UsageError(f"{source}: every model needs a unique 'name' (got {name!r})")
        seen.add(name)
        size = e.pop("size", None)
        if size is not None and size not in sizes:
            raise UsageError(f"{source}: model {name} names unknown size {size!r}; sizes: {sorted(sizes)}")
        tpp = e.pop("tokens_per_param", None)
        e.pop("role", None)
        d = _merge(defaults, e)
        d["model"] = _merge(sizes.get(size, {}), e.get("model", {}))
        if tpp is not None:
            n = count_params(ModelConfig.from_dict(d["model"]))
            d.setdefault("train", {})
            d["train"] = dict(d["train"], tokens=int(round(float(tpp) * n)))
        out.append(RunConfig.from_dict(d))
    return out


def rebuild_command(family_path: str, name: str | None, out_dir: str) -> str:
    """The command that retrains one model: of a family file (out_dir = the runs folder) or of a
    single-model config (name None, out_dir = the run folder)."""
    pick = ["--model", shlex.quote(name)] if name else []
    return " ".join(["quantpredict", "family", "train", shlex.quote(family_path), *pick,
                     "-o", shlex.quote(out_dir), "--threads", "1"])


def _take_lock(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:  # a lock whose process is gone is stale
            pid = int(path.read_text().split()[0])
            os.kill(pid, 0)
            return False
        except (ValueError, IndexError, ProcessLookupError, PermissionError, OSError):
            path.unlink(missing_ok=True)
            return _take_lock(path)
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()} {time.time():.0f}\n")
    return True


def train_family(family_path: str | os.PathLike, runs_dir: str | os.PathLike, *, only: list[str] | None = None,
                 threads: int = 1, records_dir: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """Train every (or each named) model of the family into runs_dir/NAME; returns the finished records.

    Each finished record is also copied to records_dir/NAME.json (the committed provenance)."""
    cfgs = expand_family(read_family(family_path), source=os.fspath(family_path))
    if only:
        unknown = set(only) - {c.name for c in cfgs}
        if unknown:
            raise UsageError(f"no model named {sorted(unknown)} in {family_path}")
        cfgs = [c for c in cfgs if c.name in only]
    runs = Path(runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    done = []
    corpora = {}  # the corpus depends on these data settings only (the mix acts per batch)
    for cfg in cfgs:
        run = runs / cfg.name
        if run_status(run) != "done":
            run.mkdir(parents=True, exist_ok=True)
            lock = run / "lock"
            if not _take_lock(lock):
                if progress:
                    progress(f"{cfg.name}: another worker is training it, skipping")
                continue
            try:
                key = (cfg.data.corpus_dir, cfg.data.items_dir, cfg.data.max_code_file_bytes)
                if key not in corpora:
                    from predictor.family.data import load_corpus  # noqa: PLC0415
                    corpora[key] = load_corpus(cfg.data)
                rec = train_run(cfg, run, threads=threads, corpus=corpora[key],
                                rebuild_command=rebuild_command(os.fspath(family_path), cfg.name, os.fspath(runs)),
                                progress=progress)
            finally:
                lock.unlink(missing_ok=True)
        else:
            rec = json.loads((run / "record.json").read_text(encoding="utf-8"))
        if records_dir is not None:
            rd = Path(records_dir)
            rd.mkdir(parents=True, exist_ok=True)
            (rd / f"{cfg.name}.json").write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        done.append(rec)
    return done
