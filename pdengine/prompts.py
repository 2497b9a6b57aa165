"""Teacher and student prompts (docs/DESIGN.md, "Method"), and the context-length check.

Teacher prompt = chat template(system, user: document + separator + question).
Student prompt = chat template(system, user: question).
The *same* answer token ids (plus end of turn) are appended to both; the answer is never
re-tokenised per side. Tokenizers without a chat template get a plain template.

Everything that builds a prompt (QA generation, prefill, training, evaluation) goes
through this module, so train-time and eval-time prompts cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdengine.errors import InputError

PLAIN_TEMPLATE = "{system}User: {user}\nAssistant:"


@dataclass(frozen=True)
class PromptFormat:
    system: str | None = None
    separator: str = "\n\n"
    question_prefix: str = ""

    def teacher_user(self, document: str, question: str) -> str:
        return f"{document}{self.separator}{self.question_prefix}{question}"

    def student_user(self, question: str) -> str:
        return f"{self.question_prefix}{question}"


DEFAULT_FORMAT = PromptFormat()


def _as_id_list(out) -> list[int]:
    # transformers returns a list, a BatchEncoding or a tensor depending on version/flags.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def prompt_ids(tokenizer, user_text: str, fmt: PromptFormat = DEFAULT_FORMAT) -> list[int]:
    """Token ids of a prompt that ends where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": fmt.system}] if fmt.system else []
        messages.append({"role": "user", "content": user_text})
        return _as_id_list(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        )
    system = f"{fmt.system}\n\n" if fmt.system else ""
    return _as_id_list(tokenizer(PLAIN_TEMPLATE.format(system=system, user=user_text)).input_ids)


def teacher_prompt_ids(tokenizer, document: str, question: str, fmt: PromptFormat = DEFAULT_FORMAT):
    return prompt_ids(tokenizer, fmt.teacher_user(document, question), fmt)


def student_prompt_ids(tokenizer, question: str, fmt: PromptFormat = DEFAULT_FORMAT):
    return prompt_ids(tokenizer, fmt.student_user(question), fmt)


def end_of_turn_ids(tokenizer) -> list[int]:
    """What closes the assistant's turn: the tokenizer's eos token (Llama 3 <|eot_id|>,
    Qwen <|im_end|>, ...)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(eos[0])]


def strip_end_of_turn(answer_ids, tokenizer) -> list[int]:
    """Answer ids as generated, without trailing end-of-turn/pad tokens."""
    stop = set(end_of_turn_ids(tokenizer))
    if tokenizer.pad_token_id is not None:
        stop.add(int(tokenizer.pad_token_id))
    ids = [int(t) for t in answer_ids]
    while ids and ids[-1] in stop:
        ids.pop()
    return ids


def build_example(tokenizer, document: str, question: str, answer_ids, fmt: PromptFormat = DEFAULT_FORMAT):
    """Teacher and student sequences sharing the same answer ids (+ end of turn).

    Returns dict(teacher_input_ids, student_input_ids, answer_start_teacher,
    answer_start_student); answer tokens are `ids[answer_start:]` on both sides.
    """
    answer = strip_end_of_turn(answer_ids, tokenizer) + end_of_turn_ids(tokenizer)
    teacher = teacher_prompt_ids(tokenizer, document, question, fmt)
    student = student_prompt_ids(tokenizer, question, fmt)
    return {
        "teacher_input_ids": teacher + answer,
        "student_input_ids": student + answer,
        "answer_start_teacher": len(teacher),
        "answer_start_student": len(student),
    }


# ------------------------------------------------------------------ context length


def context_length(model) -> int | None:
    """The number of positions the model was built for (`config.max_position_embeddings`),
    None when its config names none. Accepts a model or its config."""
    config = getattr(model, "config", model)
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_context_length(model, lengths, *, budget: int = 0,
                         what: str = "teacher sequence (prompt + document + question + answer)") -> None:
    """InputError unless every sequence, plus `budget` tokens still to be generated, fits
    the model's context length; called by a stage before it runs the model.

    `lengths`: (document id, token count) pairs, e.g. one per QA pair. The error names the
    first document whose longest sequence is over the limit, that length and the limit
    (and how many other documents are over it): beyond its positions a model reads garbage
    or fails, so a too-long document is refused up front rather than found mid-run.
    """
    limit = context_length(model)
    if limit is None:
        return
    longest: dict[str, int] = {}
    for doc_id, n_tokens in lengths:
        key = str(doc_id)
        longest[key] = max(longest.get(key, 0), int(n_tokens) + budget)
    over = [(key, n) for key, n in longest.items() if n > limit]
    if not over:
        return
    doc_id, n_tokens = over[0]
    spent = f" including {budget} tokens to generate" if budget else ""
    more = f" ({len(over) - 1} more documents are too long)" if len(over) > 1 else ""
    raise InputError(f"document {doc_id!r}: its {what} is {n_tokens} tokens{spent}, over the model's context "
                     f"length of {limit} (max_position_embeddings){more}; shorten or split the document")
