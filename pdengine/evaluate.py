"""Evaluation (DESIGN.md section 1, step 4): who answers the held-out questions, and how well.

Methods, all with greedy decoding and batched:

- closed book: the question alone (`prompts.student_prompt_ids`), base model or base +
  adapter (the student);
- open book: the teacher, with the right document in its prompt (`prompts.teacher_prompt_ids`),
  i.e. oracle RAG;
- RAG: a small built-in BM25 index over passages of all documents; the top passages go
  into the teacher prompt in place of the document.

Metrics (SQuAD normalisation: lower case, no punctuation, no articles a/an/the, single
spaces): exact match, token F1, and contains (the normalised reference appears, on word
boundaries, inside the normalised prediction). An optional local judge model grades each
answer with a yes/no prompt.

`evaluate(...)` runs everything; `write_report(...)` writes report.json, report.md,
report.png (when matplotlib is installed) and answers.jsonl.
"""
from __future__ import annotations

import collections
import math
import re
import string
import sys
from pathlib import Path

from pdengine import prompts
from pdengine.prompts import DEFAULT_FORMAT, PromptFormat

# method key -> the name it has in reports (the demo's report.json uses these)
METHOD_NAMES = {"closed_book": "base_closed_book", "open_book": "teacher_open_book", "rag": "rag_bm25"}
METRICS = ("exact_match", "f1", "contains")

DEFAULT_JUDGE_PROMPT = (
    "You grade answers to questions. Question: {question}\n"
    "Correct answer: {reference}\nProposed answer: {prediction}\n"
    "Does the proposed answer give the same information as the correct answer? "
    "Reply with one word: yes or no."
)

# ---------------------------------------------------------------- metrics

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


def _references(reference) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"a reference answer must be a string or a non-empty list of strings, got {reference!r}")
    return refs


def score_one(prediction: str, reference) -> dict:
    """`{exact_match, f1, contains}` of one prediction; the best over several references."""
    refs = _references(reference)
    return {
        "exact_match": max(exact_match(prediction, r) for r in refs),
        "f1": max(f1(prediction, r) for r in refs),
        "contains": max(contains(prediction, r) for r in refs),
    }


def score(predictions: list[str], references: list) -> dict:
    """Mean exact match, F1 and contains over questions (values in [0, 1]), plus `n`."""
    if len(predictions) != len(references):
        raise ValueError(f"predictions ({len(predictions)}) and references ({len(references)}) differ in length")
    if not predictions:
        raise ValueError("predictions is empty")
    per = [score_one(p, r) for p, r in zip(predictions, references)]
    means = {m: sum(s[m] for s in per) / len(per) for m in METRICS}
    return {**means, "n": len(per)}


# ---------------------------------------------------------------- BM25 retrieval


