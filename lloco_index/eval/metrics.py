"""Answer scoring: SQuAD exact match / token F1, multiple-choice accuracy, needle scores.

All functions are pure and deterministic so a report can be re-scored from its predictions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
_LETTER = re.compile(r"^\W*?\(?([A-Za-z])\s*(?:[).:]|$)")  # "B", "(B)", "B.", "B) text"; not "A town"


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD token F1, the best over the gold answers."""
    return max((_f1(prediction, a) for a in answers), default=0.0)


def contains_answer(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any normalised gold answer occurs in the normalised prediction (as whole words).

    Small models answer in sentences; this is the lenient score the needle tests use too.
    """
    pred = f" {normalize_answer(prediction)} "
    return float(any(normalize_answer(a) and f" {normalize_answer(a)} " in pred for a in answers))


def gold_choice(choices: Sequence[str], answers: Sequence[str]) -> int:
    """Index of the correct option: the first answer that is an option's text, or its letter."""
    norm = [normalize_answer(c) for c in choices]
    for a in answers:
        if normalize_answer(a) in norm:
            return norm.index(normalize_answer(a))
        if len(a.strip()) == 1 and 0 <= ord(a.strip().upper()) - ord("A") < len(choices):
            return ord(a.strip().upper()) - ord("A")
    raise ValueError(f"none of the answers {list(answers)!r} is one of the choices {list(choices)!r} or its letter")


def predicted_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """The option a prediction picks: a leading letter ("B", "(B)", "B. ..."), else the only option text it contains."""
    m = _LETTER.match(prediction.strip())
    if m and ord(m.group(1).upper()) - ord("A") < len(choices):
        return ord(m.group(1).upper()) - ord("A")
    hits = [i for i, c in enumerate(choices) if contains_answer(prediction, [c])]
    return hits[0] if len(hits) == 1 else None


def choice_correct(prediction: str, choices: Sequence[str], answers: Sequence[str]) -> float:
    return float(predicted_choice(prediction, choices) == gold_choice(choices, answers))


def needle_score(answer: str, expect: Sequence[str]) -> int:
    """Deterministic stand-in for the LLM judge: 10 if every expected phrase is in the answer, 5 if some, 1 if none."""
    low = answer.lower()
    found = sum(w.lower() in low for w in expect)
    return 10 if found == len(expect) else 5 if found else 1
