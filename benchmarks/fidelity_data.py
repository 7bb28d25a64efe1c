"""Synthetic multi-chunk questions with gold answers, generated deterministically from a seed.

Every question comes with 4 memory chunks in shuffled order: the chunk(s) holding the answer and
distractors about other people. Two kinds:

* one-hop: "Where does Nadia Okafor live?" -- the answer is in one chunk;
* two-hop: "Where does Nadia Okafor's cousin live?" -- one chunk says who the cousin is, another
  where that person lives, so the answer needs facts from two different chunks.

Length bands set how much text surrounds each fact: ``short`` (the bare fact, ~10-20 tokens),
``medium`` (~100 tokens of narrative around it) and ``long`` (~300 tokens).

The main set (:func:`make_lookups`) is below; the long-answer set (:func:`make_long_answers`) asks the
cost curve's questions over the cost curve's memory chunks for free-form answers of ~64 tokens.
"""

from __future__ import annotations

import dataclasses
import random
import re

FIRST = ["Nadia", "Tomas", "Priya", "Kenji", "Amara", "Lukas", "Sofia", "Mateo", "Ingrid", "Yusuf",
         "Elena", "Rafael", "Mei", "Oskar", "Leila", "Dmitri", "Chloe", "Anders", "Fatima", "Hugo",
         "Zara", "Emil", "Noor", "Felix", "Aiko", "Bruno", "Greta", "Omar", "Lucia", "Viktor"]
LAST = ["Okafor", "Lindqvist", "Ramanathan", "Watanabe", "Mensah", "Hoffmann", "Rossi", "Alvarez",
        "Berg", "Demir", "Petrova", "Costa", "Zhang", "Nowak", "Haddad", "Ivanov", "Dubois", "Nilsen",
        "Rahman", "Laurent", "Karimi", "Fischer", "Siddiqui", "Moreau", "Tanaka", "Silva", "Jansen",
        "Aziz", "Romano", "Kowalski"]
CITIES = ["Denver", "Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Lima", "Oslo", "Cairo", "Perth",
          "Dublin", "Seoul", "Austin", "Bergen", "Tunis", "Porto", "Quito", "Hanoi", "Zurich", "Adelaide",
          "Valencia", "Tbilisi", "Calgary", "Bologna", "Accra", "Sapporo", "Tallinn", "Cusco", "Malmo",
          "Halifax"]
RELATIONS = ["sister", "brother", "cousin", "neighbor", "manager", "roommate", "mentor", "uncle"]
FILLER = [
    "The morning had been quiet, with a light rain that stopped before noon.",
    "Most weekends are spent reading, cooking, or walking along the river path.",
    "The local market opens early and sells bread, cheese, and fresh vegetables.",
    "Last spring there was a long trip by train through several small towns.",
    "Friends describe the household as busy, friendly, and a little chaotic.",
    "An old bicycle leans against the wall next to a stack of library books.",
    "The kitchen window looks out over a small garden with tomatoes and herbs.",
    "Evenings usually end with tea and a phone call to an old school friend.",
    "A new hobby this year has been learning to play the acoustic guitar.",
    "The neighborhood has a bakery, a hardware store, and a tiny cinema.",
    "There is a framed map on the hallway wall with pins in visited places.",
    "On holidays the whole family gathers for a long lunch that lasts for hours.",
    "The apartment is on the third floor, and the elevator is often broken.",
    "A favorite recipe is a slow-cooked stew that takes most of a Sunday.",
    "Work has been demanding lately, with several deadlines in the same week.",
    "The winter was colder than usual, and the lake froze for two weeks.",
    "A stray cat visits the back porch most evenings and waits for scraps.",
    "The car needs new tires, but the repair has been postponed twice already.",
    "Saturday football games in the park attract a small but loyal crowd.",
    "The bookshelf is full of travel guides, cookbooks, and detective novels.",
    "A power cut last month lasted the whole night and spoiled the freezer.",
    "Coffee is always made in an old stovetop pot that whistles when ready.",
    "The family dog is elderly now and prefers short, slow walks.",
    "Plans for the summer include painting the fence and fixing the shed roof.",
]
BAND_FILLER_SENTENCES = {"short": 0, "medium": 6, "long": 21}


@dataclasses.dataclass(frozen=True)
class Question:
    qid: str
    band: str
    hops: int
    question: str
    gold: str
    chunks: tuple[str, ...]  # in the order the prompt places them (shuffled)

    @property
    def prompt(self) -> str:
        """What follows the chunks in the user turn. This instruction form lifted SmolLM2-135M's
        full-prefill accuracy from 1/12 to 4/12 (one- and two-hop) over the bare question."""
        return (f"Using the notes above, answer the question. {self.question} "
                "Answer with the name of the city only.")