def _terms(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 over a list of texts (k1, b as usual; idf = log(1 + (N - df + .5)/(df + .5)))."""

    def __init__(self, texts: list[str], *, k1: float = 1.5, b: float = 0.75):
        if not texts:
            raise ValueError("BM25: texts is empty")
        self.k1, self.b = k1, b
        self._tf = [collections.Counter(_terms(t)) for t in texts]
        self._len = [sum(tf.values()) for tf in self._tf]
        self._avg_len = max(sum(self._len) / len(self._len), 1e-9)
        df = collections.Counter(term for tf in self._tf for term in tf)
        n = len(texts)
        self._idf = {term: math.log(1 + (n - d + 0.5) / (d + 0.5)) for term, d in df.items()}

    def scores(self, query: str) -> list[float]:
        """BM25 score of every text for `query`."""
        terms = [t for t in _terms(query) if t in self._idf]
        out = []
        for tf, length in zip(self._tf, self._len):
            norm = self.k1 * (1 - self.b + self.b * length / self._avg_len)
            out.append(sum(self._idf[t] * tf[t] * (self.k1 + 1) / (tf[t] + norm) for t in terms if t in tf))
        return out

    def top(self, query: str, n: int) -> list[int]:
        """Indices of the n best texts, best first (ties: earlier text first)."""
        s = self.scores(query)
        return sorted(range(len(s)), key=lambda i: (-s[i], i))[:n]


def split_passages(documents: list[dict], passage_words: int = 200) -> list[dict]:
    """Documents cut into passages of at most `passage_words` words: `[{doc_id, text}]`.
    A document that is short enough stays one passage, with its formatting intact."""
    if passage_words < 1:
        raise ValueError(f"passage_words must be >= 1, got {passage_words}")
    passages = []
    for doc in documents:
        words = doc["text"].split()
        if len(words) <= passage_words:
            passages.append({"doc_id": str(doc["id"]), "text": doc["text"]})
            continue
        for start in range(0, len(words), passage_words):
            passages.append({"doc_id": str(doc["id"]), "text": " ".join(words[start:start + passage_words])})
    return passages


def retrieve(documents: list[dict], questions: list[dict], *, top_n: int = 3, passage_words: int = 200) -> list[dict]:
    """For each question, the BM25 top-`top_n` passages: `[{context, doc_ids}]`
    (`context` = the passages joined by blank lines, best first)."""
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    passages = split_passages(documents, passage_words)
    index = BM25([p["text"] for p in passages])
    out = []
    for q in questions:
        best = [passages[i] for i in index.top(q["question"], top_n)]
        out.append({"context": "\n\n".join(p["text"] for p in best), "doc_ids": [p["doc_id"] for p in best]})
    return out


# ---------------------------------------------------------------- answering


def _generate(model, tokenizer, prompt_list, *, max_new_tokens, batch_size, desc, progress) -> list[str]:
    from pdengine import qa

    ids = qa.generate_ids(model, tokenizer, prompt_list, temperature=0.0, max_new_tokens=max_new_tokens,
                          batch_size=batch_size, desc=desc, progress=progress)
    return [qa.decode(tokenizer, x) for x in ids]


def _check_questions(questions, need_answer: bool = False) -> None:
    keys = ("doc_id", "question", "answer") if need_answer else ("question",)
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or any(k not in q for k in keys):
            raise ValueError(f"questions[{i}] must be a dict with {', '.join(map(repr, keys))}")
    if not questions:
        raise ValueError("questions is empty")


def answer_closed_book(model, tokenizer, questions: list[dict], *, fmt: PromptFormat = DEFAULT_FORMAT,
                       max_new_tokens: int = 64, batch_size: int = 16, progress: bool = True) -> list[str]:
    """Greedy answers from the question alone (the student's prompt); one string per question."""
    _check_questions(questions)
    prompt_list = [prompts.student_prompt_ids(tokenizer, q["question"], fmt) for q in questions]
    return _generate(model, tokenizer, prompt_list, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     desc="closed book", progress=progress)


def answer_with_contexts(model, tokenizer, contexts: list[str], questions: list[dict], *,
                         fmt: PromptFormat = DEFAULT_FORMAT, max_new_tokens: int = 64, batch_size: int = 16,
                         desc: str = "open book", progress: bool = True) -> list[str]:
    """Greedy answers with `contexts[i]` in the teacher prompt of question i."""
    _check_questions(questions)
    if len(contexts) != len(questions):
        raise ValueError(f"contexts ({len(contexts)}) and questions ({len(questions)}) differ in length")
    prompt_list = [prompts.teacher_prompt_ids(tokenizer, c, q["question"], fmt) for c, q in zip(contexts, questions)]
    return _generate(model, tokenizer, prompt_list, max_new_tokens=max_new_tokens, batch_size=batch_size,
                     desc=desc, progress=progress)


def answer_open_book(model, tokenizer, documents: list[dict], questions: list[dict], **kwargs) -> list[str]:
    """Greedy teacher answers with the question's own document (by `doc_id`) in the prompt.
    Keyword arguments as `answer_with_contexts` (fmt, max_new_tokens, batch_size, progress)."""
    _check_questions(questions)
    text = {str(d["id"]): d["text"] for d in documents}
    missing = sorted({str(q.get("doc_id")) for q in questions} - set(text))
    if missing:
        raise ValueError(f"questions refer to unknown doc_id(s) {missing[:5]}")
    contexts = [text[str(q["doc_id"])] for q in questions]
    return answer_with_contexts(model, tokenizer, contexts, questions, desc="open book", **kwargs)


def answer_rag(model, tokenizer, documents: list[dict], questions: list[dict], *, top_n: int = 3,
               passage_words: int = 200, **kwargs) -> list[str]:
    """Greedy answers with the BM25 top-`top_n` passages (over all documents) in the prompt.
    Keyword arguments as `answer_with_contexts`."""
    _check_questions(questions)
    contexts = [r["context"] for r in retrieve(documents, questions, top_n=top_n, passage_words=passage_words)]
    return answer_with_contexts(model, tokenizer, contexts, questions, desc="rag", **kwargs)


# ---------------------------------------------------------------- judge


def parse_verdict(text: str) -> bool | None:
    """The judge's verdict from its first word: yes/true/correct -> True,
    no/false/incorrect/wrong -> False, anything else -> None."""
    words = re.findall(r"[a-z]+", text.lower())
    if not words:
        return None
    if words[0] in ("yes", "true", "correct"):
        return True
    if words[0] in ("no", "false", "incorrect", "wrong"):
        return False
    return None


def judge(model, tokenizer, questions: list[dict], predictions: list[str], *, prompt: str = DEFAULT_JUDGE_PROMPT,
          batch_size: int = 16, max_new_tokens: int = 4, progress: bool = True) -> list[bool | None]:
    """A local model grades each prediction against `question["answer"]` (greedy, yes/no);
    None where its reply is neither."""
    _check_questions(questions, need_answer=True)
    if len(predictions) != len(questions):
        raise ValueError(f"predictions ({len(predictions)}) and questions ({len(questions)}) differ in length")
    texts = [prompt.format(question=q["question"], reference=_references(q["answer"])[0], prediction=p)
             for q, p in zip(questions, predictions)]
    replies = _generate(model, tokenizer, [prompts.prompt_ids(tokenizer, t) for t in texts],
                        max_new_tokens=max_new_tokens, batch_size=batch_size, desc="judge", progress=progress)
    return [parse_verdict(r) for r in replies]


# ---------------------------------------------------------------- the whole evaluation


def evaluate(model, tokenizer, documents: list[dict], questions: list[dict], *,
             methods=("closed_book", "open_book", "rag"), students: dict | None = None,
             judge_model=None, judge_tokenizer=None, fmt: PromptFormat = DEFAULT_FORMAT,
             max_new_tokens: int = 64, batch_size: int = 16, rag_top_n: int = 3, passage_words: int = 200,
             progress: bool = True) -> tuple[dict, list[dict]]:
    """Answer `questions` (`{doc_id, question, answer}`) with every method and score them.

    methods: any of "closed_book", "open_book", "rag" (reported as base_closed_book,
    teacher_open_book, rag_bm25). students: `{name: model}` answered closed-book with the
    same tokenizer; a value may also be a zero-argument callable returning the model
    (loaded when its turn comes, released after). With a judge model, each method also
    gets `judge` (share of answers judged correct; unparsable verdicts count as wrong).

    Returns `(metrics, per_question)`: `metrics[name] = {exact_match, f1, contains, n[, judge]}`,
    `per_question[i] = {doc_id, question, reference, answers: {name: text},
    scores: {name: {...}}, retrieved: [doc_id]}` (retrieved only with rag).
    """
    _check_questions(questions, need_answer=True)
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"methods: unknown {unknown}; valid: {sorted(METHOD_NAMES)}")
    common = dict(fmt=fmt, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    answers: dict[str, list[str]] = {}
    retrieved = None
    if "closed_book" in methods:
        answers["base_closed_book"] = answer_closed_book(model, tokenizer, questions, **common)
    if "open_book" in methods:
        answers["teacher_open_book"] = answer_open_book(model, tokenizer, documents, questions, **common)
    if "rag" in methods:
        retrieved = retrieve(documents, questions, top_n=rag_top_n, passage_words=passage_words)
        answers["rag_bm25"] = answer_with_contexts(model, tokenizer, [r["context"] for r in retrieved],
                                                   questions, desc="rag", **common)
    for name, student in (students or {}).items():
        student_model = student() if callable(student) and not hasattr(student, "generate") else student
        answers[name] = answer_closed_book(student_model, tokenizer, questions, **common)
        del student_model
    if not answers:
        raise ValueError("nothing to evaluate: no methods and no students")
    return _score_all(questions, answers, retrieved, judge_model, judge_tokenizer, batch_size, progress)


def _score_all(questions, answers, retrieved, judge_model, judge_tokenizer, batch_size, progress):
    refs = [q["answer"] for q in questions]
    metrics = {name: score(preds, refs) for name, preds in answers.items()}
    verdicts = {}
    if judge_model is not None:
        for name, preds in answers.items():
            verdicts[name] = judge(judge_model, judge_tokenizer, questions, preds, batch_size=batch_size,
                                   progress=progress)
            metrics[name]["judge"] = sum(v is True for v in verdicts[name]) / len(preds)
    per_question = []
    for i, q in enumerate(questions):
        row = {"doc_id": str(q["doc_id"]), "question": q["question"], "reference": q["answer"],
               "answers": {name: preds[i] for name, preds in answers.items()},
               "scores": {name: score_one(preds[i], q["answer"]) for name, preds in answers.items()}}
        for name in verdicts:
            row["scores"][name]["judge"] = verdicts[name][i]
        if retrieved is not None:
            row["retrieved"] = retrieved[i]["doc_ids"]
        per_question.append(row)
    return metrics, per_question


# ---------------------------------------------------------------- report


def write_report(out_dir, methods: dict, per_question: list, extra: dict | None = None) -> dict:
    """Write report.json, report.md (a table), report.png (bar chart, when matplotlib is
    installed) and answers.jsonl (one line per question) into `out_dir`.

    report.json = `{"methods": methods, "n_eval_questions": len(per_question), **extra}`.
    Returns `{"json", "md", "answers"[, "png"]}` -> Path.
    """
    from pdengine.io import atomic_write_json, atomic_write_text, write_jsonl

    if not isinstance(methods, dict) or not methods:
        raise ValueError("methods must be a non-empty dict {name: {metric: value}}")
    extra = dict(extra or {})
    clash = sorted({"methods", "n_eval_questions"} & set(extra))
    if clash:
        raise ValueError(f"extra must not override {clash}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "answers": out / "answers.jsonl"}
    atomic_write_json(paths["json"], {"methods": methods, "n_eval_questions": len(per_question), **extra})
    atomic_write_text(paths["md"], markdown_table(methods, n_questions=len(per_question)))
    write_jsonl(paths["answers"], per_question)
    png = _bar_chart(out / "report.png", methods)
    if png is not None:
        paths["png"] = png
    return paths


def _metric_columns(methods: dict) -> list[str]:
    names = list(METRICS)
    if any("judge" in m for m in methods.values()):
        names.append("judge")
    return names


def markdown_table(methods: dict, n_questions: int | None = None) -> str:
    """The methods x metrics table (values in percent) as Markdown."""
    cols = _metric_columns(methods)
    lines = ["| method | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for name, m in methods.items():
        cells = [f"{100 * m[c]:.1f}" if isinstance(m.get(c), (int, float)) else "-" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    head = f"Evaluation on {n_questions} questions (scores in %).\n\n" if n_questions is not None else ""
    return head + "\n".join(lines) + "\n"


def _bar_chart(path: Path, methods: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.png skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
        return None
    import io as _io

    from pdengine.io import atomic_write_bytes

    cols = _metric_columns(methods)
    names = list(methods)
    width = 0.8 / len(cols)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names) + 2), 4))
    for j, col in enumerate(cols):
        values = [100 * float(methods[n].get(col) or 0.0) for n in names]
        ax.bar([i + (j - (len(cols) - 1) / 2) * width for i in range(len(names))], values, width, label=col)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15, ha="right")
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------- CLI


def _adapter_spec(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--adapter expects NAME=DIR, got {value!r}")
    return name, path


def add_arguments(parser) -> None:
    """Options of `pdengine eval`."""
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM directory (the base)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a trained adapter, answered closed-book and reported as NAME (repeatable)")
    parser.add_argument("--documents", required=True, help="documents JSONL: {id, text}")
    parser.add_argument("--questions", required=True, help="evaluation JSONL: {doc_id, question, answer}")
    parser.add_argument("--out", required=True, help="output directory for the report")
    parser.add_argument("--methods", default="closed_book,open_book,rag",
                        help="comma-separated subset of closed_book,open_book,rag ('' for adapters only)")
    parser.add_argument("--judge-model", default=None, help="local causal-LM directory used as a yes/no judge")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rag-top-n", type=int, default=3, help="BM25 passages put in the RAG prompt")
    parser.add_argument("--passage-words", type=int, default=200, help="words per BM25 passage")
    parser.add_argument("--system", default=None, help="system prompt (PromptFormat.system)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def _adapter_loader(args, path):
    def load():
        import pdengine

        model, _ = _load_model(args, args.model)
        return pdengine.load_adapter(model, path)

    return load


def _load_model(args, path):
    import torch

    from pdengine.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(path, dtype=getattr(torch, args.dtype) if args.dtype else None,
                                    device=args.device)


def run(args) -> int:
    """`pdengine eval`: answer the evaluation questions with every method; write the report."""
    from pdengine.io import read_jsonl

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHOD_NAMES))
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; valid: {sorted(METHOD_NAMES)}")
    adapters = dict(_adapter_spec(a) for a in args.adapter)
    for name, path in adapters.items():
        if not Path(path).is_dir():
            raise ValueError(f"--adapter {name}: directory {path} does not exist")
    documents = read_jsonl(args.documents, required=("id", "text"))
    questions = read_jsonl(args.questions, required=("doc_id", "question", "answer"))
    model, tokenizer = _load_model(args, args.model)
    judge_model = judge_tokenizer = None
    if args.judge_model:
        judge_model, judge_tokenizer = _load_model(args, args.judge_model)
    metrics, per_question = evaluate(
        model, tokenizer, documents, questions, methods=methods,
        students={name: _adapter_loader(args, path) for name, path in adapters.items()},
        judge_model=judge_model, judge_tokenizer=judge_tokenizer, fmt=PromptFormat(system=args.system),
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, rag_top_n=args.rag_top_n,
        passage_words=args.passage_words,
    )
    paths = write_report(args.out, metrics, per_question, extra={"model": str(args.model), "adapters": adapters})
    print(markdown_table(metrics, n_questions=len(per_question)))
    print(f"report: {paths['md']}", file=sys.stderr)
    return 0
