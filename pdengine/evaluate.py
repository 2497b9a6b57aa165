"""Evaluation (docs/DESIGN.md, "Evaluation"): who answers the held-out questions, and how well.

Methods, all with greedy decoding and batched:

- closed book: the question alone (`prompts.student_prompt_ids`), base model or base +
  adapter (the student);
- open book: the teacher, with the right document in its prompt (`prompts.teacher_prompt_ids`),
  i.e. oracle RAG;
- RAG: BM25 (`pdengine.retrieval`, on bm25s) over passages of all documents; the top
  passages go into the teacher prompt in place of the document;
- PD + RAG (`pd_rag`): the prompt-distilled student (the student named
  "prompt_distillation") with the same retrieved passages in its prompt.

Metrics (`pdengine.metrics`, SQuAD normalisation): exact match, token F1 and contains. An
optional local judge model grades each answer with a yes/no prompt. A student may come with
several training seeds; its scores are then the mean over seeds.

`evaluate(...)` runs everything; `write_report(...)` (`pdengine.report`) writes report.json
(with bootstrap intervals and paired differences, `pdengine.statistics`), report.md,
report.png and answers.jsonl. Under torchrun every method's generation batches are split
over the ranks and every rank gets all the answers (retrieval is deterministic, so each
rank computes it); rank 0 holds the output directory and writes the report.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pdengine import config as C
from pdengine import distributed, generation, input_checks, prompts
from pdengine.config import Check, POSITIVE, setting
from pdengine.documents import document_of, index_documents
from pdengine.errors import InputError
from pdengine.generation import ModelStageSettings
from pdengine.metrics import (  # noqa: F401  (public here too)
    METRICS, contains, exact_match, f1, normalize_answer, references, score, score_one)
from pdengine.prompts import DEFAULT_FORMAT, PromptFormat
from pdengine.report import as_number, markdown_table, write_report  # noqa: F401  (public here too)
from pdengine.retrieval import retrieve
from pdengine.training import prompt_record

# method key -> the name it has in reports (the demo's report.json uses these)
METHOD_NAMES = {"closed_book": "base_closed_book", "open_book": "teacher_open_book", "rag": "rag_bm25",
                "pd_rag": "pd_rag"}
PD_STUDENT = "prompt_distillation"  # the student `pd_rag` puts the retrieved passages in front of

DEFAULT_JUDGE_PROMPT = (
    "You grade answers to questions. Question: {question}\n"
    "Correct answer: {reference}\nProposed answer: {prediction}\n"
    "Does the proposed answer give the same information as the correct answer? "
    "Reply with one word: yes or no."
)


@dataclass(frozen=True)
class EvalConfig(ModelStageSettings):
    """Settings of `pdengine eval`."""

    methods: tuple[str, ...] = setting(
        ("closed_book", "open_book", "rag", "pd_rag"),
        "methods to run besides the adapters: closed_book, open_book, rag, pd_rag ('' for adapters only; "
        "pd_rag needs an adapter named prompt_distillation)",
        check=Check(lambda v: set(v) <= set(METHOD_NAMES), "a subset of " + ", ".join(METHOD_NAMES)))
    judge_model: str | None = setting(None, "local causal-LM directory used as a yes/no judge; auto = no judge")
    max_new_tokens: int = setting(64, "tokens per answer at most", check=POSITIVE)
    rag_top_n: int = setting(3, "BM25 passages put in the RAG prompt", check=POSITIVE)
    passage_words: int = setting(200, "words per BM25 passage", check=POSITIVE)


_DEFAULTS = EvalConfig()

# ---------------------------------------------------------------- input checks


def _check_questions(questions, need_answer: bool = False) -> None:
    """Every question an object with a non-empty string `question` (and, for scoring, an
    answer that is a string or a list of strings)."""
    if not isinstance(questions, list) or not questions:
        raise InputError("questions is empty")
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or not isinstance(q.get("question"), str) or not q["question"].strip():
            raise InputError(f"questions[{i}] must be an object with a non-empty string 'question'")
        if need_answer:
            if "answer" not in q:
                raise InputError(f"questions[{i}] has no 'answer'")
            try:
                references(q["answer"])
            except InputError as e:
                raise InputError(f"questions[{i}]: {e}") from None


def check_eval_inputs(documents, questions, tokenizer=None) -> dict[str, dict]:
    """The documents index, once every evaluation question is well formed and its document
    is among the documents (the open-book teacher needs it; a question without it is an
    error, not a warning, so every method answers the same questions and their paired
    differences stay paired). With a tokenizer, warns on a high share of `<unk>` tokens."""
    docs = index_documents(documents)
    _check_questions(questions, need_answer=True)
    unknown = []
    for i, q in enumerate(questions):
        try:
            document_of(docs, q, f"questions[{i}]")
        except InputError as e:
            unknown.append(str(e))
    if unknown:
        raise InputError(f"{len(unknown)} of {len(questions)} eval questions have no document among the documents "
                         f"(first: {unknown[0]}); every method must answer the same questions")
    if tokenizer is not None:
        input_checks.check_unknown_tokens(tokenizer, docs, questions, stage="eval",
                                          stream=distributed.log_stream(distributed.context()))
    return docs


# ---------------------------------------------------------------- answering


def answer_closed_book(model, tokenizer, questions: list[dict], *, fmt: PromptFormat = DEFAULT_FORMAT,
                       max_new_tokens: int = _DEFAULTS.max_new_tokens, batch_size: int = _DEFAULTS.batch_size,
                       progress: bool = True) -> list[str]:
    """Greedy answers from the question alone (the student's prompt); one string per question."""
    _check_questions(questions)
    prompt_list = [prompts.student_prompt_ids(tokenizer, q["question"], fmt) for q in questions]
    return generation.greedy_texts(model, tokenizer, prompt_list, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, desc="closed book", progress=progress)


def answer_with_contexts(model, tokenizer, contexts: list[str], questions: list[dict], *,
                         fmt: PromptFormat = DEFAULT_FORMAT, max_new_tokens: int = _DEFAULTS.max_new_tokens,
                         batch_size: int = _DEFAULTS.batch_size, desc: str = "open book",
                         progress: bool = True) -> list[str]:
    """Greedy answers with `contexts[i]` in the teacher prompt of question i."""
    _check_questions(questions)
    if len(contexts) != len(questions):
        raise InputError(f"contexts ({len(contexts)}) and questions ({len(questions)}) differ in length")
    prompt_list = [prompts.teacher_prompt_ids(tokenizer, c, q["question"], fmt) for c, q in zip(contexts, questions)]
    return generation.greedy_texts(model, tokenizer, prompt_list, max_new_tokens=max_new_tokens,
                                   batch_size=batch_size, desc=desc, progress=progress)


def answer_open_book(model, tokenizer, documents, questions: list[dict], **kwargs) -> list[str]:
    """Greedy teacher answers with the question's own document (by `doc_id`) in the prompt.
    Keyword arguments as `answer_with_contexts` (fmt, max_new_tokens, batch_size, progress)."""
    _check_questions(questions)
    docs = index_documents(documents)
    contexts = [document_of(docs, q, f"questions[{i}]")["text"] for i, q in enumerate(questions)]
    return answer_with_contexts(model, tokenizer, contexts, questions, desc="open book", **kwargs)


def answer_rag(model, tokenizer, documents, questions: list[dict], *, top_n: int = _DEFAULTS.rag_top_n,
               passage_words: int = _DEFAULTS.passage_words, **kwargs) -> list[str]:
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
          batch_size: int = _DEFAULTS.batch_size, max_new_tokens: int = 4, progress: bool = True) -> list[bool | None]:
    """A local model grades each prediction against `question["answer"]` (greedy, yes/no);
    None where its reply is neither."""
    _check_questions(questions, need_answer=True)
    if len(predictions) != len(questions):
        raise InputError(f"predictions ({len(predictions)}) and questions ({len(questions)}) differ in length")
    texts = [prompt.format(question=q["question"], reference=references(q["answer"])[0], prediction=p)
             for q, p in zip(questions, predictions)]
    return [parse_verdict(r) for r in generation.greedy_texts(
        model, tokenizer, [prompts.prompt_ids(tokenizer, t) for t in texts], max_new_tokens=max_new_tokens,
        batch_size=batch_size, desc="judge", progress=progress)]


