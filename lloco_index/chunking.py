"""Split text into chunks that each fit one compressor segment, cut at natural boundaries."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_BOUNDARY = re.compile(r"\n\s*\n|\n|(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    n_tokens: int
    start_char: int


def chunk_text(text: str, tokenizer, segment_tokens: int, min_fill: float = 0.8) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``segment_tokens`` tokens.

    A cut backs off to the last paragraph, line or sentence break in the final ``1 - min_fill``
    of the window, so a fact is rarely split across two chunks. The chunks cover the text exactly
    (``"".join(c.text for c in chunks) == text``) so nothing is lost between them.
    """
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
    if not text:
        return []
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    chunks: list[Chunk] = []
    start_tok = 0
    while start_tok < len(offsets):
        start_char = offsets[start_tok][0] if start_tok else 0
        end_tok = min(start_tok + segment_tokens, len(offsets))
        if end_tok == len(offsets):
            end_char = len(text)
        else:
            end_char = offsets[end_tok][0]
            floor_char = offsets[start_tok + int(segment_tokens * min_fill)][0]
            cut = None
            for m in _BOUNDARY.finditer(text, floor_char, end_char):
                cut = m.end()
            if cut is not None and cut > start_char:
                end_char = cut
        piece = text[start_char:end_char]
        n = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        while n > segment_tokens:  # re-tokenising a slice can merge differently; shrink until it fits
            end_char = start_char + int(len(piece) * segment_tokens / n * 0.98)
            piece = text[start_char:end_char]
            n = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        chunks.append(Chunk(piece, n, start_char))
        while start_tok < len(offsets) and offsets[start_tok][0] < end_char:
            start_tok += 1
        if start_tok < len(offsets) and offsets[start_tok][0] > end_char:
            # a token straddles the cut: give the gap to this chunk so coverage stays exact
            gap = text[end_char:offsets[start_tok][0]]
            chunks[-1] = Chunk(piece + gap, n, start_char)
    return chunks


def read_text_file(path: str | Path) -> str:
    """Read a UTF-8 text file; reject binary or non-UTF-8 input with a one-line reason."""
    return decode_text(Path(path).read_bytes(), path)


def decode_text(data: bytes, path: str | Path) -> str:
    """File bytes -> text, with the checks of ``read_text_file`` (for files read by other means)."""
    if not data.strip():
        raise ValueError(f"{path}: file is empty")
    if b"\x00" in data[:8192]:
        raise ValueError(f"{path}: looks like a binary file (NUL bytes), not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 text (byte {e.start}); convert it to UTF-8 first") from None


TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst"})


def iter_text_files(paths: list[str | Path], suffixes: frozenset[str] = TEXT_SUFFIXES) -> list[Path]:
    """Expand files and folders (recursively, ``*.txt``/``*.md``/``*.rst``) into a sorted file list."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out
