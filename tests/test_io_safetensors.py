"""safetensors reader: round trips, shards, folders, bounded reads, and hostile files built by hand."""

from __future__ import annotations

import json
import struct
import tracemalloc

import gguf
import numpy as np
import pytest

from predictor.errors import InputFileError, UnsupportedError
from predictor.fixtures.hf import write_safetensors, write_tiny_llama
from predictor.io import open_model
from predictor.io.safetensors import open_safetensors, read_header


def _raw_file(path, header, data=b"", *, header_len=None):
    """A safetensors file from a header (dict or raw bytes) and data bytes, built with struct.pack."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(blob) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + blob + data)
    return path


def _assert_one_line(err, path):
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "\n" not in msg


def _entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# ---------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_round_trip_each_dtype(tmp_path, dtype):
    rng = np.random.default_rng(1)
    arrays = {"a": rng.standard_normal((5, 7)).astype(np.float32) * 0.02,
              "b": rng.standard_normal(9).astype(np.float32),
              "c": rng.standard_normal((2, 3, 4)).astype(np.float32)}
    path = write_safetensors(tmp_path / "x.safetensors", arrays, dtype=dtype, metadata={"k": "v"})
    header = read_header(path)
    assert header.metadata == {"k": "v"}
    assert [t.name for t in header.tensors] == ["a", "b", "c"]  # file order
    assert all(t.dtype == dtype for t in header.tensors)
    with open_safetensors(path) as r:
        for name, x in arrays.items():
            got = r.read_tensor(name)
            assert got.dtype == np.float32 and got.shape == x.shape
            if dtype == "F32":
                expect = x
            elif dtype == "F16":
                expect = x.astype(np.float16).astype(np.float32)
            else:  # gguf's own BF16 converter as the independent oracle (round to nearest even)
                bits = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16)
                expect = gguf.quants.dequantize(bits, gguf.GGMLQuantizationType.BF16).reshape(x.shape)
            np.testing.assert_array_equal(got, expect)


def test_header_offsets_are_absolute_and_sizes_match(tmp_path):
    arrays = {"w": np.ones((4, 8), np.float32), "v": np.zeros(3, np.float32)}
    path = write_safetensors(tmp_path / "x.safetensors", arrays, dtype="BF16")
    header = read_header(path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert header.data_start == 8 + n
    w = header.tensors[0]
    assert w.n_bytes == 4 * 8 * 2
    assert raw[w.offset:w.offset + 2] == struct.pack("<H", 0x3F80)  # bf16 1.0


def test_read_rows_matches_full_read_in_any_order(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 10, 16)).astype(np.float32)  # rows flatten the leading dims
    path = write_safetensors(tmp_path / "x.safetensors", {"e": x}, dtype="BF16")
    with open_safetensors(path) as r:
        full = r.read_tensor("e").reshape(30, 16)
        rows = np.array([29, 0, 7, 7, 15])
        np.testing.assert_array_equal(r.read_rows("e", rows), full[rows])
        assert r.read_rows("e", np.array([], dtype=np.int64)).shape == (0, 16)
        with pytest.raises(Exception):
            r.read_rows("e", np.array([30]))


def test_read_rows_memory_is_bounded_by_rows_read(tmp_path):
    x = np.ones((4096, 1024), np.float32)  # 8 MiB as BF16, 16 MiB as float32
    path = write_safetensors(tmp_path / "big.safetensors", {"w": x}, dtype="BF16")
    with open_safetensors(path) as r:
        tracemalloc.start()
        got = r.read_rows("w", np.arange(0, 4096, 512))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert got.shape == (8, 1024)
    assert peak < 512 * 1024  # 8 rows, not the tensor


def test_iter_tensors_yields_each_once_in_file_order(tmp_path):
    folder = write_tiny_llama(tmp_path / "m", n_layers=2)
    with open_safetensors(folder) as r:
        seen = [(info.name, x.shape) for info, x in r.iter_tensors()]
    assert [n for n, _ in seen] == [t.name for t in r.tensors]
    assert all(shape == t.shape for (_, shape), t in zip(seen, r.tensors))


def test_nan_and_inf_are_reported_with_file_and_tensor(tmp_path):
    x = np.zeros((4, 8), np.float32)
    x[2, 3] = np.nan
    x[3, 1] = np.inf
    path = write_safetensors(tmp_path / "bad.safetensors", {"w": x}, dtype="BF16")
    with open_safetensors(path) as r:
        with pytest.raises(InputFileError) as err:
            r.read_tensor("w")
        _assert_one_line(err, path)
        assert "'w'" in str(err.value) and "2 NaN/Inf" in str(err.value)
        np.testing.assert_array_equal(r.read_rows("w", np.array([0, 1])), 0)  # clean rows are fine
        with pytest.raises(InputFileError):
            r.read_rows("w", np.array([2]))
    with open_safetensors(path, check_finite=False) as r:
        assert np.isnan(r.read_tensor("w")[2, 3])


def test_unsupported_dtype_is_listed_but_not_readable(tmp_path):
    header = {"q": _entry("I8", [2, 4], 0, 8), "f8": _entry("F8_E4M3", [8], 8, 16),
              "s": _entry("F32", [2], 16, 24)}
    path = _raw_file(tmp_path / "i8.safetensors", header, bytes(16) + struct.pack("<2f", 1.5, -2.0))
    with open_safetensors(path) as r:
        assert {t.source_name: t.dtype for t in r.tensors} == {"q": "I8", "f8": "F8_E4M3", "s": "F32"}
        np.testing.assert_array_equal(r.read_tensor("s"), [1.5, -2.0])
        for name in ("q", "f8"):
            with pytest.raises(UnsupportedError) as err:
                r.read_tensor(name)
            _assert_one_line(err, path)
            assert "BF16" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Shards and folders


def test_sharded_model_reads_the_same_as_single_file(tmp_path):
    one = write_tiny_llama(tmp_path / "one", n_layers=3, seed=5)
    three = write_tiny_llama(tmp_path / "three", n_layers=3, seed=5, n_shards=3)
    assert len(list(three.glob("model-*.safetensors"))) == 3
    with open_model(one) as a, open_model(three) as b, \
            open_model(three / "model.safetensors.index.json") as c:
        assert [t.name for t in a.tensors] == [t.name for t in b.tensors] == [t.name for t in c.tensors]
        assert len({t.file for t in b.tensors}) == 3
        for t in a.tensors:
            np.testing.assert_array_equal(a.read_tensor(t.name), b.read_tensor(t.name))
        assert a.metadata.n_params == b.metadata.n_params == c.metadata.n_params


def test_missing_shard_names_the_index_and_the_shard(tmp_path):
    folder = write_tiny_llama(tmp_path / "m", n_shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputFileError) as err:
        open_model(folder)
    _assert_one_line(err, folder / "model.safetensors.index.json")
    assert "model-00002-of-00002.safetensors" in str(err.value)


def test_tensor_in_two_shards_is_rejected(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "a.safetensors", {"x": np.ones(2, np.float32)})
    write_safetensors(folder / "b.safetensors", {"x": np.ones(2, np.float32), "y": np.ones(2)})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(InputFileError) as err:
        open_model(folder)
    _assert_one_line(err, folder / "b.safetensors")
    assert "'x'" in str(err.value)


@pytest.mark.parametrize("index, problem", [
    ({"weight_map": {"x": "a.safetensors", "z": "a.safetensors"}}, "'z'"),  # not in its shard
    ({"weight_map": {"x": "../a.safetensors"}}, "outside the model folder"),
    ({"weight_map": {"x": 3}}, "shard file name"),
    ({"metadata": {}}, "weight_map"),
])
def test_bad_index_files(tmp_path, index, problem):
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "a.safetensors", {"x": np.ones(2, np.float32)})
    idx = folder / "model.safetensors.index.json"
    idx.write_text(json.dumps(index))
    with pytest.raises(InputFileError) as err:
        open_model(idx)
    _assert_one_line(err, idx)
    assert problem in str(err.value)


def test_folder_without_config_still_maps_names(tmp_path):
    folder = write_tiny_llama(tmp_path / "m")
    (folder / "config.json").unlink()
    with open_model(folder) as r:
        assert r.metadata.architecture is None
        assert "blk.1.attn_v.weight" in r and not r.unmapped
        assert r.metadata.n_layers == 2 and r.metadata.hidden_size == 64 and r.metadata.vocab_size == 256
        assert r.metadata.ffn_size == 128 and r.metadata.tied_embeddings is False


def test_folder_with_other_safetensors_names(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    write_safetensors(folder / "part1.safetensors", {"model.norm.weight": np.ones(4, np.float32)})
    write_safetensors(folder / "part2.safetensors", {"model.embed_tokens.weight": np.ones((3, 4))})
    with open_model(folder) as r:
        assert {t.name for t in r.tensors} == {"output_norm.weight", "token_embd.weight"}
        assert r.metadata.n_params == 16


# ---------------------------------------------------------------------------------------------------
# Hostile files: each must give one line naming the file, before allocating anything big.

_OK = {"w": _entry("F32", [2, 2], 0, 16)}


@pytest.mark.parametrize("build, problem", [
    (lambda p: p.write_bytes(b"\x05\x00"), "too short"),
    (lambda p: _raw_file(p, _OK, bytes(16), header_len=10_000), "larger than the file"),
    (lambda p: _raw_file(p, _OK, bytes(16), header_len=1 << 40), "limit"),
    (lambda p: _raw_file(p, b'{"w": {"dtype": "F32", ', bytes(16)), "not valid JSON"),
    (lambda p: _raw_file(p, b"[1, 2]"), "not an object"),
    (lambda p: _raw_file(p, b"\xff\xfe{}"), "UTF-8"),
    (lambda p: _raw_file(p, b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [2, 2], 0, 16)}, bytes(8)), "past the end"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [2, 2], 0, 1 << 50)}, bytes(16)), "past the end"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [1], 8, 4)}, bytes(16)), "begin must be"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [2, 2], 0, 12)}, bytes(16)), "needs 16 bytes"),
    (lambda p: _raw_file(p, {"a": _entry("F32", [2, 2], 0, 16), "b": _entry("F32", [2], 8, 16)},
                         bytes(16)), "overlap"),
    (lambda p: _raw_file(p, b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                            b' "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
                         bytes(8)), "twice"),
    (lambda p: _raw_file(p, {"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), "data_offsets"),
    (lambda p: _raw_file(p, {"w": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "dtype"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [-1], 0, 4)}, bytes(4)), "non-negative"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [1.0], 0, 4)}, bytes(4)), "non-negative"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [1] * 9, 0, 4)}, bytes(4)), "non-negative"),
    (lambda p: _raw_file(p, {"w": _entry("F32", [1], 0, True)}, bytes(4)), "data_offsets"),
    (lambda p: _raw_file(p, {"w": [1, 2]}, bytes(4)), "not an object"),
    (lambda p: _raw_file(p, {"__metadata__": [1]}), "__metadata__"),
])
def test_hostile_files_give_one_line_errors(tmp_path, build, problem):
    path = tmp_path / "hostile.safetensors"
    build(path)
    tracemalloc.start()
    try:
        for opener in (read_header, open_safetensors, open_model):
            with pytest.raises(InputFileError) as err:
                opener(path)
            _assert_one_line(err, path)
            assert problem in str(err.value), str(err.value)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024


def test_truncated_real_file(tmp_path):
    folder = write_tiny_llama(tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputFileError) as err:
        open_model(folder)
    _assert_one_line(err, path)
    assert "truncated" in str(err.value)
