"""The one QA file format used by training and evaluation: JSONL, one example per line.

``{"id": str, "documents": [str, ...], "question": str, "answers": [str, ...], "choices": [str, ...]?}``
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable


@dataclass
class QAExample:
    id: str
    documents: list[str]
    question: str
    answers: list[str]
    choices: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.documents, list) or not all(isinstance(d, str) for d in self.documents):
            raise ValueError(f"example {self.id!r}: 'documents' must be a list of strings")
        if not isinstance(self.answers, list) or not all(isinstance(a, str) for a in self.answers):
            raise ValueError(f"example {self.id!r}: 'answers' must be a list of strings")
        if not isinstance(self.question, str) or not self.question.strip():
            raise ValueError(f"example {self.id!r}: 'question' must be a non-empty string")

    def to_json(self) -> str:
        d = asdict(self)
        if d["choices"] is None:
            del d["choices"]
        return json.dumps(d, ensure_ascii=False)


def read_qa(path: str | Path) -> list[QAExample]:
    """Read and validate a QA JSONL file; errors name the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                out.append(QAExample(id=str(raw["id"]), documents=raw["documents"], question=raw["question"],
                                     answers=raw["answers"], choices=raw.get("choices")))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{path}:{n}: not a valid QA example ({e})") from None
    return out


def write_qa(path: str | Path, examples: Iterable[QAExample]) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(ex.to_json() + "\n")
    tmp.replace(path)
