"""Answer metrics with SQuAD normalisation (docs/DESIGN.md, "Evaluation").

Normalisation: lower case, no punctuation, no articles a/an/the, single spaces. Exact
match and token F1 as in SQuAD; contains = the normalised reference appears, on word
boundaries, inside the normalised prediction (the demo's headline metric: a model may
answer in a sentence). With several references a prediction gets its best score.
"""
from __future__ import annotations

import collections
import re
import string

from pdengine.errors import InputError

METRICS = ("exact_match", "f1", "contains")

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation, drop a/an/the, collapse spaces."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 on normalised text (1.0 when both are empty, 0.0 when one is)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str, reference: str) -> float:
    """1.0 when the normalised reference occurs in the normalised prediction as whole words."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not ref:
        return float(not pred)
    return float(f" {ref} " in f" {pred} ")


def references(reference) -> list[str]:
    refs = [reference] if isinstance(reference, str) else reference
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
        raise InputError(f"a reference answer must be a string or a non-empty list of strings, got {reference!r}")
    return refs


def score_one(prediction: str, reference) -> dict:
    """`{exact_match, f1, contains}` of one prediction; the best over several references."""
    refs = references(reference)
    return {
        "exact_match": max(exact_match(prediction, r) for r in refs),
        "f1": max(f1(prediction, r) for r in refs),
        "contains": max(contains(prediction, r) for r in refs),
    }


def score(predictions: list[str], references: list) -> dict:
    """Mean exact match, F1 and contains over questions (values in [0, 1]), plus `n`."""
    if len(predictions) != len(references):
        raise InputError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not predictions:
        raise InputError("predictions is empty")
    per = [score_one(p, r) for p, r in zip(predictions, references)]
    means = {m: sum(s[m] for s in per) / len(per) for m in METRICS}
    return {**means, "n": len(per)}
