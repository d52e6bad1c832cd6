"""llama-quantize file types ("presets") as data: which GGML type every tensor of a model gets.

Spec: RECIPES.md of the project's shared reference data (a reading of llama.cpp
`src/llama-quant.cpp` at commit 3af988f). Proven against every decision of `llama-quantize --dry-run`
in tests/data/reference/recipes_dryrun_*.json (tests/test_recipes.py).

How a tensor's type is chosen (`choose_tensor_types`):
  1. not quantizable (1-D, norms, MoE router, ...)  -> keeps its source type
  2. preset with a float default (F16/BF16/F32)      -> the default type, nothing else
  3. output.weight (or token_embd when tied)         -> `_output_type` (shared rule)
  4. otherwise the preset's rule list for the tensor's role, first match wins, else the default;
     attn_v-like tensors of the "standard" family then get `_attn_v_bump` (70B / 8-expert)
  5. `_shape_fallback` when the row length is not a multiple of the chosen type's block size.

A rule is (type, condition, condition, ...): all conditions must hold. Conditions are names from
`_CONDITIONS` ("!" negates). Index conditions use the role's own counter: for attn_v-like tensors
`i` = running index of attn_v-like tensors and `n` = their count; for ffn_* `i` = the running count
of that role (dense) or the layer parsed from `blk.N.` (MoE), and `n` = the layer count.
`count` is always the running count of the role (llama.cpp's IQ1/IQ2 ffn_down rule uses it even
for MoE models).

Deliberate limits: no `--pure`, `--tensor-type`, `--output-tensor-type`, `--token-embedding-type`,
`--leave-output-tensor` or `--prune-layers`. A newer llama.cpp (vendored in llama-cpp-python 0.3.36)
turns an unaligned 32-block type into F16 instead of refusing, and adds GLM5-next rules; we follow
the reference commit (refuse, no GLM5-next rules).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from predictor.errors import UnsupportedError, UsageError
from predictor.quant.types import get_type

# ---------------------------------------------------------------------------------------------
# The data table. Keys of `rules` are roles (see `tensor_role`); "*" applies to every role except
# output/tied embeddings. Families: "standard" (RECIPES.md 4.4), "iq_low" (4.5, IQ1/IQ2),
# "mxfp4" (4.6), "float" (F16/BF16/F32: default type everywhere, no fallback).
# Order: roughly largest -> smallest, by the quantize tool's own size figures for Llama-3-8B.
# ---------------------------------------------------------------------------------------------

_E8 = ("Q5_K", "!falcon", "experts==8")  # attn_output of 8-expert models in most standard presets
_K8 = ("Q8_0", "experts==8")  # attn_k of 8-expert models, every standard preset

_PRESET_TABLE: list[dict] = [
    dict(name="F32", ftype=0, default="F32", family="float", description="full float32"),
    dict(name="F16", ftype=1, default="F16", family="float", description="float16"),
    dict(name="BF16", ftype=32, default="BF16", family="float", description="bfloat16"),
    dict(name="Q8_0", ftype=7, default="Q8_0", family="standard", description="7.96G, +0.0026 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8]}),
    dict(name="Q6_K", ftype=18, default="Q6_K", family="standard", description="6.14G, +0.0217 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8]}),
    dict(name="Q5_1", ftype=9, default="Q5_1", family="standard", description="5.65G, +0.1062 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8]}),
    dict(name="Q5_K_M", ftype=17, default="Q5_K", family="standard", aliases=["Q5_K"],
         description="5.33G, +0.0569 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q6_K", "more_bits")],
                "ffn_down": [("Q6_K", "more_bits")]}),
    dict(name="Q5_K_S", ftype=16, default="Q5_K", family="standard", description="5.21G, +0.1049 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8]}),
    dict(name="Q5_0", ftype=8, default="Q5_0", family="standard", description="5.21G, +0.1316 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "ffn_down": [("Q5_1", "imatrix", "i<n/8")]}),
    dict(name="Q4_1", ftype=3, default="Q4_1", family="standard", description="4.78G, +0.4511 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8]}),
    dict(name="Q4_K_M", ftype=15, default="Q4_K", family="standard", aliases=["Q4_K"],
         description="4.58G, +0.1754 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q6_K", "more_bits")],
                "attn_output": [_E8],
                "ffn_down": [("Q6_K", "falcon", "i<n/16"), ("Q5_K", "falcon", "more_bits"), ("Q4_K", "falcon"),
                             ("Q6_K", "more_bits")]}),
    dict(name="Q4_K_S", ftype=14, default="Q4_K", family="standard", description="4.37G, +0.2689 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q5_K", "i<4")],
                "attn_output": [_E8],
                "ffn_down": [("Q5_K", "!falcon", "i<n/8")]}),
    dict(name="Q4_0", ftype=2, default="Q4_0", family="standard", description="4.34G, +0.4685 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "ffn_down": [("Q4_1", "imatrix", "i<n/8")]}),
    dict(name="IQ4_NL", ftype=25, default="IQ4_NL", family="standard", description="4.50 bpw non-linear quantization",
         rules={"attn_k": [_K8],
                "attn_v": [("Q5_K", "gqa>=4")],
                "attn_output": [_E8],
                "ffn_down": [("Q5_K", "!imatrix", "i<n/8")]}),
    dict(name="IQ4_XS", ftype=30, default="IQ4_XS", family="standard", description="4.25 bpw non-linear quantization",
         rules={"attn_k": [_K8],
                "attn_v": [("Q5_K", "gqa>=4")],
                "attn_output": [_E8],
                "ffn_down": [("Q5_K", "!imatrix", "i<n/8")]}),
    dict(name="MXFP4_MOE", ftype=38, default="MXFP4", family="mxfp4", output="Q8_0",
         description="MXFP4 for MoE experts, Q8_0 elsewhere",
         rules={"*": [("MXFP4", "3d", "!bailingmoe3"), ("MXFP4", "3d", "ffn"), ("Q8_0",)]}),
    dict(name="Q3_K_L", ftype=13, default="Q3_K", family="standard", description="4.03G, +0.5562 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q5_K",)],
                "attn_output": [("Q5_K", "!falcon", "!experts==8"), ("Q4_K", "falcon")],
                "ffn_down": [("Q4_K", "falcon"), ("Q5_K",)]}),
    dict(name="Q3_K_M", ftype=12, default="Q3_K", family="standard", aliases=["Q3_K"],
         description="3.74G, +0.6569 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q5_K", "i<2"), ("Q4_K",)],
                "attn_output": [_E8, ("Q4_K", "!falcon")],
                "ffn_down": [("Q5_K", "i<n/16"), ("Q4_K", "!falcon"), ("Q4_K", "more_bits"), ("Q3_K",)]}),
    dict(name="IQ3_M", ftype=27, default="IQ3_S", family="standard", description="3.66 bpw quantization mix",
         rules={"attn_k": [_K8],
                "attn_v": [("Q4_K",)],
                "attn_output": [_E8, ("Q4_K", "!falcon")],
                "ffn_down": [("Q4_K", "i<n/8"), ("Q4_K", "experts==8", "more_bits")]}),
    dict(name="Q3_K_S", ftype=11, default="Q3_K", family="standard", description="3.41G, +1.6321 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_output": [_E8]}),
    dict(name="IQ3_S", ftype=26, default="IQ3_S", family="standard", description="3.44 bpw quantization",
         rules={"attn_k": [_K8],
                "attn_v": [("Q4_K", "gqa>=4")],
                "attn_output": [_E8]}),
    dict(name="IQ3_XS", ftype=22, default="IQ3_S", family="standard", description="3.3 bpw quantization",
         rules={"attn_k": [_K8, ("IQ3_XXS",)],
                "attn_q": [("IQ3_XXS",)],
                "attn_v": [("Q4_K", "gqa>=4")],
                "attn_output": [_E8],
                "ffn_gate": [("IQ3_XXS", "n/8<=i<7n/8")],
                "ffn_up": [("IQ3_XXS", "n/8<=i<7n/8")]}),
    dict(name="IQ3_XXS", ftype=23, default="IQ3_XXS", family="standard", output="Q5_K",
         description="3.06 bpw quantization",
         rules={"token_embd": [("IQ3_S",)],
                "attn_k": [_K8, ("IQ2_S",)],
                "attn_q": [("IQ2_S",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("IQ3_S", "!imatrix")],
                "attn_output": [_E8, ("IQ3_S", "!falcon")],
                "ffn_down": [("Q4_K", "!imatrix", "i<n/8"), ("Q3_K", "!imatrix")]}),
    dict(name="Q2_K", ftype=10, default="Q2_K", family="standard", description="2.96G, +3.5199 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q3_K",)],
                "attn_output": [_E8, ("Q3_K", "!falcon")],
                "ffn_down": [("Q3_K",)]}),
    dict(name="Q2_K_S", ftype=21, default="Q2_K", family="standard", description="2.96G, +3.1836 ppl @ Llama-3-8B",
         rules={"attn_k": [_K8],
                "attn_v": [("Q4_K", "gqa>=4")],
                "ffn_down": [("Q4_K", "i<n/8")]}),
    # IQ1/IQ2 family: "low" type is IQ3_S for IQ2_S/IQ2_M, Q2_K for the other four.
    dict(name="IQ2_M", ftype=29, default="IQ2_S", family="iq_low", output="Q5_K", description="2.7 bpw quantization",
         rules={"token_embd": [("IQ3_S",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q4_K", "experts>=4"), ("IQ3_S",)],
                "attn_k": [("Q4_K", "experts==8")],
                "ffn_down": [("IQ3_S", "count<n/8")],
                "attn_output": [("Q5_K", "experts==8"), ("IQ3_S",)]}),
    dict(name="IQ2_S", ftype=28, default="IQ2_XS", family="iq_low", output="Q5_K", description="2.5 bpw quantization",
         rules={"token_embd": [("IQ3_S",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q4_K", "experts>=4"), ("IQ3_S",)],
                "attn_k": [("Q4_K", "experts==8")],
                "ffn_down": [("IQ3_S", "count<n/8")],
                "attn_output": [("Q5_K", "experts==8"), ("IQ3_S",)]}),
    dict(name="IQ2_XS", ftype=20, default="IQ2_XS", family="iq_low", output="Q5_K", description="2.31 bpw quantization",
         rules={"token_embd": [("Q2_K",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q4_K", "experts>=4"), ("Q2_K",)],
                "attn_k": [("Q4_K", "experts==8")],
                "ffn_down": [("Q2_K", "count<n/8")],
                "attn_output": [("Q5_K", "experts==8")]}),
    dict(name="Q2_0", ftype=41, default="Q2_0", family="standard", description="2.25 bpw",
         rules={"token_embd": [("Q4_K",)], "attn_k": [_K8]}),
    dict(name="IQ2_XXS", ftype=19, default="IQ2_XXS", family="iq_low", output="Q5_K",
         description="2.06 bpw quantization",
         rules={"token_embd": [("Q2_K",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q4_K", "experts>=4"), ("Q2_K",)],
                "attn_k": [("Q4_K", "experts==8")],
                "ffn_down": [("Q2_K", "count<n/8")],
                "attn_output": [("Q5_K", "experts==8")]}),
    dict(name="TQ2_0", ftype=37, default="TQ2_0", family="standard", description="2.06 bpw ternarization",
         rules={"token_embd": [("Q4_K",)], "attn_k": [_K8]}),
    dict(name="IQ1_M", ftype=31, default="IQ1_M", family="iq_low", output="Q5_K", description="1.75 bpw quantization",
         rules={"token_embd": [("Q2_K",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q4_K", "experts>=4"), ("Q2_K",)],
                "attn_k": [("Q4_K", "experts==8")],
                "ffn_down": [("Q2_K", "count<n/8")],
                "attn_output": [("Q5_K", "experts==8"), ("IQ2_XXS",)]}),
    dict(name="TQ1_0", ftype=36, default="TQ1_0", family="standard", description="1.69 bpw ternarization",
         rules={"token_embd": [("Q4_K",)], "attn_k": [_K8]}),
    dict(name="IQ1_S", ftype=24, default="IQ1_S", family="iq_low", output="Q5_K", description="1.56 bpw quantization",
         rules={"token_embd": [("Q2_K",)],
                "attn_v": [("Q4_K", "gqa>=4"), ("Q4_K", "experts>=4"), ("Q2_K",)],
                "attn_k": [("Q4_K", "experts==8")],
                "ffn_down": [("Q2_K", "count<n/8")],
                "attn_output": [("Q5_K", "experts==8"), ("IQ2_XXS",)]}),
    dict(name="Q1_0", ftype=40, default="Q1_0", family="standard", description="1.125 bpw",
         rules={"attn_k": [_K8]}),
]

# Shape fallback when ne[0] is not a multiple of the chosen type's block (RECIPES.md sec. 5).
_FALLBACK: dict[str, str] = {
    **dict.fromkeys(["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"], "IQ4_NL"),
    **dict.fromkeys(["Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"], "Q4_0"),
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}

# Types llama-quantize refuses to run without an imatrix (sec. 6), for tensors other than
# token_embd / output. Q2_K only inside a Q2_K_S file.
_IMATRIX_TYPES = frozenset(["IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"])

# Tensors never quantized (sec. 3): substrings, and exact names.
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(f"time_mix_{k}.weight" for k in (
        "first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2", "decay_w1",
        "decay_w2", "lerp_fused")),
    "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos",
    ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
)
_KEEP_NAMES = frozenset(["position_embd.weight", "token_types.weight"])

# Size class LLM_TYPE_70B: GGUF arch -> n_layer (without MTP layers) that llama.cpp maps to 70B.
# llama additionally needs n_head != n_head_kv (else 65B) and n_expert != 8 (else 8x7B/8x22B).
_70B_LAYERS = {"llama": 80, "deci": 80, "olmo": 80, "qwen2": 80, "jais2": 68}

# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One llama-quantize file type."""

    name: str  # CLI name, e.g. Q4_K_M
    ftype: int  # llama_ftype id
    default_type: str  # GGML type of every quantizable tensor before role overrides
    family: str  # standard | iq_low | mxfp4 | float
    description: str  # the quantize tool's own one-liner
    output_type: str | None = None  # output.weight type when not forced to Q8_0 (None: Q6_K rule)
    rules: Mapping[str, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.family != "float"


@dataclass
class RecipeModel:
    """The model facts llama-quantize's rules look at.

    `n_layers` is llama.cpp's n_layer_all (block_count, MTP/nextn layers included);
    `n_nextn_layers` only matters for the size class. `is_70b` (LLM_TYPE_70B) is derived like
    llama.cpp does when left None: arch llama/deci/olmo/qwen2 with 80 layers or jais2 with 68
    (llama also needs n_head != n_head_kv and n_expert != 8).
    """

    arch: str
    n_layers: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    is_70b: bool | None = None
    n_nextn_layers: int = 0

    def __post_init__(self) -> None:
        for key in ("n_layers", "n_head", "n_head_kv", "n_expert", "n_nextn_layers"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise UsageError(f"RecipeModel.{key} must be a non-negative int, got {value!r}")
        if self.n_layers == 0:
            raise UsageError("RecipeModel.n_layers must be at least 1")
        self.arch = (self.arch or "").lower()
        if self.is_70b is None:
            self.is_70b = _is_70b(self)

    @property
    def n_gqa(self) -> int:
        """n_head / n_head_kv of layer 0, integer division; 0 when there are no KV heads."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @classmethod
    def from_metadata(cls, meta) -> "RecipeModel":
        """Build from `predictor.io.base.ModelMetadata` (unknown heads/experts count as 0)."""
        if not meta.n_layers:
            raise UsageError(
                "model metadata has no layer count; llama-quantize's rules need it — "
                "pass a config.json / GGUF with block_count"
            )
        extra = meta.extra or {}
        return cls(
            arch=meta.architecture or "",
            n_layers=int(meta.n_layers),
            n_head=int(meta.n_heads or 0),
            n_head_kv=int(meta.n_kv_heads or 0),
            n_expert=int(meta.n_experts or 0),
            n_nextn_layers=int(extra.get("nextn_predict_layers") or 0),
        )


def _is_70b(m: RecipeModel) -> bool:
    n_layer = m.n_layers - m.n_nextn_layers
    if _70B_LAYERS.get(m.arch) != n_layer:
        return False
    if m.arch == "llama":
        return m.n_expert != 8 and m.n_head != m.n_head_kv
    return True


# ---------------------------------------------------------------------------------------------
# Conditions used by the rule table. Each takes the evaluation context.


@dataclass
class _Ctx:
    model: RecipeModel
    has_imatrix: bool
    role: str
    ne: list[int]
    i: int | None = None  # see module docstring
    n: int | None = None
    count: int | None = None


def _use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern: first and last eighth, and every third layer in between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_CONDITIONS: dict[str, Callable[[_Ctx], bool]] = {
    "imatrix": lambda c: c.has_imatrix,
    "falcon": lambda c: c.model.arch == "falcon",
    "bailingmoe3": lambda c: c.model.arch == "bailingmoe3",
    "gqa>=4": lambda c: c.model.n_gqa >= 4,
    "experts>=4": lambda c: c.model.n_expert >= 4,
    "experts==8": lambda c: c.model.n_expert == 8,
    "3d": lambda c: len(c.ne) > 2 and c.ne[2] > 1,
    "ffn": lambda c: c.role in ("ffn_up", "ffn_gate", "ffn_down"),
    "i<2": lambda c: c.i < 2,
    "i<4": lambda c: c.i < 4,
    "i<n/8": lambda c: c.i < c.n // 8,
    "i<n/16": lambda c: c.i < c.n // 16,
    "n/8<=i<7n/8": lambda c: c.n // 8 <= c.i < 7 * c.n // 8,
    "more_bits": lambda c: _use_more_bits(c.i, c.n),
    "count<n/8": lambda c: c.count < c.n // 8,
}
_INDEX_CONDITIONS = {"i<2", "i<4", "i<n/8", "i<n/16", "n/8<=i<7n/8", "more_bits", "count<n/8"}
_INDEXED_ROLES = {"attn_v", "ffn_down", "ffn_gate", "ffn_up"}
ROLES = ("output", "token_embd", "attn_v", "attn_k", "attn_q", "attn_output", "ffn_up", "ffn_gate",
         "ffn_down", "other")


def _holds(cond: str, ctx: _Ctx) -> bool:
    if cond.startswith("!"):
        return not _CONDITIONS[cond[1:]](ctx)
    return _CONDITIONS[cond](ctx)


def _build_presets() -> dict[str, Preset]:
    """Turn the table into Presets, checking every name in it once at import."""
    out: dict[str, Preset] = {}
    for row in _PRESET_TABLE:
        rules = {role: tuple(tuple(r) for r in rs) for role, rs in row.get("rules", {}).items()}
        for role, rs in rules.items():
            assert role == "*" or role in ROLES, (row["name"], role)
            for rule in rs:
                get_type(rule[0])
                for cond in rule[1:]:
                    assert cond.lstrip("!") in _CONDITIONS, (row["name"], cond)
                    assert cond not in _INDEX_CONDITIONS or role in _INDEXED_ROLES, (row["name"], role, cond)
        preset = Preset(
            name=row["name"], ftype=row["ftype"], default_type=get_type(row["default"]).name,
            family=row["family"], description=row["description"], output_type=row.get("output"),
            rules=rules, aliases=tuple(row.get("aliases", ())),
        )
        out[preset.name] = preset
    return out


_PRESETS: dict[str, Preset] = _build_presets()
_LOOKUP: dict[str, Preset] = {}
for _p in _PRESETS.values():
    _LOOKUP[_p.name.upper()] = _p
    for _a in _p.aliases:
        _LOOKUP[_a.upper()] = _p

PRESETS: list[str] = list(_PRESETS)
# Common user-facing presets, runnable without an imatrix (Q2_K_S needs one, so it is left out).
STANDARD_PRESETS: list[str] = [
    "Q8_0", "Q6_K", "Q5_1", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_1", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL",
    "IQ4_XS", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K",
]


def get_preset(name: str | Preset) -> Preset:
    """Look up a preset by llama-quantize name, any case; Q3_K/Q4_K/Q5_K mean the _M variants."""
    if isinstance(name, Preset):
        return name
    preset = _LOOKUP.get(str(name).strip().upper())
    if preset is None:
        raise UsageError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return preset


# ---------------------------------------------------------------------------------------------
# Tensor classification


_LAYER_RE = re.compile(r"blk\.([+-]?\d+)\.")


def layer_of(name: str) -> int | None:
    """Layer number of a `blk.N.` tensor name, else None (like sscanf "blk.%d.")."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def processing_order(names: Sequence[str]) -> list[str]:
    """llama-quantize's order: non-layer tensors first, then by layer number, then by name."""
    def key(name: str) -> tuple[int, str]:
        layer = layer_of(name)
        return (-1 if layer is None else layer, name)

    return sorted(names, key=key)


def tensor_role(name: str) -> str:
    """Role from the name, in llama.cpp's matching order (fused QKV and MLA kv_b count as attn_v)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for needle, role in (
        ("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
        ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
        ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
    ):
        if needle in name:
            return role
    return "other"


def n_dims(ne: Sequence[int]) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count; at least 1."""
    for k in range(len(ne) - 1, 0, -1):
        if ne[k] > 1:
            return k + 1
    return 1


def is_quantizable(name: str, ne: Sequence[int]) -> bool:
    """Whether llama-quantize would quantize this tensor at all (RECIPES.md sec. 3)."""
    if n_dims(ne) < 2 or not name.endswith("weight"):
        return False
    if name in _KEEP_NAMES:
        return False
    return not any(s in name for s in _KEEP_SUBSTRINGS)


# ---------------------------------------------------------------------------------------------
# Shared rules


def _output_type(preset: Preset, model: RecipeModel, ne0: int) -> str:
    """output.weight, or token_embd when there is no output.weight (RECIPES.md 4.2)."""
    if preset.family == "mxfp4":
        return "Q8_0"
    if model.arch == "falcon" or ne0 % get_type(preset.default_type).block_size:
        return "Q8_0"
    if preset.output_type is not None:
        return preset.output_type
    return "Q6_K" if preset.default_type != "Q8_0" else "Q8_0"


def _attn_v_bump(chosen: str, model: RecipeModel) -> str:
    """After the table, for attn_v-like tensors of standard presets: 70B and 8-expert bumps."""
    if model.is_70b and chosen in ("Q3_K", "Q4_K"):
        chosen = "Q5_K"
    if model.n_expert == 8:
        chosen = "Q8_0"
    return chosen


def shape_fallback(chosen: str, name: str, ne0: int, preset_name: str = "") -> str:
    """Type actually used when ne[0] is not a multiple of `chosen`'s block (RECIPES.md sec. 5)."""
    block = get_type(chosen).block_size
    if ne0 % block == 0:
        return chosen
    fallback = _FALLBACK.get(chosen)
    if fallback is None:
        where = f"{preset_name}: " if preset_name else ""
        raise UnsupportedError(
            f"{where}llama-quantize refuses this model: {name} has row length {ne0}, not a multiple of "
            f"{block} (required for {chosen}), and no fallback is defined for {chosen} — choose another preset"
        )
    if ne0 % get_type(fallback).block_size:
        return "F16"
    return fallback


def _apply_rules(rules: Sequence[tuple[str, ...]], ctx: _Ctx, default: str) -> str:
    for rule in rules:
        if all(_holds(cond, ctx) for cond in rule[1:]):
            return rule[0]
    return default


# ---------------------------------------------------------------------------------------------
# Public entry points


def _check_tensors(tensors) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = []
    seen: set[str] = set()
    for item in tensors:
        try:
            name, ne = item
            ne = [int(d) for d in ne]
        except (TypeError, ValueError):
            raise UsageError(f"tensors must be (name, ne list) pairs, got {item!r}") from None
        if not isinstance(name, str) or not name:
            raise UsageError(f"tensor name must be a non-empty string, got {name!r}")
        if name in seen:
            raise UsageError(f"tensor {name!r} is listed twice")
        if not 1 <= len(ne) <= 4 or any(d < 1 for d in ne):
            raise UsageError(f"tensor {name!r} has shape ne={ne}; need 1 to 4 positive dimensions")
        seen.add(name)
        out.append((name, ne))
    return out


def choose_tensor_types(
    tensors: Sequence[tuple[str, Sequence[int]]],
    model: RecipeModel,
    preset: str | Preset,
    *,
    has_imatrix: bool,
    source_types: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """GGML type (gguf enum name) of every tensor under `preset`, exactly as llama-quantize picks it.

    `tensors`: (GGUF name, ggml ne with ne[0] = row length), any order; the result is in
    llama-quantize's processing order. `source_types`: the stored type of tensors that are not
    quantized (norms, routers); tensors missing from it are taken to be F32.
    Raises UnsupportedError where llama-quantize refuses (a row length with no fallback), and
    for MoE models whose ffn tensors have no `blk.N.` layer number.
    """
    p = get_preset(preset)
    items = dict(_check_tensors(tensors))
    order = processing_order(list(items))
    sources = {k: get_type(v).name for k, v in (source_types or {}).items()}
    tied = "output.weight" not in items
    nv = sum(1 for name in order if tensor_role(name) == "attn_v")
    counters = dict.fromkeys(_INDEXED_ROLES, 0)

    result: dict[str, str] = {}
    for name in order:
        ne = items[name]
        if not is_quantizable(name, ne):
            result[name] = sources.get(name, "F32")
            continue
        if not p.quantized:
            result[name] = p.default_type
            continue
        role = tensor_role(name)
        if role == "output" or (tied and role == "token_embd"):
            chosen = _output_type(p, model, ne[0])
        else:
            ctx = _Ctx(model, has_imatrix, role, ne)
            if role in _INDEXED_ROLES:
                ctx.count = counters[role]
                counters[role] += 1
                if role == "attn_v":
                    ctx.i, ctx.n = ctx.count, nv
                else:
                    ctx.i, ctx.n = ctx.count, model.n_layers
                    if p.family == "standard" and max(1, model.n_expert) > 1:
                        ctx.i = _moe_layer(name, model.n_layers)
            rules = p.rules.get("*") or p.rules.get(role, ())
            chosen = _apply_rules(rules, ctx, p.default_type)
            if role == "attn_v" and p.family == "standard":
                chosen = _attn_v_bump(chosen, model)
        result[name] = shape_fallback(chosen, name, ne[0], p.name)
    return result


def _moe_layer(name: str, n_layers: int) -> int:
    """MoE models index ffn rules by the layer in the name (experts are not stored in order)."""
    layer = layer_of(name)
    if layer is None:
        raise UnsupportedError(f"cannot determine the layer of MoE tensor {name!r} (expected blk.N.*)")
    if not 0 <= layer < n_layers:
        raise UnsupportedError(f"tensor {name!r} is in layer {layer}, outside [0, {n_layers})")
    return layer


def requires_imatrix(preset: str | Preset, types: Mapping[str, str]) -> bool:
    """Whether llama-quantize refuses to make this preset without --imatrix (RECIPES.md sec. 6).

    `types` is `choose_tensor_types`'s result (non-quantized tensors are never IQ1/IQ2/IQ3_XXS).
    """
    p = get_preset(preset)
    for name, t in types.items():
        if tensor_role(name) in ("output", "token_embd"):
            continue
        t = get_type(t).name
        if t in _IMATRIX_TYPES or (t == "Q2_K" and p.name == "Q2_K_S"):
            return True
    return False
