"""Small Llama-architecture models trained from scratch, exported to GGUF: ground truth for how
size and training length change quantization damage (issue 3).

Needs torch (`pip install 'quantpredict[family]'`); importing this package does not — the
training and export modules import it when used.
"""

from predictor.family.tokenizer import BOS_ID, EOS_ID, N_VOCAB, decode, encode

__all__ = ["BOS_ID", "EOS_ID", "N_VOCAB", "decode", "encode"]
