"""Question generation and teacher answers (DESIGN.md section 1, steps 1 and 2).

1. The base model reads each document and writes questions that make sense without it
   (paper defaults: 30 per document, 5 per call, temperature 1.5, top-k 50).
2. The teacher (the base model with the document in its prompt) answers each question by
   sampling; the sampled token ids are kept (`answer_ids`) so the answer is never
   re-tokenised downstream.

Generation is batched with left padding built here from token ids, so the caller's
tokenizer is never mutated (no change to `padding_side` or `pad_token`). Sampling is
deterministic for a given seed and batch size; the global RNG state is restored afterwards.
"""
from __future__ import annotations

import math
import re
import sys
from contextlib import contextmanager

import torch

from pdengine import prompts
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


# ---------------------------------------------------------------- batched generation


def pad_token_id(tokenizer) -> int:
    """The id used for left padding: pad, else end of turn, else 0 (masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eot = prompts.end_of_turn_ids(tokenizer)
    return eot[0] if eot else 0


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)` `[B, T]` with the prompts right-aligned."""
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, p in enumerate(prompt_ids):
        if p:
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def stop_ids(model, tokenizer) -> list[int]:
    """Tokens that end generation: the tokenizer's end of turn plus the model's own
    generation_config eos ids (Llama 3 instruct models stop on both <|eot_id|> and
    <|end_of_text|>)."""
    ids = list(prompts.end_of_turn_ids(tokenizer))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for t in [extra] if isinstance(extra, int) else (extra or []):
        if int(t) not in ids:
            ids.append(int(t))
    return ids


def _generation_config(tokenizer, stop, *, temperature, top_k, max_new_tokens):
    """Every sampling knob set explicitly, so a model's own generation_config.json
    (top_p, repetition penalty, ...) cannot silently change the method."""
    from transformers import GenerationConfig

    sample = temperature > 0
    # greedy: the sampling knobs stay unset (transformers warns about them otherwise)
    sampling = dict(temperature=float(temperature), top_k=int(top_k or 0), top_p=1.0) if sample else {}
    return GenerationConfig(
        do_sample=sample,
        **sampling,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        num_beams=1,
        max_new_tokens=int(max_new_tokens),
        pad_token_id=pad_token_id(tokenizer),
        eos_token_id=stop or None,
    )


@contextmanager
def _seeded(seed: int, device):
    """Seed torch's RNGs for a block and restore the caller's RNG state afterwards."""
    device = torch.device(device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _cut_at_stop(ids: list[int], stop: set, tokenizer) -> list[int]:
    """Generated ids up to (not including) the first stop token; trailing pads removed."""
    for i, t in enumerate(ids):
        if t in stop:
            ids = ids[:i]
            break
    return prompts.strip_end_of_turn(ids, tokenizer)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", disable=not enabled or total == 0, file=sys.stderr)


def _check_positive(**values) -> None:
    for name, value in values.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_sampling(temperature, top_k) -> None:
    if not isinstance(temperature, (int, float)) or temperature < 0 or math.isnan(temperature):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be None or a non-negative integer, got {top_k!r}")


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    seed: int = 0,
    desc: str = "generate",
    progress: bool = True,
) -> list[list[int]]:
    """Continue each prompt; returns the new token ids, cut at the first end of turn.

    temperature 0 = greedy. Prompts are sorted by length before batching (less padding)
    and results come back in the input order. Batch b is sampled under seed `seed + b`,
    so the output is a function of (prompts, seed, batch_size).
    """
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size)
    _check_sampling(temperature, top_k)
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token")
    stop = stop_ids(model, tokenizer)
    config = _generation_config(tokenizer, stop, temperature=temperature, top_k=top_k,
                                max_new_tokens=max_new_tokens)
    device = next(model.parameters()).device
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    with _progress(len(order), desc, progress) as bar:
        for b, start in enumerate(range(0, len(order), batch_size)):
            rows = order[start:start + batch_size]
            ids, mask = left_pad([prompt_ids[i] for i in rows], config.pad_token_id, device)
            with _seeded(seed + b, device):
                out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, new in zip(rows, out[:, ids.shape[1]:].cpu().tolist()):
                results[row] = _cut_at_stop(new, set(stop), tokenizer)
            bar.update(len(rows))
    return results


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


