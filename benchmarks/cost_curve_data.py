"""The cost curve's memory and conversation (benchmarks.cost_curve): user facts and document
passages by topic, and a slowly drifting sequence of questions about them."""

from __future__ import annotations

import random

from benchmarks.fidelity_data import CITIES, FILLER, FIRST, LAST

TOPICS = ["family", "work", "travel", "health", "hobbies", "home"]


def make_memory(n_chunks: int, facts_per_chunk: int = 16,
                seed: int = 0) -> tuple[list[str], dict[str, list[str]], dict[str, set[str]]]:
    """User facts and document passages; each topic gets a share. Returns (texts, questions by topic,
    gold: question -> the cities the memory connects its person to).

    A third of the chunks are document passages (~150-300 tokens); the rest hold ``facts_per_chunk``
    user facts each (~15 tokens a fact), as the memory layer packs a remembered list of facts into
    chunks of up to ``amem.memory.chunk_tokens`` (256) tokens. ``facts_per_chunk=1``: one short fact
    per chunk (~20 tokens), the worst case for chunk reuse."""
    rng = random.Random(seed)
    texts, questions, gold = [], {t: [] for t in TOPICS}, {}
    for i in range(n_chunks):
        topic = TOPICS[i % len(TOPICS)]
        if i % 3 == 0:  # a document passage
            name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
            body = " ".join(rng.sample(FILLER, rng.randint(8, 14)))
            texts.append(f"Notes on {topic} ({i}): {name} from {city}. {body}")
            questions[topic].append(f"In my {topic} notes, which city is {name} connected to?")
            gold.setdefault(questions[topic][-1], set()).add(city)
            continue
        facts = []
        for _ in range(facts_per_chunk):
            name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
            facts.append(f"{name} is connected to {city} through {topic}.")
            questions[topic].append(f"In my {topic} notes, which city is {name} connected to?")
            gold.setdefault(questions[topic][-1], set()).add(city)
        texts.append(f"The user's {topic} notes ({i}): " + " ".join(facts))
    return texts, questions, gold


def topic_changed(asks: list[str], t: int) -> bool:
    """The conversation moved to another topic at turn ``t`` (a session re-pins its working set)."""
    topic = lambda q: q.split("my ")[1].split(" notes")[0]  # noqa: E731
    return t > 0 and topic(asks[t]) != topic(asks[t - 1])


def turn_questions(questions: dict[str, list[str]], turns: int, seed: int = 1) -> list[str]:
    """A slowly drifting conversation: a topic for several turns, then the next one."""
    rng = random.Random(seed)
    out, topic = [], 0
    for t in range(turns):
        if t and t % 6 == 0:
            topic = (topic + 1) % len(TOPICS)
        out.append(rng.choice(questions[TOPICS[topic]]))
    return out
