"""CLIP's text tokenizer: ``SimpleTokenizer`` (openai/CLIP clip/simple_tokenizer.py, copied unchanged into
glide_text2im/tokenizer/simple_tokenizer.py), with the two ways the official code pads it:

- :meth:`CLIPTokenizer.padded_tokens_and_len` equals GLIDE's ``SimpleTokenizer.padded_tokens_and_len``, the
  path of ``CLIPModel.encode_prompts`` (GLIDE's noised CLIP reads its feature at position ``len - 1``);
- :meth:`CLIPTokenizer.padded_tokens_and_mask` equals Karlo's ``CustomizedTokenizer.padded_tokens_and_mask``,
  what Karlo's prior and decoder receive as ``tok`` / ``mask``.

The vocabulary file is ``bpe_simple_vocab_16e6.txt.gz`` as shipped with openai/CLIP and glide-text2im.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

from difflab.text._bpe import (
    MergeTable,
    byte_to_char,
    bytes_as_chars,
    chars_as_text,
    check_text_ctx,
    find_file,
    read_text,
    warn_truncated,
)

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenisation: the special tokens literally, contractions, letter runs, single digits, and
# runs of other symbols; whitespace only separates.
CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
WHITESPACE = regex.compile(r"\s+")
# The 16e6 file holds more merges than the released CLIP models use: they keep 49152 - 256 - 2 of them.
N_MERGES = 49152 - 256 - 2
CLIP_TEXT_CTX = 77
VOCAB_FILE = "bpe_simple_vocab_16e6.txt"


def clean_caption(text: str) -> str:
    """``whitespace_clean(basic_clean(text)).lower()`` of ``SimpleTokenizer.encode``: ``ftfy.fix_text``,
    ``html.unescape`` twice, strip, whitespace runs -> one space, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return WHITESPACE.sub(" ", text).strip().lower()


class CLIPTokenizer:
    """CLIP BPE (vocabulary 49408) with '</w>' word ends and SOT/EOT 49406/49407.

    Args:
        path: ``bpe_simple_vocab_16e6.txt[.gz]`` itself, or the folder that holds it.
    Attributes:
        n_vocab: 49408. ids 0..255 are the single byte-characters, 256..511 the same with '</w>', then one id
            per merge, then SOT and EOT.
        pad_token: 0 (the official padding; it is also the id of '!').
        sot_token, eot_token: 49406, 49407.
    """

    def __init__(self, path: str | Path):
        merges_file = find_file(path, [VOCAB_FILE])
        lines = read_text(merges_file).split("\n")
        merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
        if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"CLIP tokenizer: {merges_file} does not hold {N_MERGES} merges after its header line")
        self.merges = MergeTable(merges)
        # The official vocabulary lists the byte characters in code-point order (printable bytes, then
        # chr(256)...), not in byte order.
        chars = sorted(byte_to_char().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder: dict[str, int] = {s: i for i, s in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.n_vocab = len(vocab)
        self.sot_token = self.encoder[SOT]
        self.eot_token = self.encoder[EOT]
        self.pad_token = 0

    def encode(self, text: str) -> list[int]:
        """``SimpleTokenizer.encode``: :func:`clean_caption`, CLIP regex, BPE with '</w>' on each word's last
        symbol. A literal "<|startoftext|>" / "<|endoftext|>" becomes the special id. No SOT/EOT is added."""
        ids: list[int] = []
        for piece in CLIP_PATTERN.findall(clean_caption(text)):
            if piece in (SOT, EOT):
                ids.append(self.encoder[piece])
                continue
            chars = bytes_as_chars(piece)
            symbols = (*chars[:-1], chars[-1] + "</w>")
            ids.extend(self.encoder[s] for s in self.merges.apply(symbols))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """``SimpleTokenizer.decode``: '</w>' becomes a space."""
        return chars_as_text("".join(self.decoder[int(i)] for i in ids)).replace("</w>", " ")

    def _ids_and_caption(self, text_or_ids: str | Sequence[int]) -> tuple[list[int], str | None]:
        if isinstance(text_or_ids, str):
            return self.encode(text_or_ids), text_or_ids
        return [int(i) for i in text_or_ids], None

    def _warn_if_cut(self, ids: list[int], caption: str | None, text_ctx: int) -> None:
        kept = text_ctx - 2
        if len(ids) > kept:
            warn_truncated(
                caption if caption is not None else self.decode(ids[:16]), len(ids), kept, text_ctx, stacklevel=4
            )

    def padded_tokens_and_len(
        self, text_or_ids: str | Sequence[int], text_ctx: int = CLIP_TEXT_CTX
    ) -> tuple[torch.Tensor, int]:
        """GLIDE's ``padded_tokens_and_len(tokens, text_ctx)`` (used by ``CLIPModel.encode_prompts``).

        Returns ``(tokens, text_len)``: int64 (text_ctx,) = ``[SOT] + ids[:text_ctx - 2] + [EOT]`` padded with 0,
        and its length counting SOT and EOT (so the EOT sits at ``text_len - 1``). Warns when ids are cut.
        """
        check_text_ctx(text_ctx, 2)
        ids, caption = self._ids_and_caption(text_or_ids)
        self._warn_if_cut(ids, caption, text_ctx)
        seq = [self.sot_token, *ids[: text_ctx - 2], self.eot_token]
        tokens = torch.zeros(text_ctx, dtype=torch.long)
        tokens[: len(seq)] = torch.tensor(seq, dtype=torch.long)
        return tokens, len(seq)

    def padded_tokens_and_mask(
        self, text_or_ids: str | Sequence[int], text_ctx: int = CLIP_TEXT_CTX
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Karlo's ``CustomizedTokenizer.padded_tokens_and_mask([text], text_ctx)`` for one caption.

        ``[SOT] + ids + [EOT]``; when longer than ``text_ctx`` it is cut to ``text_ctx`` and its last entry set to
        EOT (the same content as :meth:`padded_tokens_and_len`), with a warning. Returns ``(tokens, mask)``:
        int32 (text_ctx,) padded with 0, and bool (text_ctx,) True from SOT to EOT. Karlo's CLIP pools at
        ``argmax(tokens)``, the first EOT (a literal "<|endoftext|>" in the caption moves it).
        """
        check_text_ctx(text_ctx, 2)
        ids, caption = self._ids_and_caption(text_or_ids)
        self._warn_if_cut(ids, caption, text_ctx)
        seq = [self.sot_token, *ids, self.eot_token]
        if len(seq) > text_ctx:
            seq = seq[:text_ctx]
            seq[-1] = self.eot_token
        tokens = torch.zeros(text_ctx, dtype=torch.int32)
        tokens[: len(seq)] = torch.tensor(seq, dtype=torch.int32)
        mask = torch.zeros(text_ctx, dtype=torch.bool)
        mask[: len(seq)] = True
        return tokens, mask
