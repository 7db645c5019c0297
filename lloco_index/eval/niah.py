"""Needle in a haystack (gkamradt/LLMTest_NeedleInAHaystack conventions, scored without an LLM judge).

A corpus of text files is shuffled with a seed and concatenated; for each length (in the decoder's own
tokens, needle included) it is cut to size and the needle goes in at the sentence boundary just before
each depth (depth 100 appends it). Full text that exceeds the decoder window is reported as "does not
fit", never truncated.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from ..chunking import iter_text_files, read_text_file
from ..generation import GenerationConfig
from ..pipeline import LLoCO
from . import MODES
from .contexts import PromptBuilder, answer_batches
from .metrics import needle_score
from .report import EvalRun

DEFAULT_NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
DEFAULT_QUESTION = "What is the best thing to do in San Francisco?"
DEFAULT_EXPECT = ("sandwich", "Dolores Park")
DEFAULT_LENGTHS = (1000, 2000, 4000, 8000, 16000)
DEFAULT_DEPTHS = (0.0, 25.0, 50.0, 75.0, 100.0)
_NOTICES = ("LICENSE", "README", "SOURCE")  # files kept beside a corpus that are not part of it
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*\s+")


def load_haystack(paths: Sequence[str | Path], seed: int = 0) -> str:
    """Text files under ``paths`` (not LICENSE/README/SOURCE notices) in a seeded shuffled order, joined."""
    files = [f for f in iter_text_files(list(paths)) if not f.stem.upper().startswith(_NOTICES)]
    if not files:
        raise ValueError(f"no haystack text files (.txt/.md/.rst) in {', '.join(map(str, paths))}")
    random.Random(seed).shuffle(files)
    return "\n\n".join(read_text_file(f).strip() for f in files)


class Haystack:
    """A corpus tokenised once with the decoder's tokenizer, cut to lengths with a needle inserted."""

    def __init__(self, corpus: str, tokenizer):
        self.text, self.tokenizer = corpus, tokenizer
        self.offsets = tokenizer(corpus, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]

    def build(self, length: int, depth: float, needle: str) -> str:
        """``length`` tokens of corpus + needle, the needle at the last sentence start before ``depth``%."""
        if not 0 <= depth <= 100:
            raise ValueError(f"depths are percentages in [0, 100], got {depth}")
        n_hay = length - len(self.tokenizer(" " + needle, add_special_tokens=False)["input_ids"])
        if n_hay < 1:
            raise ValueError(f"length {length} leaves no room for the needle; use longer --lengths")
        if n_hay > len(self.offsets):
            raise ValueError(f"the haystack has only {len(self.offsets)} tokens but length {length} was asked; "
                             f"add text to the haystack folder or lower --lengths")
        hay = self.text[:self.offsets[n_hay][0]] if n_hay < len(self.offsets) else self.text
        if depth == 100:
            return hay.rstrip() + " " + needle
        target = self.offsets[int(n_hay * depth / 100)][0]
        cut = max((m.end() for m in _SENTENCE_END.finditer(hay, 0, target)), default=0)
        return hay[:cut] + needle + " " + hay[cut:]


