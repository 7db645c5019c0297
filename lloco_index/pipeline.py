"""``LLoCO``: the framework-free facade (ingest -> ask, or whole-document answer).

Example::

    lloco = LLoCO.from_pretrained("smollm2-135m", store="my_store")
    lloco.ingest(["docs/"])
    print(lloco.ask("What does the essay say about startups?", top_k=5).answer)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .backbone import Backbone
from .checkpoints import is_autocompressor
from .chunking import Chunk, check_text, chunk_text, iter_text_files, read_text_file
from .compressor import ContextCompressor
from .generation import GenerationConfig, Generator, Piece
from .models import DEFAULT_MODEL
from .presets import get_preset
from .prompts import SYSTEM_PROMPT, ExpandAt, arrange_expanded, check_expand_at, qa_pieces
from .retrieval import BM25
from .store import CompressedStore, KeyRef, StoreError, chunk_key, escape_sentinels

logger = logging.getLogger(__name__)
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
Messages = Sequence[tuple[str, str]]  # chat (role, text) turns
DEFAULT_ADAPTER = "default"


@dataclass
class Answer:
    answer: str
    prompt_tokens: int  # decoder input positions, vectors included
    source_tokens: int  # tokens of the original text the compressed context stands for
    context_vectors: int
    chunks: list[str] = field(default_factory=list)  # keys of the chunks used, in prompt order
    adapter: str | None = None
    latency_s: float = 0.0  # of the whole decoder call (shared by the answers of one batch)
    new_tokens: int = 0
    finish_reason: str = ""  # "stop" (EOS or stop string), "length", or "choice" (``LLoCO.choose``)
    choice_scores: list[float] | None = None  # ``LLoCO.choose``: each option's log-probability as the answer

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IngestReport:
    documents: int
    chunks: int
    new_chunks: int
    source_tokens: int


def _vector_count(pieces: Sequence[Piece]) -> int:
    """Decoder positions a prompt spends on compressed vectors."""
    return sum(x.shape[0] for x in pieces if isinstance(x, torch.Tensor))


def bundled(model: str, part: str) -> Path | None:
    """Trained defaults shipped in the package (``pretrained/<model>/<part>``), if present."""
    path = PRETRAINED_DIR / model / part
    return path if path.is_dir() else None


class LLoCO:
    """Compressor + store + LoRA decoder over one shared base model."""

    def __init__(self, backbone: Backbone, compressor: ContextCompressor, store: CompressedStore | None = None,
                 adapter: str | None = None, system_prompt: str = SYSTEM_PROMPT, prompt_preset: str | None = None,
                 expand_at: ExpandAt = "end"):
        if prompt_preset is not None:
            get_preset(prompt_preset)  # fail now, not at the first question
        self.expand_at = expand_at
        self.prompt_preset = prompt_preset
        self.backbone = backbone
        self.compressor = compressor
        self.generator = Generator(backbone)
        self.store = store
        self.adapter = adapter
        self.system_prompt = system_prompt
        self._memory: dict[str, tuple[torch.Tensor, int, str]] = {}  # key -> (vectors, source tokens, text) w/o store
        self._bm25: tuple[int, BM25, list[str]] | None = None

    @property
    def expand_at(self) -> ExpandAt:
        """Where ``expand``ed (text) chunks go: ``"end"`` (after the vectors, before the question) or ``"in_place"``."""
        return self._expand_at

    @expand_at.setter
    def expand_at(self, value: ExpandAt) -> None:
        self._expand_at = check_expand_at(value)  # a bad value fails here, not at the first question

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, *, compressor: str | Path | None = None,
                        adapter: str | Path | None = None, store: str | Path | None = None,
                        device: str | None = None, prompt_preset: str | None = None,
                        dtype: str | torch.dtype | None = None) -> "LLoCO":
        """Load the base model, the compressor and a decoder adapter; open or create ``store``.

        Args:
            model: embedded name (``smollm2-135m``), local folder or hub id.
            compressor: compressor folder; default: the model's own when it is an AutoCompressor
                checkpoint, else the bundled trained one for ``model``, else untrained.
            adapter: PEFT LoRA folder or hub id, ``"base"`` for none; default: the bundled QA adapter.
            store: folder of a compressed store (created if missing).
            device: ``cuda``/``cpu``; default: CUDA when available.
            prompt_preset: a prompt format of ``lloco_index.presets`` (e.g. ``"quality"`` for the
                LLoCO QuALITY adapter); default: the chat-template layout of ``prompts.qa_pieces``.
            dtype: ``"bfloat16"``, ``"float32"``, ... or a torch dtype; default: bf16 on GPU, fp32 on CPU.
        """
        backbone = Backbone.from_pretrained(model, device=device, dtype=dtype)
        model_dir = Path(backbone.model.config.name_or_path)  # the resolved local folder
        comp_dir = Path(compressor) if compressor else bundled(model, "compressor")
        if compressor is None and is_autocompressor(model_dir):
            comp = ContextCompressor.from_autocompressor(backbone, model_dir)
        elif comp_dir is not None:
            comp = ContextCompressor.from_pretrained(backbone, comp_dir)
        else:
            logger.warning("no trained compressor for %s: using untrained summary embeddings "
                           "(answers from compressed context will be poor; see `lloco train`)", model)
            comp = ContextCompressor.untrained(backbone)
        name = None
        if adapter != "base":
            adapter_dir = Path(adapter) if adapter else bundled(model, "decoder")
            if adapter_dir is not None:
                name = DEFAULT_ADAPTER if adapter is None else Path(adapter).name
                backbone.load_adapter(adapter_dir, name)
        st = None
        if store is not None:
            st = CompressedStore(store, fingerprint=comp.fingerprint(), create=True,
                                 compressor_config=asdict(comp.config))
        return cls(backbone, comp, st, adapter=name, prompt_preset=prompt_preset)

    # -- compression --------------------------------------------------------------------------
    def chunk(self, text: str) -> list[Chunk]:
        return chunk_text(text, self.backbone.tokenizer, self.compressor.config.segment_tokens)

    def compress_texts(self, texts: Sequence[str], batch_size: int = 16, show_progress_bar: bool = False,
                       sources: Sequence[tuple[str, int]] | None = None) -> list[str]:
        """Keys for ``texts`` (each at most one segment), compressing only what is not cached yet."""
        return self._compress(texts, batch_size, show_progress_bar, sources)[0]

    def _compress(self, texts: Sequence[str], batch_size: int, show_progress_bar: bool,
                  sources: Sequence[tuple[str, int]] | None) -> tuple[list[str], int]:
        """``(keys, number of entries this call stored)``; every text is checked before anything is written."""
        for i, t in enumerate(texts):
            check_text(t)
            if not t:
                raise ValueError(f"text {i} is empty: nothing to compress")
        fp = self.compressor.fingerprint()
        keys = [self.store.key_for(t) if self.store else chunk_key(fp, t) for t in texts]
        missing = set(self.store.missing(keys) if self.store else [k for k in keys if k not in self._memory])
        items = list({k: t for k, t in zip(keys, texts) if k in missing}.items())
        src_by_key: dict[str, list[tuple[str, int, str]]] = {}
        for (d, p), k in zip(sources or [], keys):
            src_by_key.setdefault(k, []).append((d, p, k))
        step = max(batch_size * 8, 1)  # write a shard every few batches so an interrupted ingest keeps its work
        stored = 0
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), disable=not show_progress_bar, desc="compress", unit="chunk")
        for i in range(0, len(items), step):
            part = items[i:i + step]
            vecs = self.compressor.compress([t for _, t in part], batch_size=batch_size)
            n_src = [len(self.backbone.tokenizer(t, add_special_tokens=False)["input_ids"]) for _, t in part]
            if self.store:
                stored += self.store.put_many([(k, v, t, n) for (k, t), v, n in zip(part, vecs, n_src)],
                                              [r for k, _ in part for r in src_by_key.get(k, ())])
            else:
                self._memory.update({k: (v, n, t) for (k, t), v, n in zip(part, vecs, n_src)})
                stored += len(part)
            bar.update(len(part))
        bar.close()
        if self.store and src_by_key:
            self.store.put_many([], [r for rows in src_by_key.values() for r in rows])
        return keys, stored

    def ingest(self, paths: Sequence[str | Path], batch_size: int = 16, show_progress_bar: bool = False) -> IngestReport:
        """Chunk and compress files/folders of text into the store; cached chunks are skipped.

        Every file is read and checked before anything is written, so bad input changes nothing.
        Sentinel-looking strings in the documents are made inert (``escape_sentinels``), so a chunk's
        text can never load another chunk's vectors when a framework puts it in a prompt.
        """
        if self.store is None:
            raise StoreError("ingest needs a store: LLoCO.from_pretrained(..., store=DIR)")
        files = iter_text_files(paths)
        if not files:
            raise ValueError(f"no text files (.txt/.md/.rst) found in {', '.join(map(str, paths))}")
        texts, srcs, n_tokens = [], [], {}
        for f in files:
            for i, c in enumerate(self.chunk(escape_sentinels(read_text_file(f)))):
                texts.append(c.text)
                srcs.append((str(f), i))
                n_tokens[c.text] = c.n_tokens
        _, new = self._compress(texts, batch_size, show_progress_bar, srcs)
        return IngestReport(len(files), len(texts), new, sum(n_tokens.values()))

    def vectors(self, keys: Sequence[str]) -> list[torch.Tensor]:
        if self.store:
            return self.store.get_many(list(keys))
        return [self._memory[k][0] for k in keys]

    def _texts(self, keys) -> dict[str, str]:
        if self.store:
            return {c.key: c.text for c in self.store.chunks(list(keys))}
        return {k: self._memory[k][2] for k in keys}

    def _source_tokens(self, keys: Sequence[str]) -> int:
        if self.store:
            return sum(c.source_tokens for c in self.store.chunks(list(keys)))
        return sum(self._memory[k][1] for k in keys)

    # -- retrieval and answering --------------------------------------------------------------
    def retrieve(self, question: str, top_k: int = 5) -> list[tuple[str, float]]:
        """``(key, score)`` of the best chunks in the store for ``question`` (BM25)."""
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if self.store is None:
            raise StoreError("retrieval needs a store: LLoCO.from_pretrained(..., store=DIR)")
        chunks = self.store.chunks()
        if not chunks:
            raise StoreError(f"store {self.store.path} is empty; run `lloco ingest` first")
        if self._bm25 is None or self._bm25[0] != len(chunks):
            self._bm25 = (len(chunks), BM25([c.text for c in chunks]), [c.key for c in chunks])
        _, bm25, keys = self._bm25
        return [(keys[i], s) for i, s in bm25.top_k(question, top_k)]

    def ask(self, question: str, top_k: int = 5, config: GenerationConfig | None = None,
            adapter: str | None = None, expand: int = 0) -> Answer:
        """Answer from the ``top_k`` retrieved compressed chunks (kept in document order).

        ``expand``: the best-scoring ``expand`` chunks go in as text instead of vectors
        (selective re-expansion, as REFRAG does for facts that compression blurs), where ``self.expand_at`` says.
        """
        keys, best = self._retrieved_keys(question, top_k, expand)
        return self._answer_keys(question, keys, config, adapter, best)

    def stream_ask(self, question: str, top_k: int = 5, config: GenerationConfig | None = None,
                   adapter: str | None = None, expand: int = 0) -> Iterator[str]:
        keys, as_text = self._retrieved_keys(question, top_k, expand)
        keys = arrange_expanded(keys, as_text, self.expand_at)
        pieces = self._pieces(question, keys, as_text)
        return self.generator.stream(pieces, config, self._adapter(adapter))

    def answer(self, question: str, contexts: Sequence[str], config: GenerationConfig | None = None,
               adapter: str | None = None, expand: int = 0, accumulate: bool = False,
               top_k: int | None = None) -> Answer:
        """Whole-document mode: compress every chunk of ``contexts`` and answer from all of them.

        ``expand``: the ``expand`` chunks most relevant to the question (BM25) go in as text.
        ``top_k``: keep only the ``top_k`` chunks most relevant to the question (BM25, in document order), so
        a long input costs the decoder the same few positions as a short one (the trained defaults read up to
        ~64 chunks well; docs/quality.md measures 128k-token inputs with ``top_k=16, expand=1``).
        ``accumulate=True`` compresses each context whole in AutoCompressor's recurrent mode, as
        LLoCO did for its adapters. Those vectors depend on the whole document, so they are not
        chunk-addressable: they are computed per call and never written to the store.
        """
        if accumulate:
            if top_k is not None:
                raise ValueError("top_k selects chunks; accumulate mode compresses each context whole")
            docs = [c for c in contexts if c]
            if not docs:
                raise ValueError("no context text given")
            n_src = sum(len(self.backbone.tokenizer(d, add_special_tokens=False)["input_ids"]) for d in docs)
            pieces = self._pieces_for(question, self.compressor.compress(docs, accumulate=True))
            return self._finish_batch([pieces], [[]], config, adapter, [n_src])[0]
        keys, best = self._context_keys(question, contexts, expand, top_k)
        return self._answer_keys(question, keys, config, adapter, best)

    def choose(self, question: str, choices: Sequence[str], contexts: Sequence[str] | None = None,
               adapter: str | None = None, expand: int = 0, top_k: int | None = None) -> Answer:
        """Multiple choice: the option the decoder finds most likely as the complete answer to ``question``
        (``Generator.score``); ``answer`` is that option's text, ``choice_scores`` all of them.

        With ``contexts``, over those documents as ``answer`` reads them (``top_k``, ``expand`` alike); without,
        over the ``top_k`` (default 5) chunks retrieved from the store, as ``ask``.
        Why not ask for a letter: a small decoder often writes an option's text or a wrong letter, so ranking
        the options by likelihood measures what the context told it.
        """
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise ValueError(f"need at least two non-empty choices, got {list(choices)!r}")
        if contexts is None:
            keys, best = self._retrieved_keys(question, 5 if top_k is None else top_k, expand)
        else:
            keys, best = self._context_keys(question, contexts, expand, top_k)
        keys = arrange_expanded(keys, best, self.expand_at)
        pieces, name = self._pieces(question, keys, best), self._adapter(adapter)
        t0 = time.perf_counter()
        scores = self.generator.score([pieces], [list(choices)], name)[0]
        return Answer(answer=choices[scores.index(max(scores))], prompt_tokens=self.generator.count_positions(pieces),
                      source_tokens=self._source_tokens(keys),
                      context_vectors=_vector_count(pieces), chunks=keys,
                      adapter=name, latency_s=time.perf_counter() - t0, finish_reason="choice", choice_scores=scores)

    def _retrieved_keys(self, question: str, top_k: int, expand: int) -> tuple[list[str], set[str]]:
        """Keys of the ``top_k`` chunks retrieved from the store, in document order, and those of the ``expand``
        best-scoring among them."""
        ranked = [k for k, _ in self.retrieve(question, top_k)]
        return self._in_doc_order(ranked), set(ranked[:expand])

    def _context_keys(self, question: str, contexts: Sequence[str], expand: int,
                      top_k: int | None) -> tuple[list[str], set[str]]:
        """Keys of the (``top_k`` most relevant, else all) chunks of ``contexts``, compressed and in document
        order, and those of the ``expand`` best among them."""
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        texts = [c.text for ctx in contexts for c in self.chunk(ctx)]
        if not texts:
            raise ValueError("no context text given")
        if top_k is not None:
            texts = [texts[i] for i in sorted(i for i, _ in BM25(texts).top_k(question, top_k))]
        keys = self.compress_texts(texts)
        return keys, {keys[i] for i, _ in BM25(texts).top_k(question, expand)} if expand else set()

    def complete(self, prompt: str | Messages, config: GenerationConfig | None = None, adapter: str | None = None,
                 stream: bool = False) -> Answer | Iterator[str]:
        """Generate from a prompt whose ``<lloco:...>`` sentinels (from ``store.sentinel``) become vectors.

        ``prompt`` is one user turn, or chat ``(role, text)`` messages rendered with the model's chat template
        (``self.system_prompt`` is added when there is no system message). Put untrusted text (documents, user
        questions) into such a prompt only through ``lloco_index.store.escape_sentinels`` so it cannot smuggle
        in a sentinel of its own.
        """
        pieces, keys = self._prompt_pieces(prompt)
        if stream:
            return self.generator.stream(pieces, config, self._adapter(adapter))
        return self._finish_batch([pieces], [keys], config, adapter)[0]

    def complete_batch(self, prompts: Sequence[str | Messages], config: GenerationConfig | None = None,
                       adapter: str | None = None) -> list[Answer]:
        """``complete`` for several prompts in one batched decoder pass."""
        resolved = [self._prompt_pieces(p) for p in prompts]
        return self._finish_batch([p for p, _ in resolved], [k for _, k in resolved], config, adapter)

    def _prompt_pieces(self, prompt: str | Messages) -> tuple[list[Piece], list[str]]:
        if isinstance(prompt, str):
            user, keys = self.resolve(prompt)
            return self.generator.chat_pieces(user, system=self.system_prompt), keys
        msgs = [{"role": r, "content": t} for r, t in prompt]
        if not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": self.system_prompt})
        tok = self.backbone.tokenizer
        if tok.chat_template:  # sentinels are plain text to the template and stay intact
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
        return self.resolve(text)

    def resolve(self, prompt: str) -> tuple[list[Piece], list[str]]:
        """Prompt string -> (pieces with verified sentinels replaced by vectors, their keys)."""
        if self.store is None:
            return [prompt], []
        parts = self.store.split_sentinels(prompt)
        keys = [p.key for p in parts if isinstance(p, KeyRef)]
        vecs = dict(zip(keys, self.store.get_many(keys)))
        return [vecs[p.key] if isinstance(p, KeyRef) else p for p in parts], keys

    def _in_doc_order(self, keys: list[str]) -> list[str]:
        return [c.key for c in self.store.chunks(keys)]  # store order = ingestion (document) order

    def _adapter(self, adapter: str | None) -> str | None:
        return adapter if adapter is not None else self.adapter

    def _pieces(self, question: str, keys: Sequence[str], as_text: set[str] = frozenset()) -> list[Piece]:
        """Prompt with each chunk (``keys`` in prompt order) as vectors, or as text when its key is in ``as_text``."""
        texts = self._texts(as_text) if as_text else {}
        vecs = dict(zip(keys, self.vectors(keys)))
        return self._pieces_for(question, [texts[k] if k in as_text else vecs[k] for k in keys])

    def _pieces_for(self, question: str, contexts: Sequence[Piece]) -> list[Piece]:
        if self.prompt_preset is not None:  # LLoCO's own formats: vectors, then plain text, no chat template
            return get_preset(self.prompt_preset).pieces(contexts, question)
        return self.generator.chat_pieces(qa_pieces(contexts, question), system=self.system_prompt)

    def _answer_keys(self, question: str, keys: Sequence[str], config, adapter,
                     as_text: set[str] = frozenset()) -> Answer:
        keys = arrange_expanded(keys, as_text, self.expand_at)
        return self._finish_batch([self._pieces(question, keys, as_text)], [keys], config, adapter)[0]

    def _finish_batch(self, pieces: list[list[Piece]], keys: list[Sequence[str]], config, adapter,
                      source_tokens: list[int] | None = None) -> list[Answer]:
        t0 = time.perf_counter()
        name = self._adapter(adapter)
        gens = self.generator.generate(pieces, config, [name] * len(pieces))
        dt = time.perf_counter() - t0
        if source_tokens is None:
            source_tokens = [self._source_tokens(k) for k in keys]
        return [Answer(answer=g.text.strip(), prompt_tokens=g.prompt_tokens, source_tokens=n,
                       context_vectors=_vector_count(p), chunks=list(k),
                       adapter=name, latency_s=dt, new_tokens=g.new_tokens, finish_reason=g.finish_reason)
                for p, k, g, n in zip(pieces, keys, gens, source_tokens)]
