"""Packed rows through the model's own attention: sequences never see each other, for every
implementation this machine has; the implementation choice and its errors."""
import pytest
import torch
from helpers import tiny_model

from pdengine import attention, modeling
from pdengine.errors import InputError

LENGTHS = (7, 5, 9)


def packed_hidden(model, sequences, use_cache=False):
    ids = torch.cat(sequences)[None]
    positions = torch.cat([torch.arange(len(s)) for s in sequences])[None]
    if use_cache:  # the trap: with a KV cache transformers does not split by position_ids
        out = modeling.model_body(model)(input_ids=ids, position_ids=positions)
        return out.last_hidden_state[0]
    return modeling.hidden_states(model, ids, positions)[0]


def sequences(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 64, (n,), generator=gen) for n in LENGTHS]


@pytest.mark.parametrize("implementation", attention.available("cpu", training=True))
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3"])
def test_packed_sequences_cannot_see_each_other(implementation, family):
    model = tiny_model(family, 64, max_position_embeddings=64, attn_implementation=implementation)
    a, b = sequences(0), sequences(1)
    changed = [b[0], a[1], b[2]]  # the middle sequence kept, its neighbours replaced
    with torch.no_grad():
        first, second = packed_hidden(model, a), packed_hidden(model, changed)
    middle = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert torch.equal(first[middle], second[middle])
    with torch.no_grad():
        alone = modeling.hidden_states(model, a[1][None])[0]
    torch.testing.assert_close(first[middle], alone, rtol=1e-5, atol=1e-5)


def test_with_a_kv_cache_the_sequences_would_leak():
    """Guards the reason for use_cache=False: if transformers ever separated them with a cache
    too, this test tells us the warning in pdengine/attention.py is out of date."""
    model = tiny_model("llama", 64, max_position_embeddings=64)
    a, b = sequences(0), sequences(1)
    with torch.no_grad():
        first = packed_hidden(model, a, use_cache=True)
        second = packed_hidden(model, [b[0], a[1], b[2]], use_cache=True)
    middle = slice(LENGTHS[0], LENGTHS[0] + LENGTHS[1])
    assert not torch.equal(first[middle], second[middle])


def test_choice():
    assert attention.choose(None, "cpu") == "sdpa"
    assert attention.choose("auto", "cpu") == "sdpa"
    assert attention.choose("eager", "cpu") == "eager"
    for training in (True, False):
        with pytest.raises(InputError, match="'flex_attention' cannot be used: it is not available on cpu"):
            attention.choose("flex_attention", "cpu", training=training)
    with pytest.raises(InputError, match="flash-attn is not installed"):
        attention.choose("flash_attention_2", "cpu")
    with pytest.raises(InputError, match="must be one of auto, sdpa"):
        attention.choose("fast", "cpu")


@pytest.mark.parametrize("implementation", attention.available("cpu", training=True))
def test_training_batches_keep_their_sequences_apart(implementation):
    """The trainer's own path (pack_sequences -> target_hidden), with gradients on."""
    from pdengine.training.batching import pack_sequences
    from pdengine.training.losses import target_hidden

    model = tiny_model("llama", 64, max_position_embeddings=64, attn_implementation=implementation).train()
    a, b = sequences(0), sequences(1)

    def middle_targets(seqs):
        batch = pack_sequences([(s, 2, len(s) - 2) for s in seqs])
        hidden = target_hidden(model, batch)
        n0 = LENGTHS[0] - 2
        return hidden[n0: n0 + LENGTHS[1] - 2]

    first, second = middle_targets(a), middle_targets([b[0], a[1], b[2]])
    assert first.requires_grad and torch.equal(first.detach(), second.detach())