def run_niah(lloco: LLoCO, corpus: str, lengths: Sequence[int] = DEFAULT_LENGTHS,
             depths: Sequence[float] = DEFAULT_DEPTHS, modes: Sequence[str] = ("lloco", "full"),
             needle: str = DEFAULT_NEEDLE, question: str = DEFAULT_QUESTION, expect: Sequence[str] | None = None,
             top_k: int | None = None, config: GenerationConfig | None = None, batch_size: int = 4,
             adapter: str | None = None, out: str | Path | None = None, meta: dict | None = None,
             show_progress_bar: bool = False, expand: int = 0) -> dict:
    """Ask ``question`` over every (mode, length, depth) haystack and score the answers.

    Args:
        lloco: the model under test.
        corpus: haystack text (``load_haystack``); it must hold at least ``max(lengths)`` tokens.
        lengths: context lengths in decoder tokens, needle included. depths: needle depths in percent.
        modes: any of lloco/full/rag/none; ``full`` beyond the window is "does not fit".
        needle, question, expect: the fact, the question about it, and the phrases a right answer
            contains (default: the San Francisco needle, "sandwich" and "Dolores Park").
        top_k: lloco/rag: answer from the top-k chunks (BM25) instead of the whole haystack.
        expand: lloco: the K chunks most relevant to the question go in as text (selective re-expansion).
        config, batch_size, adapter, out, show_progress_bar: as in ``evaluate_qa``.
        meta: extra fields recorded in the report (e.g. the command line and haystack folder).

    Returns:
        The report: settings, ``summary`` per mode (cells, fit, accuracy = share of fitting cells scoring 10,
        mean_score) and ``cells`` (one record per mode/length/depth).
    """
    if expect is None:
        if needle != DEFAULT_NEEDLE:
            raise ValueError("a custom needle needs the words a right answer must contain (--expect)")
        expect = DEFAULT_EXPECT
    if not expect or not lengths or not depths or not modes:
        raise ValueError("need at least one expected word, length, depth and mode")
    if unknown := [m for m in modes if m not in MODES]:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    config = config or GenerationConfig()
    adapter = lloco.adapter if adapter is None else adapter
    hay = Haystack(corpus, lloco.backbone.tokenizer)
    for n in lengths:  # fail on a bad length/depth before any generation
        hay.build(n, depths[0], needle)
    for d in depths:
        hay.build(lengths[0], d, needle)
    settings = {"kind": "niah", "model": lloco.backbone.name_or_path, "adapter": adapter,
                "compressor": lloco.compressor.fingerprint(), "top_k": top_k, "expand": expand,
                "expand_at": lloco.expand_at,
                "generation": asdict(config),
                "needle": needle, "question": question, "expect": list(expect), "lengths": list(lengths),
                "depths": list(depths), "modes": list(modes), "window": lloco.backbone.context_window,
                "corpus_sha256": hashlib.sha256(corpus.encode()).hexdigest()[:16], "corpus_tokens": len(hay.offsets)}
    cells = [(m, n, d) for m in modes for n in lengths for d in depths]
    run = EvalRun(settings, [_cell_id(*c) for c in cells], out, "needle", show_progress_bar)
    t0 = time.perf_counter()
    for mode in modes:
        builder = PromptBuilder(lloco, mode, top_k if mode in ("lloco", "rag") else None, config.max_new_tokens,
                                truncate=False, expand=expand if mode == "lloco" else 0)
        todo = run.pending([(n, d) for n in lengths for d in depths], lambda c: _cell_id(mode, *c))
        for pairs in answer_batches(builder, todo, lambda c: (question, [hay.build(*c, needle)]), config, adapter,
                                    batch_size):
            run.add([{"id": _cell_id(mode, n, d), "mode": mode, "length": n, "depth": d,
                      "context_tokens": o.prompt.document_tokens, "fits": o.prompt.fits, "answer": o.text,
                      "score": needle_score(o.text, expect) if o.prompt.fits else None,
                      "prompt_positions": o.prompt.positions, "source_tokens": o.prompt.source_tokens,
                      "chunks": o.prompt.chunks, "latency_s": round(o.latency_s, 4)} for (n, d), o in pairs])
    records = run.records()
    return run.finish({**settings, **(meta or {}), "device": str(lloco.backbone.device),
                       "dtype": str(lloco.backbone.dtype).removeprefix("torch."),
                       "elapsed_s": round(time.perf_counter() - t0, 3),
                       "summary": {m: _summary([r for r in records if r["mode"] == m]) for m in modes},
                       "cells": records})


def _cell_id(mode: str, length: int, depth: float) -> str:
    return f"{mode}/{length}/{depth:g}"


def _summary(records: list[dict]) -> dict:
    fit = [r for r in records if r["fits"]]
    return {"cells": len(records), "fit": len(fit),
            "accuracy": round(sum(r["score"] == 10 for r in fit) / len(fit), 4) if fit else None,
            "mean_score": round(sum(r["score"] for r in fit) / len(fit), 3) if fit else None}
