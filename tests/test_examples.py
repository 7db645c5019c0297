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
    assert len(answer) > len("answer: ") and streamed.removeprefix("streamed: ").strip() == answer.removeprefix("answer: ")
