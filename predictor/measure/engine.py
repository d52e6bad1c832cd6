"""llama.cpp through llama-cpp-python's C API: load a GGUF, tokenize, and get next-token logits.

Imported lazily: the core install does not need llama-cpp-python (`pip install quantpredict[measure]`).
We use the low-level API rather than `llama_cpp.Llama` because we need two things it hides:
  * `use_extra_bufts = False` — CPU weight repacking (and AMX kernels where the build enables them)
    can differ from the plain kernels and crashes with SIGILL on VMs that advertise AMX without
    enabling it; the plain kernels are what every CPU runs;
  * per-token logits flags, so a long context costs no output-layer work, and KV-cache reuse of a
    shared prefix (multiple-choice endings, few-shot headers) without re-evaluating it.
Memory is bounded by one batch of logits (n_scored x n_vocab float32).
"""

from __future__ import annotations

import ctypes
import os
from typing import Sequence

import numpy as np

from predictor.errors import InputFileError, UnsupportedError, UsageError

__all__ = ["Engine", "engine_version", "load_llama_cpp"]

_LOG_CALLBACK = None  # kept alive for the process: llama.cpp calls it from C


def load_llama_cpp():
    """The llama_cpp module, or a one-line UnsupportedError saying how to install it."""
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError:
        raise UnsupportedError(
            "measure needs llama-cpp-python — pip install 'quantpredict[measure]' (compiles llama.cpp, 10-25 min)"
        ) from None
    return llama_cpp


def engine_version() -> str:
    llama_cpp = load_llama_cpp()
    return f"llama-cpp-python {llama_cpp.__version__}"


def _silence(llama_cpp) -> None:
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = llama_cpp.llama_log_callback(lambda level, text, user: None)
        llama_cpp.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        llama_cpp.llama_backend_init()


