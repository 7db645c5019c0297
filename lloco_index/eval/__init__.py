"""Evaluation: QA reports in four modes, needle in a haystack, comparison tables, a synthetic dev set.

Example::

    from lloco_index import LLoCO
    from lloco_index.data import read_qa
    from lloco_index.eval import evaluate_qa

    lloco = LLoCO.from_pretrained("smollm2-135m")
    report = evaluate_qa(lloco, read_qa("dev.jsonl"), mode="lloco", out="reports/lloco.json")
    print(report["metrics"])   # {"exact_match": ..., "f1": ..., "mean_prompt_positions": ..., ...}
"""

from typing import TYPE_CHECKING

MODES = ("lloco", "full", "rag", "none")  # what stands for the documents: vectors, all text, top-k text, nothing
CHOICE_SCORING = ("generate", "likelihood")  # multiple choice: read the generated letter, or rank options by likelihood
__all__ = ["evaluate_qa", "run_niah", "load_haystack", "plot_niah", "markdown_table", "compare_reports", "make_dev_set",
           "DevSetConfig", "MODES", "CHOICE_SCORING"]

if TYPE_CHECKING:
    from .devset import DevSetConfig, make_dev_set
    from .niah import load_haystack, run_niah
    from .qa import evaluate_qa
    from .report import compare_reports, markdown_table, plot_niah

_LAZY = {"evaluate_qa": "qa", "run_niah": "niah", "load_haystack": "niah", "plot_niah": "report",
         "markdown_table": "report", "compare_reports": "report", "make_dev_set": "devset", "DevSetConfig": "devset"}


def __getattr__(name: str):
    """Import on first use so the CLI can read ``MODES`` without importing torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'lloco_index.eval' has no attribute {name!r}")