# ---------------------------------------------------------------- the whole evaluation


def evaluate(model, tokenizer, documents, questions: list[dict], settings: EvalConfig | None = None, *,
             students: dict | None = None, judge_model=None, judge_tokenizer=None,
             fmt: PromptFormat = DEFAULT_FORMAT, **overrides) -> tuple[dict, list[dict]]:
    """Answer `questions` (`{doc_id, question, answer}`) with every method and score them.

    `settings` is an `EvalConfig` (keyword `overrides` replace its fields: methods,
    max_new_tokens, batch_size, rag_top_n, passage_words, progress). methods: any of
    "closed_book", "open_book", "rag", "pd_rag" (reported as base_closed_book,
    teacher_open_book, rag_bm25, pd_rag). students: `{name: model}` answered closed-book
    with the same tokenizer; a value may also be a zero-argument callable returning the
    model (loaded when its turn comes, released after), or a list of them: one per
    training seed, reported together (the mean over seeds, `seeds`, `per_seed`). `pd_rag`
    is the student named "prompt_distillation" with the RAG passages in its prompt
    (skipped, with a note, when there is no such student). With a judge model (a model,
    not `settings.judge_model`'s path), each method also gets `judge` (share judged
    correct; unparsable verdicts count as wrong).

    Returns `(metrics, per_question)`: `metrics[name] = {exact_match, f1, contains, n[, judge]}`,
    `per_question[i] = {doc_id, question, reference, answers: {name: text}, scores: {name: {...}}
    [, seed_scores: {name: [{...} per seed]}], retrieved: [doc_id]}` (retrieved only with rag
    or pd_rag; a method with several seeds has a list of answers and its mean scores).
    """
    cfg = generation.resolve_settings(EvalConfig, settings, overrides)
    docs = check_eval_inputs(documents, questions, tokenizer)
    students = {name: list(s) if isinstance(s, (list, tuple)) else [s] for name, s in (students or {}).items()}
    methods = set(cfg.methods)
    if "pd_rag" in methods and PD_STUDENT not in students:
        print(f"eval: pd_rag skipped: no student named {PD_STUDENT}",
              file=distributed.log_stream(distributed.context()))
        methods.discard("pd_rag")
    common = dict(fmt=fmt, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, progress=cfg.progress)
    retrieved = None
    if methods & {"rag", "pd_rag"}:
        retrieved = retrieve(docs, questions, top_n=cfg.rag_top_n, passage_words=cfg.passage_words)
    contexts = {"open_book": [document_of(docs, q, "question")["text"] for q in questions],
                "rag": [r["context"] for r in retrieved] if retrieved else None}
    runs: dict[str, list[list[str]]] = {}  # method -> one list of answers per training seed
    if "closed_book" in methods:
        runs["base_closed_book"] = [answer_closed_book(model, tokenizer, questions, **common)]
    for method in ("open_book", "rag"):
        if method in methods:
            runs[METHOD_NAMES[method]] = [answer_with_contexts(model, tokenizer, contexts[method], questions,
                                                               desc=method.replace("_", " "), **common)]
    for name, seeds in students.items():
        for student in seeds:
            student_model = student() if callable(student) and not hasattr(student, "generate") else student
            runs.setdefault(name, []).append(answer_closed_book(student_model, tokenizer, questions, **common))
            if name == PD_STUDENT and "pd_rag" in methods:
                runs.setdefault("pd_rag", []).append(answer_with_contexts(
                    student_model, tokenizer, contexts["rag"], questions, desc="pd + rag", **common))
            del student_model
    if not runs:
        raise InputError("nothing to evaluate: no methods and no students")
    return _score_all(questions, runs, retrieved, judge_model, judge_tokenizer, cfg)


