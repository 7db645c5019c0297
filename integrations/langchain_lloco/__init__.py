"""LangChain integration of lloco-index: compressed-context RAG with a LoRA-adapted decoder.

Example::

    from langchain_lloco import LLoCODocumentCompressor, LLoCOLLM, default_embeddings
"""

from langchain_lloco.chat_models import ChatLLoCO
from langchain_lloco.document_compressors import LLoCODocumentCompressor, LLoCOIngestor
from langchain_lloco.embeddings import LocalEmbeddings, default_embeddings
from langchain_lloco.llms import LLoCOLLM

__all__ = ["LLoCOLLM", "ChatLLoCO", "LLoCODocumentCompressor", "LLoCOIngestor", "LocalEmbeddings",
           "default_embeddings"]
