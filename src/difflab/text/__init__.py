"""Tokenizers for text conditioning.

- ``"gpt2"``: :class:`GPT2Tokenizer`, GLIDE's GPT-2 BPE (glide_text2im/tokenizer/bpe.py); text_ctx 128.
- ``"clip"``: :class:`CLIPTokenizer`, CLIP's ``SimpleTokenizer`` with GLIDE's ``padded_tokens_and_len`` and
  Karlo's ``padded_tokens_and_mask``; text_ctx 77.
- ``"miniature"``: :class:`MiniatureTokenizer`, word-level, for miniature captions trained from scratch.

All three share one interface (:class:`Tokenizer`): ``encode(text) -> list[int]``,
``padded_tokens_and_mask(text_or_ids, text_ctx) -> (tokens, mask)`` with 1-D tensors of length text_ctx,
``n_vocab`` and ``pad_token``. A caption longer than the context is cut as the official code cuts it, and a
one-line ``UserWarning`` says how many tokens were lost. See docs/text.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, get_args, runtime_checkable

import torch

from difflab.text.clip_bpe import CLIPTokenizer, clean_caption
from difflab.text.gpt2_bpe import GPT2Tokenizer
from difflab.text.miniature import MiniatureTokenizer

TokenizerKind = Literal["gpt2", "clip", "miniature"]
TOKENIZER_KINDS: tuple[str, ...] = get_args(TokenizerKind)


@runtime_checkable
class Tokenizer(Protocol):
    """What every difflab tokenizer offers."""

    n_vocab: int
    pad_token: int

    def encode(self, text: str) -> list[int]: ...

    def padded_tokens_and_mask(
        self, text_or_ids: str | Sequence[int], text_ctx: int
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def load_tokenizer(kind: TokenizerKind, path: str | Path) -> Tokenizer:
    """The tokenizer ``kind`` with its vocabulary read from ``path``.

    Args:
        kind: "gpt2" (``path``: a folder with encoder.json and vocab.bpe, optionally .gz), "clip" (``path``:
            bpe_simple_vocab_16e6.txt[.gz] or its folder) or "miniature" (``path``: the JSON file written by
            :meth:`MiniatureTokenizer.save`, or the folder holding its tokenizer.json).
    Raises:
        ValueError: an unknown kind (the message lists the valid ones) or a malformed vocabulary file.
        FileNotFoundError: the GPT-2 or CLIP vocabulary files are missing.
    """
    if kind == "gpt2":
        return GPT2Tokenizer(path)
    if kind == "clip":
        return CLIPTokenizer(path)
    if kind == "miniature":
        return MiniatureTokenizer.load(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")


def tokenize_batch(tokenizer: Tokenizer, captions: Sequence[str], text_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens`` [N, text_ctx] int64 and ``mask`` [N, text_ctx] bool for N captions (the empty caption ""
    is GLIDE's unconditional input)."""
    pairs = [tokenizer.padded_tokens_and_mask(c, text_ctx) for c in captions]
    if not pairs:
        return torch.zeros(0, text_ctx, dtype=torch.long), torch.zeros(0, text_ctx, dtype=torch.bool)
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


__all__ = [
    "CLIPTokenizer",
    "GPT2Tokenizer",
    "MiniatureTokenizer",
    "TOKENIZER_KINDS",
    "Tokenizer",
    "TokenizerKind",
    "clean_caption",
    "load_tokenizer",
    "tokenize_batch",
]
