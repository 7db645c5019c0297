"""The example scripts run as documented (imported and called with small settings)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def load_main(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("name", ["llamaindex_rag", "langchain_rag"])
def test_example_ingests_queries_and_streams(name, rag_lloco, capsys):
    """Same --store/--device as the session model, so the example reuses it (shared_lloco) instead of loading."""
    args = ["--store", str(rag_lloco.store.path), "--device", "cpu", "--max-new-tokens", "8"]
    assert load_main(name)(args) == 0
    out = capsys.readouterr().out
    assert f"compressed chunks in {rag_lloco.store.path}" in out
    answer = next(line for line in out.splitlines() if line.startswith("answer: "))
    streamed = next(line for line in out.splitlines() if line.startswith("streamed: "))
    assert len(answer) > len("answer: ")
    assert streamed.removeprefix("streamed: ").strip() == answer.removeprefix("answer: ")


def test_components_built_from_names_share_one_lloco(rag_lloco):
    """LLM, postprocessor and LangChain pieces built from the same store/device reuse the session model."""
    from langchain_lloco import LLoCODocumentCompressor
    from langchain_lloco import LLoCOLLM as LangChainLLM
    from llama_index.llms.lloco import LLoCOLLM
    from llama_index.postprocessor.lloco import LLoCOPostprocessor

    store = rag_lloco.store.path  # a Path works as well as a str
    built = [LLoCOLLM(store=store, device="cpu").lloco, LLoCOPostprocessor(store=store, device="cpu").lloco,
             LangChainLLM(store=store, device="cpu").lloco, LLoCODocumentCompressor(store=store, device="cpu").lloco]
    assert all(lloco is rag_lloco for lloco in built)
