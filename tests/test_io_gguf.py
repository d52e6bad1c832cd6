"""GGUF model reader: metadata, tensors, row reads, dequantization, and hostile files built with struct.pack."""

from __future__ import annotations

import struct
import tracemalloc

import gguf
import gguf.quants
import numpy as np
import pytest

import predictor.io.gguf as gguf_io
from predictor.errors import InputFileError, UsageError
from predictor.fixtures.gguf import write_tiny_gguf
from predictor.io.gguf import open_gguf, read_gguf_header

SHAPE = dict(n_layers=2, hidden=64, ffn=96, n_heads=4, n_kv_heads=2, vocab=80)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """One tiny model per stored type, with the float32 tensors it was made from."""
    d = tmp_path_factory.mktemp("gguf")
    out = {}
    for ttype in ("F32", "F16", "BF16", "Q8_0", "Q4_0"):
        p = d / f"tiny_{ttype}.gguf"
        out[ttype] = (p, write_tiny_gguf(p, tensor_type=ttype, seed=1, **SHAPE))
    return out


# -- well-formed files ------------------------------------------------------------------------

def test_metadata_from_keys_and_tensors(models):
    path, src = models["Q8_0"]
    with open_gguf(path) as m:
        md = m.metadata
        assert (md.architecture, md.name, md.source) == ("llama", "tiny", "gguf")
        assert (md.n_layers, md.hidden_size, md.ffn_size) == (2, 64, 96)
        assert (md.n_heads, md.n_kv_heads, md.n_gqa, md.head_dim) == (4, 2, 2, 16)
        assert (md.vocab_size, md.context_length, md.n_experts) == (80, 256, 0)
        assert md.tied_embeddings is False
        assert md.n_params == sum(x.size for x in src.values())
        assert md.extra["tensor_type_counts"] == {"F32": 5, "Q8_0": 16}
        assert m.unmapped == []


def test_tied_and_moe_metadata(tmp_path):
    p = tmp_path / "moe.gguf"
    src = write_tiny_gguf(p, tied=True, n_experts=4, **SHAPE)
    with open_gguf(p) as m:
        assert m.metadata.tied_embeddings is True and "output.weight" not in m
        assert m.metadata.n_experts == 4 and m.metadata.extra["n_experts_used"] == 2
        t = m.tensor("blk.1.ffn_down_exps.weight")
        assert t.shape == (4, 64, 96) and t.rows == 4 * 64 and t.ne == [96, 64, 4]
        np.testing.assert_array_equal(m.read_tensor(t.name), src[t.name])
        rows = np.array([0, 63, 64, 255])  # rows of the flattened (experts x rows, cols) view
        np.testing.assert_array_equal(m.read_rows(t.name, rows), src[t.name].reshape(-1, 96)[rows])


@pytest.mark.parametrize("ttype", ["F32", "F16", "BF16", "Q8_0", "Q4_0"])
def test_tensors_shapes_types_and_values(models, ttype):
    path, src = models[ttype]
    with open_gguf(path) as m:
        assert [t.name for t in m.tensors] == list(src)  # file order
        for t in m.tensors:
            assert t.shape == src[t.name].shape and t.source_name == t.name and t.file == str(path)
            stored = "F32" if len(t.shape) == 1 else ttype
            assert t.dtype == stored
            x = m.read_tensor(t.name)
            assert x.dtype == np.float32 and x.shape == t.shape
            if stored == "F32":
                np.testing.assert_array_equal(x, src[t.name])
            elif stored == "F16":
                np.testing.assert_array_equal(x, src[t.name].astype(np.float16).astype(np.float32))
            else:  # lossy: within the type's step size
                assert np.abs(x - src[t.name]).max() < 0.2 * np.abs(src[t.name]).max()


def test_quantized_values_match_gguf_dequantize(models):
    """Our Q8_0 read equals gguf.quants.dequantize of the bytes as gguf's own reader sees them."""
    path, _ = models["Q8_0"]
    reader = gguf.GGUFReader(path)
    with open_gguf(path) as m:
        n_checked = 0
        for rt in reader.tensors:
            if rt.tensor_type != gguf.GGMLQuantizationType.Q8_0:
                continue
            want = gguf.quants.dequantize(np.asarray(rt.data), rt.tensor_type).astype(np.float32)
            got = m.read_tensor(rt.name)
            assert np.array_equal(got.view(np.uint32), want.reshape(got.shape).view(np.uint32)), rt.name
            n_checked += 1
        assert n_checked == 16


