"""LlamaIndex LLoCO compression: ``from llama_index.postprocessor.lloco import LLoCOPostprocessor``."""

from llama_index.postprocessor.lloco.base import LLoCOIngestor, LLoCOPostprocessor, restore_text

__all__ = ["LLoCOPostprocessor", "LLoCOIngestor", "restore_text"]
