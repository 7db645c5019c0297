"""The one prompt layout shared by inference, training and evaluation (they must match exactly)."""

from __future__ import annotations

from typing import Sequence

from .generation import Piece

SYSTEM_PROMPT = "You are a helpful assistant. Answer the question from the context, briefly."


def question_text(question: str, choices: Sequence[str] | None = None) -> str:
    """The question as the decoder reads it; multiple choice lists lettered options and asks for a letter."""
    if not choices:
        return question.strip()
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n{options}\nAnswer with the letter of the correct option."


def qa_pieces(contexts: Sequence[Piece], question: str) -> list[Piece]:
    """User-turn pieces: each context (text or vectors) on its own line, then the question."""
    pieces: list[Piece] = ["Context:\n"] if contexts else []
    for c in contexts:
        pieces += [c, "\n"]
    pieces.append(("\n" if contexts else "") + f"Question: {question.strip()}")
    return pieces
