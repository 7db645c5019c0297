"""Synthetic facts and questions for training the compressor and decoder to keep *facts*.

Facts are made-up (random names, numbers, codes), so answers cannot come from the model's
parametric knowledge: the only way to answer is to read them out of the compressed vectors.
Many templates and question phrasings keep the model from overfitting one format. Nothing here
uses the evaluation needle ("best thing to do in San Francisco") or its template.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ON = ["ka", "lo", "mi", "ra", "ben", "tor", "vel", "sa", "dri", "mon", "ne", "ul", "fa", "zo", "gri", "pe",
       "an", "tal", "or", "is", "quin", "ha", "de", "ru", "shi", "bo", "lem", "ta", "vi", "cor"]
_THINGS = {
    "colour": ["teal", "crimson", "ochre", "lavender", "amber", "indigo", "olive", "coral", "silver", "maroon"],
    "fruit": ["quince", "papaya", "lychee", "apricot", "persimmon", "guava", "fig", "kumquat", "mango", "plum"],
    "instrument": ["cello", "oboe", "banjo", "harp", "trombone", "sitar", "clarinet", "accordion", "viola", "tuba"],
    "animal": ["otter", "heron", "lynx", "badger", "gecko", "walrus", "falcon", "tapir", "marmot", "ibis"],
    "sport": ["fencing", "curling", "rowing", "archery", "polo", "squash", "judo", "lacrosse", "sailing", "hurling"],
    "dish": ["lentil soup", "fish pie", "mushroom risotto", "beef stew", "onion tart", "bean chili", "crab cakes"],
}
_PLACES = ["the harbor", "the old mill", "the north tower", "the library basement", "the orchard", "the train depot",
           "the glass house", "the east quay", "the chapel garden", "the weather station"]
_TASKS = ["sign the contracts", "test the engines", "paint the hangar", "hire two pilots", "order new tyres",
          "call the mayor", "clean the gutters", "book the hall", "print the tickets", "repair the fence",
          "feed the goats", "update the maps", "wash the vans", "count the chairs", "tune the piano"]
_TIMETABLE = [("the ferry", "leaves", "leave"), ("the museum", "opens", "open"), ("the night train", "arrives", "arrive"),
              ("the market", "closes", "close")]
_PASTIMES = ["swim in the lake", "read old newspapers", "fix bicycles", "bake rye bread", "walk the dogs",
             "play the organ", "visit the flea market", "paint model boats", "climb the water tower", "write letters",
             "watch the freight trains", "grow tomatoes", "sing in the choir", "repair clocks", "feed the pigeons"]
_ERRANDS = ["buy fresh bread", "drink a coffee", "take a short nap", "call an old friend", "wash the car",
            "water the plants", "light a candle", "stretch for ten minutes", "tidy the desk", "post a letter"]
_SPOTS = ["sit by {} Fountain", "walk along {} Canal", "read on the steps of {} Hall", "feed the ducks at {} Pond",
          "wait under the clock of {} Station", "sketch the boats in {} Harbour", "rest in the shade of {} Square"]
_WHEN = ["on a windy evening", "before the shops close", "after the first frost", "until the lights come on",
         "on a quiet Sunday morning", "when the rain stops", "in late autumn"]
_ITEMS = ["spare key", "silver trophy", "old logbook", "first-aid kit", "red ledger", "brass telescope", "map case"]


def _name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(_ON) for _ in range(parts)).capitalize()


def _person(rng: random.Random) -> str:
    return f"{_name(rng, rng.randint(2, 3))} {_name(rng, rng.randint(2, 3))}"


def _code(rng: random.Random) -> str:
    return rng.choice(["{l}{l}-{d}{d}{d}{d}", "{d}{d}{d}{d}{d}", "{l}{d}{l}{d}{l}{d}", "{d}{d}{d}-{d}{d}{d}"]).format_map(
        _Rand(rng))


class _Rand(dict):
    def __init__(self, rng: random.Random):
        super().__init__()
        self.rng = rng

    def __missing__(self, key: str) -> str:
        return self.rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") if key == "l" else str(self.rng.randint(0, 9))


@dataclass
class Fact:
    sentences: list[str]  # one sentence, or several (multi-hop) to place in different chunks
    question: str
    answer: str
    kind: int = -1  # the template family (make_fact's ``kind``)


KINDS = 16
# kinds whose subject is drawn from a large space (a random person or name): two facts of one of these kinds
# never share a subject, so one can be the other's distractor (kinds 1, 4 and 9 pick from short lists)
MANY_SUBJECTS = frozenset(range(KINDS)) - {1, 4, 9}


def make_fact(rng: random.Random, kind: int | None = None) -> Fact:
    """One random fact with a question whose answer is a span of the fact; ``kind`` (0..KINDS-1) picks the
    template family, e.g. to draw plausible wrong options for a multiple-choice question."""
    kind = rng.randrange(KINDS) if kind is None else kind
    fact = _fact(rng, kind)
    fact.kind = kind
    return fact


def _fact(rng: random.Random, kind: int) -> Fact:
    p = _person(rng)
    if kind == 0:
        cat = rng.choice(list(_THINGS))
        v = rng.choice(_THINGS[cat])
        s = rng.choice([f"{p}'s favourite {cat} is the {v}.", f"The favourite {cat} of {p} is the {v}.",
                        f"Everyone knows that {p} likes the {v} more than any other {cat}."])
        q = rng.choice([f"What is {p}'s favourite {cat}?", f"Which {cat} does {p} like most?"])
        return Fact([s], q, f"the {v}" if rng.random() < 0.5 else v)
    if kind == 1:
        v, thing = _code(rng), rng.choice(["safe", "blue vault", "server room", "boathouse", "archive door"])
        s = rng.choice([f"The code for the {thing} is {v}.", f"To open the {thing}, enter {v}.",
                        f"Remember: the {thing} code is {v}."])
        return Fact([s], rng.choice([f"What is the code for the {thing}?", f"Which code opens the {thing}?"]), v)
    if kind == 2:
        year, city = rng.randint(1700, 2020), _name(rng, 3)
        s = rng.choice([f"{p} was born in {city} in {year}.", f"In {year}, {p} was born in the town of {city}."])
        if rng.random() < 0.5:
            return Fact([s], rng.choice([f"In which year was {p} born?", f"When was {p} born?"]), str(year))
        return Fact([s], rng.choice([f"Where was {p} born?", f"In which town was {p} born?"]), city)
    if kind == 3:  # a two-part answer ("X and Y"): the whole span must come back, not its first half
        t1, t2 = rng.sample(_TASKS, 2)
        event = rng.choice(["the launch", "the audit", "the wedding", "the harvest fair", "the move", "the concert"])
        s = rng.choice([f"Before {event}, {p} had to {t1} and {t2}.", f"{p}'s list for {event} said: {t1} and {t2}."])
        q = rng.choice([f"What did {p} have to do before {event}?", f"What was on {p}'s list for {event}?"])
        return Fact([s], q, f"{t1} and {t2}")
    if kind == 4:
        n, item = rng.randint(2, 9999), rng.choice(["lamps", "books", "chairs", "bicycles", "paintings", "clocks"])
        place = rng.choice(_PLACES)
        s = rng.choice([f"There are exactly {n} {item} in {place}.", f"Someone counted {n} {item} in {place}."])
        return Fact([s], rng.choice([f"How many {item} are in {place}?", f"What is the number of {item} in {place}?"]), str(n))
    if kind == 5:
        key, val = _code(rng), _name(rng, 3)
        s = rng.choice([f"Key {key} maps to the value {val}.", f"The entry for {key} reads {val}."])
        return Fact([s], rng.choice([f"What value does key {key} map to?", f"What is the entry for {key}?"]), val)
    if kind == 6:  # two-hop: person -> company -> city, facts in different places
        comp, city = _name(rng, 3) + " " + rng.choice(["Ltd", "Works", "Labs", "Trading"]), _name(rng, 3)
        return Fact([f"{p} works for {comp}.", f"{comp} has its headquarters in {city}."],
                    f"In which city is the headquarters of the company {p} works for?", city)
    if kind == 7:
        pet = _name(rng, 2)
        return Fact([f"{p} keeps a pet {rng.choice(_THINGS['animal'])} called {pet}."],
                    rng.choice([f"What is the name of {p}'s pet?", f"What is {p}'s pet called?"]), pet)
    if kind == 8:  # a second two-part answer, in real-life wording ("X and Y" after a long context)
        a1, a2 = rng.sample(_PASTIMES, 2)
        day, town = rng.choice(["Sunday", "Saturday", "holiday", "rainy day"]), _name(rng, 3)
        s, q = rng.choice([(f"On a {day}, {p} likes to {a1} and {a2}.", f"What does {p} like to do on a {day}?"),
                           (f"Whenever {p} is in {town}, the plan is to {a1} and {a2}.",
                            f"What is {p}'s plan whenever {p} is in {town}?")])
        return Fact([s], q, f"{a1} and {a2}")
    if kind == 9:
        item, place = rng.choice(_ITEMS), rng.choice(_PLACES)
        s = rng.choice([f"The {item} is kept in {place}.", f"Nobody remembers that the {item} was moved to {place}."])
        return Fact([s], rng.choice([f"Where is the {item} kept?", f"Where can the {item} be found?"]), place)
    if kind == 10:
        partner, rel = _person(rng), rng.choice(["married to", "the sister of", "the business partner of", "mentored by"])
        return Fact([f"{p} is {rel} {partner}."], f"Who is {p} {rel}?", partner)
    if kind == 11:
        n, unit = rng.randint(3, 950), rng.choice(["metres long", "kilograms heavy", "years old", "metres tall"])
        thing = f"the {rng.choice(['bridge', 'statue', 'oak', 'boat', 'bell'])} of {_name(rng, 3)}"
        s = rng.choice([f"{thing[0].upper()}{thing[1:]} is {n} {unit}.", f"According to the guide, {thing} is {n} {unit}."])
        return Fact([s], f"How {unit.split()[1]} is {thing}?", f"{n} {unit.split()[0]}")
    if kind == 12:
        hh, mm = rng.randint(1, 12), rng.choice(["00", "15", "20", "30", "45", "50"])
        subject, says, asks = rng.choice(_TIMETABLE)
        town = _name(rng, 3)
        return Fact([f"In {town}, {subject} {says} at {hh}:{mm}."], f"When does {subject} {asks} in {town}?", f"{hh}:{mm}")
    if kind == 13:  # a long two-part answer whose second part carries a name and a time ("X and Y at <Name> Pond in Z")
        a1, a2 = rng.choice(_ERRANDS), rng.choice(_SPOTS).format(_name(rng, 3)) + " " + rng.choice(_WHEN)
        s, q = rng.choice([(f"{p}'s doctor says the cure for a long week is to {a1} and {a2}.",
                            f"What does {p}'s doctor say is the cure for a long week?"),
                           (f"For {p}, a perfect day off means to {a1} and {a2}.",
                            f"What does a perfect day off mean for {p}?"),
                           (f"{p} left a note saying: {a1} and {a2}.", f"What did {p}'s note say?")])
        return Fact([s], q, f"{a1} and {a2}")
    if kind == 14:  # a meeting's room or day
        room, day = rng.randint(100, 999), rng.choice(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"])
        s = f"The {rng.choice(['budget', 'design', 'safety', 'planning'])} meeting led by {p} is on {day} in room {room}."
        if rng.random() < 0.5:
            return Fact([s], f"In which room is the meeting led by {p}?", str(room))
        return Fact([s], f"On which day is the meeting led by {p}?", day)
    if kind == 15:  # a person's number of 3-6 digits: among other people's numbers, only the name tells them apart
        label = rng.choice(["locker number", "PIN", "phone extension", "membership number", "ticket number", "badge number"])
        digits = rng.randint(3, 6)
        n = str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))
        s = rng.choice([f"{p}'s {label} is {n}.", f"The {label} of {p} is {n}.", f"{p} was given the {label} {n}."])
        return Fact([s], rng.choice([f"What is {p}'s {label}?", f"Which {label} does {p} have?"]), n)
    raise ValueError(f"fact kinds are 0..{KINDS - 1}, got {kind}")


def insert_sentence(text: str, sentence: str, rng: random.Random) -> str:
    """Put ``sentence`` at a random sentence boundary of ``text`` (or at either end)."""
    cuts = [0] + [i + 2 for i in range(len(text) - 1) if text[i] in ".!?\n" and text[i + 1] in " \n"] + [len(text)]
    at = rng.choice(cuts)
    before, after = text[:at].rstrip(" "), text[at:].lstrip(" ")
    return f"{before} {sentence} {after}".strip()
