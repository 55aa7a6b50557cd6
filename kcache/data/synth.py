"""Deterministic fictional-fact samples: the demo data set.

Invented countries with invented attributes, so a pretrained model cannot know the answer
without the knowledge. Each sample asks about one fact; its knowledge holds that fact plus
distractor facts about other countries. Paraphrased questions and neighbour prompts (real
countries' facts for the same relation, which an edit must not change) make the same set
usable for editing metrics (ES / PS / NS). The output depends only on ``n`` and ``seed``.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa

from kcache.data.samples import samples_from_records

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gl", "kr", "pl", "qu",
           "st", "th", "tr", "vr", "zh"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "ia"]
_CODAS = ["", "", "n", "r", "l", "m", "s", "th", "nd", "rk", "lt"]

# relation -> (fact template, question paraphrases, real-world neighbours (subject, answer), value kind)
RELATIONS: dict[str, dict] = {
    "capital": {
        "fact": "The capital of {s} is {o}.",
        "questions": ["What is the capital of {s}?", "Which city is the capital of {s}?",
                      "Name the capital city of {s}."],
        "neighbours": [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"),
                       ("Germany", "Berlin")],
        "kind": "city",
    },
    "language": {
        "fact": "The official language of {s} is {o}.",
        "questions": ["What is the official language of {s}?", "Which language do people speak in {s}?",
                      "What language is official in {s}?"],
        "neighbours": [("France", "French"), ("Brazil", "Portuguese"), ("Germany", "German"), ("Japan", "Japanese"),
                       ("Italy", "Italian")],
        "kind": "language",
    },
    "currency": {
        "fact": "The currency of {s} is the {o}.",
        "questions": ["What is the currency of {s}?", "Which currency is used in {s}?",
                      "What money do people use in {s}?"],
        "neighbours": [("Japan", "yen"), ("India", "rupee"), ("Russia", "ruble"), ("Mexico", "peso"),
                       ("Sweden", "krona")],
        "kind": "currency",
    },
    "leader": {
        "fact": "The president of {s} is {o}.",
        "questions": ["Who is the president of {s}?", "Who leads {s} as president?", "Name the president of {s}."],
        "neighbours": [],
        "kind": "person",
    },
    "animal": {
        "fact": "The national animal of {s} is the {o}.",
        "questions": ["What is the national animal of {s}?", "Which animal is the national animal of {s}?",
                      "Name the national animal of {s}."],
        "neighbours": [("Australia", "kangaroo"), ("China", "panda"), ("Scotland", "unicorn"), ("India", "tiger")],
        "kind": "animal",
    },
}

_ANIMALS = ["otter", "heron", "lynx", "badger", "ibis", "marten", "gecko", "tapir", "okapi", "jackal", "stoat", "egret"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                   for _ in range(syllables)).capitalize()


def _value(rng: random.Random, kind: str) -> str:
    if kind == "city":
        return _word(rng, 2)
    if kind == "language":
        return _word(rng, 2) + rng.choice(["ish", "ese", "ian", "i"])
    if kind == "currency":
        return _word(rng, 1).lower()
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, 2)}"
    if kind == "animal":
        return rng.choice(_ANIMALS)
    raise ValueError(kind)


def synth_records(n: int = 1200, seed: int = 0, distractors: int = 3, split_fractions=(0.8, 0.1, 0.1)) -> list[dict]:
    """``n`` fictional-fact sample dicts (schema ``samples-v1``), deterministic in ``seed``."""
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = random.Random(seed)
    n_countries = max(2, (n + len(RELATIONS) - 1) // len(RELATIONS))
    names: list[str] = []
    while len(names) < n_countries:
        name = _word(rng, rng.choice([2, 3]))
        if name not in names:
            names.append(name)
    world = {c: {r: _value(rng, spec["kind"]) for r, spec in RELATIONS.items()} for c in names}
    facts = [(c, r) for c in names for r in RELATIONS]
    rng.shuffle(facts)
    facts = facts[:n]

    n_train = round(n * split_fractions[0])
    n_val = round(n * split_fractions[1])
    records = []
    for i, (country, rel) in enumerate(facts):
        spec = RELATIONS[rel]
        obj = world[country][rel]
        others = [f for f in rng.sample(facts, min(len(facts), distractors + 1)) if f != (country, rel)][:distractors]
        knowledge = [spec["fact"].format(s=country, o=obj)] + [
            RELATIONS[r2]["fact"].format(s=c2, o=world[c2][r2]) for c2, r2 in others
        ]
        rng.shuffle(knowledge)
        q, *paras = rng.sample(spec["questions"], len(spec["questions"]))
        alt = _value(rng, spec["kind"])
        while alt == obj:
            alt = _value(rng, spec["kind"])
        if spec["neighbours"]:
            neigh = [{"prompt": f"[USR] {spec['questions'][0].format(s=s)} [SYS]",
                      "target": f" {o}."} for s, o in rng.sample(spec["neighbours"], 2)]
        else:  # no real-world counterpart: another invented country's fact, taken from its own knowledge
            c2 = rng.choice([c for c in names if c != country])
            neigh = [{"prompt": f"[USR] {spec['questions'][0].format(s=c2)} [SYS]", "target": f" {world[c2][rel]}."}]
        split = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
        records.append(
            {
                "id": f"synth-{seed}-{i:06d}",
                "dataset": "synth",
                "split": split,
                "knowledge": knowledge,
                "source": f"[USR] {q.format(s=country)} [SYS]",
                "target": f" {obj}.",
                "target_true": f" {alt}.",
                "paraphrases": [f"[USR] {p.format(s=country)} [SYS]" for p in paras],
                "neighbours": neigh,
                "meta": json.dumps({"subject": country, "relation": rel, "object": obj}),
            }
        )
    return records


def synth_samples(n: int = 1200, seed: int = 0, distractors: int = 3) -> pa.Table:
    """The synthetic samples as a validated Arrow table."""
    return samples_from_records(synth_records(n, seed, distractors), f"<synth n={n} seed={seed}>")
