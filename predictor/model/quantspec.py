"""One description for every quantization the training data mentions: a llama.cpp preset on a
given architecture, or an integer method (RTN/GPTQ/AWQ/... at W bits, group g).

The common currency is the *reference error*: the relative RMSE (sqrt(Σ(x_q−x)²/Σx²)) that the
quantization gives a fixed, seeded, heavy-tailed synthetic weight sample. For a preset it is the
element-weighted mix over the GGML types that `llama-quantize` really picks for each tensor of the
architecture (so a 576-wide model whose "Q2_K" is mostly Q4_0 gets Q4_0's error, not Q2_K's); for
an integer method it is plain min/max round-to-nearest at that width and group. The learned models
add what the reference cannot know (how much better GPTQ/AWQ are than RTN, what an imatrix buys, how
sensitive a given model is).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from predictor import quant
from predictor.errors import UnsupportedError, UsageError
from predictor.io.base import ModelMetadata
from predictor.io.hf import hf_tensor_shapes, map_tensor_names
from predictor.quant.recipes import (
    PRESETS,
    RecipeModel,
    choose_tensor_types,
    get_preset,
    is_quantizable,
    requires_imatrix,
    tensor_role,
)
from predictor.quant.sizes import n_elements, tensor_bytes

# Synthetic sample: Student-t (8 d.o.f.) rows with per-row scales, 4096 wide (a multiple of every
# block size). Real weights are roughly this shape; only the ratios between types matter.
REF_ROWS, REF_COLS, REF_SEED = 16, 4096, 20240601
# Method classes the models know; anything else is "other".
METHOD_CLASSES = ("llama.cpp", "rtn", "gptq", "awq", "autoround", "hqq", "omniquant", "other")
_METHOD_ALIASES = {"autoround-rtn": "autoround", "gguf": "llama.cpp"}
# Types ggml refuses to quantize without an importance matrix: the reference uses a flat one.
_NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S"}
# Tensor roles whose share of the error Stage A weighs separately. llama.cpp's presets differ mostly
# in which roles get more bits (attn_v, ffn_down, output), and those are small by element count but
# large in output distortion; Q and K (and gate and up) are upgraded together, so they share a weight.
ROLE_GROUPS = ("attn_qk", "attn_v", "attn_output", "ffn_up_gate", "ffn_down", "output", "token_embd", "other")
_ROLE_GROUP = {"attn_q": "attn_qk", "attn_k": "attn_qk", "attn_v": "attn_v", "attn_output": "attn_output",
               "ffn_up": "ffn_up_gate", "ffn_gate": "ffn_up_gate", "ffn_down": "ffn_down", "output": "output",
               "token_embd": "token_embd"}
# Integer methods (RTN/GPTQ/AWQ/...) quantize the transformer blocks' linear layers only.
_BLOCK_GROUPS = ("attn_qk", "attn_v", "attn_output", "ffn_up_gate", "ffn_down", "other")


def role_group(tensor_name: str) -> str:
    """ROLE_GROUPS entry of a GGUF tensor name (blk.3.attn_q.weight -> attn_qk)."""
    return _ROLE_GROUP.get(tensor_role(tensor_name), "other")


def reference_sample() -> np.ndarray:
    rng = np.random.default_rng(REF_SEED)
    x = rng.standard_t(8, size=(REF_ROWS, REF_COLS)) * rng.uniform(0.5, 2.0, size=(REF_ROWS, 1))
    return x.astype(np.float32)


def compute_type_ref_rmse(types: Sequence[str] | None = None) -> dict[str, float]:
    """Relative RMSE of each GGML type on the reference sample (float types: their rounding error)."""
    x = reference_sample()
    out: dict[str, float] = {}
    for t in types or quant.supported_types():
        imat = np.ones(REF_COLS, dtype=np.float32) if t in _NEEDS_IMATRIX else None
        xq = quant.dequantize(quant.quantize(x, t, imatrix=imat), t, cols=REF_COLS)
        out[t] = float(np.sqrt(((xq.astype(np.float64) - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()))
    return out


def rtn_ref_rmse(bits: float, group: int | None) -> float:
    """Relative RMSE of asymmetric min/max round-to-nearest at `bits` with `group` weights per scale
    (-1 / None / 0 = one scale per 4096-wide row). Fractional bits are interpolated in log space."""
    x = reference_sample().astype(np.float64)
    g = REF_COLS if not group or group < 0 or group > REF_COLS else int(group)
    if REF_COLS % g:
        g = math.gcd(REF_COLS, g) or REF_COLS

    def at(b: int) -> float:
        blocks = x.reshape(-1, g)
        lo, hi = blocks.min(axis=1, keepdims=True), blocks.max(axis=1, keepdims=True)
        levels = 2**b - 1
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        q = np.clip(np.round((blocks - lo) / scale), 0, levels)
        xq = q * scale + lo
        return float(np.sqrt(((xq - blocks) ** 2).sum() / (blocks**2).sum()))

    b = max(1.0, min(16.0, float(bits)))
    lo_b, hi_b = int(math.floor(b)), int(math.ceil(b))
    if lo_b == hi_b:
        return at(lo_b)
    f = b - lo_b
    return float(math.exp((1 - f) * math.log(at(lo_b)) + f * math.log(at(hi_b))))


def method_class(method: str | None) -> str:
    m = (method or "").strip().lower()
    m = _METHOD_ALIASES.get(m, m)
    return m if m in METHOD_CLASSES else "other"


# ---------------------------------------------------------------------------------------------
# Architectures -> GGUF tensor specs


def metadata_from_registry(row: Mapping) -> ModelMetadata:
    """ModelMetadata from a registry row (training_data/registry.csv), for type mixes and sizes."""
    h, nh = row.get("hidden_size"), row.get("n_heads")
    return ModelMetadata(
        architecture=row.get("gguf_arch"),
        name=row.get("model"),
        n_layers=row.get("n_layers"),
        hidden_size=h,
        n_heads=nh,
        n_kv_heads=row.get("n_kv_heads") or nh,
        ffn_size=row.get("ffn_size") or row.get("expert_ffn_size"),
        vocab_size=row.get("vocab_size"),
        tied_embeddings=bool(row.get("tied_embeddings")),
        n_experts=row.get("n_experts"),
        head_dim=(h // nh) if h and nh else None,
        source="registry",
    )


def gguf_specs_from_metadata(meta: ModelMetadata) -> list[tuple[str, list[int]]]:
    """(GGUF name, ggml ne) of the tensors a config implies; [] when a size is missing.
    MoE expert tensors are not listed (hf_tensor_shapes does not know them): the dense mix stands in."""
    shapes = hf_tensor_shapes(meta)
    if not shapes:
        return []
    mapping = map_tensor_names([n for n, _ in shapes], meta.architecture)
    return [(mapping.names[n], list(reversed(s))) for n, s in shapes if n in mapping.names]


@dataclass
class PresetPlan:
    """A preset on one architecture: what llama-quantize would produce."""

    preset: str
    tensor_bytes: int
    bits_per_weight: float  # all tensors, norms included (file-level)
    type_shares: dict[str, float]  # GGML type -> share of the quantizable weights
    ref_rmse: float  # element-weighted reference error of the type mix
    needs_imatrix: bool
    # role group -> Σ_{tensors of the role} n_t · ref_t² / n_quantizable: each role's part of ref_rmse²
    role_mse: dict[str, float] = field(default_factory=dict)


def _type_ref(type_ref: Mapping[str, float], t: str) -> float:
    if t not in type_ref:
        raise UnsupportedError(f"no reference error for GGML type {t}")
    return type_ref[t]


def mix_ref_rmse(type_shares: Mapping[str, float], type_ref: Mapping[str, float]) -> float:
    """sqrt(Σ share_t · rmse_t²): squared errors add by element count."""
    return math.sqrt(sum(s * _type_ref(type_ref, t) ** 2 for t, s in type_shares.items()))


def plan_presets(
    specs: Sequence[tuple[str, Sequence[int]]],
    recipe_model: RecipeModel,
    presets: Sequence[str],
    type_ref: Mapping[str, float],
    *,
    has_imatrix: bool,
    source_types: Mapping[str, str] | None = None,
) -> dict[str, PresetPlan]:
    """Type mix, exact size and reference error of each preset; presets llama-quantize refuses for
    this model (no fallback for a row length) are left out."""
    out: dict[str, PresetPlan] = {}
    shapes = {n: list(ne) for n, ne in specs}
    for name in presets:
        p = get_preset(name)
        try:
            types = choose_tensor_types(specs, recipe_model, p, has_imatrix=has_imatrix, source_types=source_types)
        except UnsupportedError:
            continue
        total = n_all = n_q = 0
        counts: dict[str, int] = {}
        role_counts: dict[tuple[str, str], int] = {}
        for tname, t in types.items():
            ne = shapes[tname]
            total += tensor_bytes(t, ne)
            n = n_elements(ne)
            n_all += n
            if is_quantizable(tname, ne):
                n_q += n
                counts[t] = counts.get(t, 0) + n
                key = (role_group(tname), t)
                role_counts[key] = role_counts.get(key, 0) + n
        shares = {t: c / n_q for t, c in sorted(counts.items())} if n_q else {}
        role_mse = dict.fromkeys(ROLE_GROUPS, 0.0)
        for (g, t), c in role_counts.items():
            role_mse[g] += c / n_q * _type_ref(type_ref, t) ** 2
        out[p.name] = PresetPlan(
            preset=p.name,
            tensor_bytes=total,
            bits_per_weight=8.0 * total / n_all if n_all else 0.0,
            type_shares=shares,
            ref_rmse=mix_ref_rmse(shares, type_ref),
            needs_imatrix=requires_imatrix(p, types),
            role_mse=role_mse,
        )
    return out


def block_role_shares(specs: Sequence[tuple[str, Sequence[int]]]) -> dict[str, float]:
    """Share of all quantizable elements held by each role group (token_embd and output included)."""
    counts = dict.fromkeys(ROLE_GROUPS, 0)
    for tname, ne in specs:
        if is_quantizable(tname, ne):
            counts[role_group(tname)] += n_elements(ne)
    n = sum(counts.values())
    return {g: c / n for g, c in counts.items()} if n else {}


def integer_role_mse(ref_rmse: float, shares: Mapping[str, float]) -> dict[str, float]:
    """Role parts of an integer method's error: the blocks' linear layers at `ref_rmse`, the token
    embedding and output head left in 16 bits (as GPTQ/AWQ/RTN checkpoints keep them)."""
    return {g: (shares.get(g, 0.0) * ref_rmse**2 if g in _BLOCK_GROUPS else 0.0) for g in ROLE_GROUPS}


def preset_nominal_bits(preset: str) -> float:
    """Nominal bits of a preset's main type (Q4_K_M -> 4, IQ3_XXS -> 3, Q8_0 -> 8, IQ1_S -> 1.5)."""
    p = get_preset(preset)
    t = p.default_type
    if t in ("F32",):
        return 32.0
    if t in ("F16", "BF16"):
        return 16.0
    if t.startswith("IQ1"):
        return 1.5
    if t.startswith("TQ"):
        return 1.6
    digits = [c for c in t if c.isdigit()]
    if not digits:
        raise UsageError(f"cannot tell the nominal bits of preset {preset}")
    return float(digits[0])


def is_known_preset(name: str) -> bool:
    try:
        get_preset(name)
    except UsageError:
        return False
    return True


__all__ = [
    "METHOD_CLASSES",
    "ROLE_GROUPS",
    "block_role_shares",
    "integer_role_mse",
    "role_group",
    "PRESETS",
    "PresetPlan",
    "compute_type_ref_rmse",
    "gguf_specs_from_metadata",
    "is_known_preset",
    "metadata_from_registry",
    "method_class",
    "mix_ref_rmse",
    "plan_presets",
    "preset_nominal_bits",
    "rtn_ref_rmse",
]
