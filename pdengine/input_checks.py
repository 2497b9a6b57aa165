"""Checks on what goes into the pipeline, before it is trained on or scored.

Each check is a pure function of the stage's inputs (a tokenizer, documents, questions or
QA pairs): it returns an `InputReport` (counts and one-line warnings) and prints the
warnings on stderr, one line each, with counts, in the form the stages already use
(`answer: warning: 3 of 90 ...`). A check raises `InputError` only where going on would
give a meaningless result: most of the text unknown to the tokenizer, no eval question
whose document is known, every answer empty.

- `check_unknown_tokens`: the share of `<unk>` tokens in documents and questions (a word
  tokenizer, or a text in a script the model never saw, turns facts into `<unk>`).
- `check_questions_per_document`: documents that got fewer questions than asked.
- `check_answers`: empty or truncated answers, dropped and counted (never trained on).
- `check_near_duplicates`: questions of a document that say the same thing (same
  normalised text, or a high token overlap): they weigh that fact several times.
Eval questions whose document is missing are an error, counted, in evaluate.check_eval_inputs
(every method must answer the same questions, so none can be dropped silently).

See docs/DESIGN.md, "Conventions" (errors and warnings) and "Method" (the stages).
"""
from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field

from pdengine.documents import doc_key, index_documents
from pdengine.errors import InputError

UNK_WARN_SHARE = 0.03   # a few percent of <unk>: facts are being lost
UNK_ERROR_SHARE = 0.5   # half the text unknown: nothing left worth injecting
DUPLICATE_OVERLAP = 0.8  # word-set Jaccard at or above which two questions say the same
_EXAMPLES = 3           # ids named in a warning line at most
_TOKENIZE_BATCH = 256   # texts per tokenizer call (fast tokenizers batch in Rust)


@dataclass
class InputReport:
    """What one check found: `counts` (name -> number) and the warning lines it printed.
    `kept` holds the rows that survive a check that drops some (check_answers)."""

    check: str
    counts: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    kept: list | None = None

    @property
    def ok(self) -> bool:
        return not self.warnings


def _emit(report: InputReport, stage: str, message: str, stream) -> None:
    line = f"{stage}: warning: {message}"
    report.warnings.append(line)
    print(line, file=stream or sys.stderr, flush=True)


def _examples(ids) -> str:
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:_EXAMPLES])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > _EXAMPLES else "")


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.1f} %" if whole else "0 %"


# ---------------------------------------------------------------- <unk> tokens


def unknown_token_counts(tokenizer, texts) -> tuple[int, int]:
    """(number of `<unk>` tokens, number of tokens) over `texts`; (0, n) for a tokenizer
    without an unknown token (byte-level BPE can spell anything)."""
    unk_id = getattr(tokenizer, "unk_token_id", None)
    texts = list(texts)
    unknown = total = 0
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        # verbose=False: a document longer than the model's context is not this check's concern
        batch = tokenizer(texts[start:start + _TOKENIZE_BATCH], add_special_tokens=False, verbose=False)
        for ids in batch["input_ids"]:
            total += len(ids)
            if unk_id is not None:
                unknown += sum(1 for i in ids if i == unk_id)
    return unknown, total


def check_unknown_tokens(tokenizer, documents, questions=(), *, stage: str = "input",
                         warn_above: float = UNK_WARN_SHARE, error_above: float = UNK_ERROR_SHARE,
                         stream=None) -> InputReport:
    """The share of `<unk>` tokens in the documents' texts and in the questions.

    Warns above `warn_above` (default 3 %); InputError above `error_above` (default 50 %):
    the model cannot read such text, so nothing it learns from it is the documents' content."""
    report = InputReport("unknown_tokens")
    docs = index_documents(documents)
    parts = {"documents": [d["text"] for d in docs.values()],
             "questions": [q["question"] for q in questions if isinstance(q.get("question"), str)]}
    for name, texts in parts.items():
        if not texts:
            continue
        unknown, total = unknown_token_counts(tokenizer, texts)
        share = unknown / total if total else 0.0
        report.counts.update({f"{name}_unknown_tokens": unknown, f"{name}_tokens": total, f"{name}_share": share})
        what = f"{unknown} of {total} tokens ({_percent(unknown, total)}) of the {name} are {tokenizer.unk_token!r}"
        if share > error_above:
            raise InputError(f"{stage}: {what}: the model cannot read this text (wrong tokenizer or an unsupported "
                             f"script?); fix the {name} or use a model whose tokenizer covers them")
        if share > warn_above:
            _emit(report, stage, f"{what}; those words are lost to the model", stream)
    return report


# ---------------------------------------------------------------- questions per document


