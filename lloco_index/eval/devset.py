"""A seeded multi-document QA dev set for quality measurement, kept apart from any training data.

Filler text is prose from a held-out source (default: the Node.js API docs of the ``nodejs`` package,
``/usr/share/doc/nodejs/api``; training uses the Python docs and essays). Invented facts (people, towns,
door codes, years, objects) that no model can know are inserted at paragraph ends, and questions ask
about them: single-hop, multi-hop (two facts in two different documents) and some multiple choice.
Each example also carries distractor facts of the same kind about other people.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..chunking import iter_text_files, read_text_file
from ..data import QAExample

DEFAULT_SOURCE = Path("/usr/share/doc/nodejs/api")
FIRST = ("Ailsa", "Bartholo", "Corentin", "Dagny", "Eulalie", "Fennick", "Gwenith", "Hallam", "Isaura", "Jovan",
         "Kestrel", "Linnea", "Marek", "Nerys", "Oswin", "Perpetua", "Quillon", "Rosalind", "Sorrel", "Tobiah",
         "Ulla", "Valko", "Wynne", "Xanthe", "Yusuf", "Zelie")
LAST = ("Abernethy", "Brackwater", "Castellane", "Dunmore", "Eskdale", "Fairweather", "Greaves", "Holloway",
        "Ingleby", "Jessop", "Kettering", "Lockhart", "Marchbank", "Nettleford", "Okonjo", "Pemberton", "Quarrie",
        "Rushworth", "Saltonstall", "Thistlewood", "Underhill", "Whitcombe", "Yardley")
TOWN = (("Bram", "Corr", "Dun", "Elm", "Fair", "Glen", "Hart", "Ivy", "Kirk", "Lark", "Marl", "Nor", "Oak", "Pen",
         "Quen", "Rook", "Stan", "Thorn", "Wex", "Yarrow"),
        ("wick", "mere", "ford", "haven", "stead", "holt", "combe", "field", "moor", "ness", "bury", "dale"))
ORG = (("Amber", "Cobalt", "Harbor", "Juniper", "Lantern", "Meridian", "Northwind", "Saffron", "Tidewater", "Vellum"),
       ("Glassworks", "Cartographers", "Ropeworks", "Instruments", "Printing House", "Clockmakers", "Ferry Company"))
ITEMS = ("brass compass", "clay teapot", "green lantern", "wooden owl", "silver kettle", "stone frog",
         "red typewriter", "glass globe", "paper crane", "copper bell", "blue umbrella", "walnut chessboard")
# kind -> (fact, question); {p} a person, {v} the answer
SINGLE = {
    "born": ("{p} was born in the town of {v}.", "In which town was {p} born?"),
    "code": ("The door code of {p}'s workshop is {v}.", "What is the door code of {p}'s workshop?"),
    "year": ("{p} learned to sail in {v}.", "In which year did {p} learn to sail?"),
    "item": ("{p} keeps a {v} on the shelf above the stove.", "What does {p} keep on the shelf above the stove?"),
}
# kind -> (first fact, second fact, question); {p} a person, {x} the bridge entity, {v} the answer (a town)
MULTI = {
    "employer": ("{p} works as a surveyor for the {x}.", "The {x} has its head office in {v}.",
                 "In which town is the head office of the company that {p} works for?"),
    "teacher": ("{p} trained as an apprentice under {x}.", "{x} was born in the town of {v}.",
                "In which town was the person who trained {p} as an apprentice born?"),
}
_CODE_FENCE = re.compile(r"```.*?```|<!--.*?-->", re.S)


@dataclass
class DevSetConfig:
    examples: int = field(default=60, metadata={"help": "questions to write"})
    documents: int = field(default=3, metadata={"help": "documents per question (multi-hop needs 2+)"})
    doc_words: int = field(default=350, metadata={"help": "filler words per document, at least"})
    distractors: int = field(default=3, metadata={"help": "invented facts about other people per question"})
    multi_hop: float = field(default=0.25, metadata={"help": "share of multi-hop questions"})
    multiple_choice: float = field(default=0.2, metadata={"help": "share of questions with 4 lettered options"})
    seed: int = field(default=0, metadata={"help": "everything is drawn from random.Random(seed)"})

    def __post_init__(self) -> None:
        if self.examples < 1 or self.documents < 2 or self.doc_words < 1 or self.distractors < 0:
            raise ValueError("need examples >= 1, documents >= 2, doc_words >= 1 and distractors >= 0")
        if not (0 <= self.multi_hop <= 1 and 0 <= self.multiple_choice <= 1):
            raise ValueError("multi_hop and multiple_choice are shares in [0, 1]")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose from text/markdown: no code, headings, lists, tables or comments."""
    out = []
    for block in re.split(r"\n\s*\n", _CODE_FENCE.sub("\n\n", text)):
        para = " ".join(block.split())
        if (len(para.split()) >= 12 and para.endswith((".", "!", "?")) and not block.startswith(("    ", "\t"))
                and not para.startswith(("#", ">", "|", "*", "-", "<", "[", "+")) and not re.match(r"\d+\.", para)):
            out.append(para)
    return out


