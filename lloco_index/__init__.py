"""lloco-index: LLoCO (Learning Long Contexts Offline) for RAG frameworks.

Long documents are compressed offline into a few soft-prompt vectors per chunk, cached in a
store, and read by a LoRA-adapted decoder at question time (~20x fewer decoder positions).
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLoCO", "Answer", "ContextCompressor", "CompressorConfig", "CompressedStore", "Generator",
           "GenerationConfig", "Backbone"]

if TYPE_CHECKING:
    from .backbone import Backbone
    from .compressor import CompressorConfig, ContextCompressor
    from .generation import GenerationConfig, Generator
    from .pipeline import Answer, LLoCO
    from .store import CompressedStore

_LAZY = {"LLoCO": "pipeline", "Answer": "pipeline", "ContextCompressor": "compressor",
         "CompressorConfig": "compressor", "CompressedStore": "store", "Generator": "generation",
         "GenerationConfig": "generation", "Backbone": "backbone"}


def __getattr__(name: str):
    """Import on first use so ``lloco --help`` and ``import lloco_index`` stay free of torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lloco_index' has no attribute {name!r}")
