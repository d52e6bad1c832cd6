"""Exact tensor sizes per preset: hand-computed cases, shape fallbacks, real llama-quantize row sizes,
and a Llama-3-8B-shaped Q4_K_M total derived by arithmetic from RECIPES.md sec. 1 and 4.4."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from predictor.errors import UnsupportedError, UsageError
from predictor.quant.recipes import PRESETS, RecipeModel, choose_tensor_types
from predictor.quant.sizes import preset_size, preset_sizes, tensor_bytes

REF = Path(__file__).parent / "data" / "reference"
SMOLLM2 = RecipeModel("llama", n_layers=30, n_head=9, n_head_kv=3)


def test_hand_computed_tensor_bytes():
    assert tensor_bytes("Q4_K", [4096, 4096]) == 16 * 4096 * 144  # 16 super-blocks of 144 bytes per row
    assert tensor_bytes("q4_K", [4096, 4096]) == 16 * 4096 * 144  # llama.cpp's spelling
    assert tensor_bytes("Q8_0", [576, 49152]) == 49152 * 18 * 34
    assert tensor_bytes("Q6_K", [14336, 4096]) == 4096 * 56 * 210
    assert tensor_bytes("IQ4_XS", [1536, 576]) == 576 * 6 * 136
    assert tensor_bytes("MXFP4", [256, 512, 8]) == 8 * 512 * 8 * 17  # 3-D experts: rows = ne1 * ne2
    assert tensor_bytes("F32", [576]) == 576 * 4
    assert tensor_bytes("BF16", [3, 5]) == 30
    assert tensor_bytes("Q1_0", [128, 2]) == 2 * 18


def test_bad_sizes():
    with pytest.raises(UsageError, match="multiple"):
        tensor_bytes("Q4_K", [576, 10])
    with pytest.raises(UsageError):
        tensor_bytes("Q4_K", [0, 10])
    with pytest.raises(UsageError):
        tensor_bytes("Q9_X", [256, 10])


def _one_layer(n_embd: int, n_ff: int):
    p = "blk.0."
    return [("token_embd.weight", [n_embd, 1000]), ("output_norm.weight", [n_embd]),
            (p + "attn_norm.weight", [n_embd]), (p + "ffn_norm.weight", [n_embd]),
            (p + "attn_q.weight", [n_embd, n_embd]), (p + "attn_k.weight", [n_embd, n_embd]),
            (p + "attn_v.weight", [n_embd, n_embd]), (p + "attn_output.weight", [n_embd, n_embd]),
            (p + "ffn_gate.weight", [n_embd, n_ff]), (p + "ffn_up.weight", [n_embd, n_ff]),
            (p + "ffn_down.weight", [n_ff, n_embd])]


def test_fallback_sizes_smollm2_shape():
    """576 = 2.25 x 256: K-types fall back to 32-block types (RECIPES.md sec. 5); 1536 keeps K."""
    model = RecipeModel("llama", 1, 9, 3)
    s = preset_size(_one_layer(576, 1536), model, "Q4_K_M", has_imatrix=False)
    t = s.tensor_types
    assert t["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K -> Q5_0
    assert t["blk.0.attn_v.weight"] == "Q8_0"  # Q6_K (more bits, layer 0) -> Q8_0
    assert t["blk.0.ffn_down.weight"] == "Q6_K"  # ne0 1536 divisible by 256
    assert t["token_embd.weight"] == "Q8_0"  # tied: output rule, 576 % 256 != 0 -> Q8_0
    q5_0 = 576 // 32 * 22
    expected = (
        1000 * (576 // 32 * 34)  # token_embd Q8_0
        + 3 * 576 * 4  # norms F32
        + 2 * 576 * q5_0  # attn_q, attn_k
        + 576 * (576 // 32 * 34)  # attn_v Q8_0
        + 576 * q5_0  # attn_output
        + 2 * 1536 * q5_0  # ffn_gate, ffn_up
        + 576 * (1536 // 256 * 210)  # ffn_down Q6_K
    )
    assert s.tensor_bytes == expected
    assert sum(s.bytes_by_type.values()) == expected
    assert s.bytes_by_type["F32"] == 3 * 576 * 4


def test_fallback_to_f16_and_refusal():
    """ne0 = 100 is not a multiple of 32: K fallbacks become F16; 32-block defaults are refused."""
    model = RecipeModel("llama", 1, 4, 4)
    # tied token_embd gets the output rule: 100 % 256 -> Q8_0, and Q8_0 has no fallback
    with pytest.raises(UnsupportedError, match="token_embd.weight.*Q8_0"):
        preset_size(_one_layer(100, 256), model, "Q4_K_M", has_imatrix=False)
    tensors = [t for t in _one_layer(100, 256) if t[0] != "token_embd.weight"]
    s = preset_size(tensors, model, "Q4_K_M", has_imatrix=False)
    assert s.tensor_types["blk.0.attn_q.weight"] == "F16"
    assert s.tensor_types["blk.0.ffn_down.weight"] == "Q6_K"
    assert tensor_bytes(s.tensor_types["blk.0.ffn_up.weight"], [100, 256]) == 100 * 256 * 2
    with pytest.raises(UnsupportedError, match="Q4_0"):
        preset_size(tensors, model, "Q4_0", has_imatrix=False)
    sizes, refused = preset_sizes(tensors, model, ["Q4_K_M", "Q4_0", "F16"], has_imatrix=False)
    assert set(sizes) == {"Q4_K_M", "F16"} and set(refused) == {"Q4_0"}
    assert "blk.0" in refused["Q4_0"]


def test_real_llama_quantize_row_sizes():
    """Types and row bytes of tensors written by the real llama-quantize for SmolLM2-135M."""
    e2e = np.load(REF / "smollm2_e2e_llama_quantize.npz")
    meta = json.loads(str(e2e["meta_json"]))
    d = json.loads((REF / "recipes_dryrun_smollm2_135m.json").read_text())
    tensors = list(zip(d["tensors"], d["shapes_ne"]))
    cache = {}
    for case in meta["cases"]:
        key = (case["ftype"], case["variant"])
        if key not in cache:
            cache[key] = choose_tensor_types(tensors, SMOLLM2, case["ftype"], has_imatrix=case["variant"] == "imat")
        name = case["tensor"]
        rows, cols = meta["tensors"][name]["full_shape_rows_cols"]
        got = cache[key][name]
        assert got == case["ggml_type"], case
        assert tensor_bytes(got, [cols, rows]) == rows * case["row_bytes"], case
        q = e2e[f"{case['ftype']}/{case['variant']}/{name}/q"]
        assert q.shape[1] == case["row_bytes"]
    assert len(meta["cases"]) == 96


def test_all_presets_smollm2_consistent():
    d = json.loads((REF / "recipes_dryrun_smollm2_135m.json").read_text())
    tensors = list(zip(d["tensors"], d["shapes_ne"]))
    sizes, refused = preset_sizes(tensors, SMOLLM2, has_imatrix=True)
    assert set(refused) == {"Q1_0"} and set(sizes) | set(refused) == set(PRESETS)
    n = sum(int(np.prod(ne)) for _, ne in tensors)
    for s in sizes.values():
        assert s.n_weights == n
        assert s.tensor_bytes == sum(tensor_bytes(s.tensor_types[k], ne) for k, ne in tensors)
        assert s.bits_per_weight == pytest.approx(8 * s.tensor_bytes / n)
    assert sizes["F32"].tensor_bytes == 4 * n
    assert sizes["F16"].tensor_bytes == sizes["BF16"].tensor_bytes
    # bigger presets are bigger on this model
    assert sizes["Q8_0"].tensor_bytes > sizes["Q6_K"].tensor_bytes > sizes["Q4_K_M"].tensor_bytes
    assert sizes["Q4_K_M"].tensor_bytes > sizes["Q3_K_M"].tensor_bytes > sizes["Q2_K"].tensor_bytes
    print("\nSmolLM2-135M bits per weight:",
          ", ".join(f"{p} {s.bits_per_weight:.3f}" for p, s in sizes.items()))


def _llama3_8b():
    e, ff, kv, vocab = 4096, 14336, 1024, 128256
    t = [("token_embd.weight", [e, vocab]), ("output.weight", [e, vocab]), ("output_norm.weight", [e])]
    for i in range(32):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", [e]), (p + "ffn_norm.weight", [e]),
              (p + "attn_q.weight", [e, e]), (p + "attn_k.weight", [e, kv]), (p + "attn_v.weight", [e, kv]),
              (p + "attn_output.weight", [e, e]), (p + "ffn_gate.weight", [e, ff]),
              (p + "ffn_up.weight", [e, ff]), (p + "ffn_down.weight", [ff, e])]
    return t


def test_llama3_8b_q4_k_m_bits_per_weight():
    e, ff, kv, vocab = 4096, 14336, 1024, 128256
    model = RecipeModel("llama", n_layers=32, n_head=32, n_head_kv=8)
    s = preset_size(_llama3_8b(), model, "Q4_K_M", has_imatrix=False)

    # RECIPES.md sec. 1 bytes per weight, and the worked example in 4.4: token_embd Q4_K, output Q6_K,
    # attn_v and ffn_down Q6_K in 16 layers (0-3, 6, 9, ..., 27, 28-31), all other matrices Q4_K.
    q4k, q6k = Fraction(144, 256), Fraction(210, 256)
    n_six = len(set(range(4)) | set(range(6, 28, 3)) | set(range(28, 32)))
    assert n_six == 16
    per_layer_q4k = e * e * 2 + e * kv + e * ff * 2  # q, output, k, gate, up
    expected = (
        e * vocab * q4k + e * vocab * q6k + e * 4
        + 32 * (2 * e * 4 + per_layer_q4k * q4k)
        + n_six * (e * kv + ff * e) * q6k + (32 - n_six) * (e * kv + ff * e) * q4k
    )
    assert expected.denominator == 1
    n_weights = 2 * e * vocab + e + 32 * (2 * e + 2 * e * e + 2 * e * kv + 3 * e * ff)
    assert s.tensor_bytes == int(expected)
    assert s.n_weights == n_weights
    assert s.bits_per_weight == pytest.approx(8 * int(expected) / n_weights, rel=1e-12)
    print(f"\nLlama-3-8B-shaped Q4_K_M: {s.tensor_bytes} bytes = {s.gib:.3f} GiB, {s.bits_per_weight:.4f} bpw")
    # the quantize tool describes Q4_K_M as 4.58G for Llama-3-8B
    assert abs(s.gib - 4.58) < 0.02
    assert s.bytes_by_type.keys() == {"Q4_K", "Q6_K", "F32"}
