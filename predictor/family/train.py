"""Train one family model: seeded, resumable from a checkpoint, logged, exported to GGUF at the end.

A run folder holds
  train.log      one JSON line per logged step / evaluation (appended across resumes)
  ckpt.pt        the latest checkpoint (model, optimizer, step, wall time) — torch weights_only format
  model.gguf     the F32 GGUF, written when training finishes
  record.json    config, seed, tokens seen, final losses, wall time, machine, rebuild command
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np

from predictor.errors import InputFileError, UsageError
from predictor.family.data import Corpus, DataConfig, load_corpus
from predictor.family.model import ModelConfig, count_params

__all__ = ["TrainConfig", "RunConfig", "train_run", "run_status"]


@dataclass(frozen=True)
class TrainConfig:
    tokens: int = 1_000_000  # training tokens (targets), rounded up to whole steps
    batch_size: int = 8  # sequences of n_ctx tokens per step
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * this
    warmup_frac: float = 0.05
    weight_decay: float = 0.1  # on matrices and embeddings, never on norm gains
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    precision: str = "bf16-autocast"  # or "fp32"; weights and optimizer state are float32 either way
    eval_every: int = 0  # steps between validation passes; 0 = about 10 per run
    log_every: int = 20
    checkpoint_seconds: float = 300.0

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise UsageError(f"unknown train setting(s) {sorted(set(d) - known)}; known: {sorted(known)}")
        cfg = cls(**d)
        if cfg.precision not in ("bf16-autocast", "fp32"):
            raise UsageError(f"precision {cfg.precision!r}: use 'bf16-autocast' or 'fp32'")
        if cfg.tokens <= 0 or cfg.batch_size <= 0 or cfg.lr <= 0:
            raise UsageError("tokens, batch_size and lr must be positive")
        return cfg


@dataclass(frozen=True)
class RunConfig:
    name: str
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    notes: str = ""

    @classmethod
    def from_dict(cls, d: dict, *, kquant_sizes: bool = True) -> "RunConfig":
        known = {"name", "seed", "model", "data", "train", "notes"}
        if set(d) - known or "name" not in d:
            raise UsageError(f"a model config needs 'name' and only {sorted(known)}; got {sorted(d)}")
        return cls(name=str(d["name"]), seed=int(d.get("seed", 0)),
                   model=ModelConfig.from_dict(d.get("model", {})).validate(kquant_sizes=kquant_sizes),
                   data=DataConfig.from_dict(d.get("data", {})), train=TrainConfig.from_dict(d.get("train", {})),
                   notes=str(d.get("notes", "")))

    def as_dict(self) -> dict:
        return {"name": self.name, "seed": self.seed, "model": self.model.as_dict(), "data": asdict(self.data),
                "train": asdict(self.train), "notes": self.notes}

    @property
    def n_steps(self) -> int:
        return math.ceil(self.train.tokens / (self.train.batch_size * self.model.n_ctx))


def _lr_at(cfg: TrainConfig, step: int, n_steps: int) -> float:
    warm = max(1, int(cfg.warmup_frac * n_steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, n_steps - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _evaluate(model, val: dict[str, np.ndarray], autocast: bool) -> dict[str, float]:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    out = {}
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for name, rows in val.items():
            x = torch.from_numpy(rows)
            logits = model(x[:, :-1]).float()
            out[name] = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)))
    model.train()
    return out


def outlier_stats(model, rows: np.ndarray) -> dict[str, float]:
    """Weight and activation outlier measures: worst max|w|/rms over matrices, mean excess kurtosis,
    and the residual stream's largest |activation| over its median (massive activations)."""
    import torch  # noqa: PLC0415

    ratios, kurts = [], []
    for name, p in model.named_parameters():
        if p.ndim == 2 and "tok_embd" not in name:
            w = p.detach().double().flatten()
            rms = float(w.pow(2).mean().sqrt())
            ratios.append(float(w.abs().max()) / rms)
            z = (w - w.mean()) / w.std()
            kurts.append(float(z.pow(4).mean()) - 3.0)
    acts = []
    hooks = [b.register_forward_hook(lambda m, i, o: acts.append(o.detach().abs())) for b in model.blocks]
    try:
        with torch.no_grad():
            model(torch.from_numpy(rows[:, :-1]))
    finally:
        for h in hooks:
            h.remove()
    massive = max(float(a.max() / a.median().clamp_min(1e-12)) for a in acts) if acts else 0.0
    return {"max_abs_over_rms": max(ratios), "mean_excess_kurtosis": float(np.mean(kurts)),
            "massive_activation_ratio": massive}


def run_status(run_dir: str | os.PathLike) -> str:
    d = Path(run_dir)
    if (d / "record.json").is_file() and (d / "model.gguf").is_file():
        return "done"
    return "partial" if (d / "ckpt.pt").is_file() else "new"


