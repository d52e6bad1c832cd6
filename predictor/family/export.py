"""Write a trained family model as an F32 llama GGUF that llama.cpp loads, with its byte vocabulary.

The tensors are already in llama.cpp's layout (see model.py: adjacent-pair RoPE, so no Q/K row
permutation). 1-D norm weights and every matrix are F32: this is the full-precision base that
`measure` quantizes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from predictor.family.tokenizer import BOS_ID, EOS_ID, UNK_ID, gguf_vocab
from predictor.io.gguf import write_staged_gguf

__all__ = ["write_family_gguf", "export_checkpoint", "llama_cpp_logits", "llama_cpp_tokenize"]


def write_family_gguf(path: str | os.PathLike, tensors: dict[str, np.ndarray], cfg, *, name: str,
                      extra: dict[str, str] | None = None) -> Path:
    """Write `tensors` (GGUF names -> float32 arrays, numpy (rows, cols) order) with `cfg`'s hyperparameters.

    `extra` adds string metadata (provenance) under "quantpredict.family.*"."""
    import gguf  # noqa: PLC0415

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".part")
    tokens, scores, types = gguf_vocab()
    w = gguf.GGUFWriter(os.fspath(tmp), "llama")
    w.add_name(name)
    w.add_context_length(cfg.n_ctx)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.d_ff)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_base))
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_file_type(0)  # ALL_F32
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_unk_token_id(UNK_ID)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for k, v in (extra or {}).items():
        w.add_string(f"quantpredict.family.{k}", str(v))
    for tname, x in tensors.items():
        w.add_tensor(tname, np.ascontiguousarray(x, dtype=np.float32))
    write_staged_gguf(w)
    tmp.replace(path)
    return path


_LOG_CALLBACK = None  # kept alive for the process: llama.cpp calls it from C


def _llama_cpp():
    """llama_cpp with its logging silenced (imported lazily: only the checks need it)."""
    global _LOG_CALLBACK
    import ctypes  # noqa: PLC0415

    import llama_cpp as L  # noqa: PLC0415

    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = L.llama_log_callback(lambda level, text, user: None)
        L.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p())
        L.llama_backend_init()
    return L


def llama_cpp_logits(path: str | os.PathLike, tokens: list[int], *, n_threads: int = 1) -> np.ndarray:
    """(len(tokens), n_vocab) float32 logits of every position, from llama.cpp (CPU, plain kernels).

    A check of the export: compare with the torch forward pass."""
    L = _llama_cpp()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = False  # repacked / AMX kernels can differ from the plain ones
    model = L.llama_model_load_from_file(os.fspath(path).encode(), mp)
    if not model:
        raise RuntimeError(f"{path}: llama.cpp could not load the GGUF")
    try:
        cp = L.llama_context_default_params()
        cp.n_ctx = max(32, len(tokens))
        cp.n_batch = cp.n_ubatch = max(32, len(tokens))
        cp.n_threads = cp.n_threads_batch = n_threads
        # F32 K/V cache and no flash attention: the default F16 cache alone moves logits by ~1e-3
        # relative, which would hide a real export error; with these the match is ~1e-6
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = L.llama_init_from_model(model, cp)
        try:
            n_vocab = int(L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
            b = L.llama_batch_init(len(tokens), 0, 1)
            try:
                for i, t in enumerate(tokens):
                    b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, 1
                    b.seq_id[i][0] = 0
                b.n_tokens = len(tokens)
                if L.llama_decode(ctx, b) != 0:
                    raise RuntimeError(f"{path}: llama_decode failed")
                return np.ctypeslib.as_array(L.llama_get_logits(ctx), shape=(len(tokens), n_vocab)).copy()
            finally:
                L.llama_batch_free(b)
        finally:
            L.llama_free(ctx)
    finally:
        L.llama_model_free(model)


def llama_cpp_tokenize(path: str | os.PathLike, text: str, *, bos: bool = True) -> list[int]:
    """llama.cpp's tokenization of `text` with the GGUF's vocabulary (vocab only, no weights)."""
    L = _llama_cpp()
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(os.fspath(path).encode(), mp)
    if not model:
        raise RuntimeError(f"{path}: llama.cpp could not load the GGUF")
    try:
        vocab = L.llama_model_get_vocab(model)
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(vocab, data, len(data), buf, cap, bos, False)
        return list(buf[:n])
    finally:
        L.llama_model_free(model)


def export_checkpoint(run_dir: str | os.PathLike, out_path: str | os.PathLike | None = None) -> Path:
    """Write the GGUF of a run folder's latest checkpoint (default RUN/model.gguf); returns its path."""
    import json  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from predictor.errors import InputFileError  # noqa: PLC0415
    from predictor.family.model import FamilyLM  # noqa: PLC0415
    from predictor.family.train import RunConfig  # noqa: PLC0415

    run = Path(run_dir)
    cfg_path, ckpt = run / "config.json", run / "ckpt.pt"
    if not cfg_path.is_file() or not ckpt.is_file():
        raise InputFileError(run, "no config.json and ckpt.pt here", "give a run folder of quantpredict family train")
    try:
        cfg = RunConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")), kquant_sizes=False)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model = FamilyLM(cfg.model)
        model.load_state_dict(state["model"])
    except (json.JSONDecodeError, KeyError, RuntimeError, OSError) as e:
        raise InputFileError(run, f"unreadable run ({type(e).__name__}: {str(e)[:120]})",
                             "retrain it with quantpredict family train") from None
    out = Path(out_path) if out_path else run / "model.gguf"
    tensors = {k: v.numpy() for k, v in model.gguf_tensors().items()}
    return write_family_gguf(out, tensors, cfg.model, name=cfg.name,
                             extra={"seed": cfg.seed, "step": int(state["step"]), "config": json.dumps(cfg.as_dict())})
