"""Hugging Face side: config.json metadata, HF -> GGUF names, parameter counts, the open_model dispatcher."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from predictor.errors import InputFileError
from predictor.fixtures.hf import FAMILIES, tiny_config, write_safetensors, write_tiny_llama
from predictor.io import ConfigOnlyReader, detect_format, open_model, read_model_metadata
from predictor.io.hf import (
    hf_tensor_shapes,
    map_tensor_names,
    metadata_from_config,
    read_hf_config,
)

REFERENCE = Path(__file__).parent / "data" / "reference"
EXPECTED_ARCH = {"llama": "llama", "mistral": "llama", "smollm": "llama", "qwen2": "qwen2",
                 "qwen3": "qwen3", "gemma2": "gemma2", "gemma3": "gemma3", "phi3": "phi3"}
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
             "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma2": gguf.MODEL_ARCH.GEMMA2,
             "gemma3": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3}


def _assert_one_line(err, path):
    msg = str(err.value)
    assert str(path) in msg, msg
    assert "\n" not in msg


# ---------------------------------------------------------------------------------------------------
# config.json -> metadata


@pytest.mark.parametrize("family", FAMILIES)
def test_config_metadata_per_family(tmp_path, family):
    cfg = tiny_config(family, n_layers=3, hidden=96, ffn=160, n_heads=6, n_kv_heads=2, vocab=300)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    meta = read_hf_config(tmp_path)
    assert meta.architecture == EXPECTED_ARCH[family]
    assert (meta.n_layers, meta.hidden_size, meta.n_heads, meta.n_kv_heads, meta.ffn_size,
            meta.vocab_size, meta.head_dim, meta.n_gqa) == (3, 96, 6, 2, 160, 300, 16, 3)
    assert meta.tied_embeddings is family.startswith("gemma")
    assert meta.context_length == 4096 and meta.source == "config.json"


def test_gemma3_multimodal_config_nests_text_config_and_uses_defaults(tmp_path):
    # shape of google/gemma-3-4b-it's config.json: text_config omits heads/kv heads/head_dim/vocab
    cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
           "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                           "num_hidden_layers": 34, "sliding_window": 1024},
           "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    meta = read_hf_config(tmp_path / "config.json")
    assert meta.architecture == "gemma3"
    assert (meta.hidden_size, meta.n_layers, meta.ffn_size) == (2560, 34, 10240)  # not the vision ones
    assert (meta.n_heads, meta.n_kv_heads, meta.head_dim, meta.vocab_size) == (8, 4, 256, 262208)
    assert meta.tied_embeddings is True
    assert set(meta.extra["defaults_used"]) >= {"num_attention_heads", "head_dim", "vocab_size"}
    # q: 2560 x 2048, so head_dim is not hidden/heads here; the estimate must use 256
    # Gemma 3 report, 4B: 3,209M non-embedding parameters (+ ~0.67B embedding, tied)
    n_embedding = 262208 * 2560
    assert round((meta.n_params - n_embedding) / 1e6) == 3209


def test_moe_config_reports_experts():
    cfg = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
           "num_local_experts": 8, "num_experts_per_tok": 2}
    meta = metadata_from_config(cfg)
    assert meta.architecture == "llama" and meta.n_experts == 8
    assert meta.extra["n_experts_used"] == 2
    dense = metadata_from_config({**cfg, "num_local_experts": None})
    assert meta.n_params - dense.n_params == 2 * (7 * 3 * 64 * 96 + 64 * 8)  # 7 extra experts + router


@pytest.mark.parametrize("bad, problem", [
    (b"{not json", "not valid JSON"),
    (b"[]", "not an object"),
    (b'{"model_type": "llama", "hidden_size": "big"}', "hidden_size"),
    (b'{"model_type": "llama", "num_hidden_layers": -2}', "num_hidden_layers"),
    (b'{"model_type": "llama", "model_type": "qwen2"}', "twice"),
])
def test_bad_config_files(tmp_path, bad, problem):
    path = tmp_path / "config.json"
    path.write_bytes(bad)
    with pytest.raises(InputFileError) as err:
        read_hf_config(path)
    _assert_one_line(err, path)
    assert problem in str(err.value)


def test_oversized_config_is_refused_without_reading_it(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.write(b"{")
        f.seek(17 * 1024 * 1024)
        f.write(b"}")
    with pytest.raises(InputFileError) as err:
        read_hf_config(path)
    _assert_one_line(err, path)
    assert "limit" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# Parameter counts: config estimate == tensors counted == real GGUF tensor lists


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [False, True])
def test_estimate_from_config_equals_count_from_tensors(tmp_path, family, tied):
    folder = write_tiny_llama(tmp_path / family, family=family, tied=tied, n_layers=2, hidden=32,
                              ffn=48, n_heads=4, n_kv_heads=2, vocab=40, dtype="F16")
    estimated = read_hf_config(folder).n_params
    with open_model(folder) as r:
        assert r.metadata.n_params == sum(math.prod(t.shape) for t in r.tensors) == estimated
        # llama.cpp reuses token_embd when there is no output.weight
        assert r.metadata.tied_embeddings is (tied or family == "gemma2")


def _reference_shapes(name):
    data = json.loads((REFERENCE / name).read_text())
    shapes = {}
    for tensor, ne in zip(data["tensors"], data["shapes_ne"]):
        dims = list(reversed([int(d) for d in ne]))
        while len(dims) > 1 and dims[0] == 1:
            dims.pop(0)
        shapes[tensor] = tuple(dims)
    return shapes


@pytest.mark.parametrize("reference, cfg", [
    # SmolLM2-135M-Instruct's published config.json (sizes only)
    ("recipes_dryrun_smollm2_135m.json",
     dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    ("recipes_dryrun_fake_dense32_gqa4.json",
     dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=32,
          num_attention_heads=8, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)),
    ("recipes_dryrun_fake_dense32_gqa1_tied.json",
     dict(model_type="llama", hidden_size=256, intermediate_size=512, num_hidden_layers=32,
          num_attention_heads=8, num_key_value_heads=8, vocab_size=512, tie_word_embeddings=True)),
])
def test_config_implies_exactly_the_tensors_llama_cpp_wrote(reference, cfg):
    """Names and shapes from config + our mapping == the tensor list of real llama.cpp GGUFs."""
    expected = _reference_shapes(reference)
    meta = metadata_from_config(cfg)
    hf = hf_tensor_shapes(meta)
    mapping = map_tensor_names([n for n, _ in hf], meta.architecture)
    assert not mapping.unmapped and not mapping.ignored
    ours = {mapping.names[n]: shape for n, shape in hf}
    assert ours == expected
    assert meta.n_params == sum(math.prod(s) for s in expected.values())


@pytest.mark.parametrize("family, expected_ne", [
    # ne as llama.cpp's loaders create them (src/models/phi3.cpp, qwen3.cpp, gemma3.cpp) for
    # n_embd 64, n_head 4, n_head_kv 2, head_dim 32 (not n_embd / n_head), n_ff 128
    ("phi3", {"attn_qkv": (64, 4 * 32 + 2 * 2 * 32), "attn_output": (4 * 32, 64),
              "ffn_up": (64, 2 * 128), "ffn_down": (128, 64)}),
    ("qwen3", {"attn_q": (64, 4 * 32), "attn_k": (64, 2 * 32), "attn_output": (4 * 32, 64),
               "attn_q_norm": (32,), "attn_k_norm": (32,), "ffn_gate": (64, 128)}),
    ("gemma3", {"attn_q": (64, 4 * 32), "attn_v": (64, 2 * 32), "attn_output": (4 * 32, 64),
                "post_attention_norm": (64,), "post_ffw_norm": (64,), "ffn_norm": (64,)}),
])
def test_shapes_match_llama_cpp_loaders(tmp_path, family, expected_ne):
    folder = write_tiny_llama(tmp_path / family, family=family, n_layers=1, hidden=64, ffn=128,
                              n_heads=4, n_kv_heads=2, head_dim=32, vocab=50)
    with open_model(folder) as r:
        for role, ne in expected_ne.items():
            assert r.tensor(f"blk.0.{role}.weight").ne == list(ne), role


# ---------------------------------------------------------------------------------------------------
# Name mapping


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_mapping_agrees_with_gguf_tensor_name_map(family):
    """Every HF name a family's checkpoint has maps as gguf-py's TensorNameMap maps it."""
    cfg = tiny_config(family, n_layers=3, tied=False)
    meta = metadata_from_config(cfg)
    names = [n for n, _ in hf_tensor_shapes(meta)]
    if family == "qwen2":
        assert "model.layers.0.self_attn.q_proj.bias" in names
    mapping = map_tensor_names(names, meta.architecture)
    oracle = gguf.get_tensor_name_map(GGUF_ARCH[meta.architecture], 3)
    for name in names:
        expected = oracle.get_name(name, try_suffixes=(".weight", ".bias"))
        if expected is None:  # gemma2 has no output tensor: llama.cpp skips lm_head
            assert family == "gemma2" and name == "lm_head.weight"
            assert name in mapping.ignored
        else:
            assert mapping.names[name] == expected, name
    assert not mapping.unmapped


@pytest.mark.parametrize("arch, hf, expected", [
    ("llama", "model.layers.3.self_attn.v_proj.weight", "blk.3.attn_v.weight"),
    ("llama", "model.layers.0.self_attn.o_proj.weight", "blk.0.attn_output.weight"),
    ("llama", "model.layers.7.post_attention_layernorm.weight", "blk.7.ffn_norm.weight"),
    ("llama", "lm_head.weight", "output.weight"),
    ("qwen2", "model.layers.1.self_attn.k_proj.bias", "blk.1.attn_k.bias"),
    ("qwen3", "model.layers.2.self_attn.q_norm.weight", "blk.2.attn_q_norm.weight"),
    ("gemma2", "model.layers.4.post_attention_layernorm.weight", "blk.4.post_attention_norm.weight"),
    ("gemma3", "model.layers.4.pre_feedforward_layernorm.weight", "blk.4.ffn_norm.weight"),
    ("gemma3", "model.layers.4.post_feedforward_layernorm.weight", "blk.4.post_ffw_norm.weight"),
    ("gemma3", "language_model.model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
    ("gemma3", "model.language_model.layers.0.mlp.up_proj.weight", "blk.0.ffn_up.weight"),
    ("phi3", "model.layers.5.self_attn.qkv_proj.weight", "blk.5.attn_qkv.weight"),
    ("phi3", "model.layers.5.mlp.gate_up_proj.weight", "blk.5.ffn_up.weight"),
    (None, "layers.2.mlp.down_proj.weight", "blk.2.ffn_down.weight"),  # bare LlamaModel names
])
def test_mapping_examples(arch, hf, expected):
    assert map_tensor_names([hf], arch).names[hf] == expected


def test_unknown_names_are_kept_and_reported(tmp_path):
    folder = write_tiny_llama(tmp_path / "m", n_layers=1)
    extra = {"model.layers.0.mlp.weird_proj.weight": np.ones((2, 4), np.float32),
             "score.weight": np.ones((3, 4), np.float32),
             "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32),
             "vision_tower.encoder.layers.0.fc1.weight": np.ones((2, 2), np.float32)}
    write_safetensors(folder / "extra.safetensors", extra)
    (folder / "model.safetensors").rename(folder / "main.safetensors")  # folder of *.safetensors
    with open_model(folder) as r:
        assert sorted(r.unmapped) == ["model.layers.0.mlp.weird_proj.weight", "score.weight"]
        names = {t.name for t in r.tensors}
        assert "score.weight" in names and "model.layers.0.mlp.weird_proj.weight" in names
        np.testing.assert_array_equal(r.read_tensor("score.weight"), 1.0)
        assert set(r.ignored) == {"model.layers.0.self_attn.rotary_emb.inv_freq",
                                  "vision_tower.encoder.layers.0.fc1.weight"}
        assert not names & set(r.ignored)
        assert r.metadata.n_params == sum(t.n_elements for t in r.tensors)


def test_two_sources_for_one_gguf_name_is_an_error(tmp_path):
    path = write_safetensors(tmp_path / "x.safetensors",
                             {"model.norm.weight": np.ones(4), "language_model.model.norm.weight": np.ones(4)})
    with pytest.raises(InputFileError) as err:
        open_model(path)
    _assert_one_line(err, path)
    assert "output_norm.weight" in str(err.value)


# ---------------------------------------------------------------------------------------------------
# open_model dispatch (magic bytes, not extensions) and config-only input


def test_config_only_input(tmp_path):
    cfg = tiny_config("qwen3", n_layers=4)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for target in (tmp_path, tmp_path / "config.json"):
        with open_model(target) as r:
            assert isinstance(r, ConfigOnlyReader)
            assert r.tensors == [] and r.unmapped == [] and list(r.iter_tensors()) == []
            assert r.metadata.architecture == "qwen3" and r.metadata.n_layers == 4
            assert r.metadata.n_params == metadata_from_config(cfg).n_params > 0
            with pytest.raises(InputFileError) as err:
                r.read_tensor("blk.0.attn_q.weight")
            _assert_one_line(err, target)
    assert read_model_metadata(tmp_path).architecture == "qwen3"


def test_dispatch_uses_magic_bytes_not_extensions(tmp_path):
    st = write_safetensors(tmp_path / "x.safetensors", {"model.norm.weight": np.ones(4, np.float32)})
    disguised = tmp_path / "weights.gguf"
    disguised.write_bytes(st.read_bytes())
    assert detect_format(disguised) == "safetensors"
    with open_model(disguised) as r:
        assert [t.name for t in r.tensors] == ["output_norm.weight"]

    writer = gguf.GGUFWriter(str(tmp_path / "real.gguf"), "llama")
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    renamed = tmp_path / "model.safetensors.bin"
    renamed.write_bytes((tmp_path / "real.gguf").read_bytes())
    assert detect_format(renamed) == "gguf"
    with open_model(renamed) as r:  # handed to predictor.io.gguf
        assert [t.name for t in r.tensors] == ["output_norm.weight"]
        np.testing.assert_array_equal(r.read_tensor("output_norm.weight"), 1.0)

    folder = write_tiny_llama(tmp_path / "m", n_shards=2)
    assert detect_format(folder) == "safetensors-folder"
    assert detect_format(folder / "model.safetensors.index.json") == "safetensors-index"
    assert detect_format(folder / "config.json") == "hf-config"


@pytest.mark.parametrize("content, problem", [
    (b"", "not a recognised model file"),
    (b"\x00" * 64, "not a recognised model file"),
    (b"GGUG" + b"\x00" * 60, "not a recognised model file"),
    (b'{"hello": "world"}', "neither a safetensors index"),
    (b"PK\x03\x04" + b"\x00" * 60, "PyTorch"),
])
def test_unknown_files_are_refused_with_what_is_accepted(tmp_path, content, problem):
    path = tmp_path / "model.dat"
    path.write_bytes(content)
    with pytest.raises(InputFileError) as err:
        open_model(path)
    _assert_one_line(err, path)
    assert problem in str(err.value)
    assert "config.json" in str(err.value) or "PyTorch" in problem


def test_folder_and_path_problems(tmp_path):
    with pytest.raises(InputFileError) as err:
        open_model(tmp_path / "nope")
    _assert_one_line(err, tmp_path / "nope")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputFileError) as err:
        open_model(empty)
    _assert_one_line(err, empty)

    torch_only = tmp_path / "torch"
    torch_only.mkdir()
    (torch_only / "pytorch_model.bin").write_bytes(b"PK\x03\x04")
    with pytest.raises(InputFileError) as err:
        open_model(torch_only)
    assert "PyTorch" in str(err.value)

    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF" + struct.pack("<I", 3))
    with pytest.raises(InputFileError) as err:
        open_model(two)
    _assert_one_line(err, two)
    assert "pass one of them" in str(err.value)
