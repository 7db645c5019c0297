"""Training text: real English documents tokenized once into a compact ``.npz`` token file.

Sources are plain or gzipped text files (e.g. the Python docs' reST sources from Debian's
``python3.11-doc`` and the kernel docs from ``linux-doc-6.1``). reST markup lines are dropped so
the model learns prose, not underlines.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_MARKUP = re.compile(r"^\s*([=\-~^*#+`'\"]{3,}|\.\. [\w-]+::.*|:[\w-]+:.*)\s*$")


def clean_rst(text: str) -> str:
    """Drop reST underlines, directives and field lines; collapse blank runs."""
    lines = [ln for ln in text.splitlines() if not _MARKUP.match(ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def build_corpus(files: list[Path], tokenizer, out: Path, max_tokens: int, min_doc_tokens: int = 256) -> dict:
    """Tokenize ``files`` (in the given order) until ``max_tokens``; save ``tokens`` + ``doc_starts``."""
    ids: list[np.ndarray] = []
    starts, total = [], 0
    for f in files:
        text = clean_rst(_read(f))
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) < min_doc_tokens:
            continue
        starts.append(total)
        ids.append(np.asarray(toks, dtype=np.uint16 if len(tokenizer) < 65536 else np.int32))
        total += len(toks)
        if total >= max_tokens:
            break
    tokens = np.concatenate(ids)[:max_tokens]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, tokens=tokens, doc_starts=np.asarray(starts, dtype=np.int64))
    return {"tokens": int(tokens.size), "documents": len(starts), "file": str(out)}


@dataclass
class Corpus:
    """Random windows of a token file; windows may cross documents (like packed LM pretraining)."""

    tokens: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> "Corpus":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["tokens"].astype(np.int64))

    def split(self, held_out: float = 0.02) -> tuple["Corpus", "Corpus"]:
        """Train/held-out split by position (the tail is held out: no window overlaps both)."""
        cut = int(len(self.tokens) * (1 - held_out))
        return Corpus(self.tokens[:cut]), Corpus(self.tokens[cut:])

    def window(self, rng: np.random.Generator, length: int) -> list[int]:
        start = int(rng.integers(0, len(self.tokens) - length))
        return self.tokens[start:start + length].tolist()
