"""llama-quantize presets: every tensor type decision against the real tool's --dry-run output.

Oracle: tests/data/reference/recipes_dryrun_*.json (llama-quantize --dry-run at llama.cpp 3af988f, see
RECIPES.md sec. 8). Other cases are derived from the rules written in RECIPES.md sec. 2-6.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from predictor.errors import UnsupportedError, UsageError
from predictor.io.base import ModelMetadata
from predictor.quant.recipes import (
    PRESETS,
    STANDARD_PRESETS,
    RecipeModel,
    choose_tensor_types,
    get_preset,
    is_quantizable,
    processing_order,
    requires_imatrix,
)
from predictor.quant.types import get_type

REF = Path(__file__).parent / "data" / "reference"
DRYRUN_FILES = sorted(REF.glob("recipes_dryrun_*.json"))

# Model facts from RECIPES.md sec. 8 and each file's `description` (checked against it below).
MODELS = {
    "smollm2_135m": RecipeModel("llama", n_layers=30, n_head=9, n_head_kv=3, n_expert=0),
    "fake_dense32_gqa4": RecipeModel("llama", n_layers=32, n_head=8, n_head_kv=2, n_expert=0),
    "fake_dense32_gqa1_tied": RecipeModel("llama", n_layers=32, n_head=8, n_head_kv=8, n_expert=0),
    "fake_moe8_16L_gqa4": RecipeModel("llama", n_layers=16, n_head=8, n_head_kv=2, n_expert=8),
}


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _norm(t: str) -> str:
    return get_type(t).name  # the tool prints q4_K / iq4_nl; we use Q4_K / IQ4_NL


def test_reference_files_present():
    assert len(DRYRUN_FILES) == 4, DRYRUN_FILES
    assert {_load(p)["model"] for p in DRYRUN_FILES} == set(MODELS)


@pytest.mark.parametrize("path", DRYRUN_FILES, ids=lambda p: p.stem)
def test_model_facts_match_description(path):
    d = _load(path)
    m = MODELS[d["model"]]
    desc = d["description"]
    assert f"{m.n_layers} layers" in desc
    assert f"{m.n_head} heads / {m.n_head_kv} kv heads (n_gqa {m.n_gqa})" in desc
    assert bool(re.search(r"\btied embeddings", desc)) == ("output.weight" not in d["tensors"])
    assert (f"{m.n_expert} experts" in desc) == (m.n_expert > 0)


def test_every_dryrun_decision():
    """All ftypes x (noimat, imat) x every tensor of all four models."""
    n_quantizable = n_kept = n_refusals = 0
    mismatches = []
    for path in DRYRUN_FILES:
        d = _load(path)
        model = MODELS[d["model"]]
        tensors = list(zip(d["tensors"], d["shapes_ne"]))
        shapes = dict(tensors)
        for ftype, entry in d["ftypes"].items():
            for variant in ("noimat", "imat"):
                has_imatrix = variant == "imat"
                if "error" in entry:
                    n_refusals += 1
                    continue  # test_refusals_match checks these
                expected = entry.get(variant, entry["noimat"])  # `imat` only stored where it differs
                got = choose_tensor_types(tensors, model, ftype, has_imatrix=has_imatrix)
                assert list(got) == d["tensors"], f"{path.name} {ftype}: processing order differs"
                for name, want in zip(d["tensors"], expected):
                    if is_quantizable(name, shapes[name]):
                        n_quantizable += 1
                    else:
                        n_kept += 1
                    if got[name] != _norm(want):
                        mismatches.append((d["model"], ftype, variant, name, shapes[name], _norm(want), got[name]))
    print(f"\ncompared {n_quantizable} quantizable-tensor decisions + {n_kept} kept tensors, "
          f"{n_refusals} refusals; {len(mismatches)} mismatches")
    if mismatches:
        lines = [f"  {m} {f} {v} {n} ne={s}: llama-quantize {w}, ours {g}" for m, f, v, n, s, w, g in mismatches[:10]]
        pytest.fail(f"{len(mismatches)} of {n_quantizable + n_kept} decisions differ; first ones:\n" + "\n".join(lines))
    # RECIPES.md sec. 8 counts 49,242 (model, ftype, imatrix-or-not, quantizable tensor) decisions.
    assert n_quantizable == 49_242


def test_refusals_match():
    seen = 0
    for path in DRYRUN_FILES:
        d = _load(path)
        tensors = list(zip(d["tensors"], d["shapes_ne"]))
        for ftype, entry in d["ftypes"].items():
            if "error" not in entry:
                continue
            seen += 1
            culprit = re.search(r"warning: (\S+)", entry["error"]).group(1)
            for has_imatrix in (False, True):
                with pytest.raises(UnsupportedError) as info:
                    choose_tensor_types(tensors, MODELS[d["model"]], ftype, has_imatrix=has_imatrix)
                msg = str(info.value)
                assert culprit in msg and ftype in msg and "\n" not in msg
    assert seen == 1  # Q1_0 on SmolLM2 (576 is not a multiple of 128)


def test_input_order_does_not_matter():
    d = _load(REF / "recipes_dryrun_fake_moe8_16L_gqa4.json")
    tensors = list(zip(d["tensors"], d["shapes_ne"]))
    shuffled = tensors[:]
    random.Random(0).shuffle(shuffled)
    assert processing_order([n for n, _ in shuffled]) == d["tensors"]
    model = MODELS[d["model"]]
    a = choose_tensor_types(tensors, model, "Q3_K_M", has_imatrix=False)
    b = choose_tensor_types(shuffled, model, "Q3_K_M", has_imatrix=False)
    assert list(a.items()) == list(b.items())


def test_preset_list_and_lookup():
    d = _load(DRYRUN_FILES[0])
    assert set(d["ftypes"]) | {"F16", "BF16", "F32"} == set(PRESETS)
    assert len(PRESETS) == len(set(PRESETS)) == 35
    assert set(STANDARD_PRESETS) <= set(PRESETS)
    assert not any(p.startswith(("IQ1", "IQ2", "IQ3", "TQ", "MXFP4")) or p in ("Q1_0", "Q2_0") for p in STANDARD_PRESETS)
    assert {"Q2_K", "Q8_0", "IQ4_NL", "IQ4_XS", "Q4_K_M"} <= set(STANDARD_PRESETS)
    assert get_preset("q4_k").name == "Q4_K_M"
    assert get_preset("Q3_K").name == "Q3_K_M"
    assert get_preset(" q5_k ").name == "Q5_K_M"
    assert get_preset("iq2_s").default_type == "IQ2_XS"  # RECIPES.md sec. 2 surprise
    assert get_preset("IQ2_M").default_type == "IQ2_S"
    with pytest.raises(UsageError) as info:
        get_preset("Q4_K_XL")
    assert "Q4_K_XL" in str(info.value) and "Q4_K_M" in str(info.value) and "IQ1_S" in str(info.value)


def _dense(n_layers: int, n_embd: int = 256, n_ff: int = 512, n_kv: int = 64, qkv: bool = False, output: bool = True):
    t = [("token_embd.weight", [n_embd, 512]), ("output_norm.weight", [n_embd])]
    if output:
        t.append(("output.weight", [n_embd, 512]))
    for i in range(n_layers):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", [n_embd]), (p + "ffn_norm.weight", [n_embd]),
              (p + "attn_output.weight", [n_embd, n_embd]), (p + "ffn_gate.weight", [n_embd, n_ff]),
              (p + "ffn_up.weight", [n_embd, n_ff]), (p + "ffn_down.weight", [n_ff, n_embd])]
        if qkv:
            t.append((p + "attn_qkv.weight", [n_embd, n_embd + 2 * n_kv]))
        else:
            t += [(p + "attn_q.weight", [n_embd, n_embd]), (p + "attn_k.weight", [n_embd, n_kv]),
                  (p + "attn_v.weight", [n_embd, n_kv])]
    return t


def _more_bits_layers(n: int) -> set[int]:
    # RECIPES.md 4.1: i < n/8, i >= 7n/8, or (i - n/8) % 3 == 2
    return {i for i in range(n) if i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2}


def test_more_bits_pattern_for_32_layers():
    assert _more_bits_layers(32) == {0, 1, 2, 3, 28, 29, 30, 31, 6, 9, 12, 15, 18, 21, 24, 27}


def test_size_class_70b():
    assert RecipeModel("llama", 80, 64, 8).is_70b
    assert not RecipeModel("llama", 80, 64, 64).is_70b  # 65B (no GQA)
    assert not RecipeModel("llama", 80, 64, 8, n_expert=8).is_70b
    assert RecipeModel("qwen2", 80, 64, 8).is_70b
    assert RecipeModel("jais2", 68, 64, 8).is_70b
    assert not RecipeModel("llama", 32, 32, 8).is_70b
    assert not RecipeModel("gemma3", 80, 64, 8).is_70b
    assert RecipeModel("llama", 81, 64, 8, n_nextn_layers=1).is_70b


def test_70b_bumps_attn_v():
    model = RecipeModel("llama", 80, 64, 8)
    assert model.is_70b
    types = choose_tensor_types(_dense(80), model, "Q4_K_M", has_imatrix=False)
    more = _more_bits_layers(80)
    for i in range(80):
        assert types[f"blk.{i}.attn_v.weight"] == ("Q6_K" if i in more else "Q5_K")  # Q4_K -> Q5_K
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K"
    q3 = choose_tensor_types(_dense(80), model, "Q3_K_M", has_imatrix=False)
    assert {q3[f"blk.{i}.attn_v.weight"] for i in range(80)} == {"Q5_K"}
    not70 = RecipeModel("llama", 80, 64, 64)
    q3 = choose_tensor_types(_dense(80), not70, "Q3_K_M", has_imatrix=False)
    assert [q3[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q5_K", "Q5_K", "Q4_K"]


def test_fused_qkv_follows_attn_v_column():
    model = RecipeModel("phi3", 32, 32, 8)
    types = choose_tensor_types(_dense(32, qkv=True), model, "Q4_K_M", has_imatrix=False)
    more = _more_bits_layers(32)
    for i in range(32):
        assert types[f"blk.{i}.attn_qkv.weight"] == ("Q6_K" if i in more else "Q4_K")
        assert types[f"blk.{i}.ffn_down.weight"] == ("Q6_K" if i in more else "Q4_K")


def test_falcon_rules():
    model = RecipeModel("falcon", 32, 8, 8)
    t = choose_tensor_types(_dense(32), model, "Q4_K_M", has_imatrix=False)
    assert t["output.weight"] == "Q8_0"
    more = _more_bits_layers(32)
    for i in range(32):
        want = "Q6_K" if i < 32 // 16 else "Q5_K" if i in more else "Q4_K"
        assert t[f"blk.{i}.ffn_down.weight"] == want
    t = choose_tensor_types(_dense(32), model, "Q3_K_L", has_imatrix=False)
    assert t["blk.5.attn_output.weight"] == "Q4_K" and t["blk.5.ffn_down.weight"] == "Q4_K"
    t = choose_tensor_types(_dense(32), model, "Q2_K", has_imatrix=False)
    assert t["blk.5.attn_output.weight"] == "Q2_K"  # the Q2_K attn_output rule is non-Falcon only


def test_float_presets_and_source_types():
    model = RecipeModel("llama", 2, 8, 2)
    tensors = _dense(2, n_embd=100) + [("blk.0.ffn_gate_inp.weight", [100, 4])]
    for preset in ("F16", "BF16", "F32"):
        t = choose_tensor_types(tensors, model, preset, has_imatrix=False,
                                source_types={"blk.0.ffn_gate_inp.weight": "f16"})
        assert t["blk.0.attn_q.weight"] == preset  # no fallback for float presets
        assert t["token_embd.weight"] == preset and t["output.weight"] == preset
        assert t["blk.0.attn_norm.weight"] == "F32"  # not quantizable, default source F32
        assert t["blk.0.ffn_gate_inp.weight"] == "F16"  # router keeps its (given) source type


def test_quantizable_rules():
    assert is_quantizable("blk.0.attn_q.weight", [256, 256])
    assert not is_quantizable("blk.0.attn_q.weight", [256, 1])  # ggml_n_dims ignores trailing 1s
    assert not is_quantizable("blk.0.attn_q.bias", [256, 256])
    assert not is_quantizable("blk.0.attn_norm.weight", [256, 256])
    assert not is_quantizable("blk.0.ffn_gate_inp.weight", [256, 8])
    assert not is_quantizable("position_embd.weight", [256, 1024])
    assert is_quantizable("blk.0.ffn_up_exps.weight", [256, 256, 8])


def test_moe_tensor_without_layer_is_refused():
    model = RecipeModel("llama", 2, 8, 2, n_expert=8)
    tensors = [("ffn_down_exps.weight", [256, 256, 8])]
    with pytest.raises(UnsupportedError, match="ffn_down_exps.weight"):
        choose_tensor_types(tensors, model, "Q4_K_M", has_imatrix=False)


def test_requires_imatrix():
    d = _load(REF / "recipes_dryrun_fake_dense32_gqa4.json")
    tensors = list(zip(d["tensors"], d["shapes_ne"]))
    model = MODELS[d["model"]]

    def needs(preset: str) -> bool:
        return requires_imatrix(preset, choose_tensor_types(tensors, model, preset, has_imatrix=False))

    # RECIPES.md sec. 6: IQ1_S/IQ1_M/IQ2_*/IQ3_XXS tensors, or Q2_K inside Q2_K_S
    for preset in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"):
        assert needs(preset), preset
    for preset in ("Q2_K", "Q3_K_S", "Q4_K_M", "Q8_0", "IQ3_S", "IQ3_M", "IQ4_XS", "IQ4_NL", "TQ1_0", "Q1_0",
                   "MXFP4_MOE", "F16"):
        assert not needs(preset), preset
    # token_embd / output are exempt
    assert not requires_imatrix("IQ1_S", {"token_embd.weight": "IQ1_S", "output.weight": "IQ2_XXS",
                                          "blk.0.attn_q.weight": "Q4_K"})
    assert requires_imatrix("IQ4_XS", {"blk.0.attn_q.weight": "iq2_xs"})


def test_from_metadata():
    meta = ModelMetadata(architecture="llama", n_layers=80, n_heads=64, n_kv_heads=8, n_experts=None)
    m = RecipeModel.from_metadata(meta)
    assert (m.arch, m.n_layers, m.n_head, m.n_head_kv, m.n_expert, m.n_gqa, m.is_70b) == ("llama", 80, 64, 8, 0, 8, True)
    with pytest.raises(UsageError, match="layer count"):
        RecipeModel.from_metadata(ModelMetadata(architecture="llama"))


def test_bad_tensor_lists():
    model = RecipeModel("llama", 2, 8, 2)
    with pytest.raises(UsageError, match="twice"):
        choose_tensor_types([("a.weight", [32, 32]), ("a.weight", [32, 32])], model, "Q8_0", has_imatrix=False)
    with pytest.raises(UsageError, match="shape"):
        choose_tensor_types([("a.weight", [0, 32])], model, "Q8_0", has_imatrix=False)
    with pytest.raises(UsageError):
        choose_tensor_types([("a.weight",)], model, "Q8_0", has_imatrix=False)
    with pytest.raises(UsageError):
        RecipeModel("llama", 0, 8, 2)
