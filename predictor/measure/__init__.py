"""Measure quantization damage with the real llama.cpp engine (optional extra `quantpredict[measure]`).

    from predictor.measure import MeasureConfig, measure
    measure(MeasureConfig(base="model.gguf", out_dir="training_data/measured", presets=["Q4_K_M"]))

Modules: `writer` (quantized GGUFs from our quantizers), `engine` (llama-cpp-python, imported lazily),
`distortion` (KLD / top-1 / PPL), `tasks` + `items` (the evaluation suite), `evaluate` (one pass),
`sweep` (the resumable orchestrator), `imatrix` (our own importance matrices).
"""

from predictor.measure.sweep import MeasureConfig, measure

__all__ = ["MeasureConfig", "measure"]