def train_run(cfg: RunConfig, run_dir: str | os.PathLike, *, threads: int = 1, corpus: Corpus | None = None,
              rebuild_command: str = "", progress: Callable[[str], None] | None = None,
              max_steps: int | None = None) -> dict:
    """Train (or resume) `cfg` in `run_dir`; returns the record (also written to record.json).

    `max_steps` stops after that many steps in total, as a killed run would (tests): the checkpoint is
    saved and a partial record is returned, nothing exported."""
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415

    from predictor.family.export import write_family_gguf  # noqa: PLC0415
    from predictor.family.model import FamilyLM  # noqa: PLC0415

    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    cfg_path = run / "config.json"
    if cfg_path.is_file():
        old = json.loads(cfg_path.read_text(encoding="utf-8"))
        if old != cfg.as_dict():
            raise UsageError(f"{run} holds a run of another config — use a new folder or delete it")
    else:
        cfg_path.write_text(json.dumps(cfg.as_dict(), indent=1) + "\n", encoding="utf-8")
    if run_status(run) == "done":
        return json.loads((run / "record.json").read_text(encoding="utf-8"))

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = FamilyLM(cfg.model)
    decay = [p for p in model.parameters() if p.ndim == 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    tc = cfg.train
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    step, wall, losses = 0, 0.0, []
    ckpt = run / "ckpt.pt"
    if ckpt.is_file():
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
            raise InputFileError(ckpt, f"cannot resume from this checkpoint ({type(e).__name__})",
                                 "delete it to restart the run from step 0") from None
        step, wall, losses = int(state["step"]), float(state["wall"]), list(state["recent_losses"])
        if progress:
            progress(f"{cfg.name}: resuming at step {step}")
    corpus = corpus or load_corpus(cfg.data)
    val = corpus.val_batches(cfg.model.n_ctx)
    autocast = tc.precision == "bf16-autocast"
    n_steps = cfg.n_steps
    stop = n_steps if max_steps is None else min(n_steps, max_steps)
    eval_every = tc.eval_every or max(1, n_steps // 10)
    log = run / "train.log"
    t_seg, t_ckpt = time.perf_counter(), time.perf_counter()

    def save() -> None:
        nonlocal t_seg
        state = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                 "wall": wall + time.perf_counter() - t_seg, "recent_losses": losses[-200:]}
        torch.save(state, run / "ckpt.pt.tmp")
        os.replace(run / "ckpt.pt.tmp", ckpt)

    model.train()
    while step < stop:
        lr = _lr_at(tc, step, n_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.from_numpy(corpus.batch(cfg.data.mix, cfg.seed, step, tc.batch_size, cfg.model.n_ctx))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if not torch.isfinite(loss):
            raise UsageError(f"{cfg.name}: loss is {float(loss)} at step {step} — lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % tc.log_every == 0 or step == stop:
            now = wall + time.perf_counter() - t_seg
            row = {"step": step, "tokens": step * tc.batch_size * cfg.model.n_ctx, "loss": float(np.mean(losses[-tc.log_every:])),
                   "lr": lr, "grad_norm": gnorm, "wall_s": round(now, 1)}
            if step % eval_every == 0 or step == stop:
                row["val"] = _evaluate(model, val, autocast)
            _log(log, row)
            if progress:
                progress(f"{cfg.name}: step {step}/{n_steps} loss {row['loss']:.3f} ({now:.0f} s)")
        if time.perf_counter() - t_ckpt > tc.checkpoint_seconds:
            save()
            t_ckpt = time.perf_counter()
    wall += time.perf_counter() - t_seg
    t_seg = time.perf_counter()
    save()
    if step < n_steps:
        return {"name": cfg.name, "steps": step, "steps_planned": n_steps, "finished": False}

    final_val = _evaluate(model, val, autocast)
    final_val_fp32 = _evaluate(model, val, False)
    rows = next(iter(val.values())) if val else corpus.batch(cfg.data.mix, cfg.seed, 0, 2, cfg.model.n_ctx)
    gguf_path = run / "model.gguf"
    tensors = {k: v.numpy() for k, v in model.gguf_tensors().items()}
    tokens_seen = step * tc.batch_size * cfg.model.n_ctx
    n_params = count_params(cfg.model)
    record = {
        "name": cfg.name, "seed": cfg.seed, "config": cfg.as_dict(),
        "n_params": n_params, "n_params_non_embedding": n_params - 2 * cfg.model.n_vocab * cfg.model.d_model,
        "steps": step, "steps_planned": n_steps, "finished": True,
        "tokens_seen": tokens_seen, "tokens_per_param": tokens_seen / n_params,
        "final_train_loss": float(np.mean(losses[-50:])) if losses else None,
        "final_val_loss": final_val, "final_val_loss_fp32": final_val_fp32,
        "outliers": outlier_stats(model, rows[:2]),
        "train_seconds": round(wall, 1), "threads": threads,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "device": "cpu"},
        "corpus": corpus.provenance, "rebuild_command": rebuild_command,
    }
    write_family_gguf(gguf_path, tensors, cfg.model, name=cfg.name,
                      extra={"seed": cfg.seed, "tokens_seen": tokens_seen, "config": json.dumps(cfg.as_dict())})
    record["gguf"] = {"file": gguf_path.name, "bytes": gguf_path.stat().st_size, "sha256": _sha256(gguf_path)}
    tmp = run / "record.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, run / "record.json")
    return record


def _sha256(path: Path) -> str:
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
