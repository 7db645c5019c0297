"""Split text into chunks that each fit one compressor segment, cut at natural boundaries."""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

WINDOW_CHARS = 1 << 20  # tokenize at most this many characters at a time (~250k tokens of prose)
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),  # before UTF-16: same first bytes
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_BOUNDARY = re.compile(r"\n\s*\n|\n|(?<=[.!?])\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    n_tokens: int
    start_char: int


def chunk_text(text: str, tokenizer, segment_tokens: int, min_fill: float = 0.8,
               window_chars: int = WINDOW_CHARS) -> list[Chunk]:
    """Cut ``text`` into chunks of at most ``segment_tokens`` tokens.

    A cut backs off to the last paragraph, line or sentence break in the final ``1 - min_fill``
    of the window, so a fact is rarely split across two chunks. The chunks cover the text exactly
    (``"".join(c.text for c in chunks) == text``) so nothing is lost between them. The text is
    tokenized ``window_chars`` characters at a time, so a huge document needs bounded memory.
    """
    return list(iter_chunks(text, tokenizer, segment_tokens, min_fill, window_chars))


def iter_chunks(text: str, tokenizer, segment_tokens: int, min_fill: float = 0.8,
                window_chars: int = WINDOW_CHARS) -> Iterator[Chunk]:
    """``chunk_text`` as a generator."""
    if segment_tokens < 1:
        raise ValueError(f"segment_tokens must be >= 1, got {segment_tokens}")
    check_text(text)
    pos = 0
    while pos < len(text):
        end = min(len(text), pos + max(window_chars, 1))
        chunks = _chunk_window(text, pos, end, tokenizer, segment_tokens, min_fill)
        if end < len(text) and len(chunks) > 1:
            chunks.pop()  # it was cut by the window, not by the segment size: redo it in the next window
        yield from chunks
        pos = chunks[-1].start_char + len(chunks[-1].text)


def _chunk_window(text: str, pos: int, stop: int, tokenizer, segment_tokens: int, min_fill: float) -> list[Chunk]:
    """Chunks covering ``text[pos:stop]`` exactly."""
    offsets = [(a + pos, b + pos) for a, b in
               tokenizer(text[pos:stop], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]]
    chunks: list[Chunk] = []
    tok = 0
    while pos < stop:
        while tok < len(offsets) and offsets[tok][1] <= pos:
            tok += 1  # first token not wholly before pos
        end_tok = tok + segment_tokens
        end = stop
        if end_tok < len(offsets):
            end = offsets[end_tok][0]
            floor = offsets[tok + int(segment_tokens * min_fill)][0]
            for m in _BOUNDARY.finditer(text, floor, end):
                if m.end() > pos:
                    end = m.end()
        if end <= pos:  # several tokens share one character (byte-level BPE): take that character
            end = pos + 1
        piece, n = _fit(text, pos, end, tokenizer, segment_tokens)
        chunks.append(Chunk(piece, n, pos))
        pos += len(piece)
    return chunks


def _fit(text: str, start: int, end: int, tokenizer, segment_tokens: int) -> tuple[str, int]:
    """Shrink ``text[start:end]`` until it tokenizes (on its own) to at most ``segment_tokens`` tokens."""
    while True:
        piece = text[start:end]
        n = len(tokenizer(piece, add_special_tokens=False)["input_ids"])
        if n <= segment_tokens:
            return piece, n
        if end - start == 1:
            raise ValueError(f"segment_tokens={segment_tokens} is too small: the character {piece!r} alone "
                             f"is {n} tokens")
        end = start + max(1, min(end - start - 1, int((end - start) * segment_tokens / n * 0.98)))


def check_text(text: str) -> None:
    """Refuse what no tokenizer can encode (lone surrogates) with a one-line reason."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text has an unpaired surrogate {text[e.start]!r} at character {e.start}; "
                         "it is not valid Unicode text") from None


def read_text_file(path: str | Path) -> str:
    """Read a text file (UTF-8, or UTF-16/32 with a byte-order mark); reject binary, mis-encoded or
    empty input with a one-line reason."""
    return decode_text(Path(path).read_bytes(), path)


def decode_text(data: bytes, path: str | Path) -> str:
    """File bytes -> text, with the checks of ``read_text_file`` (for files read by other means)."""
    encoding = next((enc for bom, enc in _BOMS if data.startswith(bom)), "utf-8-sig")
    if encoding == "utf-8-sig" and b"\x00" in data:
        raise ValueError(f"{path}: looks like a binary file (NUL bytes), not text")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid {encoding.removesuffix('-sig').upper()} text (byte {e.start}); "
                         "convert it to UTF-8 first") from None
    if "\x00" in text:
        raise ValueError(f"{path}: looks like a binary file (NUL characters), not text")
    if not text.strip():
        raise ValueError(f"{path}: file is empty")
    return text


TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst"})


def iter_text_files(paths: list[str | Path], suffixes: frozenset[str] = TEXT_SUFFIXES) -> list[Path]:
    """Expand files and folders (recursively, ``*.txt``/``*.md``/``*.rst``) into a sorted file list."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in suffixes))
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise ValueError(f"{p}: not a regular file or folder")
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out
