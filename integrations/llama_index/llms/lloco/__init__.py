"""LlamaIndex LLM over LLoCO: ``from llama_index.llms.lloco import LLoCOLLM``."""

from llama_index.llms.lloco.base import LLoCOLLM

__all__ = ["LLoCOLLM"]
