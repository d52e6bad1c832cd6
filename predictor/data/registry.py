"""The model registry: architecture facts with citations, and name/config -> model recognition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import polars as pl

from predictor.errors import SchemaError


@dataclass(frozen=True)
class ModelMatch:
    family: str | None
    model: str | None  # registry id when exactly one entry matches, else None
    exact: bool  # True when the architecture dimensions matched registry rows
    candidates: tuple[str, ...] = ()


def alias_map(registry: pl.DataFrame) -> dict[str, str]:
    """Case-folded name (model id or alias) -> model id. Raises SchemaError on ambiguous aliases."""
    out: dict[str, str] = {}
    for model, aliases in registry.select("model", "aliases").iter_rows():
        names = [model] + [a for a in (aliases or "").split("|") if a.strip()]
        for name in names:
            key = name.strip().casefold()
            if key in out and out[key] != model:
                raise SchemaError(f"registry: name {name!r} maps to both {out[key]!r} and {model!r} — make aliases unique")
            out[key] = model
    return out


def resolve_model(name: str, registry: pl.DataFrame, aliases: dict[str, str] | None = None) -> str | None:
    """The registry id for a model name or alias (case-insensitive), or None if unknown."""
    aliases = alias_map(registry) if aliases is None else aliases
    return aliases.get(name.strip().casefold())


def registry_row(model: str, registry: pl.DataFrame) -> dict[str, Any] | None:
    hit = registry.filter(pl.col("model") == model)
    return hit.row(0, named=True) if hit.height else None


def _config_facts(config: Any) -> dict[str, Any]:
    """Architecture facts from a Hugging Face config.json dict or a predictor.io ModelMetadata."""
    if isinstance(config, Mapping):
        text = config.get("text_config") if isinstance(config.get("text_config"), Mapping) else {}

        def get(*keys):
            for k in keys:
                for src in (config, text):
                    if k in src and src[k] is not None:
                        return src[k]
            return None

        archs = config.get("architectures") or []
        return {
            "architecture": archs[0] if archs else None,
            "model_type": get("model_type"),
            "n_layers": get("num_hidden_layers", "n_layer", "num_layers"),
            "hidden_size": get("hidden_size", "d_model", "n_embd"),
            "vocab_size": get("padded_vocab_size", "vocab_size"),
            "n_heads": get("num_attention_heads", "n_head"),
            "n_kv_heads": get("num_key_value_heads", "multi_query_group_num", "num_kv_heads", "n_head_kv"),
        }
    return {  # ModelMetadata-like object
        "gguf_arch": getattr(config, "architecture", None),
        "n_layers": getattr(config, "n_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "n_heads": getattr(config, "n_heads", None),
        "n_kv_heads": getattr(config, "n_kv_heads", None),
    }


# config.json model_type / GGUF architecture -> family, used when no registry row matches exactly.
_FAMILY_BY_TYPE = {
    "qwen3": "qwen3", "qwen3_moe": "qwen3-moe", "qwen3moe": "qwen3-moe", "qwen2": "qwen2.5",
    "mistral": "mistral", "mixtral": "mixtral", "gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3",
    "gemma3_text": "gemma3", "phi3": "phi3", "falcon": "falcon",
    "bloom": "bloom", "opt": "opt", "chatglm": "chatglm3", "stablelm": "stablelm", "mamba": "mamba",
    "deepseek_v3": "deepseek-v3-moe", "deepseek2": "deepseek-v3-moe",
}


def identify_model(config: Any, registry: pl.DataFrame) -> ModelMatch:
    """Recognise a user's model from its config.json (dict) or ModelMetadata.

    Rows match when every known dimension (layers, width, vocabulary, heads, KV heads) agrees and the
    architecture name agrees where both sides have one. One family among the matches -> that family
    (exact); otherwise fall back to the model_type / GGUF architecture name (not exact).
    """
    facts = _config_facts(config)
    dims = ["n_layers", "hidden_size", "vocab_size", "n_heads", "n_kv_heads"]
    known = {k: facts.get(k) for k in dims if facts.get(k) is not None}
    if len(known) >= 3:
        cond = pl.lit(True)
        for k, v in known.items():
            cond = cond & (pl.col(k) == int(v))
        if facts.get("architecture"):
            cond = cond & (pl.col("architecture").is_null() | (pl.col("architecture") == facts["architecture"]))
        if facts.get("gguf_arch"):
            cond = cond & (pl.col("gguf_arch").is_null() | (pl.col("gguf_arch") == facts["gguf_arch"]))
        hits = registry.filter(cond)
        families = sorted(set(hits.get_column("family").to_list()))
        models = tuple(hits.get_column("model").to_list())
        if len(families) == 1:
            return ModelMatch(families[0], models[0] if len(models) == 1 else None, True, models)
    else:
        models = ()
    # Ambiguous (e.g. Llama-1 7B and Llama-2 7B share every dimension) or unknown: the type name decides.
    key = (facts.get("model_type") or facts.get("gguf_arch") or "").lower()
    return ModelMatch(_FAMILY_BY_TYPE.get(key), None, False, models)
