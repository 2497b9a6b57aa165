"""pdengine.modeling: the pieces of an HF causal LM the fused ops need, block masks, packing."""
import pytest
import torch
from helpers import tiny_model

from pdengine import modeling


def test_body_and_output_layer_of_each_family():
    for family in ("llama", "qwen2", "gemma", "phi3"):
        model = tiny_model(family)
        assert modeling.output_layer(model) is model.lm_head
        assert modeling.model_body(model) is model.model
        assert modeling.final_logit_softcap(model) is None


def test_final_logit_softcap_reads_the_config():
    model = tiny_model("llama")
    model.config.final_logit_softcapping = 30
    assert modeling.final_logit_softcap(model) == 30.0


def test_output_layer_missing_is_a_clear_error():
    model = tiny_model("llama")
    model.get_output_embeddings = lambda: None
    with pytest.raises(ValueError, match="no output embeddings"):
        modeling.output_layer(model)


def test_segment_mask_isolates_sequences_and_shares_parents():
    seg = torch.tensor([0, 0, 1, 1, 2])
    mask = modeling.segment_attention_mask(seg)[0, 0]
    assert mask[1, 0] and not mask[2, 1] and not mask[0, 1]
    shared = modeling.segment_attention_mask(seg, parent=[-1, 0, 0])[0, 0]
    assert shared[2, 0] and shared[4, 1] and not shared[4, 3]


def test_hidden_states_of_packed_rows_match_separate_forwards():
    model = tiny_model("llama", vocab_size=50, num_hidden_layers=2)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 50, (1, 4), generator=gen), torch.randint(0, 50, (1, 6), generator=gen)
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
