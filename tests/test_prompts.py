"""pdengine.prompts: teacher and student prompts share the answer ids, templates, end of turn."""
import pytest
from helpers import WORD_CHAT, word_tokenizer

from pdengine import prompts

# The plain template's "User:"/"Assistant:" and WORD_CHAT's "user:"/"assistant:" both in vocabulary.
WORDS = ("<pad> <eos> <unk> User: Assistant: the cat sat on a mat who where is ? . Ada lives in Oslo "
         "user: assistant: system: Q:").split()


@pytest.mark.parametrize("template", [None, WORD_CHAT])
def test_build_example_shares_answer_ids(template):
    tok = word_tokenizer(WORDS, template)
    answer = tok("Oslo .").input_ids
    ex = prompts.build_example(tok, "Ada lives in Oslo .", "where is Ada ?", answer + [tok.eos_token_id])
    t, s = ex["teacher_input_ids"], ex["student_input_ids"]
    assert t[ex["answer_start_teacher"] :] == s[ex["answer_start_student"] :] == answer + [tok.eos_token_id]
    assert len(t) > len(s)  # the document is only in the teacher prompt
    assert tok.convert_tokens_to_ids("Oslo") in t[: ex["answer_start_teacher"]]


def test_chat_template_is_used_when_present():
    tok = word_tokenizer(WORDS, WORD_CHAT)
    ids = prompts.student_prompt_ids(tok, "where is Ada ?")
    assert tok.convert_ids_to_tokens(ids)[0] == "user:"
    assert tok.convert_ids_to_tokens(ids)[-1] == "assistant:"


def test_plain_template_without_chat_template():
    tok = word_tokenizer(WORDS)
    tokens = tok.convert_ids_to_tokens(prompts.student_prompt_ids(tok, "where is Ada ?"))
    assert tokens == ["User:", "where", "is", "Ada", "?", "Assistant:"]


def test_prompt_format_system_separator_and_question_prefix():
    fmt = prompts.PromptFormat(system="the", separator=" . ", question_prefix="Q: ")
    assert fmt.teacher_user("Ada lives", "who ?") == "Ada lives . Q: who ?"
    assert fmt.student_user("who ?") == "Q: who ?"
    tok = word_tokenizer(WORDS, WORD_CHAT)
    tokens = tok.convert_ids_to_tokens(prompts.student_prompt_ids(tok, "who ?", fmt))
    assert tokens[:4] == ["system:", "the", "<eos>", "user:"] and "Q:" in tokens


def test_end_of_turn_and_strip():
    tok = word_tokenizer(WORDS)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    assert prompts.end_of_turn_ids(tok) == [eos]
    assert prompts.strip_end_of_turn([7, 8, eos, pad, pad], tok) == [7, 8]
    ex = prompts.build_example(tok, "Ada lives in Oslo .", "where is Ada ?", [7, eos, eos])
    assert ex["student_input_ids"][ex["answer_start_student"]:] == [7, eos]  # one end of turn, not three
