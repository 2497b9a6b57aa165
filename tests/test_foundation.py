"""Prompts, JSONL I/O, model loading, block masks: the pieces every stage shares."""
import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pdengine import io, loading, modeling, prompts

WORDS = "<pad> <eos> <unk> User: Assistant: the cat sat on a mat who where is ? . Ada lives in Oslo".split()
CHAT = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def tiny_tokenizer(chat_template=None):
    vocab = {w: i for i, w in enumerate(WORDS + ["user:", "assistant:", "system:"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = chat_template
    return fast


@pytest.mark.parametrize("template", [None, CHAT])
def test_build_example_shares_answer_ids(template):
    tok = tiny_tokenizer(template)
    answer = tok("Oslo .").input_ids
    ex = prompts.build_example(tok, "Ada lives in Oslo .", "where is Ada ?", answer + [tok.eos_token_id])
    t, s = ex["teacher_input_ids"], ex["student_input_ids"]
    assert t[ex["answer_start_teacher"] :] == s[ex["answer_start_student"] :] == answer + [tok.eos_token_id]
    assert len(t) > len(s)  # the document is only in the teacher prompt
    assert tok.convert_tokens_to_ids("Oslo") in t[: ex["answer_start_teacher"]]


def test_chat_template_is_used_when_present():
    tok = tiny_tokenizer(CHAT)
    ids = prompts.student_prompt_ids(tok, "where is Ada ?")
    assert tok.convert_ids_to_tokens(ids)[0] == "user:"


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    good = tmp_path / "docs.jsonl"
    io.write_jsonl(good, [{"id": "a", "text": "x"}])
    assert io.read_jsonl(good, required=("id", "text")) == [{"id": "a", "text": "x"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        io.read_jsonl(bad)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        io.read_jsonl(tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="not found"):
        io.read_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"missing key\(s\) \['text'\]"):
        io.write_jsonl(bad, [{"id": "a"}]) or io.read_jsonl(bad, required=("id", "text"))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    io.atomic_write_json(tmp_path / "m.json", {"a": 1})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        loading.load_model_and_tokenizer(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        loading.load_model_and_tokenizer(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="not a causal LM"):
        loading.load_model_and_tokenizer(tmp_path)


def test_load_model_roundtrip(tmp_path):
    cfg = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=16, intermediate_size=32,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tiny_tokenizer(CHAT).save_pretrained(tmp_path)
    model, tok = loading.load_model_and_tokenizer(tmp_path)
    assert not model.training and tok.chat_template == CHAT


def test_segment_mask_isolates_sequences_and_shares_parents():
    seg = torch.tensor([0, 0, 1, 1, 2])
    mask = modeling.segment_attention_mask(seg)[0, 0]
    assert mask[1, 0] and not mask[2, 1] and not mask[0, 1]
    shared = modeling.segment_attention_mask(seg, parent=[-1, 0, 0])[0, 0]
    assert shared[2, 0] and shared[4, 1] and not shared[4, 3]


def test_hidden_states_of_packed_rows_match_separate_forwards():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg).eval()
    a, b = torch.randint(0, 50, (1, 4)), torch.randint(0, 50, (1, 6))
    seg = torch.tensor([0] * 4 + [1] * 6)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]])
    packed = modeling.hidden_states(model, torch.cat([a, b], 1), pos, modeling.segment_attention_mask(seg))
    torch.testing.assert_close(packed[:, :4], modeling.hidden_states(model, a), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 4:], modeling.hidden_states(model, b), atol=1e-5, rtol=1e-5)


def test_greedy_pack_keeps_order_and_budget():
    assert modeling.greedy_pack([3, 3, 3, 5, 1], 6) == [[0, 1], [2], [3, 4]]
    assert modeling.greedy_pack([7, 2], 6) == [[0], [1]]  # too large alone: own group
    assert modeling.greedy_pack([2, 2, 2], 7, overhead=3) == [[0, 1], [2]]
    assert modeling.greedy_pack([], 4) == []