class Engine:
    """One loaded model with one sequence in its KV cache.

    `score(prefix, continuation)` returns the logits that predict each continuation token
    (row j predicts continuation[j]); the KV cache keeps the last evaluated tokens, and a new call
    re-evaluates only from the first token that differs (at least one token, to get its logits)."""

    MAX_SEQ = 8  # parallel sequences for multiple-choice endings

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 1024, n_threads: int = 2, n_batch: int = 512):
        L = load_llama_cpp()
        _silence(L)
        self._L = L
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise InputFileError(self.path, "file not found", "check the path")
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = False
        self._model = L.llama_model_load_from_file(self.path.encode(), mp)
        if not self._model:
            raise InputFileError(self.path, "llama.cpp could not load this GGUF",
                                 "check that it is a complete model file of an architecture llama.cpp supports")
        cp = L.llama_context_default_params()
        cp.n_ctx = n_ctx
        cp.n_batch = n_batch
        cp.n_ubatch = n_batch
        cp.n_seq_max = self.MAX_SEQ
        cp.kv_unified = True  # choices of one question share the prefix's cells
        cp.n_threads = n_threads
        cp.n_threads_batch = n_threads
        self._ctx = L.llama_init_from_model(self._model, cp)
        if not self._ctx:
            L.llama_model_free(self._model)
            raise UsageError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self._vocab = L.llama_model_get_vocab(self._model)
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))
        self.bos = int(L.llama_vocab_bos(self._vocab))
        self._batch = L.llama_batch_init(n_batch, 0, 1)
        self._cached: list[int] = []  # tokens whose K/V are in the cache, positions 0..len-1
        self.n_evaluated = 0  # tokens run through the model (throughput accounting)

    # -- tokens ---------------------------------------------------------------------------------
    def tokenize(self, text: str, *, bos: bool = False) -> list[int]:
        L = self._L
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, bos and self.add_bos, False)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (L.llama_token * cap)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, bos and self.add_bos, False)
        return list(buf[:n])

    def prefix_tokens(self, text: str) -> list[int]:
        """Tokens of a sequence start (with BOS when the model's vocabulary asks for one)."""
        return self.tokenize(text, bos=True)

    # -- evaluation -----------------------------------------------------------------------------
    def _decode(self, tokens: Sequence[int], start: int, want_logits: Sequence[bool]) -> np.ndarray:
        """Evaluate tokens at positions start.., return logits rows of the flagged tokens."""
        L = self._L
        b = self._batch
        rows = []
        for c0 in range(0, len(tokens), self.n_batch):
            chunk = tokens[c0:c0 + self.n_batch]
            flags = want_logits[c0:c0 + self.n_batch]
            for i, tok in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = start + c0 + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 1 if flags[i] else 0
            b.n_tokens = len(chunk)
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                self._cached = []
                raise UsageError(f"{self.path}: llama_decode failed with code {rc}")
            self.n_evaluated += len(chunk)
            n_out = int(sum(1 for f in flags if f))
            if n_out:
                ptr = L.llama_get_logits(self._ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        if not rows:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]

    def _reuse_cache(self, tokens: Sequence[int], limit: int) -> int:
        """Keep the cached tokens that `tokens` starts with (at most `limit`), drop the rest of the KV
        cache; returns how many are kept."""
        common = 0
        limit = min(len(self._cached), limit)
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        mem = self._L.llama_get_memory(self._ctx)
        if common == 0:
            self._L.llama_memory_clear(mem, True)
        else:
            self._L.llama_memory_seq_rm(mem, 0, common, -1)
        return common

    def _eval_prefix(self, prefix: Sequence[int]) -> np.ndarray:
        """Put `prefix` in the cache (sequence 0), reusing what is there; logits of its last token (1, V)."""
        common = self._reuse_cache(prefix, len(prefix) - 1)
        todo = list(prefix[common:])
        out = self._decode(todo, common, [i == len(todo) - 1 for i in range(len(todo))])
        self._cached = list(prefix)
        return out

    def score(self, prefix: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """float32 (len(continuation), n_vocab): row j = logits after prefix + continuation[:j]."""
        seq = list(prefix) + list(continuation)
        if not prefix or not continuation:
            raise UsageError("score needs a non-empty prefix and continuation")
        if len(seq) > self.n_ctx:
            raise UsageError(f"sequence of {len(seq)} tokens exceeds the context of {self.n_ctx}")
        # reuse the cached common prefix, but re-evaluate at least the token before the continuation
        common = self._reuse_cache(seq, len(prefix) - 1)
        todo = seq[common:-1]  # the last token's logits predict nothing we score
        first_scored = len(prefix) - 1 - common
        flags = [i >= first_scored for i in range(len(todo))]
        out = self._decode(todo, common, flags)
        self._cached = seq[:-1]
        return out

    def score_choices(self, prefix: Sequence[int], choices: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """`score(prefix, c)` for every choice c, with the choices evaluated together in one batch
        (one sequence each, sharing the prefix's KV cells), so a question costs two model calls."""
        total = len(prefix) + sum(len(c) for c in choices)
        if (len(choices) > self.MAX_SEQ or total > self.n_ctx or sum(len(c) for c in choices) > self.n_batch
                or not prefix or not all(choices)):
            return [self.score(prefix, c) for c in choices]
        L = self._L
        mem = L.llama_get_memory(self._ctx)
        last = self._eval_prefix(prefix)
        for s in range(1, len(choices)):
            L.llama_memory_seq_cp(mem, 0, s, -1, -1)
        b = self._batch
        n, spans = 0, []
        for s, c in enumerate(choices):
            spans.append((n, len(c) - 1))
            for j, tok in enumerate(c[:-1]):
                b.token[n] = tok
                b.pos[n] = len(prefix) + j
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = s
                b.logits[n] = 1
                n += 1
        rows = np.empty((0, self.n_vocab), dtype=np.float32)
        if n:
            b.n_tokens = n
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                self._cached = []
                raise UsageError(f"{self.path}: llama_decode failed with code {rc}")
            self.n_evaluated += n
            rows = np.ctypeslib.as_array(L.llama_get_logits(self._ctx), shape=(n, self.n_vocab)).copy()
        for s in range(1, len(choices)):
            L.llama_memory_seq_rm(mem, s, -1, -1)
        L.llama_memory_seq_rm(mem, 0, len(prefix), -1)
        self._cached = list(prefix)
        return [np.concatenate([last, rows[o:o + k]], axis=0) for o, k in spans]

    def close(self) -> None:
        L = self._L
        if getattr(self, "_batch", None) is not None:
            L.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "_ctx", None):
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
