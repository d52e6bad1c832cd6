"""Normalised quant names.

llama.cpp presets keep their `llama-quantize` names (Q4_K_M, IQ4_XS, Q8_0). Integer methods are
written METHOD-W<bits>-g<group> or METHOD-W<bits>-perchannel (GPTQ-W4-g128, RTN-W3-perchannel).
The presets are a data table, not if-chains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from predictor.errors import UsageError


@dataclass(frozen=True)
class QuantInfo:
    quant: str  # normalised name
    quant_family: str  # one of schema.QUANT_FAMILIES
    method: str  # algorithm that chose the weights
    weight_bits: float | None
    group_size: int | None  # -1 = per output channel; None for GGUF presets / unknown
    note: str | None = None


# llama-quantize preset -> (family, nominal bits). Names as listed by `llama-quantize --help`.
LLAMA_CPP_PRESETS: dict[str, tuple[str, float]] = {
    "Q2_K": ("gguf-k", 2), "Q2_K_S": ("gguf-k", 2),
    "Q3_K_XS": ("gguf-k", 3), "Q3_K_S": ("gguf-k", 3), "Q3_K_M": ("gguf-k", 3), "Q3_K_L": ("gguf-k", 3),
    "Q4_K_S": ("gguf-k", 4), "Q4_K_M": ("gguf-k", 4),
    "Q5_K_S": ("gguf-k", 5), "Q5_K_M": ("gguf-k", 5),
    "Q6_K": ("gguf-k", 6),
    "IQ1_S": ("gguf-i", 1), "IQ1_M": ("gguf-i", 1),
    "IQ2_XXS": ("gguf-i", 2), "IQ2_XS": ("gguf-i", 2), "IQ2_S": ("gguf-i", 2), "IQ2_M": ("gguf-i", 2),
    "IQ3_XXS": ("gguf-i", 3), "IQ3_XS": ("gguf-i", 3), "IQ3_S": ("gguf-i", 3), "IQ3_M": ("gguf-i", 3),
    "IQ4_NL": ("gguf-i", 4), "IQ4_XS": ("gguf-i", 4),
    "Q4_0": ("gguf-legacy", 4), "Q4_1": ("gguf-legacy", 4),
    "Q5_0": ("gguf-legacy", 5), "Q5_1": ("gguf-legacy", 5),
    "Q8_0": ("gguf-legacy", 8),
    "TQ1_0": ("other", 1.69), "TQ2_0": ("other", 2.06),
    "MXFP4_MOE": ("fp4", 4),
    "F16": ("float", 16), "BF16": ("float", 16), "F32": ("float", 32),
}

# `llama-quantize` accepts these as aliases (tools/quantize/quantize.cpp: "alias for Q4_K_M").
LLAMA_CPP_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# Presets whose quantization llama.cpp refuses to run without an imatrix
# (src/llama-quant.cpp tensor_requires_imatrix: IQ1_*, IQ2_* tensors and the Q2_K tensors of Q2_K_S).
IMATRIX_REQUIRED = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S"})

# llama.cpp `general.file_type` descriptions as printed by llama-perplexity ("file type = Q4_K - Medium").
FILE_TYPE_NAMES = {
    "all F32": "F32", "F16": "F16", "BF16": "BF16",
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K - Medium": "Q2_K", "Q2_K - Small": "Q2_K_S",
    "Q3_K - Extra small": "Q3_K_XS", "Q3_K - Small": "Q3_K_S", "Q3_K - Medium": "Q3_K_M", "Q3_K - Large": "Q3_K_L",
    "Q4_K - Small": "Q4_K_S", "Q4_K - Medium": "Q4_K_M", "Q5_K - Small": "Q5_K_S", "Q5_K - Medium": "Q5_K_M",
    "Q6_K": "Q6_K",
    "IQ2_XXS - 2.0625 bpw": "IQ2_XXS", "IQ2_XS - 2.3125 bpw": "IQ2_XS", "IQ2_S - 2.5 bpw": "IQ2_S",
    "IQ2_M - 2.7 bpw": "IQ2_M", "IQ3_XS - 3.3 bpw": "IQ3_XS", "IQ3_XXS - 3.0625 bpw": "IQ3_XXS",
    "IQ1_S - 1.5625 bpw": "IQ1_S", "IQ1_M - 1.75 bpw": "IQ1_M", "IQ4_NL - 4.5 bpw": "IQ4_NL",
    "IQ4_XS - 4.25 bpw": "IQ4_XS", "IQ3_S - 3.4375 bpw": "IQ3_S", "IQ3_S mix - 3.66 bpw": "IQ3_M",
}

# Integer methods that users may name at ingest: METHOD-W<bits>[-g<group>|-perchannel].
_INTEGER_METHODS = {
    "RTN": ("rtn", "rtn"), "GPTQ": ("gptq", "gptq"), "AWQ": ("awq", "awq"),
    "AUTOROUND": ("autoround", "autoround"), "HQQ": ("hqq", "hqq"), "OMNIQUANT": ("omniquant", "omniquant"),
}
_INTEGER_RE = re.compile(r"^(?P<m>[A-Za-z]+)-W(?P<b>\d+(?:\.\d+)?)(?:-g(?P<g>\d+)|-(?P<pc>perchannel))?$", re.I)
# Community mixes: bartowski-style _L/_XL (8-bit embeddings/output), Unsloth dynamic UD-*.
_COMMUNITY_RE = re.compile(r"^(?:UD-)?I?Q\d_K(?:_[SML])?_X?L$|^UD-[A-Z0-9_]+$", re.I)
_IK_RE = re.compile(r"^IQ\d_K(?:S|SS|T|L)?$", re.I)


def integer_name(method: str, bits: float, group: int | None) -> str:
    b = f"{bits:g}"
    if group is None:
        return f"{method}-W{b}"
    return f"{method}-W{b}-perchannel" if group == -1 else f"{method}-W{b}-g{group}"


def preset_info(name: str) -> QuantInfo | None:
    """QuantInfo for a llama.cpp preset name (any case, aliases resolved), else None."""
    up = name.strip().upper()
    note = None
    if up in LLAMA_CPP_ALIASES:
        note = f"{up} is llama-quantize's alias for {LLAMA_CPP_ALIASES[up]}"
        up = LLAMA_CPP_ALIASES[up]
    if up in LLAMA_CPP_PRESETS:
        family, bits = LLAMA_CPP_PRESETS[up]
        return QuantInfo(up, family, "llama.cpp" if family != "float" else "none", bits, None, note)
    return None


def parse_quant_name(name: str) -> QuantInfo:
    """Normalise a quant name given by a user (ingest labels, CSV rows).

    Accepts llama.cpp presets (Q4_K_M, q4_k_m, Q4_K), ik_llama.cpp and community GGUF mixes, and
    METHOD-W<bits>-g<group> / METHOD-W<bits>-perchannel for RTN, GPTQ, AWQ, AUTOROUND, HQQ, OMNIQUANT.
    """
    raw = name.strip()
    info = preset_info(raw)
    if info is not None:
        return info
    m = _INTEGER_RE.match(raw)
    if m and m.group("m").upper() in _INTEGER_METHODS:
        family, method = _INTEGER_METHODS[m.group("m").upper()]
        bits = float(m.group("b"))
        group = -1 if m.group("pc") else (int(m.group("g")) if m.group("g") else None)
        return QuantInfo(integer_name(m.group("m").upper(), bits, group), family, method, bits, group)
    if _IK_RE.match(raw):
        up = raw.upper()
        return QuantInfo(up, "gguf-ik", "ik_llama.cpp", float(up[2]), None)
    if _COMMUNITY_RE.match(raw):
        up = raw.upper()
        bits = re.search(r"Q(\d)", up)
        return QuantInfo(up, "gguf-mixed", "llama.cpp", float(bits.group(1)) if bits else None, None,
                         "community GGUF mix (not a llama-quantize preset)")
    raise UsageError(
        f"unknown quant name {name!r} — use a llama.cpp preset (Q4_K_M, IQ4_XS, Q8_0) or "
        "METHOD-W<bits>-g<group> / METHOD-W<bits>-perchannel with METHOD in "
        f"{sorted(_INTEGER_METHODS)} (e.g. GPTQ-W4-g128)"
    )
