"""Question generation and teacher answers (docs/DESIGN.md, "Method", steps 1 and 2).

1. The base model reads each document and writes questions that make sense without it
   (paper defaults: 30 per document, 5 per call, temperature 1.5, top-k 50).
2. The teacher (the base model with the document in its prompt) answers each question by
   sampling; the sampled token ids are kept (`answer_ids`) so the answer is never
   re-tokenised downstream. Empty answers are dropped and counted: they would teach the
   student to stop at once.

Settings live in `GenerateConfig` and `AnswerConfig` (the only place their defaults are
written); the functions take one of them plus keyword overrides, and the CLI flags are
generated from them. Batched, seeded generation is `pdengine.generation`; documents are
looked up through the one documents index, `pdengine.documents`. Under torchrun the
generation batches are split over the ranks and every rank gets all the results (so the
rounds of question top-up stay in lock-step); rank 0 writes the file and the warnings.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from pdengine import config as C
from pdengine import distributed, generation, input_checks, prompts
from pdengine.config import NON_NEGATIVE, POSITIVE, setting
from pdengine.documents import document_of, index_documents
from pdengine.errors import InputError
from pdengine.generation import ModelStageSettings, decode
from pdengine.prompts import DEFAULT_FORMAT, PromptFormat

DEFAULT_QUESTION_PROMPT = (
    "Read the following text and write {n} different questions about the facts in it. "
    "Each question must make sense on its own, without the text: name the people, places "
    "and things it is about, never say 'the text' or 'the document'. "
    "Write one question per line, numbered.\n\n{document}"
)

# Questions that point at a document the reader will not have.
_DOC_REFERENCE = re.compile(
    r"\b(the|this|that|these|above|given|provided|following|mentioned)\s+"
    r"(documents?|texts?|passages?|articles?|excerpts?|paragraphs?|stor(y|ies)|context|sections?|readings?)\b"
    r"|\baccording to the author\b|\bthe author\b",
    re.IGNORECASE,
)
# Leading list markers: "1.", "2)", "(3)", "-", "*", "•", "Q1:", "Question 2:".
_LIST_MARKER = re.compile(
    r"^\s*(?:\(?\d+[.):]|[-*•·]|q(?:uestion)?\s*\d*\s*[:.)-])\s*", re.IGNORECASE
)
# Split "1. What is X? 2. Where is Y?" written on one line.
_INLINE_SPLIT = re.compile(r"(?<=\?)\s+(?=(?:\(?\d+[.):]|[-*•])\s)")


# ---------------------------------------------------------------- parsing


def normalize_question(question: str) -> str:
    """Key for deduplication: lower case, letters/digits only, single spaces."""
    return " ".join(re.sub(r"[^\w\s]", " ", question.lower()).split())


def mentions_document(question: str) -> bool:
    """True when the question only makes sense next to the document ("in the text ...")."""
    return bool(_DOC_REFERENCE.search(question))


def parse_questions(text: str, *, require_question_mark: bool = True, min_words: int = 2) -> list[str]:
    """Questions found in a model's output: one per line, numbered, bulleted or plain.

    List markers and surrounding quotes are removed. Lines that are not questions
    (no '?', when `require_question_mark`), too short, or that refer to "the text /
    document / passage ..." are dropped. Order is kept; duplicates are not removed here.
    """
    found = []
    for line in text.splitlines():
        for piece in _INLINE_SPLIT.split(line):
            question = _clean_line(piece)
            if require_question_mark:
                if "?" not in question:
                    continue
                question = question[: question.rindex("?") + 1]
            if len(question.split()) < min_words or mentions_document(question):
                continue
            found.append(question)
    return found


def _clean_line(line: str) -> str:
    line = _LIST_MARKER.sub("", line.strip()).strip()
    line = line.strip("\"'“”‘’`*_ ").strip()
    return " ".join(line.split())


class _QuestionSet:
    """Questions of one document, deduplicated by `normalize_question`, capped at `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.questions: list[str] = []
        self._seen: set[str] = set()

    @property
    def full(self) -> bool:
        return len(self.questions) >= self.limit

    def add(self, question: str) -> None:
        key = normalize_question(question)
        if key and key not in self._seen and not self.full:
            self._seen.add(key)
            self.questions.append(question)


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class GenerateConfig(ModelStageSettings):
    """Settings of `pdengine generate` (paper defaults)."""

    n_questions: int = setting(30, "questions per document", check=POSITIVE)
    per_call: int = setting(5, "questions asked for per generation", check=POSITIVE)
    temperature: float = setting(1.5, "sampling temperature (0 = greedy)", check=NON_NEGATIVE)
    top_k: int | None = setting(50, "sample among the k most likely tokens (0 = no top-k)", check=NON_NEGATIVE)
    max_new_tokens: int = setting(256, "tokens generated per call at most", check=POSITIVE)
    max_calls: int | None = setting(None, "generations per document at most; auto = 4 x n_questions / per_call",
                                    check=POSITIVE)
    prompt: str | None = setting(None, "question prompt with {n}, {document}, {title}; @FILE reads it from a "
                                       "file; auto = the built-in prompt")
    require_question_mark: bool = setting(True, "keep only lines that hold a '?'")
    seed: int = setting(0, "sampling seed")


@dataclass(frozen=True)
class AnswerConfig(ModelStageSettings):
    """Settings of `pdengine answer` (paper defaults)."""

    n_answers: int = setting(1, "sampled answers per question", check=POSITIVE)
    temperature: float = setting(1.5, "sampling temperature (0 = greedy)", check=NON_NEGATIVE)
    top_k: int | None = setting(0, "sample among the k most likely tokens (0 = no top-k)", check=NON_NEGATIVE)
    max_new_tokens: int = setting(256, "tokens per answer at most", check=POSITIVE)
    keep_truncated: bool = setting(True, "keep answers cut off by max_new_tokens (counted on stderr either way; "
                                         "--no-keep-truncated drops them: they teach the student to stop mid-answer)")
    seed: int = setting(0, "sampling seed")


def question_prompt_text(value: str | None) -> str:
    """The question prompt a setting names: None = built-in, "@FILE" = read from FILE, else the text."""
    if value is None:
        return DEFAULT_QUESTION_PROMPT
    if value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise InputError(f"prompt: file {path} not found")
        return path.read_text(encoding="utf-8")
    return value


# ---------------------------------------------------------------- questions


def _question_prompt(prompt: str, document: dict, n: int) -> str:
    try:
        return prompt.format(n=n, document=document["text"], title=document.get("title", ""))
    except (KeyError, IndexError) as e:
        raise InputError(
            f"prompt: unknown placeholder {e}; available: {{n}}, {{document}}, {{title}}"
        ) from None


def generate_questions(model, tokenizer, documents: list[dict], settings: GenerateConfig | None = None, *,
                       fmt: PromptFormat = DEFAULT_FORMAT, **overrides) -> list[dict]:
    """The model reads each document and writes questions about it.

    `settings` is a `GenerateConfig` (default: the paper's); keyword `overrides` replace
    its fields (`n_questions=3, seed=7, ...`). The prompt is formatted with `{n}`
    (= per_call), `{document}` and `{title}`, then wrapped by `prompts.prompt_ids` (chat
    template when the tokenizer has one; `fmt.system` is the system prompt). Outputs are
    parsed with `parse_questions`, deduplicated per document (normalised text) and capped
    at `n_questions` per document. Documents still short of questions get more calls, up
    to `max_calls` calls per document; a shortfall is reported as one line on stderr.

    Returns `[{"doc_id", "question"}]`, grouped by document in input order.
    """
    cfg = generation.resolve_settings(GenerateConfig, settings, overrides)
    docs = index_documents(documents)
    log = distributed.log_stream(distributed.context())  # under torchrun rank 0 warns for the job
    input_checks.check_unknown_tokens(tokenizer, docs, stage="generate", stream=log)
    max_calls = cfg.max_calls or 4 * math.ceil(cfg.n_questions / cfg.per_call)
    prompt = question_prompt_text(cfg.prompt)
    found = {doc_id: _QuestionSet(cfg.n_questions) for doc_id in docs}
    user_prompt = {doc_id: prompts.prompt_ids(tokenizer, _question_prompt(prompt, d, cfg.per_call), fmt)
                   for doc_id, d in docs.items()}
    calls = dict.fromkeys(docs, 0)
    for round_no in range(max_calls):
        plan = _plan_calls(found, calls, cfg.per_call, max_calls)
        if not plan:
            break
        outputs = generation.generate_ids(
            model, tokenizer, [user_prompt[d] for d in plan],
            temperature=cfg.temperature, top_k=cfg.top_k or None, max_new_tokens=cfg.max_new_tokens,
            batch_size=cfg.batch_size, seed=cfg.seed + 100_003 * round_no,
            desc=f"questions (round {round_no + 1})", progress=cfg.progress,
        )
        for doc_id, ids in zip(plan, outputs):
            for question in parse_questions(decode(tokenizer, ids), require_question_mark=cfg.require_question_mark):
                found[doc_id].add(question)
    rows = [{"doc_id": d, "question": q} for d, qs in found.items() for q in qs.questions]
    input_checks.check_questions_per_document(docs, rows, cfg.n_questions, stage="generate", stream=log)
    input_checks.check_near_duplicates(rows, stage="generate", stream=log)
    return rows


def _plan_calls(found, calls, per_call, max_calls) -> list[str]:
    """One round: each unfinished document gets the calls it still needs (one call yields
    up to `per_call` questions), within its remaining call budget."""
    plan = []
    for doc_id, qs in found.items():
        need = math.ceil((qs.limit - len(qs.questions)) / per_call)
        n = min(need, max_calls - calls[doc_id])
        calls[doc_id] += max(n, 0)
        plan.extend([doc_id] * max(n, 0))
    return plan


# ---------------------------------------------------------------- answers


def answer_questions(model, tokenizer, documents: list[dict], questions: list[dict],
                     settings: AnswerConfig | None = None, *, fmt: PromptFormat = DEFAULT_FORMAT,
                     **overrides) -> list[dict]:
    """The teacher (document in its prompt, `prompts.teacher_prompt_ids`) answers each
    question `n_answers` times by sampling (temperature 0 = greedy).

    `settings` is an `AnswerConfig`; keyword `overrides` replace its fields. Returns
    `[{"doc_id", "question", "answer", "answer_ids"}]`, the answers of each question
    together, in question order. `answer_ids` are the sampled ids without end of turn or
    padding; `answer` is their decoded text. Empty answers are dropped and answers cut off
    by max_new_tokens counted (dropped too unless `keep_truncated`), one line on stderr.
    """
    cfg = generation.resolve_settings(AnswerConfig, settings, overrides)
    docs = index_documents(documents)
    pairs = []
    for i, q in enumerate(questions):
        where = f"questions[{i}]"
        doc = document_of(docs, q, where)
        if not isinstance(q.get("question"), str) or not q["question"].strip():
            raise InputError(f"{where}: 'question' must be a non-empty string")
        pairs.extend([(str(doc["id"]), doc["text"], q["question"])] * cfg.n_answers)
    log = distributed.log_stream(distributed.context())  # under torchrun rank 0 warns for the job
    input_checks.check_unknown_tokens(tokenizer, docs, questions, stage="answer", stream=log)
    prompt_list = [prompts.teacher_prompt_ids(tokenizer, text, q, fmt) for _, text, q in pairs]
    outputs = generation.generate_sequences(
        model, tokenizer, prompt_list, temperature=cfg.temperature, top_k=cfg.top_k or None,
        max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=cfg.seed, desc="answers",
        progress=cfg.progress,
    )
    rows = [{"doc_id": d, "question": q, "answer": decode(tokenizer, out.ids), "answer_ids": out.ids,
             "truncated": not out.stopped} for (d, _, q), out in zip(pairs, outputs)]
    # empty answers are always dropped (never trained on); cut-off ones unless keep_truncated
    kept = input_checks.check_answers(rows, max_new_tokens=cfg.max_new_tokens, keep_truncated=cfg.keep_truncated,
                                      stage="answer", stream=log).kept
    return [{k: v for k, v in r.items() if k != "truncated"} for r in kept]


# ---------------------------------------------------------------- CLI


def add_generate_arguments(parser) -> None:
    """Options of `pdengine generate`."""
    generation.add_model_arguments(parser, out_help="output questions JSONL")
    parser.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    C.add_arguments(parser, GenerateConfig)


def add_answer_arguments(parser) -> None:
    """Options of `pdengine answer`."""
    generation.add_model_arguments(parser, out_help="output QA pairs JSONL (with answer_ids)")
    parser.add_argument("--questions", required=True, help="questions JSONL: {doc_id, question}")
    parser.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    C.add_arguments(parser, AnswerConfig)


def _refuse_overwrite(args) -> None:
    """An existing --out (questions or answers that took a model run to make) is replaced
    only with --force; checked before any model loads."""
    if Path(args.out).exists() and not getattr(args, "force", False):
        raise InputError(f"--out {args.out} exists already; pass --force to overwrite it")


def _write_on_main(out, rows: list[dict], message: str) -> None:
    """Every rank holds the same rows; rank 0 writes them, and every rank returns once the
    file is there (a next stage on any rank reads it)."""
    from pdengine.io import write_jsonl

    def write():
        write_jsonl(out, rows)
        print(message, file=sys.stderr)

    distributed.on_main(distributed.context(), write)


def run_generate(args) -> int:
    """`pdengine generate`: documents JSONL -> questions JSONL."""
    from pdengine.io import read_jsonl

    cfg = C.from_args(GenerateConfig, args)
    _refuse_overwrite(args)
    documents = read_jsonl(args.documents, required=("id", "text"))
    index_documents(documents, args.documents)  # bad documents fail before the model loads
    question_prompt_text(cfg.prompt)
    model, tokenizer = generation.load_model(args.model, cfg, args.device, **generation.load_options(args))
    rows = generate_questions(model, tokenizer, documents, cfg, fmt=PromptFormat(system=args.system))
    if not rows:
        raise InputError("the model wrote no usable question; check the prompt, --max-new-tokens, or the model")
    _write_on_main(args.out, rows, f"wrote {len(rows)} questions for {len(documents)} documents to {args.out}")
    return 0


def run_answer(args) -> int:
    """`pdengine answer`: documents + questions JSONL -> QA pairs JSONL (with answer_ids)."""
    from pdengine.io import read_jsonl

    cfg = C.from_args(AnswerConfig, args)
    _refuse_overwrite(args)
    documents = read_jsonl(args.documents, required=("id", "text"))
    questions = read_jsonl(args.questions, required=("doc_id", "question"))
    docs = index_documents(documents, args.documents)
    for i, q in enumerate(questions):
        document_of(docs, q, f"{args.questions}: questions[{i}]")
    model, tokenizer = generation.load_model(args.model, cfg, args.device, **generation.load_options(args))
    rows = answer_questions(model, tokenizer, documents, questions, cfg, fmt=PromptFormat(system=args.system))
    _write_on_main(args.out, rows, f"wrote {len(rows)} answers to {args.out}")
    return 0
