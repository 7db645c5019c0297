"""LLoCO's own prompt formats, one per published adapter (``xiuyul/Lloco-7b-*``).

Each adapter was finetuned on exactly one format (``jeffreysijuntan/lloco``, ``finetune_quality.py``,
``finetune_scrolls.py``, ``finetune_hotpot.py``), so the strings below are copied character for
character, odd spacing included. The layout is always ``[context vectors, prompt text]``: no chat
template, no ``[INST]`` tags, no BOS (LLoCO tokenizes the prompt with ``add_special_tokens=False``),
and the answer follows the prompt directly.

Example::

    lloco = LLoCO.from_pretrained("AutoCompressor-Llama-2-7b-6k", adapter="xiuyul/Lloco-7b-nqa",
                                  prompt_preset="nqa")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # keeps `lloco --help` free of torch
    from .generation import Piece

_QUALITY_INSTRUCTION = "Choose the best answer by writing its corresponding letter (either A, B, C, or D)."
_QUALITY_ONE_SHOT = (
    "You are provided a story from above. We will now give you a multiple-choice question with 4 possible "
    "answers (marked by A, B, C, D). " + _QUALITY_INSTRUCTION + "\nExample question:\nWhere is the capital of "
    "France?\n\nChoices:\nA. Berlin\nB. Paris\nC. London\nD. Tokyo\n" + _QUALITY_INSTRUCTION +
    "\n\nAnswer:\nB. Paris\n\n")
_CHOICES = "\n\nChoices:\n"


@dataclass(frozen=True)
class PromptPreset:
    """``prefix + question + suffix`` after the context vectors."""

    name: str
    prefix: str
    suffix: str
    adapter: str  # hub id of the LLoCO adapter finetuned on this format
    requires: str = ""  # text the question must contain (QuALITY: its choices)

    def text(self, question: str) -> str:
        if self.requires and self.requires not in question:
            raise ValueError(f"the {self.name!r} preset needs a question made by "
                             f"lloco_index.presets.quality_question(question, options)")
        return self.prefix + question + self.suffix

    def pieces(self, contexts: Sequence["Piece"], question: str) -> list["Piece"]:
        """Context vectors back to back (a document's segments in order), then the prompt text."""
        return [*contexts, self.text(question)]


PRESETS: dict[str, PromptPreset] = {p.name: p for p in [
    PromptPreset("quality", _QUALITY_ONE_SHOT + "Question:\n", "\n" + _QUALITY_INSTRUCTION + "\n\nAnswer:\n",
                 "xiuyul/Lloco-7b-quality", requires=_CHOICES),
    PromptPreset("qasper", "You are just given an scientific article from above. I will now give you a question. "
                 "Answer the question as concisely as you can, using a single phrase or sentence if possible. If "
                 "the question cannot be answered based on the information in the article, write 'unanswerable'. "
                 "If the question is a yes/no question, answer 'yes', 'no', or 'unanswerable'.\nQuestion: ",
                 "\nAnswer:", "xiuyul/Lloco-7b-qasper"),
    PromptPreset("qmsum", "You are given a meeting transcript from above. I will now give you a query containing a "
                 "question or instruction. Answer the query in one or more sentences. \nQuery: ",
                 "\nAnswer:", "xiuyul/Lloco-7b-qmsum"),
    PromptPreset("nqa", "You are given a story from above, which can be either a novel or a movie script, and a "
                 "question. Answer the question as concisely as you can, using a single phrase if possible."
                 "\nQuestion:", "\nAnswer:", "xiuyul/Lloco-7b-nqa"),
    PromptPreset("hqa", "You were just given an article from above. I will now give you a question. Answer the "
                 "question as concisely as you can, using a single phrase or sentence if possible.\nQuestion: ",
                 "\nAnswer:", "xiuyul/Lloco-7b-hqa"),
]}


def get_preset(name: str) -> PromptPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown prompt preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def quality_question(question: str, options: Sequence[str]) -> str:
    """A QuALITY question with its four options, as the ``quality`` preset expects it."""
    if len(options) != 4:
        raise ValueError(f"QuALITY questions have 4 options, got {len(options)}")
    return question + _CHOICES + "\n".join(f"{letter}. {o}" for letter, o in zip("ABCD", options))
