"""imatrix readers (GGUF, legacy .dat) against the two real llama-imatrix files; the writer; hostile input."""

from __future__ import annotations

import struct
import tracemalloc
from pathlib import Path

import gguf
import numpy as np
import pytest

from predictor.errors import InputFileError, MismatchError, UsageError
from predictor.fixtures.gguf import write_tiny_gguf
from predictor.io.base import TensorInfo
from predictor.io.gguf import open_gguf
from predictor.io.imatrix import read_imatrix, write_imatrix_gguf

REF = Path(__file__).parent / "data" / "reference"
GGUF_FILE = REF / "smollm2_135m_imatrix.gguf"
DAT_FILE = REF / "smollm2_135m_imatrix.dat"


@pytest.fixture(scope="module")
def real():
    return read_imatrix(GGUF_FILE), read_imatrix(DAT_FILE)


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# -- the real files ---------------------------------------------------------------------------

def test_real_files_contents(real):
    g, d = real
    assert (g.format, d.format) == ("gguf", "dat")
    assert len(g) == len(d) == 210 and g.n_values == d.n_values == 149_760
    assert {int(c[0]) for c in g.counts.values()} == {1280}
    assert {int(c[0]) for c in d.counts.values()} == {10}
    assert (g.chunk_count, g.chunk_size, g.datasets) == (10, 128, ["calib.txt"])
    assert (d.chunk_count, d.chunk_size, d.datasets) == (10, None, ["calib.txt"])
    assert g.entries["blk.0.ffn_down.weight"].shape == (1, 1536)
    assert g.entries["blk.0.attn_q.weight"].shape == (1, 576)


def test_both_formats_give_bit_identical_vectors(real):
    g, d = real
    assert sorted(g.entries) == sorted(d.entries)
    differing = [n for n in g.entries if not np.array_equal(_bits(g.vector(n)), _bits(d.vector(n)))]
    assert differing == []


def test_vectors_equal_what_llama_quantize_passed_to_ggml(real):
    """smollm2_e2e_llama_quantize.npz stores in_sum2 / counts as llama-quantize computed it."""
    e2e = np.load(REF / "smollm2_e2e_llama_quantize.npz")
    keys = [k for k in e2e.files if k.startswith("imatrix/")]
    assert len(keys) == 4
    for imat in real:
        for k in keys:
            name = k.split("/", 1)[1]
            assert np.array_equal(_bits(imat.vector(name)), _bits(e2e[k])), (imat.format, name)


def test_gguf_normalisation_matches_a_direct_computation(real):
    """Independent of our GGUF parser: gguf.GGUFReader's raw sums divided by the rounded count."""
    reader = gguf.GGUFReader(GGUF_FILE)
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    for name in ("blk.3.attn_k.weight", "blk.17.ffn_down.weight"):
        count = np.float32(round(float(tensors[f"{name}.counts"][0])))
        want = tensors[f"{name}.in_sum2"].astype(np.float32) / count
        assert np.array_equal(_bits(real[0].vector(name)), _bits(want))


# -- writer ----------------------------------------------------------------------------------

def test_rewriting_the_real_file_is_byte_identical(real, tmp_path):
    with open_gguf(GGUF_FILE) as g:
        sums = {n: g.read_tensor(f"{n}.in_sum2") for n in real[0].entries}
        counts = {n: g.read_tensor(f"{n}.counts") for n in real[0].entries}
    out = tmp_path / "rewritten.gguf"
    write_imatrix_gguf(out, sums, counts, chunk_count=10, chunk_size=128, datasets=["calib.txt"])
    assert out.read_bytes() == GGUF_FILE.read_bytes()


