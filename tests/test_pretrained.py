"""The bundled defaults (0.7.0) read invented facts out of the vectors alone, on CPU.

A regression test of the shipped weights, not of the code: a retrained compressor or adapter that stops
reading its vectors (as 0.1.0 and 0.2.0 did) fails here. docs/quality.md has the measured dev-set figures.
"""

from __future__ import annotations

import pytest
import torch

FILLER = ("The committee met on a grey morning to review the harbour accounts. Several members asked about the "
          "repairs to the eastern pier, and the treasurer read out the figures for the year. ")
FACTS = [  # (sentence hidden in the filler, question, answer); made up here, not in any training template's data
    ("Ottoline Brackwater was born in the town of Fenwick.", "In which town was Ottoline Brackwater born?", "Fenwick"),
    ("The door code of Tamsin Arkwright's workshop is 4817.", "What is the door code of Tamsin Arkwright's workshop?",
     "4817"),
    ("Jasper Quill keeps a brass compass on the shelf above the stove.",
     "What does Jasper Quill keep on the shelf above the stove?", "brass compass"),
    ("Mirela Voss learned to sail in 1962.", "In which year did Mirela Voss learn to sail?", "1962"),
]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lloco(request, default_lloco):
    """The defaults in fp32 (the CPU default) and in bf16 (``dtype="bfloat16"``, as on a GPU)."""
    if request.param == "float32":
        return default_lloco
    from lloco_index.pipeline import LLoCO

    bf16 = LLoCO.from_pretrained("smollm2-135m", device="cpu", dtype="bfloat16")
    assert bf16.backbone.dtype == torch.bfloat16
    return bf16


def test_bundled_defaults_answer_from_vectors_alone(lloco):
    right = 0
    for sentence, question, answer in FACTS:
        with_fact = lloco.answer(question, [FILLER * 2 + sentence + " " + FILLER])  # expand=0: vectors only
        without = lloco.answer(question, [FILLER * 3])
        assert with_fact.context_vectors > 0 and sentence not in str(with_fact.to_dict())
        assert answer.lower() not in without.answer.lower()  # the answer is not guessed from the question
        right += answer.lower() in with_fact.answer.lower()
    assert right >= 2, f"{right}/4 facts read from the vectors (3/4 in fp32 when 0.3.0 and 0.4.0 shipped)"


def test_bundled_compressor_keeps_its_recorded_fingerprint(default_lloco):
    """Users' stores are keyed by this fingerprint: a code change that moved it (a new config field, a new way
    of hashing) would silently make every store built with the shipped compressor unreadable."""
    import json
    from pathlib import Path

    import lloco_index

    meta = json.loads((Path(lloco_index.__file__).parent / "pretrained/smollm2-135m/lloco_pretrained.json").read_text())
    assert default_lloco.compressor.fingerprint() == meta["compressor_fingerprint"]