def _score_all(questions, runs, retrieved, judge_model, judge_tokenizer, cfg):
    """Metrics and per-question rows from each method's runs (one per training seed)."""
    refs = [q["answer"] for q in questions]
    scores = {name: [[score_one(p, r) for p, r in zip(preds, refs)] for preds in seeds]
              for name, seeds in runs.items()}
    if judge_model is not None:
        for name, seeds in runs.items():
            for run_scores, preds in zip(scores[name], seeds):
                verdicts = judge(judge_model, judge_tokenizer, questions, preds, batch_size=cfg.batch_size,
                                 progress=cfg.progress)
                for one, verdict in zip(run_scores, verdicts):
                    one["judge"] = verdict
    metrics = {name: _summary(run_scores) for name, run_scores in scores.items()}
    per_question = []
    for i, q in enumerate(questions):
        row = {"doc_id": str(q["doc_id"]), "question": q["question"], "reference": q["answer"],
               "answers": {name: seeds[0][i] if len(seeds) == 1 else [s[i] for s in seeds]
                           for name, seeds in runs.items()},
               "scores": {name: _mean_scores([s[i] for s in run_scores]) for name, run_scores in scores.items()}}
        several = {name: [s[i] for s in run_scores] for name, run_scores in scores.items() if len(run_scores) > 1}
        if several:
            row["seed_scores"] = several
        if retrieved is not None:
            row["retrieved"] = retrieved[i]["doc_ids"]
        per_question.append(row)
    return metrics, per_question