def test_moe_round_trip_with_zero_and_fractional_counts(tmp_path):
    rng = np.random.default_rng(0)
    sums = {"blk.0.ffn_up_exps.weight": rng.random((4, 64), dtype=np.float32) * 50,
            "blk.0.attn_q.weight": rng.random(64, dtype=np.float32)}
    counts = {"blk.0.ffn_up_exps.weight": np.array([10, 0, 2.5, 0.49999997], np.float32),
              "blk.0.attn_q.weight": np.array([7], np.float32)}
    p = tmp_path / "moe.imatrix.gguf"
    write_imatrix_gguf(p, sums, counts, chunk_count=3, chunk_size=16, datasets=["a.txt", "b.txt"])
    with open_gguf(p) as g:  # layout as llama-imatrix writes it
        assert [t.name for t in g.tensors] == [
            "blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
            "blk.0.ffn_up_exps.weight.in_sum2", "blk.0.ffn_up_exps.weight.counts"]
        assert [t.ne for t in g.tensors] == [[64], [1], [64, 4], [1, 4]]
        assert g.kv["general.type"] == "imatrix" and "general.architecture" not in g.kv
    im = read_imatrix(p)
    assert (im.chunk_count, im.chunk_size, im.datasets) == (3, 16, ["a.txt", "b.txt"])
    e = im.entries["blk.0.ffn_up_exps.weight"]
    assert e.shape == (4, 64)
    assert im.counts["blk.0.ffn_up_exps.weight"].tolist() == [10, 0, 3, 0]  # lround: half away from zero
    s = sums["blk.0.ffn_up_exps.weight"]
    assert np.array_equal(_bits(im.vector("blk.0.ffn_up_exps.weight", 0)), _bits(s[0] / np.float32(10)))
    assert np.array_equal(im.vector("blk.0.ffn_up_exps.weight", 1), np.ones(64, np.float32))
    assert np.array_equal(_bits(im.vector("blk.0.ffn_up_exps.weight", 2)), _bits(s[2] / np.float32(3)))
    assert np.array_equal(im.vector("blk.0.ffn_up_exps.weight", 3), np.ones(64, np.float32))
    with pytest.raises(UsageError, match="out of range"):
        im.vector("blk.0.ffn_up_exps.weight", 4)
    with pytest.raises(UsageError, match="no entry"):
        im.vector("blk.0.attn_k.weight")


def test_writer_rejects_bad_arguments(tmp_path):
    p = tmp_path / "x.gguf"
    ok = dict(chunk_count=1, chunk_size=8, datasets=["d"])
    with pytest.raises(UsageError, match="same names"):
        write_imatrix_gguf(p, {"a": np.ones(4)}, {"b": np.ones(1)}, **ok)
    with pytest.raises(UsageError, match="dataset"):
        write_imatrix_gguf(p, {"a": np.ones(4)}, {"a": np.ones(1)}, chunk_count=1, chunk_size=8, datasets=[])
    with pytest.raises(UsageError, match="n_mat"):
        write_imatrix_gguf(p, {"a": np.ones((2, 4))}, {"a": np.ones(3)}, **ok)
    with pytest.raises(UsageError, match="finite"):
        write_imatrix_gguf(p, {"a": np.full(4, np.nan)}, {"a": np.ones(1)}, **ok)


# -- legacy .dat built with struct.pack --------------------------------------------------------

def _dat_entry(name: str, ncall: int, values, *, nval: int | None = None, name_len: int | None = None) -> bytes:
    raw = name.encode()
    v = np.asarray(values, dtype="<f4")
    return (struct.pack("<i", len(raw) if name_len is None else name_len) + raw
            + struct.pack("<ii", ncall, v.size if nval is None else nval) + v.tobytes())


def _dat(entries: list[bytes], trailer: bytes = b"", n_entries: int | None = None) -> bytes:
    return struct.pack("<i", len(entries) if n_entries is None else n_entries) + b"".join(entries) + trailer


def test_dat_moe_entry_is_sliced_per_expert_like_llama_quantize(tmp_path):
    vals = np.concatenate([np.full(32, 20.0), np.full(32, 40.0)]).astype(np.float32)
    p = tmp_path / "moe.dat"
    p.write_bytes(_dat([_dat_entry("blk.0.ffn_down_exps.weight", 4, vals),
                        _dat_entry("blk.0.attn_q.weight", 0, np.full(32, 3.0))],
                       struct.pack("<ii", 4, 0)))
    im = read_imatrix(p)
    assert im.entries["blk.0.ffn_down_exps.weight"].shape == (1, 64)
    assert np.array_equal(im.vector("blk.0.ffn_down_exps.weight", 1, cols=32), np.full(32, 10.0, np.float32))
    assert np.array_equal(im.vector("blk.0.attn_q.weight"), np.full(32, 3.0, np.float32))  # ncall 0: as stored
    assert (im.chunk_count, im.datasets) == (4, [])
    tensors = [TensorInfo("blk.0.ffn_down_exps.weight", "", (2, 8, 32), "F32", "", 0, 0),
               TensorInfo("blk.0.attn_q.weight", "", (16, 32), "F32", "", 0, 0)]
    im.check_against(tensors)


