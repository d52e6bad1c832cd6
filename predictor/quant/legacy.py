"""(being written) — registers QUANTIZERS / DEQUANTIZERS, see predictor/quant/__init__.py."""

QUANTIZERS: dict = {}
DEQUANTIZERS: dict = {}
