"""Decoder prompts for every eval mode, all in the one shared layout (``prompts.qa_pieces``).

``lloco`` puts compressed vectors where ``full``/``rag`` put text and ``none`` puts nothing, so the
modes differ only in what stands for the documents. Chunks are the ones ``LLoCO.chunk`` makes, so
``rag`` and ``lloco --top-k`` select among the same units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Sequence, TypeVar

from ..chunking import Chunk
from ..generation import GenerationConfig, Piece
from ..pipeline import LLoCO
from ..prompts import arrange_expanded, qa_pieces
from ..retrieval import BM25
from . import MODES

Mode = Literal["lloco", "full", "rag", "none"]
RAG_TOP_K = 5
T = TypeVar("T")


@dataclass
class EvalPrompt:
    pieces: list[Piece]  # chat-wrapped, ready for Generator.generate
    positions: int  # decoder input positions (vectors count one each)
    source_tokens: int  # tokens of document text the context stands for (after selection/truncation)
    document_tokens: int  # tokens of all the documents given
    context_positions: int = 0  # positions the context adds to the bare question's prompt (vectors, text, separators)
    chunks: list[int] = field(default_factory=list)  # indices of the chunks used (lloco/rag), in prompt order
    truncated: bool = False
    fits: bool = True  # positions + max_new_tokens within the decoder window


class PromptBuilder:
    """Build ``EvalPrompt``s for one mode.

    Args:
        lloco: the model under test (its chunker, compressor, cache and system prompt are used).
        mode: ``lloco`` (compressed chunks), ``full`` (all text), ``rag`` (top-k text chunks), ``none``.
        top_k: chunks kept by BM25 over each example's own chunks; ``None`` in lloco mode = whole document.
        max_new_tokens: room left for the answer when checking the window.
        truncate: ``full`` mode only: cut the middle of the text to fit (QA) or report "does not fit" (needles).
        expand: ``lloco`` mode only: the ``expand`` chunks most relevant to the question (BM25) go in
            as text instead of vectors (``LLoCO.answer(expand=...)``), where ``lloco.expand_at`` puts them.
    """

    def __init__(self, lloco: LLoCO, mode: Mode, top_k: int | None = None, max_new_tokens: int = 64,
                 truncate: bool = True, expand: int = 0):
        if expand and mode != "lloco":
            raise ValueError(f"--expand applies to the lloco mode, not {mode}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if top_k is not None and mode in ("full", "none"):
            raise ValueError(f"--top-k applies to the lloco and rag modes, not {mode}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"--top-k must be >= 1, got {top_k}")
        self.lloco, self.mode, self.truncate, self.expand = lloco, mode, truncate, expand
        self.top_k = RAG_TOP_K if mode == "rag" and top_k is None else top_k
        self.limit = lloco.backbone.context_window - max_new_tokens

    def build(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[EvalPrompt]:
        """Prompts for ``(question, documents)`` pairs; lloco mode compresses all their chunks in one batch."""
        tok = self.lloco.backbone.tokenizer
        doc_tokens = [sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in docs) for _, docs in items]
        if self.mode == "none":
            return [self._prompt([], q, 0, n) for (q, _), n in zip(items, doc_tokens)]
        if self.mode == "full":
            return [self._full(q, docs, n) for (q, docs), n in zip(items, doc_tokens)]
        chunked = [[c for d in docs for c in self.lloco.chunk(d)] for _, docs in items]
        picked = [self._select(q, chunks) for (q, _), chunks in zip(items, chunked)]
        as_text = [set(idx) if self.mode == "rag" else self._best(q, chunks, idx)
                   for (q, _), chunks, idx in zip(items, chunked, picked)]
        texts = [chunks[i].text for chunks, idx, t in zip(chunked, picked, as_text) for i in idx if i not in t]
        vectors = iter(self.lloco.vectors(self.lloco.compress_texts(texts)) if texts else [])
        out = []
        for (q, _), chunks, idx, t, n in zip(items, chunked, picked, as_text, doc_tokens):
            vecs = {i: next(vectors) for i in idx if i not in t}
            order = arrange_expanded(idx, t, self.lloco.expand_at) if self.mode == "lloco" else idx
            ctx = [chunks[i].text if i in t else vecs[i] for i in order]
            out.append(self._prompt(ctx, q, sum(chunks[i].n_tokens for i in idx), n, chunks=order))
        return out

    def _select(self, question: str, chunks: list[Chunk]) -> list[int]:
        """Indices of the top-k chunks (BM25 over this example's chunks only), in document order."""
        if self.top_k is None or self.top_k >= len(chunks):
            return list(range(len(chunks)))
        return sorted(i for i, _ in BM25([c.text for c in chunks]).top_k(question, self.top_k))

    def _best(self, question: str, chunks: list[Chunk], idx: list[int]) -> set[int]:
        """The ``expand`` picked chunks that BM25 ranks highest for the question (given as text)."""
        if not self.expand:
            return set()
        ranked = BM25([chunks[i].text for i in idx]).top_k(question, self.expand)
        return {idx[j] for j, _ in ranked}

    def _prompt(self, contexts: list[Piece], question: str, source: int, documents: int, **kw) -> EvalPrompt:
        gen = self.lloco.generator
        pieces = gen.chat_pieces(qa_pieces(contexts, question), system=self.lloco.system_prompt)
        n = gen.count_positions(pieces)
        bare = gen.count_positions(gen.chat_pieces(qa_pieces([], question), system=self.lloco.system_prompt))
        return EvalPrompt(pieces, n, source, documents, context_positions=n - bare, fits=n <= self.limit, **kw)

    def _full(self, question: str, documents: Sequence[str], n_docs: int) -> EvalPrompt:
        """All text as one context; if too long (and allowed), cut tokens from the middle until it fits."""
        text = "\n".join(documents)
        prompt = self._prompt([text] if text else [], question, n_docs, n_docs)
        if prompt.fits or not self.truncate or not text:
            return prompt
        offsets = self.lloco.backbone.tokenizer(text, add_special_tokens=False,
                                                return_offsets_mapping=True)["offset_mapping"]
        keep = len(offsets) - (prompt.positions - self.limit)
        while keep > 0:  # re-tokenising the joined halves can merge differently: shrink until it fits
            tail = keep - keep // 2
            cut = text[:offsets[keep // 2][0]] + text[offsets[len(offsets) - tail][0]:]
            n_cut = len(self.lloco.backbone.tokenizer(cut, add_special_tokens=False)["input_ids"])
            prompt = self._prompt([cut], question, n_cut, n_docs, truncated=True)
            if prompt.fits:
                break
            keep -= prompt.positions - self.limit
        return prompt


@dataclass
class Outcome:
    prompt: EvalPrompt
    text: str | None  # None: the prompt does not fit the window, nothing was generated
    finish_reason: str | None
    latency_s: float  # generation time of the batch / prompts generated in it
    prepare_s: float  # prompt building (chunking, compression, retrieval) / prompts in the batch
    choice_scores: list[float] | None = None  # scored options: log-probability of each as the answer


def answer_batches(builder: PromptBuilder, todo: Sequence[T], to_item: Callable[[T], tuple[str, Sequence[str]]],
                   config: GenerationConfig, adapter: str | None, batch_size: int,
                   options: Callable[[T], Sequence[str] | None] = lambda x: None) -> Iterator[list[tuple[T, Outcome]]]:
    """Answer ``todo`` ``batch_size`` at a time (``to_item`` gives each one's question and documents).

    Items are turned into prompts only when their batch comes (needle haystacks can be large).
    ``adapter`` is passed as is (``None`` = the base model), so callers resolve the LLoCO default first.
    Items for which ``options`` gives options are not generated: every option is scored as the answer
    (``Generator.score``) and the most likely one is the outcome's text.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    gen = builder.lloco.generator
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        t0 = time.perf_counter()
        prompts = builder.build([to_item(x) for x in part])
        prepare = (time.perf_counter() - t0) / len(part)
        fit = [(x, p) for x, p in zip(part, prompts) if p.fits]
        t0 = time.perf_counter()
        free = [p.pieces for x, p in fit if not options(x)]
        gens = iter(gen.generate(free, config, [adapter] * len(free)) if free else [])
        asked = [(p.pieces, options(x)) for x, p in fit if options(x)]
        scores = iter(gen.score([p for p, _ in asked], [o for _, o in asked], adapter) if asked else [])
        latency = (time.perf_counter() - t0) / max(len(fit), 1)
        out = []
        for x, p in zip(part, prompts):
            if not p.fits:
                out.append((x, Outcome(p, None, None, 0.0, prepare)))
            elif opts := options(x):
                s = next(scores)
                out.append((x, Outcome(p, opts[s.index(max(s))], "choice", latency, prepare, s)))
            else:
                g = next(gens)
                out.append((x, Outcome(p, g.text.strip(), g.finish_reason, latency, prepare)))
        yield out