def make_dev_set(source: Sequence[str | Path] = (DEFAULT_SOURCE,), config: DevSetConfig | None = None) -> list[QAExample]:
    """Build the dev set from text files under ``source`` (same source + config -> the same examples)."""
    config = config or DevSetConfig()
    pool = [p for f in iter_text_files(list(source)) for p in prose_paragraphs(read_text_file(f))]
    if sum(len(p.split()) for p in pool) < config.doc_words * config.documents:
        raise ValueError(f"{', '.join(map(str, source))}: too little prose ({len(pool)} paragraphs) for "
                         f"{config.documents} documents of {config.doc_words} words")
    rng = random.Random(config.seed)
    return [_example(rng, pool, config, i) for i in range(config.examples)]


class _Names:
    """Fresh invented values per example: no two facts in one example share a person or an answer."""

    def __init__(self, rng: random.Random):
        r = rng
        self.make = {"person": lambda: f"{r.choice(FIRST)} {r.choice(LAST)}",
                     "born": lambda: r.choice(TOWN[0]) + r.choice(TOWN[1]),
                     "code": lambda: str(r.randint(1000, 9999)), "year": lambda: str(r.randint(1901, 1999)),
                     "item": lambda: r.choice(ITEMS), "org": lambda: f"{r.choice(ORG[0])} {r.choice(ORG[1])}"}
        self.by_kind: dict[str, list[str]] = {k: [] for k in self.make}

    def draw(self, kind: str) -> str:
        while (value := self.make[kind]()) in self.by_kind[kind]:
            pass
        self.by_kind[kind].append(value)
        return value


def _example(rng: random.Random, pool: list[str], cfg: DevSetConfig, i: int) -> QAExample:
    names = _Names(rng)
    facts: list[tuple[str, int]] = []  # (sentence, document index)
    if rng.random() < cfg.multi_hop:
        kind = rng.choice(sorted(MULTI))
        first, second, question = MULTI[kind]
        for j in range(2):  # the asked chain, then a distractor chain of the same shape
            p, v = names.draw("person"), names.draw("born")
            x = names.draw("org" if kind == "employer" else "person")
            a, b = rng.sample(range(cfg.documents), 2)
            facts += [(first.format(p=p, x=x), a), (second.format(x=x, v=v), b)]
            if j == 0:
                q, answer, answer_kind = question.format(p=p), v, "born"
        tag = f"multihop-{kind}"
    else:
        kind = rng.choice(sorted(SINGLE))
        p, answer, answer_kind = names.draw("person"), names.draw(kind), kind
        facts.append((SINGLE[kind][0].format(p=p, v=answer), rng.randrange(cfg.documents)))
        q, tag = SINGLE[kind][1].format(p=p), kind
    for j in range(cfg.distractors):  # the first is of the asked kind: the answer's type alone does not give it away
        k = answer_kind if j == 0 else rng.choice(sorted(SINGLE))
        facts.append((SINGLE[k][0].format(p=names.draw("person"), v=names.draw(k)), rng.randrange(cfg.documents)))
    choices = None
    if rng.random() < cfg.multiple_choice:
        while len(names.by_kind[answer_kind]) < 4:  # wrong options: the example's own values first
            names.draw(answer_kind)
        choices = rng.sample([v for v in names.by_kind[answer_kind] if v != answer], 3) + [answer]
        rng.shuffle(choices)
        tag += "-choice"
    docs = [_filler(rng, pool, cfg.doc_words) for _ in range(cfg.documents)]
    for sentence, d in facts:
        at = rng.randrange(len(docs[d]))
        docs[d][at] += " " + sentence
    return QAExample(id=f"dev-{i:04d}-{tag}", documents=["\n\n".join(d) for d in docs], question=q,
                     answers=[answer], choices=choices)


def _filler(rng: random.Random, pool: list[str], words: int) -> list[str]:
    """Consecutive paragraphs from a random place in the pool, at least ``words`` words."""
    start, out, n = rng.randrange(len(pool)), [], 0
    while n < words:
        out.append(pool[(start + len(out)) % len(pool)])
        n += len(out[-1].split())
    return out
