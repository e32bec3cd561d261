"""A word-level tokenizer for miniature captions ("a small red 7 in the top left", "a green seven on the left
and a blue 3 on the right"): small enough that a text U-Net trained on a CPU learns every word.

There is no official counterpart; the padding follows CLIP/Karlo (:meth:`CLIPTokenizer.padded_tokens_and_mask`):
``[SOT] + ids + [EOT]`` cut to ``text_ctx`` with the last entry forced to EOT, padded with ``pad_token``, the
mask True from SOT to EOT. Ids:

====  =======  ==========================================
id    token    meaning
====  =======  ==========================================
0     <pad>    padding (``pad_token``)
1     <sot>    start of text
2     <eot>    end of text
3     <unk>    any word not in the vocabulary
4...  words    the vocabulary in sorted order
====  =======  ==========================================

A word is a run of letters and digits or one other symbol, after lower-casing; "7", "17" and "seven" are
ordinary words. :meth:`MiniatureTokenizer.save` writes the vocabulary as a small JSON file, so that a run
folder alone rebuilds the tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import regex
import torch

from difflab.fileio import atomic_write_text
from difflab.text._bpe import check_text_ctx, warn_truncated

WORD_PATTERN = regex.compile(r"[\p{L}\p{N}]+|[^\s\p{L}\p{N}]")
SPECIALS = ("<pad>", "<sot>", "<eot>", "<unk>")
PAD, SOT, EOT, UNK = range(len(SPECIALS))
FILE_FORMAT = "difflab.miniature_tokenizer"
FILE_VERSION = 1
FILENAME = "tokenizer.json"


def split_words(text: str) -> list[str]:
    """The words of a caption: lower-cased runs of letters/digits, and each other non-space symbol alone."""
    return WORD_PATTERN.findall(text.lower())


class MiniatureTokenizer:
    """Word-level tokenizer over a fixed vocabulary (see the module docstring for the ids).

    Args:
        words: the vocabulary; duplicates are dropped and the rest sorted. Words must be what
            :func:`split_words` produces (lower-case, no spaces), and not one of the special names.
    Attributes:
        n_vocab: ``4 + len(words)``.
        pad_token, sot_token, eot_token, unk_token: 0, 1, 2, 3.
    """

    pad_token, sot_token, eot_token, unk_token = PAD, SOT, EOT, UNK

    def __init__(self, words: Iterable[str]):
        self.words: list[str] = sorted(set(words))
        for w in self.words:
            if not isinstance(w, str) or split_words(w) != [w] or w in SPECIALS:
                raise ValueError(f"miniature tokenizer: {w!r} is not a single lower-case word")
        self.ids = {w: len(SPECIALS) + i for i, w in enumerate(self.words)}
        self.n_vocab = len(SPECIALS) + len(self.words)

    @classmethod
    def from_captions(cls, captions: Iterable[str]) -> MiniatureTokenizer:
        """The tokenizer whose vocabulary is every word of ``captions``."""
        return cls(w for caption in captions for w in split_words(caption))

    def encode(self, text: str) -> list[int]:
        """Word ids of ``text`` (unknown words -> ``unk_token``). No SOT/EOT is added."""
        return [self.ids.get(w, UNK) for w in split_words(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` joined by spaces (special ids are written by name)."""
        names = [*SPECIALS, *self.words]
        return " ".join(names[int(i)] for i in ids)

    def padded_tokens_and_mask(
        self, text_or_ids: str | Sequence[int], text_ctx: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[SOT] + ids + [EOT]`` as int64 (text_ctx,), padded with 0, and a bool mask True from SOT to EOT.

        Longer than ``text_ctx``: cut to ``text_ctx`` with the last entry EOT, so ``ids[:text_ctx - 2]`` are
        kept, with a warning (the rule of :meth:`CLIPTokenizer.padded_tokens_and_mask`).
        """
        check_text_ctx(text_ctx, 2)
        text = text_or_ids if isinstance(text_or_ids, str) else None
        ids = self.encode(text) if text is not None else [int(i) for i in text_or_ids]
        if len(ids) > text_ctx - 2:
            warn_truncated(text if text is not None else self.decode(ids[:16]), len(ids), text_ctx - 2, text_ctx)
            ids = ids[: text_ctx - 2]
        seq = [SOT, *ids, EOT]
        tokens = torch.full((text_ctx,), PAD, dtype=torch.long)
        tokens[: len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask = torch.zeros(text_ctx, dtype=torch.bool)
        mask[: len(seq)] = True
        return tokens, mask

    def to_dict(self) -> dict:
        return {"format": FILE_FORMAT, "version": FILE_VERSION, "specials": list(SPECIALS), "words": self.words}

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON to ``path`` (a folder gets ``tokenizer.json``), atomically. Returns the file."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> MiniatureTokenizer:
        """Read a file written by :meth:`save` (a folder: its ``tokenizer.json``). A missing, unreadable or
        malformed file raises ValueError naming it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILENAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise ValueError(f"miniature tokenizer file {path} does not exist") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"miniature tokenizer file {path} is not readable JSON: {e}") from e
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"miniature tokenizer file {path} is not a {FILE_FORMAT} file")
        if data.get("version") != FILE_VERSION:
            raise ValueError(
                f"miniature tokenizer file {path} has version {data.get('version')!r}; "
                f"this difflab reads version {FILE_VERSION}"
            )
        words = data.get("words")
        if data.get("specials") != list(SPECIALS) or not isinstance(words, list):
            raise ValueError(
                f"miniature tokenizer file {path} lacks the special tokens {list(SPECIALS)} or a word list"
            )
        if not all(isinstance(w, str) for w in words) or words != sorted(set(words)):
            raise ValueError(f"miniature tokenizer file {path}: 'words' must be sorted, unique strings")
        try:
            return cls(words)
        except ValueError as e:
            raise ValueError(f"miniature tokenizer file {path}: {e}") from e