def _mean_scores(per_seed: list[dict]) -> dict:
    """One question's scores: as they are for one seed, the mean over seeds otherwise."""
    if len(per_seed) == 1:
        return per_seed[0]
    return {m: sum(as_number(s[m]) for s in per_seed) / len(per_seed) for m in per_seed[0]}


def _summary(run_scores: list[list[dict]]) -> dict:
    """A method's metrics: means over questions (and over seeds, with each seed's mean listed)."""
    per_run = [{m: sum(as_number(s[m]) for s in run) / len(run) for m in run[0]} for run in run_scores]
    n = len(run_scores[0])
    if len(per_run) == 1:
        return {**per_run[0], "n": n}
    metrics = {m: sum(r[m] for r in per_run) / len(per_run) for m in per_run[0]}
    return {**metrics, "n": n, "seeds": len(per_run), "per_seed": {m: [r[m] for r in per_run] for m in metrics}}


# ---------------------------------------------------------------- CLI


def _adapter_spec(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise InputError(f"--adapter expects NAME=DIR, got {value!r}")
    return name, path


def add_arguments(parser) -> None:
    """Options of `pdengine eval`."""
    generation.add_model_arguments(parser, out_help="output directory for the report")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                        help="a trained adapter, answered closed-book and reported as NAME (repeatable; "
                             "one NAME given several times = several training seeds, reported together)")
    parser.add_argument("--questions", required=True, help="evaluation JSONL: {doc_id, question, answer}")
    parser.add_argument("--allow-other-system", action="store_true",
                        help="evaluate with a --system (or chat template) other than the adapters' run.json "
                             "records (default: the recorded one; a different one is refused)")
    C.add_arguments(parser, EvalConfig)


def _adapter_loader(args, cfg, path):
    def load():
        import pdengine

        model, _ = generation.load_model(args.model, cfg, args.device, **generation.load_options(args))
        return pdengine.load_adapter(model, path)

    return load


def _check_out_dir(out) -> None:
    if Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out {out} is a file; eval writes a directory (report.json, report.md, ...)")


def run(args) -> int:
    """`pdengine eval`: answer the evaluation questions with every method; write the report."""
    from pdengine.io import read_jsonl

    cfg = C.from_args(EvalConfig, args)
    _check_out_dir(args.out)
    adapters: dict[str, list[str]] = {}  # name -> one directory per training seed
    for name, path in map(_adapter_spec, args.adapter):
        if not Path(path).is_dir():
            raise InputError(f"--adapter {name}: directory {path} does not exist")
        if path in adapters.get(name, []):
            raise InputError(f"--adapter {name}={path} is given twice")
        adapters.setdefault(name, []).append(path)
    documents = read_jsonl(args.documents, required=("id", "text"))
    questions = read_jsonl(args.questions, required=("doc_id", "question", "answer"))
    check_eval_inputs(documents, questions)  # before any model loads
    # The students' own prompt (docs/DESIGN.md, "Evaluation"): run.json's unless told otherwise.
    allow_other = getattr(args, "allow_other_system", False)
    fmt, trained_prompt = prompt_record.eval_format(
        args.system, [p for paths in adapters.values() for p in paths], allow_other)
    ctx = distributed.context()
    with distributed.main_holds_lock(ctx, args.out, "pdengine eval"):  # rank 0 owns OUT
        model, tokenizer = generation.load_model(args.model, cfg, args.device, **generation.load_options(args))
        prompt_record.check_template(tokenizer, fmt, trained_prompt, allow_other)
        judge_model = judge_tokenizer = None
        if cfg.judge_model:
            judge_model, judge_tokenizer = generation.load_model(  # the judge is not the quantized base
                cfg.judge_model, cfg, args.device, attn_implementation=args.attn_implementation)
        metrics, per_question = evaluate(
            model, tokenizer, documents, questions, cfg,
            students={name: [_adapter_loader(args, cfg, p) for p in paths] for name, paths in adapters.items()},
            judge_model=judge_model, judge_tokenizer=judge_tokenizer, fmt=fmt,
        )
        extra = {"model": str(args.model), "settings": C.to_dict(cfg),
                 "adapters": {n: p[0] if len(p) == 1 else p for n, p in adapters.items()},
                 "prompt_format": dataclasses.asdict(fmt)}
        # every rank holds the same results; rank 0 writes and prints the report, and every
        # rank returns once it is written
        paths = distributed.on_main(ctx, lambda: write_report(args.out, metrics, per_question, extra=extra))
    if ctx.is_main:
        print(paths["md"].read_text(encoding="utf-8"), end="")  # the table with intervals and differences
        print(f"report: {paths['md']}", file=sys.stderr)
    return 0