def _passage(rng: random.Random, fact: str, band: str) -> str:
    sentences = rng.sample(FILLER, BAND_FILLER_SENTENCES[band])
    sentences.insert(rng.randrange(len(sentences) + 1), fact)
    return " ".join(sentences) + "\n"


def make_questions(n: int, *, seed: int = 0, bands=("short", "medium", "long"),
                   two_hop_fraction: float = 0.5) -> list[Question]:
    rng = random.Random(seed)
    people = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(people)
    questions = []
    for i in range(n):
        band = bands[i % len(bands)]
        # Distinct people per question: 900 names give 180 disjoint sets, then random draws.
        group = people[5 * i: 5 * i + 5] if 5 * i + 5 <= len(people) else rng.sample(people, 5)
        person, relative, other1, other2, other3 = group
        city, wrong1, wrong2 = rng.sample(CITIES, 3)
        relation = rng.choice(RELATIONS)
        lives = f"{relative} lives in {city}."
        if rng.random() < two_hop_fraction:
            hops, question = 2, f"Where does {person}'s {relation} live?"
            facts = [f"{person}'s {relation} is {relative}.", lives,
                     f"{other1} lives in {wrong1}.", f"{other2}'s {rng.choice(RELATIONS)} is {other3}."]
        else:
            hops, question = 1, f"Where does {relative} live?"
            facts = [lives, f"{other1} lives in {wrong1}.", f"{other2} lives in {wrong2}.",
                     f"{person}'s {relation} is {other3}."]
        rng.shuffle(facts)
        questions.append(Question(f"q{i:04d}", band, hops, question, city,
                                  tuple(_passage(rng, fact, band) for fact in facts)))
    return questions


# ---------------------------------------------------------------------------- the main set: lookups
#
# Single-fact lookups a full prefill answers: one chunk holds the asked fact about a person, the
# distractor chunks hold facts of *other* kinds (about the same person or others), so the question's
# kind picks one fact out. SmolLM2-135M answered ~0.8 of such lookups among 3 facts of different
# kinds sent as text, but only 0.23-0.45 among 6 facts of one kind, so kinds are never repeated.

PETS = ["Biscuit", "Pepper", "Mochi", "Rex", "Luna", "Ziggy", "Noodle", "Pickles", "Waffles", "Juniper",
        "Maple", "Sprout", "Bandit", "Clover", "Toffee", "Nugget", "Pixel", "Marble", "Domino", "Sherlock"]
COLOURS = ["green", "purple", "orange", "yellow", "blue", "red", "pink", "brown", "silver", "turquoise"]
COMPANIES = ["Siemens", "Toyota", "Nestle", "Samsung", "Boeing", "Adidas", "Nokia", "Heineken", "Lego",
             "Ikea", "Philips", "Spotify", "Ericsson", "Canon", "Volvo", "Unilever", "Shell", "Intel"]
NUMBERS = [str(n) for n in range(12, 98)]

# kind -> (answer vocabulary, fact template, question, instruction)
KINDS = {
    "city": (CITIES, "{p} lives in {a}.", "In which city does {p} live?", "Answer with the name of the city only."),
    "pet": (PETS, "{p} has a dog named {a}.", "What is the name of {p}'s dog?", "Answer with the dog's name only."),
    "colour": (COLOURS, "{p}'s favourite colour is {a}.", "What is {p}'s favourite colour?",
               "Answer with the colour only."),
    "company": (COMPANIES, "{p} works at {a}.", "Which company does {p} work at?",
                "Answer with the name of the company only."),
    "number": (NUMBERS, "{p}'s house number is {a}.", "What is {p}'s house number?", "Answer with the number only."),
}
# The main set's length bands: filler sentences around each fact (~20, ~100 and ~300 tokens a chunk).
LOOKUP_FILLER_SENTENCES = {"short": 1, "medium": 6, "long": 21}
SPLITS = ("test", "calibration")


@dataclasses.dataclass(frozen=True)
class Lookup:
    """A main-set item: same fields the harness reads from a :class:`Question`."""

    qid: str
    band: str
    kind: str
    question: str
    gold: str
    chunks: tuple[str, ...]
    hops: int = 1

    @property
    def prompt(self) -> str:
        return f"Using the notes above, answer the question. {self.question} {KINDS[self.kind][3]}"


