"""A small built-in BM25 retriever over stored chunk texts, so the core is usable without a framework."""

from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"\w+", re.UNICODE)


def _terms(text: str) -> list[str]:
    """Lower-cased words plus adjacent word pairs: a chunk that holds the question's phrase ("best thing
    to do") outranks one that only repeats its names ("San Francisco") many times."""
    words = [w.lower() for w in _WORD.findall(text)]
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) over words and word pairs of a fixed list of documents."""

    def __init__(self, docs: list[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tfs = [Counter(_terms(d)) for d in docs]
        self.lens = [sum(tf.values()) for tf in self.tfs]
        self.avg = sum(self.lens) / len(self.lens) if self.lens else 0.0
        df = Counter(t for tf in self.tfs for t in tf)
        n = len(docs)
        self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}

    def top_k(self, query: str, k: int) -> list[tuple[int, float]]:
        """``(doc index, score)`` of the best ``k`` documents, best first (ties: earlier doc first)."""
        q = set(_terms(query))
        scores = []
        for i, (tf, n) in enumerate(zip(self.tfs, self.lens)):
            s = 0.0
            for t in q:
                f = tf.get(t)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + self.k1 * (1 - self.b + self.b * n / self.avg))
            scores.append((i, s))
        scores.sort(key=lambda x: (-x[1], x[0]))
        return scores[:k]
