"""A generated world of fictional people and their facts (the demo's knowledge source).

Everything here is invented, so no model can know it beforehand. The vocabulary (names,
values, sentence templates) is fixed; a seed decides which person gets which facts, how
documents are worded, and which people are held back from pretraining as "new".

Question phrasings come in two groups per attribute: TRAIN phrasings (used by pretraining
for question writing and by the demo's QA generation and injection) and HELD-OUT phrasings
(only for evaluation, so the injected knowledge is tested with wording the student never
trained on). Pretraining's reading task uses both groups: the base model must understand
every phrasing when the document is in its prompt.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

QUESTION_WRITING_PROMPT = "Write a question about this text."

_SYLLABLES = [
    "ka", "lo", "mir", "ven", "tor", "sa", "bel", "dra", "ni", "qu", "ra", "sel", "vo",
    "zan", "eth", "mor", "pil", "ush", "gar", "fen", "ti", "wyn", "ho", "lar",
]


def _invented_words(n: int, rng: random.Random, syllables: int, taken: set) -> list[str]:
    words = []
    while len(words) < n:
        w = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()
        if w not in taken:
            taken.add(w)
            words.append(w)
    return words


def _fixed_pools() -> dict:
    """The closed vocabulary of the world; independent of the seed."""
    rng = random.Random(20241121)
    taken: set = set()
    return {
        "first_names": _invented_words(70, rng, 2, taken),
        "last_names": _invented_words(70, rng, 3, taken),
        "birthplace": _invented_words(30, rng, 2, taken),
        "profession": [
            "baker", "pilot", "tailor", "farmer", "painter", "sailor", "doctor", "lawyer",
            "banker", "chemist", "carpenter", "potter", "weaver", "miner", "fisher", "nurse",
            "cook", "judge", "poet", "mason", "brewer", "glazier", "plumber", "surveyor",
            "teacher", "jeweler", "printer", "gardener", "dentist", "sculptor",
        ],
        "year": [str(y) for y in range(1901, 1991, 3)],
        "pet": [
            "cat", "dog", "parrot", "tortoise", "rabbit", "hamster", "goldfish", "ferret",
            "lizard", "canary", "goat", "pony", "snake", "owl", "frog", "pig", "duck",
            "hedgehog", "crow", "spider",
        ],
        "instrument": [
            "violin", "cello", "flute", "harp", "piano", "drum", "trumpet", "guitar", "lute",
            "banjo", "clarinet", "tuba", "viola", "bagpipe", "mandolin",
        ],
        "employer": [
            f"{a} {b}"
            for a, b in zip(
                ["Silver", "Copper", "Northern", "Golden", "Crimson", "Iron", "Blue", "Granite",
                 "Silver", "Copper", "Northern", "Golden", "Crimson", "Iron", "Blue", "Granite",
                 "Amber", "Amber", "Velvet", "Velvet"],
                ["Foundry", "Mills", "Press", "Labs", "Works", "Bank", "Freight", "Textiles",
                 "Press", "Bank", "Mills", "Freight", "Labs", "Textiles", "Works", "Foundry",
                 "Mills", "Labs", "Press", "Bank"],
            )
        ],
    }


POOLS = _fixed_pools()
ATTRIBUTES = ("birthplace", "profession", "employer", "year", "pet", "instrument")

FACT_TEMPLATES = {
    "birthplace": [
        "{name} was born in {v}.", "{name} comes from {v}.", "The hometown of {name} is {v}.",
        "{name} grew up in {v}.", "{v} is where {name} was born.",
    ],
    "profession": [
        "{name} works as a {v}.", "{name} is a {v} by trade.", "By profession, {name} is a {v}.",
        "The job of {name} is {v}.", "{name} earns a living as a {v}.",
    ],
    "employer": [
        "{name} is employed by {v}.", "{name} works for {v}.", "The employer of {name} is {v}.",
        "{v} employs {name}.", "{name} has a job at {v}.",
    ],
    "year": [
        "{name} was born in the year {v}.", "The birth year of {name} is {v}.",
        "{name} came into the world in {v}.", "In {v}, {name} was born.",
        "The year {name} was born is {v}.",
    ],
    "pet": [
        "{name} owns a {v}.", "{name} has a pet {v}.", "The pet of {name} is a {v}.",
        "{name} lives with a {v}.", "A {v} is the pet of {name}.",
    ],
    "instrument": [
        "{name} plays the {v}.", "{name} is skilled at the {v}.",
        "The instrument of {name} is the {v}.", "{name} practices the {v}.",
        "In the evenings, {name} plays the {v}.",
    ],
}

N_TRAIN_PHRASINGS = 5
QUESTION_TEMPLATES = {  # the first N_TRAIN_PHRASINGS are train phrasings, the rest held out
    "birthplace": [
        "Where was {name} born?", "In which city was {name} born?",
        "What is the birthplace of {name}?", "Which city does {name} come from?",
        "What is the hometown of {name}?",
        "Where does {name} come from?", "Name the city where {name} was born.",
        "Which town is the birthplace of {name}?",
    ],
    "profession": [
        "What does {name} do for a living?", "What is the profession of {name}?",
        "What job does {name} have?", "What is the occupation of {name}?",
        "What does {name} work as?",
        "Which profession does {name} practice?", "What is {name} by trade?",
        "What kind of work does {name} do?",
    ],
    "employer": [
        "Who employs {name}?", "Which company does {name} work for?",
        "Who is the employer of {name}?", "Where is {name} employed?",
        "For which company does {name} work?",
        "What company employs {name}?", "Which firm does {name} work at?",
        "Name the employer of {name}.",
    ],
    "year": [
        "In which year was {name} born?", "When was {name} born?",
        "What is the birth year of {name}?", "In what year was {name} born?",
        "What year was {name} born in?",
        "Which year is the birth year of {name}?", "In which year did {name} come into the world?",
        "Name the year {name} was born.",
    ],
    "pet": [
        "What pet does {name} own?", "What animal does {name} keep as a pet?",
        "What is the pet of {name}?", "Which pet does {name} have?",
        "What kind of pet does {name} have?",
        "What animal lives with {name}?", "Which animal is the pet of {name}?",
        "Name the pet of {name}.",
    ],
    "instrument": [
        "What instrument does {name} play?", "Which instrument does {name} play?",
        "What is the instrument of {name}?", "What does {name} play?",
        "Which musical instrument does {name} practice?",
        "What instrument is {name} skilled at?", "Name the instrument {name} plays.",
        "Which instrument is played by {name}?",
    ],
}


@dataclass(frozen=True)
class Entity:
    """One fictional person and their six facts."""

    name: str
    facts: dict  # attribute -> value


def question(entity: Entity, attribute: str, phrasing: int) -> str:
    return QUESTION_TEMPLATES[attribute][phrasing].format(name=entity.name)


def train_phrasings(attribute: str) -> range:
    return range(N_TRAIN_PHRASINGS)


def held_out_phrasings(attribute: str) -> range:
    return range(N_TRAIN_PHRASINGS, len(QUESTION_TEMPLATES[attribute]))


def render_document(entity: Entity, rng: random.Random) -> str:
    """One sentence per fact, random templates in a random order."""
    sentences = [
        rng.choice(FACT_TEMPLATES[a]).format(name=entity.name, v=entity.facts[a]) for a in ATTRIBUTES
    ]
    rng.shuffle(sentences)
    return " ".join(sentences)


class World:
    """People for pretraining plus `n_new` (and `n_control`) people never seen in pretraining.

    Deterministic for a seed: the same seed gives the same people, facts and documents.
    """

    MAX_NEW = 30

    def __init__(self, seed: int = 0, n_pretrain: int = 4000, n_new: int = MAX_NEW, exclude=()):
        """exclude: names that must not be new people (e.g. people another pretraining stage
        with another world seed saw); new people are the first others after the pretraining ones."""
        if n_pretrain < 1 or n_new < 1:
            raise ValueError(f"n_pretrain and n_new must be >= 1, got {n_pretrain}, {n_new}")
        names = [f"{f} {l}" for f in POOLS["first_names"] for l in POOLS["last_names"]]
        if n_pretrain + n_new > len(names):
            raise ValueError(f"n_pretrain + n_new must be <= {len(names)} (distinct names)")
        self.seed = seed
        rng = random.Random(seed)
        rng.shuffle(names)
        people = [Entity(n, {a: rng.choice(POOLS[a]) for a in ATTRIBUTES}) for n in names]
        self.pretrain_entities = people[:n_pretrain]
        exclude = set(exclude)
        self.new_entities = [p for p in people[n_pretrain:] if p.name not in exclude][:n_new]
        if len(self.new_entities) < n_new:
            raise ValueError(f"exclude leaves only {len(self.new_entities)} new people, need n_new={n_new}")
        doc_rng = random.Random(seed + 1)
        self.new_documents = [
            {"id": f"new-{i:03d}", "title": e.name, "text": render_document(e, doc_rng)}
            for i, e in enumerate(self.new_entities)
        ]

    def eval_questions(self, per_fact: int = 3, seed: int = 0, n_documents: int | None = None) -> list[dict]:
        """Held-out-phrasing questions about the (first n_documents) new people, with answers."""
        rng = random.Random(seed)
        rows = []
        pairs = list(zip(self.new_documents, self.new_entities))[:n_documents]
        for doc, ent in pairs:
            for a in ATTRIBUTES:
                phrasings = list(held_out_phrasings(a))
                for p in sorted(rng.sample(phrasings, min(per_fact, len(phrasings)))):
                    rows.append({"doc_id": doc["id"], "question": question(ent, a, p), "answer": ent.facts[a]})
        return rows

    def reading_examples(self, n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
        """Documents and QA pairs (any phrasing) about pretraining people, for replay and the gate.

        Returns `(documents, qa_rows)` with qa rows `{"doc_id", "question", "answer"}`.
        """
        rng = random.Random(seed)
        docs, rows = [], []
        for i, ent in enumerate(rng.sample(self.pretrain_entities, n)):
            doc = {"id": f"read-{i:04d}", "title": ent.name, "text": render_document(ent, rng)}
            docs.append(doc)
            a = rng.choice(ATTRIBUTES)
            p = rng.randrange(len(QUESTION_TEMPLATES[a]))
            rows.append({"doc_id": doc["id"], "question": question(ent, a, p), "answer": ent.facts[a]})
        return docs, rows


def all_texts() -> list[str]:
    """Every piece of text the world can produce (builds the closed word-level vocabulary)."""
    texts = [QUESTION_WRITING_PROMPT]
    for pool in POOLS.values():
        texts.extend(pool)
    for a in ATTRIBUTES:
        texts.extend(FACT_TEMPLATES[a])
        texts.extend(QUESTION_TEMPLATES[a])
    return texts
