"""Question generation and teacher answers: parsing, filtering, dedupe, batched generation."""
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pdengine import prompts, qa

WORDS = (
    "<pad> <eos> <unk> user: assistant: system: \n ? . , 1. 2. - who where what is lives in "
    "the a cat sat on mat Ada Oslo Bo Rome works as baker"
).split(" ")
CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
DOCS = [
    {"id": "d1", "text": "Ada lives in Oslo . Ada works as baker ."},
    {"id": "d2", "text": "Bo lives in Rome ."},
]


def tiny_tokenizer(chat_template=CHAT):
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


def tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def save_tiny(path, seed=0):
    tiny_model(seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# ---------------------------------------------------------------- parsing


def test_parse_numbered_bulleted_and_plain_lines():
    text = (
        "Here are 3 questions:\n"
        "1. Where does Ada live?\n"
        "2) What does Ada do?\n"
        "- Who lives in Rome?\n"
        "* \"Is Bo a baker?\"\n"
        "Question 5: Where is Oslo? It is in Norway.\n"
        "Where is Rome?\n"
        "Q7: no question mark here\n"
    )
    assert qa.parse_questions(text) == [
        "Where does Ada live?", "What does Ada do?", "Who lives in Rome?",
        "Is Bo a baker?", "Where is Oslo?", "Where is Rome?",
    ]


def test_parse_splits_several_numbered_questions_on_one_line():
    assert qa.parse_questions("1. Who is Ada? 2. Where is Bo?") == ["Who is Ada?", "Where is Bo?"]


def test_parse_without_question_mark_requirement_keeps_plain_lines():
    assert qa.parse_questions("1. name the baker\n\n2. x", require_question_mark=False) == ["name the baker"]


@pytest.mark.parametrize("question", [
    "What does the text say about Ada?",
    "According to the passage, where is Oslo?",
    "Who is mentioned in this article?",
    "What is the main idea of the document?",
    "What happens in the story?",
])
def test_questions_that_need_the_document_are_dropped(question):
    assert qa.mentions_document(question)
    assert qa.parse_questions(question) == []


def test_normal_questions_are_not_flagged():
    for q in ["Where does Ada live?", "What text did Ada write in 1990?", "Who wrote Textbook X?"]:
        assert not qa.mentions_document(q)


def test_normalize_question_for_dedupe():
    assert qa.normalize_question("  Where does ADA live?? ") == qa.normalize_question("where does Ada live")
    assert qa.normalize_question("Who is Ada?") != qa.normalize_question("Who is Bo?")


def test_question_set_dedupes_and_caps():
    qs = qa._QuestionSet(limit=2)
    for q in ["Who is Ada?", "who is ada", "Where is Bo?", "What is Oslo?"]:
        qs.add(q)
    assert qs.questions == ["Who is Ada?", "Where is Bo?"] and qs.full


# ---------------------------------------------------------------- generation


def test_left_pad_aligns_right():
    ids, mask = qa.left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_matches_one_by_one():
    model, tok = tiny_model(), tiny_tokenizer()
    prompt_list = [prompts.student_prompt_ids(tok, q) for q in ["who is Ada ?", "where is the cat on a mat ?", "Bo ?"]]
    batched = qa.generate_ids(model, tok, prompt_list, max_new_tokens=6, batch_size=3, progress=False)
    single = [qa.generate_ids(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0] for p in prompt_list]
    assert batched == single
    assert all(tok.eos_token_id not in ids and tok.pad_token_id not in ids for ids in batched)


def test_generation_restores_global_rng_and_leaves_tokenizer_alone():
    model, tok = tiny_model(), tiny_tokenizer()
    side, pad = tok.padding_side, tok.pad_token
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    qa.generate_ids(model, tok, [[3, 9]], temperature=1.5, max_new_tokens=3, progress=False)
    assert torch.equal(torch.rand(1), before)
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_generate_questions_structure_and_determinism():
    model, tok = tiny_model(), tiny_tokenizer()
    kwargs = dict(n_questions=3, per_call=2, max_new_tokens=12, batch_size=4, seed=7, progress=False)
    rows = qa.generate_questions(model, tok, DOCS, **kwargs)
    assert rows == qa.generate_questions(model, tok, DOCS, **kwargs)
    assert rows, "a random model over a tiny vocabulary still writes some '?' lines"
    for doc in DOCS:
        mine = [r["question"] for r in rows if r["doc_id"] == doc["id"]]
        assert len(mine) <= 3
        assert len({qa.normalize_question(q) for q in mine}) == len(mine)
    assert all(r["question"].endswith("?") and set(r) == {"doc_id", "question"} for r in rows)
    assert qa.generate_questions(model, tok, DOCS, **{**kwargs, "seed": 8}) != rows


def test_generate_questions_respects_max_calls(monkeypatch):
    calls = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        calls.append(len(prompt_ids))
        return [tokenizer("who is Ada ? \n who is Ada ?").input_ids for _ in prompt_ids]

    monkeypatch.setattr(qa, "generate_ids", fake_generate)
    tok = tiny_tokenizer()
    rows = qa.generate_questions(None, tok, DOCS, n_questions=4, per_call=2, max_calls=3, progress=False)
    # every call repeats one question: each document keeps 1 and stops after 3 calls
    assert [r["doc_id"] for r in rows] == ["d1", "d2"]
    assert sum(calls) == 2 * 3


def test_generate_questions_custom_prompt_and_errors():
    model, tok = tiny_model(), tiny_tokenizer()
    with pytest.raises(ValueError, match="placeholder"):
        qa.generate_questions(model, tok, DOCS, prompt="{nope}", progress=False)
    with pytest.raises(ValueError, match="n_questions"):
        qa.generate_questions(model, tok, DOCS, n_questions=0)
    with pytest.raises(ValueError, match="documents is empty"):
        qa.generate_questions(model, tok, [])
    with pytest.raises(ValueError, match="temperature"):
        qa.generate_questions(model, tok, DOCS, temperature=-1.0, progress=False)


def test_answer_questions_structure_ids_and_determinism():
    model, tok = tiny_model(), tiny_tokenizer()
    questions = [{"doc_id": "d1", "question": "where is Ada ?"}, {"doc_id": "d2", "question": "who is Bo ?"}]
    kwargs = dict(n_answers=2, max_new_tokens=6, batch_size=3, seed=3, progress=False)
    rows = qa.answer_questions(model, tok, DOCS, questions, **kwargs)
    assert rows == qa.answer_questions(model, tok, DOCS, questions, **kwargs)
    assert [(r["doc_id"], r["question"]) for r in rows] == [
        ("d1", "where is Ada ?"), ("d1", "where is Ada ?"), ("d2", "who is Bo ?"), ("d2", "who is Bo ?")]
    for r in rows:
        assert r["answer_ids"] == prompts.strip_end_of_turn(r["answer_ids"], tok)
        assert tok.eos_token_id not in r["answer_ids"] and len(r["answer_ids"]) <= 6
        assert r["answer"] == tok.decode(r["answer_ids"], skip_special_tokens=True).strip()
    with pytest.raises(ValueError, match="doc_id 'zz'"):
        qa.answer_questions(model, tok, DOCS, [{"doc_id": "zz", "question": "x"}], progress=False)


def test_answers_follow_the_teacher_prompt(monkeypatch):
    seen = []

    def fake_generate(model, tokenizer, prompt_ids, **kwargs):
        seen.extend(prompt_ids)
        return [[9, 10] for _ in prompt_ids]

    monkeypatch.setattr(qa, "generate_ids", fake_generate)
    tok = tiny_tokenizer()
    rows = qa.answer_questions(None, tok, DOCS, [{"doc_id": "d2", "question": "who is Bo ?"}], progress=False)
    assert seen == [prompts.teacher_prompt_ids(tok, DOCS[1]["text"], "who is Bo ?")]
    assert rows[0]["answer_ids"] == [9, 10]


def test_model_eos_ids_also_stop_generation():
    model, tok = tiny_model(), tiny_tokenizer()
    model.generation_config.eos_token_id = [1, 9]
    assert qa.stop_ids(model, tok) == [1, 9]
    assert qa._cut_at_stop([5, 6, 9, 7, 1], {1, 9}, tok) == [5, 6]
    outs = qa.generate_ids(model, tok, [[3, 4], [3, 5, 6]], temperature=1.5, max_new_tokens=8, progress=False)
    assert all(9 not in ids and 1 not in ids for ids in outs)
