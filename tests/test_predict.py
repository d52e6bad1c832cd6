"""`predict` and the `predict` command: the JSON contract, tiers, memory fit, recommendation, errors.
Uses the shipped models/default."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from cli.predict_cmd import command as predict_command
from predictor.errors import InputFileError, UsageError
from predictor.fixtures.gguf import write_tiny_gguf
from predictor.fixtures.hf import write_tiny_llama
from predictor.model.predict import (
    TASKS,
    PresetPrediction,
    kv_cache_bytes,
    parse_memory,
    predict,
    recommend,
    verdict,
)

# Llama-3-8B-Instruct's config.json (the sizes are what matter).
LLAMA3_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 128256,
    "_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct",
}
PRED_KEYS = {"preset": str, "drop_pct": float, "drop_low": float, "drop_high": float, "kld": float,
             "tensor_bytes": int, "bits_per_weight": float, "verdict": str, "drop_true_low": float,
             "drop_true_high": float, "drop_bench_low": float, "drop_bench_high": float, "memory_bytes": int}


@pytest.fixture(scope="module")
def llama3_config(tmp_path_factory):
    p = tmp_path_factory.mktemp("llama3") / "config.json"
    p.write_text(json.dumps(LLAMA3_CONFIG))
    return p


def _check_contract(obj: dict, task: str, tier: str) -> None:
    assert set(obj) == {"schema_version", "model", "task", "tier", "benchmark", "predictions", "recommendation", "notes"}
    assert obj["schema_version"] == 2 and isinstance(obj["notes"], list)
    assert obj["task"] == task and obj["tier"] == tier
    assert obj["benchmark"]["n_items"] >= 1 and obj["benchmark"]["noise_pp"] > 0
    assert isinstance(obj["model"], dict)
    assert set(obj["recommendation"]) == {"preset", "reason"}
    assert obj["recommendation"]["preset"] is None or isinstance(obj["recommendation"]["preset"], str)
    assert obj["predictions"]
    for p in obj["predictions"]:
        assert set(p) == set(PRED_KEYS) | {"fits"}
        for k, t in PRED_KEYS.items():
            assert isinstance(p[k], t), (k, p[k])
        assert p["fits"] is None or isinstance(p["fits"], bool)
        assert p["drop_low"] <= p["drop_pct"] <= p["drop_high"]
        assert p["drop_true_low"] <= p["drop_pct"] <= p["drop_true_high"]
        assert (p["drop_low"], p["drop_high"]) == (p["drop_bench_low"], p["drop_bench_high"])
        # the true drop is possible: 0..100; a measurement may show an "improvement" only within noise
        assert 0.0 <= p["drop_true_low"] and p["drop_true_high"] <= 100.0 and p["drop_high"] <= 100.0
        assert p["drop_low"] >= -obj["benchmark"]["noise_halfwidth_pp"] - 1e-9


def test_config_only_tier_json_contract(llama3_config):
    res = predict(llama3_config, task="math", memory="8GB")
    obj = json.loads(json.dumps(res.as_dict()))
    _check_contract(obj, "math", "config")
    preds = {p["preset"]: p for p in obj["predictions"]}
    assert {"Q8_0", "Q4_K_M", "Q2_K"} <= set(preds)
    assert "IQ2_XXS" not in preds  # needs an imatrix
    # known family and tokens from the registry
    assert obj["model"]["family"] == "llama3" and obj["model"]["train_tokens_t"]
    # more bits: less distortion and no larger point drop
    assert preds["Q8_0"]["kld"] < preds["Q4_K_M"]["kld"] < preds["Q2_K"]["kld"]
    assert preds["Q8_0"]["drop_pct"] <= preds["Q4_K_M"]["drop_pct"] <= preds["Q2_K"]["drop_pct"]
    # Q8_0 of an 8B model (7.95 GiB of weights) cannot fit 8 GiB with a KV cache; Q4_K_M can
    assert preds["Q8_0"]["fits"] is False and preds["Q4_K_M"]["fits"] is True
    assert preds["Q4_K_M"]["tensor_bytes"] == pytest.approx(4.58 * 2**30, rel=0.01)


def test_no_ties_among_presets_of_five_bits_and_up(llama3_config):
    res = predict(llama3_config, task="knowledge")
    by = {p.preset: p for p in res.predictions}
    order = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q3_K_M", "Q2_K"]
    drops = [by[q].drop_pct for q in order]
    klds = [by[q].kld for q in order]
    assert klds == sorted(klds) and len(set(klds)) == len(klds)
    assert drops == sorted(drops) and drops[0] < drops[1]  # Q8_0 below Q6_K: no saturation floor


def test_task_accepts_a_benchmark_name(llama3_config):
    gsm = predict(llama3_config, task="gsm8k")
    assert gsm.task == "GSM8K" and gsm.benchmark["name"] == "GSM8K" and gsm.benchmark["n_items"] == 1319
    small = predict(llama3_config, task="gsm8k", bench_n=100)
    q4 = {p.preset: p for p in small.predictions}["Q4_K_M"]
    q4_full = {p.preset: p for p in gsm.predictions}["Q4_K_M"]
    assert q4.drop_pct == q4_full.drop_pct and q4.drop_true_high == q4_full.drop_true_high
    assert q4.drop_high - q4.drop_low > q4_full.drop_high - q4_full.drop_low  # fewer items: wider bench interval
    with pytest.raises(UsageError, match="bench_n"):
        predict(llama3_config, task="gsm8k", bench_n=0)
    with pytest.raises(UsageError, match="tolerance"):
        predict(llama3_config, tolerance="3")


def test_family_from_the_architecture_name(tmp_path):
    # a Gemma-3 config whose dimensions no registry model has: family gemma3 from model_type
    cfg = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
           "intermediate_size": 6912, "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
           "head_dim": 256, "vocab_size": 262144, "tie_word_embeddings": True}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    res = predict(p, task="knowledge")
    assert res.model["family"] == "gemma3" and res.model["family_in_training_data"] is True
    assert any("from the architecture name" in n for n in res.notes)


def test_task_all_returns_one_object_per_task(llama3_config):
    res = predict(llama3_config, task="all")
    assert [r.task for r in res] == list(TASKS)
    for r in res:
        _check_contract(json.loads(json.dumps(r.as_dict())), r.task, "config")
    creative = res[TASKS.index("creative")]
    assert any("predicted as 'chat'" in n for n in creative.model["notes"])


def test_imatrix_assumed_adds_imatrix_presets(llama3_config):
    res = predict(llama3_config, task="knowledge", imatrix=True)
    names = [p.preset for p in res.predictions]
    assert "IQ2_XXS" in names and "IQ3_M" in names
    with pytest.raises(UsageError, match="needs the model's weights"):
        predict(llama3_config, imatrix=llama3_config)


def test_unknown_task_lists_valid_ones(llama3_config):
    with pytest.raises(UsageError) as e:
        predict(llama3_config, task="poetry")
    msg = str(e.value)
    for t in (*TASKS, "all"):
        assert t in msg


def test_bad_inputs_are_one_line_errors(tmp_path, llama3_config):
    with pytest.raises(InputFileError):
        predict(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="memory"):
        predict(llama3_config, memory="lots")
    with pytest.raises(UsageError, match="KV cache type"):
        predict(llama3_config, kv_type="q2")
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(InputFileError):
        predict(bad)


def test_memory_parsing_and_kv_cache():
    assert parse_memory("8GB") == 8 * 2**30 == parse_memory("8 GiB") == parse_memory("8")
    assert parse_memory("512MB") == 512 * 2**20
    assert parse_memory(None) is None
    from predictor.io.hf import metadata_from_config

    meta = metadata_from_config(LLAMA3_CONFIG)
    # 2 (K,V) x 32 layers x 8 KV heads x 128 dims x 8192 tokens x 2 bytes = 1 GiB
    assert kv_cache_bytes(meta, 8192, "f16") == 2**30
    assert kv_cache_bytes(meta, 8192, "q8_0") == int(2**30 * 34 / 64)


def test_memory_fit_drives_recommendation(llama3_config):
    tiny = predict(llama3_config, task="chat", memory="1GB")
    assert all(p.fits is False for p in tiny.predictions)
    assert tiny.recommendation.preset is None and "memory" in tiny.recommendation.reason
    roomy = predict(llama3_config, task="chat", memory="80GB", tolerance=100.0)
    assert all(p.fits for p in roomy.predictions)
    smallest = min(roomy.predictions, key=lambda p: p.tensor_bytes)
    assert roomy.recommendation.preset == smallest.preset
    strict = predict(llama3_config, task="chat", tolerance=-50.0)
    assert strict.recommendation.preset is None


def _pp(name, size, drop, fits=None, kld=0.01):
    return PresetPrediction(name, drop, drop - 1, drop + 1, kld, size, 4.0, fits, verdict(drop, drop - 1, drop + 1, kld))


def test_recommend_rule():
    preds = [_pp("big", 100, 0.1), _pp("mid", 50, 1.0), _pp("small", 30, 9.0), _pp("broken", 10, 1.0, kld=3.0)]
    r = recommend(preds, 3.0)
    assert r.preset == "mid" and "3%" in r.reason  # 'broken' is a collapse risk, 'small' over tolerance
    preds = [_pp("big", 100, 0.1, fits=False), _pp("mid", 50, 1.0, fits=True)]
    assert recommend(preds, 3.0).preset == "mid"
    assert verdict(0.5, -1.0, 1.5, 0.001) == "indistinguishable from baseline"
    assert verdict(30.0, 10.0, 50.0, 2.0) == "collapse risk"


def test_weights_tier_on_safetensors_and_gguf(tmp_path):
    folder = write_tiny_llama(tmp_path / "tiny", n_layers=2, hidden=256, ffn=512, n_heads=4, n_kv_heads=2,
                              vocab=256, dtype="F32")
    res = predict(folder, task="code", presets=["Q8_0", "Q4_K_M", "Q2_K"], sample_weights=1024)
    _check_contract(json.loads(json.dumps(res.as_dict())), "code", "weights")
    assert res.model["family_in_training_data"] is False  # a random model: priors, wider intervals
    # 1M parameters on a 256-token vocabulary: inside the family data's range, so no clipping note is owed,
    # but an 8192-token toy model would be outside the training-token range and must say so
    assert all(p.drop_true_high <= 100.0 for p in res.predictions)
    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf, hidden=256, ffn=512, vocab=96, tensor_type="Q8_0")
    res = predict(gguf, task="math", presets=["Q6_K", "Q4_K_M"], sample_weights=1024)
    assert res.tier == "weights"
    assert any("already quantized" in n for n in res.model["notes"])


def test_cli_formats_and_default_subcommand(llama3_config, tmp_path):
    runner = CliRunner()
    out = runner.invoke(predict_command, [str(llama3_config), "--task", "math", "--format", "json",
                                          "--memory", "8GB", "--context", "8192", "--kv-type", "q8_0"])
    assert out.exit_code == 0, out.output
    obj = json.loads(out.output)
    _check_contract(obj, "math", "config")
    assert obj["model"]["context"] == 8192 and obj["model"]["kv_type"] == "q8_0"
    out = runner.invoke(predict_command, [str(llama3_config), "--task", "all", "--format", "json"])
    assert isinstance(json.loads(out.output), list)
    out = runner.invoke(predict_command, [str(llama3_config), "--format", "csv"])
    assert out.output.splitlines()[0].startswith("task,tier,preset,drop_pct")
    out = runner.invoke(predict_command, [str(llama3_config)])
    assert "recommendation:" in out.output
    # `quantpredict MODEL ...` is the predict command, with or without --debug before it
    from cli.main import cli

    for args in ([str(llama3_config), "--task", "math", "--format", "json"],
                 ["--debug", str(llama3_config), "--format", "json"]):
        out = runner.invoke(cli, args)
        assert out.exit_code == 0, out.output
        _check_contract(json.loads(out.stdout), "math", "config")
    assert "Commands:" in runner.invoke(cli, ["--help"]).output


def test_cli_plot(llama3_config, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "p.png"
    out = CliRunner().invoke(predict_command, [str(llama3_config), "--task", "all", "--plot", str(png)])
    assert out.exit_code == 0, out.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