# ---------------------------------------------------------------- questions


def _document_index(documents) -> dict[str, dict]:
    index = {}
    for i, doc in enumerate(documents):
        if not isinstance(doc, dict) or "id" not in doc or "text" not in doc:
            raise ValueError(f"documents[{i}] must be a dict with 'id' and 'text'")
        if str(doc["id"]) in index:
            raise ValueError(f"documents: duplicate id {doc['id']!r}")
        index[str(doc["id"])] = doc
    if not index:
        raise ValueError("documents is empty")
    return index


def _question_prompt(prompt: str, document: dict, n: int) -> str:
    try:
        return prompt.format(n=n, document=document["text"], title=document.get("title", ""))
    except (KeyError, IndexError) as e:
        raise ValueError(
            f"prompt: unknown placeholder {e}; available: {{n}}, {{document}}, {{title}}"
        ) from None


def generate_questions(
    model,
    tokenizer,
    documents: list[dict],
    *,
    n_questions: int = 30,
    per_call: int = 5,
    temperature: float = 1.5,
    top_k: int | None = 50,
    prompt: str = DEFAULT_QUESTION_PROMPT,
    fmt: PromptFormat = DEFAULT_FORMAT,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    max_calls: int | None = None,
    require_question_mark: bool = True,
    progress: bool = True,
) -> list[dict]:
    """The model reads each document and writes questions about it.

    `prompt` is formatted with `{n}` (= per_call), `{document}` and `{title}`, then wrapped
    by `prompts.prompt_ids` (chat template when the tokenizer has one; `fmt.system` is the
    system prompt). Outputs are parsed with `parse_questions`, deduplicated per document
    (normalised text) and capped at `n_questions` per document. Documents still short of
    questions get more calls, up to `max_calls` calls per document (default
    4 * ceil(n_questions / per_call)); a document may end with fewer questions.

    Returns `[{"doc_id", "question"}]`, grouped by document in input order.
    """
    _check_positive(n_questions=n_questions, per_call=per_call, max_calls=max_calls)
    docs = _document_index(documents)
    if max_calls is None:
        max_calls = 4 * math.ceil(n_questions / per_call)
    found = {doc_id: _QuestionSet(n_questions) for doc_id in docs}
    user_prompt = {doc_id: prompts.prompt_ids(tokenizer, _question_prompt(prompt, d, per_call), fmt)
                   for doc_id, d in docs.items()}
    calls = dict.fromkeys(docs, 0)
    for round_no in range(max_calls):
        plan = _plan_calls(found, calls, per_call, max_calls)
        if not plan:
            break
        outputs = generate_ids(
            model, tokenizer, [user_prompt[d] for d in plan],
            temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
            batch_size=batch_size, seed=seed + 100_003 * round_no,
            desc=f"questions (round {round_no + 1})", progress=progress,
        )
        for doc_id, ids in zip(plan, outputs):
            for question in parse_questions(decode(tokenizer, ids), require_question_mark=require_question_mark):
                found[doc_id].add(question)
    return [{"doc_id": d, "question": q} for d, qs in found.items() for q in qs.questions]


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


