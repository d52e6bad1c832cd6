"""Small Llama-architecture models trained from scratch, exported to GGUF: ground truth for how
size and training length change quantization damage (issue 3).

Needs torch (`pip install 'quantpredict[family]'`); importing this package does not — the
training and export modules import it when used.
"""

from predictor.errors import UnsupportedError
from predictor.family.tokenizer import BOS_ID, EOS_ID, N_VOCAB, decode, encode

__all__ = ["BOS_ID", "EOS_ID", "N_VOCAB", "decode", "encode", "require_torch"]


def require_torch() -> None:
    """Raise a one-line UnsupportedError when torch is missing."""
    try:
        import torch  # noqa: F401, PLC0415
    except ImportError:
        raise UnsupportedError("training the family needs torch — pip install 'quantpredict[family]' "
                               "(CPU build: pip install torch==2.13.0)") from None