def split_people(split: str) -> list[str]:
    """The split's people: test and calibration never share a name (every other full name)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    people = [f"{f} {l}" for f in FIRST for l in LAST]
    return people[SPLITS.index(split)::2]


def make_lookups(n: int, *, seed: int = 0, split: str = "test", bands=("short", "medium", "long"),
                 chunks_per_item: int = 4) -> list[Lookup]:
    """``n`` lookups (round-robin over bands and kinds), ``chunks_per_item`` chunks each: the fact
    asked for and distractors of other kinds, in shuffled order. The calibration split uses other
    people and another random stream (seed offset), so nothing tuned on it has seen a test item."""
    if not 2 <= chunks_per_item <= len(KINDS):
        raise ValueError(f"chunks_per_item must be in [2, {len(KINDS)}]")
    rng = random.Random(seed * 2 + SPLITS.index(split) + 1_000_003)
    people = split_people(split)
    rng.shuffle(people)
    kinds = list(KINDS)
    items = []
    for i in range(n):
        band, kind = bands[i % len(bands)], kinds[(i // len(bands)) % len(kinds)]
        person = people[i % len(people)]
        vocab, fact, question, _ = KINDS[kind]
        gold = rng.choice(vocab)
        facts = [fact.format(p=person, a=gold)]
        for other in rng.sample([k for k in kinds if k != kind], chunks_per_item - 1):
            # Half the distractors are about the same person (the question's kind tells them apart).
            who = person if rng.random() < 0.5 else rng.choice(people)
            facts.append(KINDS[other][1].format(p=who, a=rng.choice(KINDS[other][0])))
        rng.shuffle(facts)
        chunks = tuple(_lookup_passage(rng, f, band) for f in facts)
        items.append(Lookup(f"{split[0]}{i:04d}", band, kind, question.format(p=person), gold, chunks))
    return items


def _lookup_passage(rng: random.Random, fact: str, band: str) -> str:
    sentences = rng.sample(FILLER, LOOKUP_FILLER_SENTENCES[band])
    sentences.insert(rng.randrange(len(sentences) + 1), fact)
    return " ".join(sentences) + "\n"


ANSWER_VOCAB = {w.lower() for vocab, *_ in KINDS.values() for w in vocab}


def extract_answer(text: str) -> str:
    """The normalised answer a reply gives: the first known entity it names (any kind: a wrong
    kind is a wrong answer, not no answer), else its first line lower-cased without punctuation."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    for w in words:
        if w in ANSWER_VOCAB:
            return w
    first = text.strip().splitlines()[0] if text.strip() else ""
    return " ".join(re.findall(r"[a-z0-9]+", first.lower()))


# ---------------------------------------------------------------------------- long free-form answers
#
# The cost curve's memory (benchmarks.cost_curve_data: packed fact chunks of ~250 tokens and document
# passages of ~150-300 tokens) and its questions ("In my travel notes, which city is X connected
# to?"), asked for a free-form answer of a few sentences: the harness compares the whole generated
# text (``--set long``, 64 new tokens by default), where most divergence shows up after the first token.


@dataclasses.dataclass(frozen=True)
class LongAnswer(Lookup):
    """A long-answer item: a :class:`Lookup` asked for a few sentences. ``band`` says what holds the
    answer: a packed ``facts`` chunk or a document ``passage``."""

    @property
    def prompt(self) -> str:
        return f"Using the notes above, answer the question in a few sentences. {self.question}"


def make_long_answers(n: int, *, seed: int = 0, chunks_per_item: int = 4, memory_chunks: int = 48) -> list[LongAnswer]:
    """``n`` items over one cost-curve memory of ``memory_chunks`` chunks: each asks about one person
    whose city the memory names once, with the chunk holding the fact and ``chunks_per_item - 1``
    other chunks of the same topic (so the question's topic does not pick the chunk out), shuffled.
    Round-robin over topics; within a topic over its chunks (passages and fact chunks alternate)."""
    from benchmarks.cost_curve_data import TOPICS, make_memory

    texts, questions, gold = make_memory(memory_chunks, seed=seed)
    rng = random.Random(seed + 7_000_003)
    head, tail = "which city is ", " connected to?"
    items = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        own = [c for c in range(len(texts)) if c % len(TOPICS) == TOPICS.index(topic)]
        target = own[(i // len(TOPICS)) % len(own)]
        asked = [q for q in questions[topic] if len(gold[q]) == 1
                 and _names_in(texts[target], q[q.index(head) + len(head): -len(tail)])]
        question = rng.choice(asked)
        others = rng.sample([c for c in own if c != target], chunks_per_item - 1)
        order = [target, *others]
        rng.shuffle(order)
        band = "passage" if target % 3 == 0 else "facts"
        items.append(LongAnswer(f"l{i:04d}", band, "city", question, next(iter(gold[question])),
                                tuple(texts[c] + "\n" for c in order)))
    return items


def _names_in(text: str, name: str) -> bool:
    """``text`` states ``name``'s city (a fact or a passage heading), not just mentions the name."""
    return f"{name} is connected to " in text or f": {name} from " in text