def check_questions_per_document(documents, questions, requested: int, *, stage: str = "generate",
                                 stream=None) -> InputReport:
    """Documents with fewer than `requested` questions (none at all counts too)."""
    docs = index_documents(documents)
    per_doc = dict.fromkeys(docs, 0)
    for q in questions:
        key = doc_key(q.get("doc_id")) if isinstance(q, dict) else None
        if key in per_doc:
            per_doc[key] += 1
    short = [k for k, n in per_doc.items() if n < requested]
    empty = [k for k, n in per_doc.items() if n == 0]
    report = InputReport("questions_per_document", counts={
        "documents": len(docs), "questions": sum(per_doc.values()), "requested_per_document": requested,
        "documents_short": len(short), "documents_without_questions": len(empty),
        "fewest": min(per_doc.values())})
    if short:
        _emit(report, stage, f"{len(short)} of {len(docs)} documents have fewer than {requested} questions "
              f"({sum(per_doc.values())} of {requested * len(docs)}; fewest {report.counts['fewest']}"
              + (f"; {len(empty)} with none: {_examples(empty)}" if empty else "") + ")", stream)
    return report


# ---------------------------------------------------------------- answers


def _is_empty(row: dict) -> bool:
    ids, text = row.get("answer_ids"), row.get("answer")
    return not ids or not isinstance(text, str) or not text.strip()


def _is_truncated(row: dict, max_new_tokens: int | None) -> bool:
    """Cut off by the generation budget: marked so, or as long as the budget (an answer
    that stopped on its own is shorter: its end-of-turn token counted against it)."""
    if row.get("truncated") is True:
        return True
    return max_new_tokens is not None and len(row.get("answer_ids") or ()) >= max_new_tokens


def check_answers(qa_pairs, *, max_new_tokens: int | None = None, keep_truncated: bool = False,
                  stage: str = "answer", stream=None) -> InputReport:
    """Drop empty answers and (unless `keep_truncated`) truncated ones; `report.kept` holds
    the rest. InputError when nothing is left: training on nothing is not a result."""
    rows = list(qa_pairs)
    empty = [_is_empty(r) for r in rows]
    truncated = [not e and _is_truncated(r, max_new_tokens) for r, e in zip(rows, empty)]
    drop = [e or (t and not keep_truncated) for e, t in zip(empty, truncated)]
    kept = [r for r, d in zip(rows, drop) if not d]
    report = InputReport("answers", kept=kept, counts={
        "answers": len(rows), "empty": sum(empty), "truncated": sum(truncated), "dropped": sum(drop),
        "kept": len(kept)})
    if any(empty) or any(truncated):
        budget = f" at max_new_tokens={max_new_tokens}" if max_new_tokens is not None else ""
        note = " (kept: keep_truncated)" if keep_truncated and any(truncated) else ""
        _emit(report, stage, f"{sum(empty)} of {len(rows)} answers empty, {sum(truncated)} cut off{budget}"
              f"{note}; dropped {sum(drop)}, never trained on", stream)
    if rows and not kept:
        raise InputError(f"{stage}: all {len(rows)} answers are empty or cut off; raise max_new_tokens or "
                         "check the chat template and the model")
    return report


# ---------------------------------------------------------------- near-duplicate questions


def normalized(question: str) -> str:
    """Lower case, letters and digits only, single spaces (as qa.normalize_question)."""
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def token_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two questions' normalised word sets (1.0 = the same words)."""
    return _jaccard(frozenset(normalized(a).split()), frozenset(normalized(b).split()))


def near_duplicate_pairs(questions, *, overlap: float = DUPLICATE_OVERLAP) -> list[tuple[int, int]]:
    """(i, j), i < j, of questions of the same document whose normalised texts are equal or
    whose word overlap is >= `overlap`. Quadratic per document only: questions of
    different documents are never compared."""
    by_doc = defaultdict(list)
    for i, q in enumerate(questions):
        by_doc[doc_key(q["doc_id"])].append((i, frozenset(normalized(q["question"]).split())))
    pairs = []
    for items in by_doc.values():
        for a in range(len(items)):
            i, wi = items[a]
            for j, wj in items[a + 1:]:
                if wi == wj or _jaccard(wi, wj) >= overlap:
                    pairs.append((i, j))
    return sorted(pairs)


def check_near_duplicates(questions, *, overlap: float = DUPLICATE_OVERLAP, stage: str = "generate",
                          stream=None) -> InputReport:
    """Count questions that repeat an earlier one of their document (warned, not dropped:
    several phrasings of one fact are wanted, the same phrasing twice is not)."""
    questions = list(questions)
    pairs = near_duplicate_pairs(questions, overlap=overlap)
    repeats = sorted({j for _, j in pairs})
    docs = {doc_key(questions[j]["doc_id"]) for j in repeats}
    report = InputReport("near_duplicates", counts={"questions": len(questions), "near_duplicates": len(repeats),
                                                    "pairs": len(pairs), "documents": len(docs)})
    if repeats:
        first = questions[pairs[0][0]]["question"], questions[pairs[0][1]]["question"]
        _emit(report, stage, f"{len(repeats)} of {len(questions)} questions repeat another of their document "
              f"(same words or >= {overlap:.0%} word overlap) in {len(docs)} documents, e.g. {first[0]!r} ~ "
              f"{first[1]!r}", stream)
    return report


# ---------------------------------------------------------------- eval questions


__all__ = ["InputReport", "check_unknown_tokens", "check_questions_per_document", "check_answers",
           "check_near_duplicates", "unknown_token_counts", "near_duplicate_pairs",
           "token_overlap", "normalized"]
