"""The family's byte-level vocabulary, written so llama.cpp's SPM tokenizer reproduces it exactly.

Ids: 0 <unk>, 1 <s> (BOS), 2 </s> (EOS), 3..258 the byte tokens <0x00>..<0xFF>, 259 "▁".
llama.cpp's SPM tokenizer always rewrites a space as "▁" (U+2581) before matching, so a space must be
its own token (259) — as byte fallback it would cost the three bytes of "▁". Every other character
has no vocabulary entry and falls back to its UTF-8 bytes. `tokenizer.ggml.add_space_prefix` is
false, so no leading space is invented. Byte 0x20's token (35) therefore never occurs.
"""

from __future__ import annotations

import numpy as np

__all__ = ["N_VOCAB", "UNK_ID", "BOS_ID", "EOS_ID", "SPACE_ID", "encode", "decode", "gguf_vocab"]

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_BYTE0 = 3
SPACE_ID = _BYTE0 + 256
N_VOCAB = SPACE_ID + 1

# byte value -> token id
_BYTE_TO_ID = np.arange(_BYTE0, _BYTE0 + 256, dtype=np.int32)
_BYTE_TO_ID[0x20] = SPACE_ID


def encode(text: str | bytes) -> np.ndarray:
    """Token ids (int32) of `text`, without BOS."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return _BYTE_TO_ID[np.frombuffer(data, dtype=np.uint8)]


def decode(ids) -> str:
    """Text of token ids; control tokens are dropped."""
    a = np.asarray(ids, dtype=np.int64)
    out = np.where(a == SPACE_ID, 0x20, a - _BYTE0)
    keep = (a >= _BYTE0) & (a <= SPACE_ID)
    return out[keep].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def gguf_vocab() -> tuple[list[str], list[float], list[int]]:
    """(tokens, scores, token types) for the GGUF. Types: 1 normal, 2 unknown, 3 control, 6 byte."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
    types = [2, 3, 3] + [6] * 256 + [1]
    scores = [0.0] * len(tokens)
    return tokens, scores, types
