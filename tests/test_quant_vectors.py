"""Byte-exactness of our quantizers against ggml's own output (tests/data/reference, see PROVENANCE.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from predictor import quant
from predictor.errors import UnsupportedError
from predictor.quant.testing import assert_same_blocks, describe_block_mismatch

REF = Path(__file__).parent / "data" / "reference"
VECTORS = np.load(REF / "llamacpp_quant_vectors.npz")
META = json.loads(str(VECTORS["meta_json"]))
E2E = np.load(REF / "smollm2_e2e_llama_quantize.npz")
E2E_META = json.loads(str(E2E["meta_json"]))

# The required set: each must quantize exactly, with and without importance weights.
REQUIRED = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]
MATRICES = ["gaussian", "student_t", "outliers", "special"]


def _cases():
    for qtype, info in META["types"].items():
        for m in MATRICES:
            for variant in ("noimat", "imat"):
                yield pytest.param(qtype, m, variant, id=f"{qtype}-{m}-{variant}")


def _expected_bytes(qtype: str, m: str, variant: str) -> np.ndarray | None:
    key = f"{qtype}/{m}/{variant}/q"
    if key in VECTORS:
        return VECTORS[key]
    if variant == "imat" and f"{qtype}/{m}/noimat/q" in VECTORS:
        return VECTORS[f"{qtype}/{m}/noimat/q"]  # the type ignores the imatrix
    return None  # e.g. IQ2_XXS without imatrix: ggml refuses


def test_required_types_are_supported():
    missing = [t for t in REQUIRED if t not in quant.supported_types()]
    assert not missing, f"required quantizers missing: {missing}"


@pytest.mark.parametrize("qtype,matrix,variant", list(_cases()))
def test_quantize_matches_ggml(qtype, matrix, variant):
    expected = _expected_bytes(qtype, matrix, variant)
    if expected is None:
        pytest.skip("no reference (ggml requires an imatrix for this type)")
    if qtype not in quant.supported_types():
        if qtype in REQUIRED:
            pytest.fail(f"{qtype} is required but not supported")
        pytest.skip(f"{qtype} quantization not implemented (reported as unsupported)")
    x = VECTORS[f"input/{matrix}"]
    imatrix = VECTORS[f"imatrix/{matrix}"] if variant == "imat" else None
    got = quant.quantize(x, qtype, imatrix=imatrix)
    assert_same_blocks(got, expected, qtype, f"{qtype}/{matrix}/{variant}")


@pytest.mark.parametrize("qtype,matrix,variant", list(_cases()))
def test_dequantize_matches_ggml(qtype, matrix, variant):
    key = f"{qtype}/{matrix}/{variant}"
    if f"{key}/q" not in VECTORS:
        pytest.skip("no separate reference bytes for this variant")
    q = VECTORS[f"{key}/q"]
    cols = VECTORS[f"input/{matrix}"].shape[1]
    try:
        got = quant.dequantize(q, qtype, cols=cols)
    except UnsupportedError:
        if qtype in REQUIRED:
            raise
        pytest.skip(f"{qtype} dequantization unsupported (gguf has no kernel for it)")
    expected = VECTORS[f"{key}/deq"]
    # compare as bits so that -0.0 / NaN payloads count too
    assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize(
    "case", E2E_META["cases"], ids=lambda c: f"{c['ftype']}-{c['variant']}-{c['tensor']}"
)
def test_end_to_end_llama_quantize_bytes(case):
    """Real SmolLM2 tensors + real imatrix: our bytes equal what llama-quantize wrote."""
    name = case["tensor"]
    x = E2E[f"input/{name}"]
    imatrix = E2E[f"imatrix/{name}"] if case["variant"] == "imat" else None
    got = quant.quantize(x, case["ggml_type"], imatrix=imatrix)
    expected = E2E[f"{case['ftype']}/{case['variant']}/{name}/q"]
    assert got.shape[1] == case["row_bytes"]
    assert_same_blocks(got, expected, case["ggml_type"], f"{case['ftype']}/{case['variant']}/{name}")


def test_mismatch_report_names_worst_block():
    x = VECTORS["input/gaussian"]
    good = VECTORS["Q8_0/gaussian/noimat/q"].copy()
    bad = good.copy()
    bad[2, 34 * 3 + 5] ^= 0xFF  # row 2, block 3
    bad[2, 34 * 3 + 9] ^= 0x01
    bad[5, 0] ^= 0x01  # row 5, block 0
    report = describe_block_mismatch(bad, good, "Q8_0")
    assert "2 of 128 blocks differ" in report
    assert "row 2 block 3" in report and "offsets [5, 9]" in report
    assert describe_block_mismatch(good, good, "Q8_0") is None
    assert x.shape == (8, 512)


def test_quantize_rejects_bad_input():
    x = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match="multiple"):
        quant.quantize(np.zeros((2, 48), np.float32), "Q8_0")
    with pytest.raises(ValueError, match="float32"):
        quant.quantize(x.astype(np.float64), "Q8_0")
    bad = x.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quant.quantize(bad, "Q8_0")
    with pytest.raises(ValueError, match="imatrix"):
        quant.quantize(x, "Q8_0", imatrix=np.ones(63, np.float32))
    with pytest.raises(ValueError, match="unknown GGML type"):
        quant.quantize(x, "Q9_9")