@pytest.mark.parametrize("ttype", ["F32", "BF16", "Q8_0", "Q4_0"])
def test_read_rows_equals_rows_of_read_tensor(models, ttype):
    path, _ = models[ttype]
    rng = np.random.default_rng(3)
    with open_gguf(path) as m:
        for t in m.tensors:
            full = m.read_tensor(t.name).reshape(t.rows, t.cols)
            rows = rng.integers(0, t.rows, size=min(7, t.rows))  # unsorted, may repeat
            np.testing.assert_array_equal(m.read_rows(t.name, rows), full[rows])
        assert m.read_rows("output.weight", np.array([], dtype=np.int64)).shape == (0, 64)


def test_read_rows_dequantizes_only_the_selected_rows(models, monkeypatch):
    path, _ = models["Q8_0"]
    seen = []
    real = gguf_io.dequantize

    def spy(q, qtype, *, cols):
        seen.append(q.shape)
        return real(q, qtype, cols=cols)

    monkeypatch.setattr(gguf_io, "dequantize", spy)
    with open_gguf(path) as m:
        m.read_rows("token_embd.weight", [5, 70, 2])
        assert seen == [(3, 64 // 32 * 34)]


def test_large_tensor_is_read_in_chunks(models, monkeypatch):
    monkeypatch.setattr(gguf_io, "_READ_CHUNK_VALUES", 64 * 10)  # 10 rows per step
    path, src = models["Q4_0"]
    with open_gguf(path) as m:
        whole = m.read_tensor("token_embd.weight")
        monkeypatch.setattr(gguf_io, "_READ_CHUNK_VALUES", 1 << 22)
        np.testing.assert_array_equal(whole, m.read_tensor("token_embd.weight"))


def test_header_agrees_with_gguf_reader(models):
    path, _ = models["Q8_0"]
    h = read_gguf_header(path)
    r = gguf.GGUFReader(path)
    assert [t.name for t in h.tensors] == [t.name for t in r.tensors]
    for ours, theirs in zip(h.tensors, r.tensors):
        assert ours.dtype == theirs.tensor_type.name
        assert list(ours.ne) == [int(d) for d in theirs.shape]
        assert ours.offset == theirs.data_offset and ours.n_bytes == theirs.n_bytes
    assert h.data_offset == r.data_offset
    assert h.kv["llama.block_count"] == r.fields["llama.block_count"].contents()
    assert list(h.kv["tokenizer.ggml.tokens"]) == r.fields["tokenizer.ggml.tokens"].contents()
    np.testing.assert_array_equal(h.kv["tokenizer.ggml.scores"], r.fields["tokenizer.ggml.scores"].contents())


def test_unknown_tensor_bad_rows_and_closed_file(models):
    path, _ = models["F32"]
    m = open_gguf(path)
    with pytest.raises(UsageError, match="no tensor named"):
        m.read_tensor("blk.9.attn_q.weight")
    with pytest.raises(UsageError, match=r"\[0, 80\)"):
        m.read_rows("output.weight", [80])
    with pytest.raises(UsageError, match="integer"):
        m.read_rows("output.weight", [0.5])
    m.close()
    with pytest.raises(UsageError, match="closed"):
        m.read_tensor("output.weight")


# -- hostile files ----------------------------------------------------------------------------

def _s(x: str | bytes) -> bytes:
    b = x.encode() if isinstance(x, str) else x
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _s(key) + struct.pack("<II", 4, v)


def _ti(name: str, ne: list[int], type_id: int = 0, offset: int = 0) -> bytes:
    dims = struct.pack(f"<I{len(ne)}Q", len(ne), *ne)
    return _s(name) + dims + struct.pack("<IQ", type_id, offset)


def _gguf(kvs=(), tis=(), data=b"", *, magic=b"GGUF", version=3, n_tensors=None, n_kv=None) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tis)
    return head + b"\0" * (-len(head) % 32) + data


TWO_ROWS = np.arange(16, dtype="<f4").tobytes()  # an F32 tensor with ne = (8, 2)
GOOD = dict(kvs=[_kv_u32("general.alignment", 32)], tis=[_ti("a", [8, 2])], data=TWO_ROWS)


def test_struct_builder_makes_valid_files(tmp_path):
    p = tmp_path / "ok.gguf"
    p.write_bytes(_gguf(**GOOD))
    with open_gguf(p) as m:
        np.testing.assert_array_equal(m.read_tensor("a"), np.arange(16, dtype=np.float32).reshape(2, 8))


def _arr_header(key: str, item_type: int, count: int) -> bytes:
    return _s(key) + struct.pack("<IIQ", 9, item_type, count)


HOSTILE = {
    "wrong magic": (_gguf(**GOOD, magic=b"GGUX"), "not a GGUF file"),
    "safetensors bytes": (struct.pack("<Q", 2) + b"{}" + b"\0" * 30, "not a GGUF file"),
    "empty file": (b"", "too short"),
    "truncated fixed header": (b"GGUF\x03\x00\x00\x00\x01", "too short"),
    "truncated in kv": (_gguf(**GOOD)[:30], "truncated"),
    "version 1": (_gguf(**GOOD, version=1), "version 1"),
    "big-endian": (_gguf(**GOOD, version=3 << 24), "byte-swapped"),
    "absurd tensor count": (_gguf(**GOOD, n_tensors=2**63), "tensor count"),
    "absurd kv count": (_gguf(**GOOD, n_kv=2**62), "key-value count"),
    "absurd key length": (_gguf([struct.pack("<Q", 2**60) + b"k"], n_kv=1), "more than the limit"),
    "key length past EOF": (_gguf([struct.pack("<Q", 60_000) + b"k" * 20], n_kv=1), "truncated"),
    "string value past EOF": (_gguf([_s("k") + struct.pack("<IQ", 8, 10**12) + b"abc"]), "truncated"),
    "numeric array past EOF": (_gguf([_arr_header("k", 4, 2**40)]), "truncated"),
    "string array past EOF": (_gguf([_arr_header("k", 8, 2**40)]), "truncated"),
    "string item past EOF": (_gguf([_arr_header("k", 8, 2) + _s("ok") + struct.pack("<Q", 2**50)]),
                             "truncated"),
    "unknown value type": (_gguf([_s("k") + struct.pack("<II", 99, 0)]), "unknown GGUF value type 99"),
    "unknown array item type": (_gguf([_arr_header("k", 77, 1)]), "unknown GGUF value type 77"),
    "nested array": (_gguf([_arr_header("k", 9, 1)]), "array of arrays"),
    "duplicate key": (_gguf([_kv_u32("k", 1), _kv_u32("k", 2)]), "duplicate metadata key"),
    "empty key": (_gguf([_kv_u32("", 1)]), "is empty"),
    "key not UTF-8": (_gguf([_s(b"\xff\xfe") + struct.pack("<II", 4, 1)]), "not valid UTF-8"),
    "bad alignment": (_gguf([_kv_u32("general.alignment", 24)], [_ti("a", [8, 2])], TWO_ROWS), "power of two"),
    "unknown ggml type": (_gguf(tis=[_ti("a", [8, 2], type_id=99)], data=TWO_ROWS), "unknown GGML type id 99"),
    "too many dims": (_gguf(tis=[_ti("a", [8, 1, 1, 1, 2])], data=TWO_ROWS), "5 dimensions"),
    "no dims": (_gguf(tis=[_ti("a", [])], data=TWO_ROWS), "0 dimensions"),
    "zero dim": (_gguf(tis=[_ti("a", [8, 0])], data=TWO_ROWS), "zero dimension"),
    "row not whole blocks": (_gguf(tis=[_ti("a", [48, 2], type_id=8)], data=b"\0" * 200), "block size"),
    "tensor name too long": (_gguf(tis=[_ti("x" * 200, [8, 2])], data=TWO_ROWS), "limit of 63"),
    "data offset beyond EOF": (_gguf(tis=[_ti("a", [8, 2], offset=2**40)], data=TWO_ROWS), "past the end"),
    "misaligned offset": (_gguf(tis=[_ti("a", [8, 2], offset=4)], data=TWO_ROWS), "alignment"),
    "tensor data past EOF": (_gguf(tis=[_ti("a", [8, 2])], data=TWO_ROWS[:40]), "past the end"),
    "astronomic shape": (_gguf(tis=[_ti("a", [2**40, 2**40, 2**40, 2**40])], data=TWO_ROWS), "past the end"),
    "overlapping tensors": (
        _gguf(tis=[_ti("a", [8, 2]), _ti("b", [8, 1], offset=32)], data=TWO_ROWS), "overlap"),
    "duplicate tensor names": (_gguf(tis=[_ti("a", [8]), _ti("a", [8], offset=32)], data=TWO_ROWS),
                               "duplicate tensor"),
    "data section past EOF": (_gguf(tis=[_ti("a", [8, 2])])[:-4], "past the end"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_gguf_gives_one_line_error_without_big_allocations(tmp_path, case):
    blob, expected = HOSTILE[case]
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(InputFileError) as err:
            open_gguf(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(err.value)
    assert expected in msg and str(p) in msg and "\n" not in msg and " — " in msg
    assert peak < 4 * 2**20, f"{case}: {peak} bytes allocated"


def test_every_truncation_and_byte_flip_of_a_header_is_caught(models, tmp_path):
    """Cut the real file at every header byte, and flip seeded random header bytes: the reader either
    opens it (a flip may be harmless) or raises InputFileError — never struct/numpy/Unicode errors."""
    path, _ = models["Q8_0"]
    blob = path.read_bytes()
    h = read_gguf_header(path)
    p = tmp_path / "cut.gguf"
    for cut in list(range(0, h.data_offset + 64, 5)) + [len(blob) - 1]:
        p.write_bytes(blob[:cut])
        with pytest.raises(InputFileError):
            open_gguf(p)
    rng = np.random.default_rng(7)
    n_opened = 0
    for _ in range(200):
        b = bytearray(blob)
        for pos in rng.integers(4, h.data_offset, size=2):
            b[pos] = rng.integers(0, 256)
        p.write_bytes(bytes(b))
        try:
            with open_gguf(p) as m:
                for t in m.tensors[:3]:
                    m.read_rows(t.name, [0])
            n_opened += 1
        except (InputFileError, UsageError):
            pass
    assert 0 < n_opened < 200


def test_header_size_cap(models, monkeypatch):
    monkeypatch.setattr(gguf_io, "MAX_HEADER_BYTES", 1024)  # the tokenizer alone is larger
    with pytest.raises(InputFileError, match="header is larger than the .* cap"):
        open_gguf(models["F32"][0])


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(InputFileError, match="file not found"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(InputFileError, match="folder"):
        open_gguf(tmp_path)


def test_nan_and_inf_weights_are_reported_with_file_and_tensor(tmp_path):
    data = np.arange(16, dtype="<f4")
    data[11] = np.nan
    data[3] = np.inf
    p = tmp_path / "nan.gguf"
    p.write_bytes(_gguf(tis=[_ti("blk.0.attn_q.weight", [8, 2])], data=data.tobytes()))
    with open_gguf(p) as m:
        with pytest.raises(InputFileError) as err:
            m.read_tensor("blk.0.attn_q.weight")
        msg = str(err.value)
        assert str(p) in msg and "blk.0.attn_q.weight" in msg and "row 0" in msg and "\n" not in msg
        with pytest.raises(InputFileError, match="row 1"):
            m.read_rows("blk.0.attn_q.weight", [1])
        with pytest.raises(InputFileError):
            list(m.iter_tensors())
    with open_gguf(p, check_finite=False) as m:
        x = m.read_tensor("blk.0.attn_q.weight")
        assert np.isnan(x[1, 3]) and np.isinf(x[0, 3])


def test_nan_scale_in_quantized_block_is_reported(tmp_path):
    """A Q8_0 block whose fp16 scale is NaN dequantizes to NaN: also an error."""
    q = gguf.quants.quantize(np.ones((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)
    q[1, :2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    p = tmp_path / "nanq.gguf"
    p.write_bytes(_gguf(tis=[_ti("w", [32, 2], type_id=8)], data=q.tobytes()))
    with open_gguf(p) as m:
        np.testing.assert_allclose(m.read_rows("w", [0]), np.ones((1, 32), np.float32), rtol=1e-3)
        with pytest.raises(InputFileError, match="w contains NaN or Inf values .first in row 1"):
            m.read_tensor("w")


def test_fixture_rejects_shapes_that_do_not_fit_the_type(tmp_path):
    with pytest.raises(UsageError, match="block size"):
        write_tiny_gguf(tmp_path / "x.gguf", tensor_type="Q8_0", hidden=48, n_heads=4, n_kv_heads=2)

