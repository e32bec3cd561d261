"""GLIDE's text tokenizer: GPT-2's byte-level BPE (glide_text2im/tokenizer/bpe.py).

``GPT2Tokenizer(folder).encode(text)`` equals ``model.tokenizer.encode(text)`` of GLIDE and
``padded_tokens_and_mask(ids, 128)`` equals its ``padded_tokens_and_mask``: GLIDE's text transformer
sees exactly these ids. The vocabulary files (``encoder.json``, ``vocab.bpe``, either may be gzipped)
are those shipped with glide-text2im.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import regex
import torch

from difflab.text._bpe import (
    MergeTable,
    bytes_as_chars,
    chars_as_text,
    check_text_ctx,
    find_file,
    read_text,
    warn_truncated,
)

# GPT-2's pre-tokenisation: contractions, then letter runs, digit runs and other-symbol runs (each
# with at most one leading space), then whitespace (a run before a word keeps its last space for it).
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

GLIDE_TEXT_CTX = 128


class GPT2Tokenizer:
    """GPT-2 BPE as GLIDE uses it: lower-cased, no SOT/EOT, padded with the last id (50256).

    Args:
        path: a folder holding ``encoder.json`` and ``vocab.bpe`` (or their ``.gz``), as they come with
            the glide-text2im release.
    Attributes:
        n_vocab: size of the vocabulary (50257), GLIDE's ``tokenizer.n_vocab``.
        pad_token: ``n_vocab - 1`` (50256, GPT-2's ``<|endoftext|>``), GLIDE's ``end_token``.
    """

    def __init__(self, path: str | Path):
        if not Path(path).is_dir():
            raise FileNotFoundError(f"GPT-2 tokenizer: {path} is not a folder with encoder.json and vocab.bpe")
        encoder_file = find_file(path, ["encoder.json"])
        merges_file = find_file(path, ["vocab.bpe"])
        try:
            self.encoder: dict[str, int] = json.loads(read_text(encoder_file))
        except (OSError, ValueError) as e:
            raise ValueError(f"GPT-2 tokenizer: cannot read {encoder_file}: {e}") from e
        lines = read_text(merges_file).split("\n")
        # Line 0 is a '#version' header and the file ends with a newline: GLIDE reads lines [1:-1].
        self.merges = MergeTable(tuple(line.split()) for line in lines[1:-1])
        self.decoder = {i: s for s, i in self.encoder.items()}
        self.n_vocab = len(self.encoder)
        self.pad_token = self.n_vocab - 1

    def encode(self, text: str) -> list[int]:
        """GLIDE's ``Encoder.encode``: ``text.lower()``, GPT-2 regex, byte-level BPE. No special tokens."""
        ids: list[int] = []
        for piece in GPT2_PATTERN.findall(text.lower()):
            ids.extend(self.encoder[s] for s in self.merges.apply(tuple(bytes_as_chars(piece))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (lower-cased, as encoded)."""
        return chars_as_text("".join(self.decoder[int(i)] for i in ids))

    def padded_tokens_and_mask(
        self, text_or_ids: str | Sequence[int], text_ctx: int = GLIDE_TEXT_CTX
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """GLIDE's ``padded_tokens_and_mask(tokens, text_ctx)``: ``ids[:text_ctx]`` padded with ``pad_token``.

        Returns ``(tokens, mask)``: int64 (text_ctx,) and bool (text_ctx,), the mask False on the padding
        (an empty caption is all padding and an all-False mask). A longer caption is cut to its first
        ``text_ctx`` ids, with a warning.
        """
        check_text_ctx(text_ctx, 1)
        text = text_or_ids if isinstance(text_or_ids, str) else None
        ids = self.encode(text) if text is not None else [int(i) for i in text_or_ids]
        if len(ids) > text_ctx:
            warn_truncated(text if text is not None else self.decode(ids[:16]), len(ids), text_ctx, text_ctx)
            ids = ids[:text_ctx]
        n = len(ids)
        tokens = torch.full((text_ctx,), self.pad_token, dtype=torch.long)
        tokens[:n] = torch.tensor(ids, dtype=torch.long)
        mask = torch.zeros(text_ctx, dtype=torch.bool)
        mask[:n] = True
        return tokens, mask
