"""The one prompt layout shared by inference, training and evaluation (they must match exactly)."""

from __future__ import annotations

from typing import Collection, Literal, Sequence, TypeVar

from .generation import Piece

ExpandAt = Literal["end", "in_place"]
EXPAND_AT = ("end", "in_place")
T = TypeVar("T")

SYSTEM_PROMPT = "You are a helpful assistant. Answer the question from the context, briefly."


def question_text(question: str, choices: Sequence[str] | None = None) -> str:
    """The question as the decoder reads it; multiple choice lists lettered options and asks for a letter."""
    if not choices:
        return question.strip()
    options = "\n".join(f"{chr(ord('A') + i)}. {c}" for i, c in enumerate(choices))
    return f"{question.strip()}\n{options}\nAnswer with the letter of the correct option."


def check_expand_at(expand_at: str) -> ExpandAt:
    if expand_at not in EXPAND_AT:
        raise ValueError(f"expand_at must be one of {', '.join(EXPAND_AT)}, got {expand_at!r}")
    return expand_at


def arrange_expanded(order: Sequence[T], as_text: Collection[T], expand_at: ExpandAt = "end") -> list[T]:
    """Chunks in prompt order: ``end`` moves the re-expanded (text) ones after all vector chunks, just before the
    question, keeping document order within each group; ``in_place`` keeps document order.

    Why ``end``: a small decoder reads a text chunk buried among hundreds of vector chunks poorly (the shipped
    default named the whole needle in 40% of 32k-token haystacks with it in place, docs/quality.md)."""
    if check_expand_at(expand_at) == "in_place":
        return list(order)
    return [c for c in order if c not in as_text] + [c for c in order if c in as_text]


def qa_pieces(contexts: Sequence[Piece], question: str) -> list[Piece]:
    """User-turn pieces: each context (text or vectors) on its own line, then the question."""
    pieces: list[Piece] = ["Context:\n"] if contexts else []
    for c in contexts:
        pieces += [c, "\n"]
    pieces.append(("\n" if contexts else "") + f"Question: {question.strip()}")
    return pieces
