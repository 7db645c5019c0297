"""LangChain documents -> LLoCO: at query time (``LLoCODocumentCompressor``) or at indexing time (``LLoCOIngestor``).

The compressor swaps each document's ``page_content`` for a ``<lloco:KEY:TAG>`` sentinel that
``LLoCOLLM``/``ChatLLoCO`` resolve to its compressed vectors; id and metadata are kept and the
original text stays in ``metadata["lloco_text"]``. It is also a Runnable, so ``retriever | compressor``
works in LCEL, and a ``BaseDocumentCompressor`` for ``ContextualCompressionRetriever``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, BaseDocumentTransformer, Document
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from pydantic import ConfigDict, Field, model_validator

from langchain_lloco._common import LLoCOBacked
from lloco_index.integration import KEY_KEY, TEXT_KEY, compress_to_sentinels, require_store
from lloco_index.prompts import arrange_expanded


class _Compressing(LLoCOBacked):
    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    batch_size: int = Field(default=16, gt=0, description="chunks compressed per forward pass")

    @model_validator(mode="after")
    def _needs_store(self) -> "_Compressing":
        require_store(self.lloco, type(self).__name__)
        return self

    def _refs(self, documents: Sequence[Document]) -> list[Optional[tuple[str, str]]]:
        """``(key, sentinel)`` per document (None: empty or already swapped); missing ones are compressed."""
        texts = [None if TEXT_KEY in d.metadata else d.page_content for d in documents]
        return compress_to_sentinels(self.lloco, texts, self.batch_size)


class LLoCODocumentCompressor(_Compressing, BaseDocumentCompressor,
                              RunnableSerializable[Sequence[Document], list[Document]]):
    """Replace documents' text with sentinels for ``LLoCOLLM``/``ChatLLoCO`` (same store); ``expand=1`` keeps
    the retriever's best document as text, the mode docs/quality.md measures best, placed where
    ``lloco.expand_at`` says (default: after the compressed documents, nearest the question).

    Example::

        compressor = LLoCODocumentCompressor(lloco=lloco)
        docs = (retriever | compressor).invoke("Who founded the museum?")
        docs[0].page_content, docs[0].metadata["lloco_text"][:40]    # '<lloco:...>', the original text
    """

    expand: int = Field(default=0, ge=0, description="the first N documents (the retriever's best) stay as text "
                        "(selective re-expansion: the facts compression blurs), the others become vectors")

    def compress_documents(self, documents: Sequence[Document], query: str = "",
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """``query`` is unused: each chunk is compressed on its own, once, whatever the question."""
        keep, rest = list(documents[:self.expand]), documents[self.expand:]
        docs = keep + [d if ref is None else
                       Document(id=d.id, page_content=ref[1], metadata={**d.metadata, KEY_KEY: ref[0],
                                                                        TEXT_KEY: d.page_content})
                       for d, ref in zip(rest, self._refs(rest))]
        return [docs[i] for i in arrange_expanded(range(len(docs)), range(len(keep)), self.lloco.expand_at)]

    def invoke(self, input: Sequence[Document], config: Optional[RunnableConfig] = None,
               **kwargs: Any) -> list[Document]:
        return self._call_with_config(lambda docs: list(self.compress_documents(docs)), input, config)


class LLoCOIngestor(_Compressing, BaseDocumentTransformer):
    """Compress documents (already split, e.g. by a text splitter) into the store at indexing time, so
    queries only look vectors up; documents pass through unchanged.

    Example::

        chunks = LLoCOIngestor(lloco=lloco).transform_documents(splitter.split_documents(docs))
    """

    def transform_documents(self, documents: Sequence[Document], **kwargs: Any) -> Sequence[Document]:
        self._refs(documents)
        return documents
