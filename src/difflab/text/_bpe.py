"""What the two byte-level BPE tokenizers share: the byte <-> character table, the merge loop,
reading (optionally gzipped) vocabulary files, and the truncation rule's warning.

Both official tokenizers (GPT-2's ``bpe.py`` and CLIP's ``simple_tokenizer.py``) run the same
algorithm: the UTF-8 bytes of a pre-token are written as printable characters, then the adjacent
pair with the lowest merge rank is merged everywhere (left to right, non-overlapping) until no
ranked pair is left. They differ only in the pre-tokenisation, the ``</w>`` word end and the files.
"""

from __future__ import annotations

import gzip
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """The reversible byte -> character table of both official tokenizers (``bytes_to_unicode``).

    The 188 printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other
    68 bytes (control characters, space, soft hyphen, ...) are given the characters chr(256), chr(257),
    ... in byte order, so that no byte is ever whitespace or invisible inside a BPE symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bytes_as_chars(piece: str) -> str:
    """The UTF-8 bytes of ``piece`` written with :func:`byte_to_char`."""
    table = byte_to_char()
    return "".join(table[b] for b in piece.encode("utf-8"))


def chars_as_text(chars: str) -> str:
    """Inverse of :func:`bytes_as_chars` (invalid UTF-8, e.g. a cut multi-byte character, becomes U+FFFD)."""
    inverse = {c: b for b, c in byte_to_char().items()}
    return bytes(inverse[c] for c in chars if c in inverse).decode("utf-8", errors="replace")


def read_text(path: Path) -> str:
    """A UTF-8 vocabulary file, gunzipped when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read().decode("utf-8")
    return path.read_text(encoding="utf-8")


def find_file(folder_or_file: str | Path, names: Sequence[str]) -> Path:
    """``folder_or_file`` itself if it is a file, else the first of ``names`` (each also tried with ``.gz``)
    inside it. FileNotFoundError names every path tried."""
    p = Path(folder_or_file)
    if p.is_file():
        return p
    tried = []
    for name in names:
        for candidate in (p / name, p / (name + ".gz")):
            if candidate.is_file():
                return candidate
            tried.append(str(candidate))
    raise FileNotFoundError(f"tokenizer vocabulary not found: tried {', '.join(tried)}")


class MergeTable:
    """Byte-pair merges ranked by their line in the merges file (a pair listed twice keeps its later rank,
    as the official ``dict(zip(merges, range(len(merges))))`` does).

    :meth:`apply` turns a tuple of initial symbols into the final symbols; results are memoised per
    pre-token, as the official ``cache`` dict does.
    """

    def __init__(self, merges: Iterable[tuple[str, str]]):
        self.ranks: dict[tuple[str, str], int] = {pair: rank for rank, pair in enumerate(merges)}
        self._cache: dict[tuple[str, ...], tuple[str, ...]] = {}

    def apply(self, symbols: tuple[str, ...]) -> tuple[str, ...]:
        cached = self._cache.get(symbols)
        if cached is not None:
            return cached
        word = list(symbols)
        while len(word) > 1:
            best = min(zip(word[:-1], word[1:], strict=True), key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = tuple(word)
        self._cache[symbols] = result
        return result


def warn_truncated(caption_start: str, n_tokens: int, n_kept: int, text_ctx: int, stacklevel: int = 3) -> None:
    """One-line warning that a caption lost ``n_tokens - n_kept`` tokens to the text context.

    The default ``stacklevel=3`` points at the caller of a ``padded_tokens_*`` method that calls this directly.
    """
    start = " ".join(caption_start.split())
    if len(start) > 40:
        start = start[:40] + "..."
    warnings.warn(
        f"caption {start!r} has {n_tokens} tokens; cut {n_tokens - n_kept} to fit text_ctx={text_ctx}",
        stacklevel=stacklevel,
    )


def check_text_ctx(text_ctx: int, minimum: int) -> None:
    if not isinstance(text_ctx, int) or isinstance(text_ctx, bool) or text_ctx < minimum:
        raise ValueError(f"text_ctx must be an integer >= {minimum}, got {text_ctx!r}")