ONE8 = np.ones(8)
_OK_ENTRY = _dat_entry("blk.0.attn_q.weight", 1, ONE8)

HOSTILE_DAT = {
    "empty file": (b"", "only 0 bytes"),
    "zero entries": (_dat([]), "entry count 0"),
    "negative entries": (_dat([], n_entries=-5), "entry count -5"),
    "absurd n_entries": (_dat([_OK_ENTRY], n_entries=2**31 - 1), "entry count 2147483647"),
    "absurd name_len": (_dat([_dat_entry("blk.0.attn_q.weight", 1, ONE8, name_len=2**31 - 1)]), "name length"),
    "negative name_len": (_dat([_dat_entry("x", 1, np.ones(8), name_len=-1)]), "name length -1"),
    "absurd nval": (_dat([_dat_entry("blk.0.attn_q.weight", 1, ONE8, nval=2**31 - 1)]), "claims 2147483647 values"),
    "zero nval": (_dat([_dat_entry("blk.0.attn_q.weight", 1, np.ones(8), nval=0)]), "claims 0 values"),
    "truncated values": (_dat([_OK_ENTRY])[:-5], "truncated"),
    "truncated in second entry": (_dat([_OK_ENTRY, _OK_ENTRY.replace(b"q", b"k")])[:-12], "truncated"),
    "NaN value": (_dat([_dat_entry("blk.0.attn_q.weight", 1, [1, np.nan, 2, 3])]), "NaN or Inf"),
    "Inf value": (_dat([_dat_entry("blk.0.attn_q.weight", 1, [1, np.inf])]), "NaN or Inf"),
    "duplicate entry": (_dat([_OK_ENTRY, _OK_ENTRY]), "duplicate entry"),
    "name not UTF-8": (_dat([struct.pack("<i", 2) + b"\xff\xfe" + struct.pack("<iif", 1, 1, 1.0)]), "not UTF-8"),
    "dataset length past EOF": (_dat([_OK_ENTRY], struct.pack("<ii", 1, 1000) + b"abc"), "dataset length 1000"),
    "partial trailer": (_dat([_OK_ENTRY], b"\x01\x00"), "truncated"),
    "garbage after trailer": (_dat([_OK_ENTRY], struct.pack("<ii", 1, 1) + b"a" + b"junk"), "unexpected"),
}


