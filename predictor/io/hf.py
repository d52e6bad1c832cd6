"""Hugging Face side of the readers: config.json -> ModelMetadata, HF -> GGUF tensor names, and the
tensor list a config implies (for parameter estimates before download and for generated fixtures).

Name mapping follows llama.cpp's converter (convert_hf_to_gguf.py + gguf-py tensor_mapping.py) for the
dense families we support: llama/mistral/smollm, qwen2, qwen3, gemma/gemma2/gemma3, phi3. What it
cannot map is kept under its source name and listed as unmapped; what llama.cpp drops on purpose
(rotary inv_freq buffers, gemma2's lm_head, vision towers) is listed as ignored with a reason.

Known differences from the real conversion (they change values, not shapes or types):
- llama.cpp permutes the rows of llama-arch attn_q/attn_k (rotary layout); we keep HF row order.
  Row order does not change per-row quantization error or per-column imatrix statistics.
- gemma norms get +1 added by the converter; norms stay F32 in every preset, so it does not matter.
- gemma3 trims token_embd to the tokenizer's real vocab (e.g. 262208 -> 262144 rows); we keep all rows.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from predictor.errors import InputFileError
from predictor.io.base import ModelMetadata, TensorInfo

MAX_CONFIG_BYTES = 16 * 1024 * 1024

# HF model_type -> GGUF architecture name (llama.cpp's MODEL_ARCH names).
HF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "llama",
    "mixtral": "llama",
    "smollm3": "smollm3",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen2_moe": "qwen2moe",
    "qwen3_moe": "qwen3moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
}
# Fallback when model_type is missing: the class name in "architectures".
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "SmolLM3ForCausalLM": "smollm3",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
    "Phi3ForCausalLM": "phi3",
}
# Families whose config.json leaves out keys that transformers fills with class defaults.
_FAMILY_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   max_position_embeddings=8192),
    "gemma3": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                   max_position_embeddings=131072),
}
# transformers' default for tie_word_embeddings per family (used when config.json omits it).
_TIED_DEFAULT = {"gemma": True, "gemma2": True, "gemma3": True, "llama": False, "smollm3": False,
                 "qwen2": False, "qwen3": False, "qwen2moe": False, "qwen3moe": False, "phi3": False}
_QKV_BIAS_FAMILIES = {"qwen2", "qwen2moe"}  # Qwen2 attention always has q/k/v biases
_QK_NORM_FAMILIES = {"qwen3", "qwen3moe", "gemma3"}
_GEMMA_NORM_FAMILIES = {"gemma2", "gemma3"}

# ---------------------------------------------------------------------------------------------------
# JSON files (config.json, index.json): size-capped, duplicate keys rejected.


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def parse_json_object(data: bytes, path: str | os.PathLike, what: str) -> dict:
    """Parse bytes as one JSON object; any problem is an InputFileError naming `path`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(path, f"{what} is not valid UTF-8 (byte {e.start})",
                             "the file is corrupt or not a Hugging Face model file") from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise InputFileError(path, f"{what} has the key {str(e)!r} twice",
                             "the file is corrupt or hostile; re-download it") from None
    except (ValueError, RecursionError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputFileError(path, f"{what} is not valid JSON ({msg})",
                             "the file is corrupt or truncated; re-download it") from None
    if not isinstance(obj, dict):
        raise InputFileError(path, f"{what} is JSON but not an object ({type(obj).__name__})",
                             "expected a JSON object {...}")
    return obj


def read_json_object(path: str | os.PathLike, *, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> dict:
    """Read a small JSON object file, refusing files larger than `max_bytes`."""
    try:
        size = os.path.getsize(path)
        if size > max_bytes:
            raise InputFileError(path, f"{what} is {size} bytes, more than the {max_bytes}-byte limit",
                                 "this is not a normal Hugging Face file; check the path")
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise InputFileError(path, f"cannot read {what} ({e.strerror or e})",
                             "check that the file exists and is readable") from None
    return parse_json_object(data, path, what)


# ---------------------------------------------------------------------------------------------------
# config.json -> ModelMetadata


def _find_config(path: Path) -> Path:
    return path / "config.json" if path.is_dir() else path


def _int_field(cfg: dict, keys: tuple[str, ...], path, *, allow_zero=False) -> int | None:
    for key in keys:
        if key in cfg and cfg[key] is not None:
            v = cfg[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 0 or (v == 0 and not allow_zero):
                raise InputFileError(path, f"config.json has {key}={v!r}, expected a positive integer",
                                     "fix or re-download config.json")
            return v
    return None


def _text_config(cfg: dict) -> dict:
    """Multimodal configs (gemma3, mistral3, llava) nest the language model under text_config."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        return cfg
    merged = dict(text)
    for key in ("tie_word_embeddings", "torch_dtype", "_name_or_path"):
        if key not in merged and key in cfg:
            merged[key] = cfg[key]
    return merged


def _architecture(cfg: dict, text: dict) -> str | None:
    for model_type in (text.get("model_type"), cfg.get("model_type")):
        if isinstance(model_type, str) and model_type in HF_MODEL_TYPES:
            return HF_MODEL_TYPES[model_type]
    archs = cfg.get("architectures")
    if isinstance(archs, list):
        for a in archs:
            if isinstance(a, str) and a in HF_ARCHITECTURES:
                return HF_ARCHITECTURES[a]
    return None


def metadata_from_config(cfg: dict, *, path: str | os.PathLike = "config.json") -> ModelMetadata:
    """ModelMetadata from an already-parsed config.json dict (n_params estimated, no tensors)."""
    text = _text_config(cfg)
    arch = _architecture(cfg, text)
    defaults_used = []
    if arch in _FAMILY_DEFAULTS:
        text = dict(text)
        for key, value in _FAMILY_DEFAULTS[arch].items():
            if key not in text:
                text[key] = value
                defaults_used.append(key)

    n_heads = _int_field(text, ("num_attention_heads", "n_head"), path)
    hidden = _int_field(text, ("hidden_size", "n_embd"), path)
    n_kv = _int_field(text, ("num_key_value_heads", "n_head_kv"), path) or n_heads
    head_dim = _int_field(text, ("head_dim",), path)
    if head_dim is None and hidden and n_heads:
        head_dim = hidden // n_heads
    n_experts = _int_field(text, ("num_local_experts", "num_experts", "n_routed_experts"), path,
                           allow_zero=True)
    tied = text.get("tie_word_embeddings")
    if not isinstance(tied, bool):
        tied = _TIED_DEFAULT.get(arch)

    model_type = text.get("model_type", cfg.get("model_type"))
    archs = cfg.get("architectures")
    extra = {
        "hf_model_type": model_type if isinstance(model_type, str) else None,
        "hf_architectures": [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else [],
        "attention_bias": arch in _QKV_BIAS_FAMILIES or text.get("attention_bias") is True,
        "attention_output_bias": text.get("attention_bias") is True and arch not in _QKV_BIAS_FAMILIES,
        "mlp_bias": text.get("mlp_bias") is True,
        "n_experts_used": _int_field(text, ("num_experts_per_tok", "num_experts_per_token"), path,
                                     allow_zero=True),
        "moe_ffn_size": _int_field(text, ("moe_intermediate_size",), path),
        "shared_expert_ffn_size": _int_field(text, ("shared_expert_intermediate_size",), path,
                                             allow_zero=True),
        "torch_dtype": text.get("torch_dtype") if isinstance(text.get("torch_dtype"), str) else None,
        "config_tied_embeddings": text.get("tie_word_embeddings"),
        "defaults_used": defaults_used,
    }
    name = cfg.get("_name_or_path")
    if not isinstance(name, str) or not name:
        parent = Path(path).resolve().parent.name if str(path) else ""
        name = parent or None
    meta = ModelMetadata(
        architecture=arch,
        name=name,
        n_layers=_int_field(text, ("num_hidden_layers", "n_layer", "num_layers"), path),
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        ffn_size=_int_field(text, ("intermediate_size", "n_inner"), path),
        vocab_size=_int_field(text, ("vocab_size",), path),
        tied_embeddings=tied,
        n_experts=n_experts or None,
        context_length=_int_field(text, ("max_position_embeddings", "n_positions", "seq_length"), path),
        head_dim=head_dim,
        source="config.json",
        extra=extra,
    )
    meta.n_params = estimate_n_params(meta)
    return meta


def read_hf_config(path: str | os.PathLike) -> ModelMetadata:
    """Metadata from a config.json (or a folder holding one); n_params is estimated from the config."""
    config_path = _find_config(Path(path))
    cfg = read_json_object(config_path, what="config.json")
    return metadata_from_config(cfg, path=config_path)


# ---------------------------------------------------------------------------------------------------
# The tensors a config implies (HF names and shapes), for estimates and fixtures.


def hf_tensor_shapes(meta: ModelMetadata) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and numpy shapes of a dense model of a supported family, in checkpoint order.

    Returns [] when the metadata lacks a size it needs. MoE experts are not listed (see
    estimate_n_params)."""
    arch = meta.architecture
    h, L, ffn, V = meta.hidden_size, meta.n_layers, meta.ffn_size, meta.vocab_size
    nh, nkv, hd = meta.n_heads, meta.n_kv_heads, meta.head_dim
    if None in (h, L, ffn, V, nh, nkv, hd):
        return []
    ex = meta.extra
    q_out, kv_out = nh * hd, nkv * hd
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (V, h))]
    for i in range(L):
        p = f"model.layers.{i}."
        out.append((p + "input_layernorm.weight", (h,)))
        if arch == "phi3":
            out.append((p + "self_attn.qkv_proj.weight", (q_out + 2 * kv_out, h)))
        else:
            out += [(p + "self_attn.q_proj.weight", (q_out, h)),
                    (p + "self_attn.k_proj.weight", (kv_out, h)),
                    (p + "self_attn.v_proj.weight", (kv_out, h))]
            if ex.get("attention_bias"):
                out += [(p + "self_attn.q_proj.bias", (q_out,)),
                        (p + "self_attn.k_proj.bias", (kv_out,)),
                        (p + "self_attn.v_proj.bias", (kv_out,))]
        out.append((p + "self_attn.o_proj.weight", (h, q_out)))
        if ex.get("attention_output_bias"):
            out.append((p + "self_attn.o_proj.bias", (h,)))
        if arch in _QK_NORM_FAMILIES:
            out += [(p + "self_attn.q_norm.weight", (hd,)), (p + "self_attn.k_norm.weight", (hd,))]
        out.append((p + "post_attention_layernorm.weight", (h,)))
        if arch in _GEMMA_NORM_FAMILIES:
            out += [(p + "pre_feedforward_layernorm.weight", (h,)),
                    (p + "post_feedforward_layernorm.weight", (h,))]
        if arch == "phi3":
            out.append((p + "mlp.gate_up_proj.weight", (2 * ffn, h)))
        else:
            out += [(p + "mlp.gate_proj.weight", (ffn, h)), (p + "mlp.up_proj.weight", (ffn, h))]
        out.append((p + "mlp.down_proj.weight", (h, ffn)))
        if ex.get("mlp_bias"):
            out += [(p + "mlp.gate_proj.bias", (ffn,)), (p + "mlp.up_proj.bias", (ffn,)),
                    (p + "mlp.down_proj.bias", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not meta.tied_embeddings:
        out.append(("lm_head.weight", (V, h)))
    return out


def estimate_n_params(meta: ModelMetadata) -> int | None:
    """Parameter count implied by a config (None when a needed size is missing).

    Exact for the dense families above (checked against real GGUF tensor lists); for MoE configs it
    counts routed experts + router (+ Qwen's shared expert) and is approximate."""
    shapes = hf_tensor_shapes(meta)
    if not shapes:
        return None
    total = sum(int(np.prod(s, dtype=np.int64)) for _, s in shapes)
    n_exp = meta.n_experts or 0
    if n_exp > 1:
        h, L = meta.hidden_size, meta.n_layers
        ex = meta.extra
        moe_ffn = ex.get("moe_ffn_size") or meta.ffn_size
        dense_ffn = 3 * h * meta.ffn_size
        per_layer = n_exp * 3 * h * moe_ffn + h * n_exp
        shared = ex.get("shared_expert_ffn_size") or 0
        if shared:
            per_layer += 3 * h * shared + h
        total += L * (per_layer - dense_ffn)
    if meta.architecture == "gemma2" and not meta.tied_embeddings:
        total -= meta.vocab_size * meta.hidden_size  # llama.cpp drops gemma2's lm_head
    return total


# ---------------------------------------------------------------------------------------------------
# HF -> GGUF tensor names

_LAYER_COMMON = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_QK_NORM = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
# Gemma2/3 have four norms per block; post_attention_layernorm is NOT the FFN input norm there.
_LAYER_GEMMA_NORMS = {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}
# Phi3 stores q|k|v and gate|up fused; llama.cpp keeps them fused (attn_qkv, ffn_up of 2*n_ff rows).
_LAYER_PHI3 = {"self_attn.qkv_proj": "attn_qkv", "mlp.gate_up_proj": "ffn_up"}


def _layer_table(arch: str | None, gemma_norms: bool) -> dict[str, str]:
    table = dict(_LAYER_COMMON)
    if arch == "phi3":
        del table["mlp.gate_proj"]
        table.update(_LAYER_PHI3)
    elif arch is None:
        table.update(_LAYER_PHI3)
        table.update(_LAYER_QK_NORM)
    if arch in _QK_NORM_FAMILIES:
        table.update(_LAYER_QK_NORM)
    if arch in _GEMMA_NORM_FAMILIES or (arch is None and gemma_norms):
        table.update(_LAYER_GEMMA_NORMS)
    return table


_LAYER_RE = re.compile(r"^model\.layers\.(\d{1,6})\.(.+)\.(weight|bias)$")
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")
_MULTIMODAL_PREFIXES = ("vision_tower.", "vision_model.", "multi_modal_projector.", "visual.",
                        "audio_tower.", "model.vision_tower.", "model.multi_modal_projector.",
                        "model.visual.")


@dataclass
class NameMapping:
    """Result of mapping a checkpoint's tensor names to GGUF names."""

    names: dict[str, str] = field(default_factory=dict)  # source -> GGUF name (or source if unmapped)
    unmapped: list[str] = field(default_factory=list)  # kept under their source name
    ignored: dict[str, str] = field(default_factory=dict)  # source -> why llama.cpp drops it


def _normalise(name: str) -> str:
    # llama.cpp strips "language_model." (gemma3/llava/mistral3 checkpoints) and prefixes bare
    # LlamaModel/Qwen2Model names with "model.".
    name = name.replace("language_model.", "")
    if name.startswith("layers.") or name in ("embed_tokens.weight", "norm.weight"):
        name = "model." + name
    return name


def map_tensor_names(source_names: list[str], architecture: str | None) -> NameMapping:
    """Map HF tensor names to GGUF names for `architecture` (a GGUF arch name, or None = generic)."""
    gemma_norms = any("pre_feedforward_layernorm" in n for n in source_names)
    table = _layer_table(architecture, gemma_norms)
    result = NameMapping()
    for src in source_names:
        if src.endswith(_IGNORED_SUFFIXES):
            result.ignored[src] = "rotary/attention buffer, not a weight (llama.cpp skips it)"
            continue
        if src.startswith(_MULTIMODAL_PREFIXES):
            result.ignored[src] = "vision/audio tower; llama.cpp puts it in a separate mmproj file"
            continue
        name = _normalise(src)
        gguf = None
        if name == "model.embed_tokens.weight":
            gguf = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf = "output_norm.weight"
        elif name == "lm_head.weight":
            if architecture == "gemma2":
                result.ignored[src] = "gemma2 always ties embeddings; llama.cpp skips lm_head"
                continue
            gguf = "output.weight"
        else:
            m = _LAYER_RE.match(name)
            if m and m.group(2) in table:
                gguf = f"blk.{int(m.group(1))}.{table[m.group(2)]}.{m.group(3)}"
        if gguf is None:
            result.unmapped.append(src)
            gguf = src
        result.names[src] = gguf
    return result


# ---------------------------------------------------------------------------------------------------
# Metadata completed from the tensors actually present

_BLK_RE = re.compile(r"^blk\.(\d+)\.")


def complete_metadata(meta: ModelMetadata, tensors: list[TensorInfo]) -> ModelMetadata:
    """Fill what tensor shapes tell us: n_params (counted), tied embeddings, and missing sizes."""
    if not tensors:
        return meta
    by_name = {t.name: t for t in tensors}
    meta.n_params = sum(t.n_elements for t in tensors)
    meta.extra["n_params_from"] = "tensors"
    emb = by_name.get("token_embd.weight")
    if emb is not None and len(emb.shape) == 2:
        meta.vocab_size = meta.vocab_size or emb.shape[0]
        meta.hidden_size = meta.hidden_size or emb.shape[1]
    if emb is not None or "output.weight" in by_name:
        # what llama.cpp will do: without output.weight it reuses token_embd
        meta.tied_embeddings = "output.weight" not in by_name
    if meta.n_layers is None:
        blocks = [int(m.group(1)) for t in tensors if (m := _BLK_RE.match(t.name))]
        meta.n_layers = max(blocks) + 1 if blocks else None
    if meta.ffn_size is None:
        gate, up = by_name.get("blk.0.ffn_gate.weight"), by_name.get("blk.0.ffn_up.weight")
        if gate is not None and len(gate.shape) == 2:
            meta.ffn_size = gate.shape[0]
        elif up is not None and len(up.shape) == 2:
            meta.ffn_size = up.shape[0] // (2 if meta.architecture == "phi3" else 1)
    return meta


# ---------------------------------------------------------------------------------------------------
# A reader for a config.json without weights ("predict before download")


class ConfigOnlyReader:
    """ModelReader over a config.json alone: metadata (n_params estimated), no tensors."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.config_path = os.fspath(_find_config(Path(path)))
        self.metadata = read_hf_config(self.config_path)
        self.tensors: list[TensorInfo] = []
        self.unmapped: list[str] = []
        self.ignored: dict[str, str] = {}

    def _no_weights(self, name: str):
        return InputFileError(self.path, f"has only config.json, no weights (asked for tensor {name!r})",
                              "download the model's .safetensors files, or pass a GGUF file")

    def read_tensor(self, name: str) -> np.ndarray:
        raise self._no_weights(name)

    def read_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        raise self._no_weights(name)

    def iter_tensors(self) -> Iterator[tuple[TensorInfo, np.ndarray]]:
        return iter(())

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ConfigOnlyReader({self.path!r}, architecture={self.metadata.architecture!r})"


__all__ = [
    "ConfigOnlyReader",
    "HF_MODEL_TYPES",
    "NameMapping",
    "complete_metadata",
    "estimate_n_params",
    "hf_tensor_shapes",
    "map_tensor_names",
    "metadata_from_config",
    "parse_json_object",
    "read_hf_config",
    "read_json_object",
]
