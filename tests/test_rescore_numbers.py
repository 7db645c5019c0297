"""scripts/rescore_numbers.py swaps an answer's number for the documents' likeliest one, and only when asked to."""

import importlib.util
from pathlib import Path

from lloco_index.data import QAExample

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["The door code of Ailsa Greaves's workshop is 1234. Marek Okonjo learned to sail in 1901.",
        "The door code of Marek Okonjo's workshop is 5678."]


def _script():
    spec = importlib.util.spec_from_file_location("rescore_numbers", ROOT / "scripts" / "rescore_numbers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rescore_rewrites_numbers_with_document_numbers(tiny_lloco):
    examples = [QAExample(id=f"dev-000{i}-code", documents=DOCS, question="What is the door code?", answers=["1234"])
                for i in range(4)]
    examples.append(QAExample(id="dev-0004-code-choice", documents=DOCS, question="Which code?", answers=["1234"],
                              choices=["1234", "5678"]))
    report = {"mode": "lloco", "top_k": None, "expand": 0, "predictions": [
        {"id": "dev-0000-code", "prediction": "It is 12349."},  # garbled: in no document
        {"id": "dev-0001-code", "prediction": "5678"},  # another person's code: in a document
        {"id": "dev-0002-code", "prediction": "no idea"},  # no number: not rescored
        {"id": "dev-0003-code", "prediction": "42"},  # under 3 digits: not rescored
        {"id": "dev-0004-code-choice", "prediction": "1234"}]}  # multiple choice: not rescored
    rows = _script().rescore(tiny_lloco, examples, report, batch_size=1)
    assert [r["id"] for r in rows] == ["dev-0000-code", "dev-0001-code"]
    garbled, other = rows
    assert garbled["candidates"] == 3  # 1234, 1901, 5678
    assert garbled["absent"] == garbled["always"]
    assert garbled["absent"] in {"It is 1234.", "It is 1901.", "It is 5678."}
    assert other["absent"] == "5678"  # already a document's number: kept
    assert other["always"] in {"1234", "1901", "5678"}