@pytest.mark.parametrize("case", list(HOSTILE_DAT))
def test_hostile_dat_gives_one_line_error_without_big_allocations(tmp_path, case):
    blob, expected = HOSTILE_DAT[case]
    p = tmp_path / "bad.dat"
    p.write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(InputFileError) as err:
            read_imatrix(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert expected in msg and str(p) in msg and "\n" not in msg and " — " in msg
    assert peak < 2 * 2**20, f"{case}: {peak} bytes allocated"


def test_every_truncation_inside_the_real_dat_entries_is_caught(tmp_path):
    blob = DAT_FILE.read_bytes()
    trailer = 4 + 4 + len(b"calib.txt")
    p = tmp_path / "cut.dat"
    rng = np.random.default_rng(1)
    # A cut exactly between entries leaves a shorter valid-looking file only if n_entries allowed it;
    # it does not (n_entries stays 210), so every cut before the trailer must fail.
    cuts = set(rng.integers(0, len(blob) - trailer, size=60).tolist()) | {1, 5, len(blob) - trailer - 1}
    for cut in sorted(cuts):
        p.write_bytes(blob[:cut])
        with pytest.raises(InputFileError):
            read_imatrix(p)


# -- hostile GGUF imatrix ------------------------------------------------------------------

def _write_imatrix_like(path, tensors: dict[str, np.ndarray], kvs: bool = True):
    w = gguf.GGUFWriter(path, arch="")
    if kvs:
        w.add_array("imatrix.datasets", ["d"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 8)
    for name, a in tensors.items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _pair(sums, counts, **kw) -> dict:
    return dict(tensors={"w.in_sum2": np.asarray(sums), "w.counts": np.asarray(counts, np.float32)}, **kw)


ONES8 = np.ones(8, np.float32)
HOSTILE_GGUF = {
    "missing metadata": (_pair(ONES8, [1], kvs=False), "not an imatrix"),
    "unpaired": (dict(tensors={"w.in_sum2": ONES8}), "only one of"),
    "no entries": (dict(tensors={"other": ONES8}), "no <name>.in_sum2"),
    "F16 sums": (_pair(ONES8.astype(np.float16), [1]), "not F32"),
    "NaN sums": (_pair(np.full(8, np.nan, np.float32), [1]), "NaN or Inf"),
    "negative count": (_pair(ONES8, [-1]), "impossible counts"),
    "counts do not divide": (_pair(np.ones(9, np.float32), [1, 1]), "do not split"),
}


@pytest.mark.parametrize("case", list(HOSTILE_GGUF))
def test_hostile_gguf_imatrix(tmp_path, case):
    kwargs, expected = HOSTILE_GGUF[case]
    p = tmp_path / "bad.imatrix.gguf"
    _write_imatrix_like(p, **kwargs)
    with pytest.raises(InputFileError) as err:
        read_imatrix(p)
    assert expected in str(err.value) and str(p) in str(err.value) and "\n" not in str(err.value)


def test_a_model_gguf_is_not_an_imatrix(tmp_path):
    p = tmp_path / "model.gguf"
    write_tiny_gguf(p)
    with pytest.raises(InputFileError, match="not an imatrix .general.type=None"):
        read_imatrix(p)


def test_corrupt_gguf_imatrix_is_reported_by_the_gguf_checks(tmp_path):
    p = tmp_path / "cut.gguf"
    p.write_bytes(GGUF_FILE.read_bytes()[:-100])
    with pytest.raises(InputFileError, match="past the end"):
        read_imatrix(p)
    with pytest.raises(InputFileError, match="file not found"):
        read_imatrix(tmp_path / "missing.dat")


# -- check_against -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model and a GGUF imatrix with an entry for each of its blk.* matrices."""
    d = tmp_path_factory.mktemp("imat")
    model = d / "tiny.gguf"
    write_tiny_gguf(model, n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, vocab=80)
    with open_gguf(model) as m:
        tensors = list(m.tensors)
    mats = {t.name: t for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2}
    return d, tensors, mats


def _imatrix_for(d: Path, shapes: dict[str, int], name: str = "im.gguf"):
    p = d / name
    write_imatrix_gguf(p, {n: np.ones(c, np.float32) for n, c in shapes.items()},
                       {n: np.ones(1, np.float32) for n in shapes}, chunk_count=1, chunk_size=8, datasets=["x"])
    return read_imatrix(p)


def test_matching_imatrix_passes(tiny):
    d, tensors, mats = tiny
    im = _imatrix_for(d, {n: t.cols for n, t in mats.items()})
    im.check_against(tensors)  # token_embd/output have no entry: allowed


def test_mismatched_imatrix_names_columns_and_coverage(tiny):
    d, tensors, mats = tiny
    shapes = {n: t.cols for n, t in mats.items()}
    shapes["blk.7.attn_q.weight"] = 64  # a deeper model's layer
    shapes["blk.0.ffn_down.weight"] = 128  # wrong width
    shapes["token_embd.weight"] = 5  # llama-quantize ignores a token_embd size mismatch
    del shapes["blk.1.attn_v.weight"]
    im = _imatrix_for(d, shapes, "bad.gguf")
    with pytest.raises(MismatchError) as err:
        im.check_against(tensors)
    msg = str(err.value)
    assert "\n" not in msg and im.path in msg and "llama-imatrix" in msg
    assert "1 entries name tensors the model does not have: blk.7.attn_q.weight" in msg
    assert "1 column counts differ: blk.0.ffn_down.weight (imatrix 1x128, model 1x96)" in msg
    assert "1 model tensors have no entry: blk.1.attn_v.weight" in msg
    assert "token_embd" not in msg
    with pytest.raises(MismatchError) as err:
        im.check_against(tensors, require_all=False)
    assert "no entry" not in str(err.value)


def test_real_imatrix_does_not_fit_a_different_model(real, tiny):
    _, tensors, _ = tiny
    with pytest.raises(MismatchError) as err:
        real[1].check_against(tensors)
    assert "196 entries name tensors the model does not have" in str(err.value)  # layers 2..29
    assert "14 column counts differ: blk.0.attn_k.weight (imatrix 1x576, model 1x64)" in str(err.value)
