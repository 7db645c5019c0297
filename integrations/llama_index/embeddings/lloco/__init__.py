"""Offline embeddings for LLoCO pipelines: ``from llama_index.embeddings.lloco import default_embed_model``."""

from llama_index.embeddings.lloco.base import LocalEmbedding, default_embed_model

__all__ = ["LocalEmbedding", "default_embed_model"]