def answer_questions(
    model,
    tokenizer,
    documents: list[dict],
    questions: list[dict],
    *,
    n_answers: int = 1,
    temperature: float = 1.5,
    top_k: int | None = None,
    max_new_tokens: int = 256,
    fmt: PromptFormat = DEFAULT_FORMAT,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> list[dict]:
    """The teacher (document in its prompt, `prompts.teacher_prompt_ids`) answers each
    question `n_answers` times by sampling (temperature 0 = greedy).

    Returns `[{"doc_id", "question", "answer", "answer_ids"}]`, the answers of each
    question together, in question order. `answer_ids` are the sampled ids without end of
    turn or padding; `answer` is their decoded text.
    """
    _check_positive(n_answers=n_answers)
    docs = _document_index(documents)
    pairs = []
    for i, q in enumerate(questions):
        if not isinstance(q, dict) or "doc_id" not in q or "question" not in q:
            raise ValueError(f"questions[{i}] must be a dict with 'doc_id' and 'question'")
        if str(q["doc_id"]) not in docs:
            raise ValueError(f"questions[{i}]: doc_id {q['doc_id']!r} is not in the documents")
        pairs.extend([(str(q["doc_id"]), q["question"])] * n_answers)
    prompt_list = [prompts.teacher_prompt_ids(tokenizer, docs[d]["text"], q, fmt) for d, q in pairs]
    outputs = generate_ids(
        model, tokenizer, prompt_list, temperature=temperature, top_k=top_k,
        max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, desc="answers", progress=progress,
    )
    return [
        {"doc_id": d, "question": q, "answer": decode(tokenizer, ids), "answer_ids": ids}
        for (d, q), ids in zip(pairs, outputs)
    ]


# ---------------------------------------------------------------- CLI


def _add_model_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face causal-LM directory")
    parser.add_argument("--documents", required=True, help="documents JSONL: {id, text}")
    parser.add_argument("--out", required=True, help="output JSONL file")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--system", default=None, help="system prompt (PromptFormat.system)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)


def add_generate_arguments(parser) -> None:
    """Options of `pdengine generate`."""
    _add_model_arguments(parser)
    parser.add_argument("--n-questions", type=int, default=30, help="questions per document")
    parser.add_argument("--per-call", type=int, default=5, help="questions asked for per generation")
    parser.add_argument("--temperature", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=50, help="0 = no top-k")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-calls", type=int, default=None, help="generations per document at most")
    parser.add_argument("--prompt", default=None,
                        help="question prompt with {n}, {document}, {title}; @FILE reads it from a file")


def add_answer_arguments(parser) -> None:
    """Options of `pdengine answer`."""
    _add_model_arguments(parser)
    parser.add_argument("--questions", required=True, help="questions JSONL: {doc_id, question}")
    parser.add_argument("--n-answers", type=int, default=1, help="sampled answers per question")
    parser.add_argument("--temperature", type=float, default=1.5)
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k")
    parser.add_argument("--max-new-tokens", type=int, default=256)


def _load(args):
    from pdengine.loading import load_model_and_tokenizer

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_model_and_tokenizer(args.model, dtype=dtype, device=args.device)


def _read_prompt(value: str | None) -> str:
    if value is None:
        return DEFAULT_QUESTION_PROMPT
    if value.startswith("@"):
        from pathlib import Path

        path = Path(value[1:])
        if not path.is_file():
            raise ValueError(f"--prompt: file {path} not found")
        return path.read_text(encoding="utf-8")
    return value


def run_generate(args) -> int:
    """`pdengine generate`: documents JSONL -> questions JSONL."""
    from pdengine.io import read_jsonl, write_jsonl

    documents = read_jsonl(args.documents, required=("id", "text"))
    prompt = _read_prompt(args.prompt)
    model, tokenizer = _load(args)
    rows = generate_questions(
        model, tokenizer, documents, n_questions=args.n_questions, per_call=args.per_call,
        temperature=args.temperature, top_k=args.top_k or None, prompt=prompt,
        fmt=PromptFormat(system=args.system), max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, seed=args.seed, max_calls=args.max_calls,
    )
    if not rows:
        raise ValueError("the model wrote no usable question; check the prompt, --max-new-tokens, or the model")
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} questions for {len(documents)} documents to {args.out}", file=sys.stderr)
    return 0


def run_answer(args) -> int:
    """`pdengine answer`: documents + questions JSONL -> QA pairs JSONL (with answer_ids)."""
    from pdengine.io import read_jsonl, write_jsonl

    documents = read_jsonl(args.documents, required=("id", "text"))
    questions = read_jsonl(args.questions, required=("doc_id", "question"))
    model, tokenizer = _load(args)
    rows = answer_questions(
        model, tokenizer, documents, questions, n_answers=args.n_answers,
        temperature=args.temperature, top_k=args.top_k or None, max_new_tokens=args.max_new_tokens,
        fmt=PromptFormat(system=args.system), batch_size=args.batch_size, seed=args.seed,
    )
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} answers to {args.out}", file=sys.stderr)
    return 0
