"""pdengine.generation: left padding, stop tokens, batched seeded generation, shared settings."""
import pytest
import torch
from helpers import qa_model, qa_tokenizer

from pdengine import generation, prompts
from pdengine.errors import InputError


def test_left_pad_aligns_right():
    ids, mask = generation.left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_batched_greedy_matches_one_by_one():
    model, tok = qa_model(), qa_tokenizer()
    prompt_list = [prompts.student_prompt_ids(tok, q) for q in ["who is Ada ?", "where is the cat on a mat ?", "Bo ?"]]
    batched = generation.generate_ids(model, tok, prompt_list, max_new_tokens=6, batch_size=3, progress=False)
    single = [generation.generate_ids(model, tok, [p], max_new_tokens=6, batch_size=1, progress=False)[0]
              for p in prompt_list]
    assert batched == single
    assert all(tok.eos_token_id not in ids and tok.pad_token_id not in ids for ids in batched)
    texts = generation.greedy_texts(model, tok, prompt_list, max_new_tokens=6, batch_size=2, desc="t",
                                    progress=False)
    assert texts == [generation.decode(tok, ids) for ids in batched]


def test_generation_restores_global_rng_and_leaves_tokenizer_alone():
    model, tok = qa_model(), qa_tokenizer()
    side, pad = tok.padding_side, tok.pad_token
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    generation.generate_ids(model, tok, [[3, 9]], temperature=1.5, max_new_tokens=3, progress=False)
    assert torch.equal(torch.rand(1), before)
    assert (tok.padding_side, tok.pad_token) == (side, pad)


def test_sampling_depends_on_the_seed_only():
    model, tok = qa_model(), qa_tokenizer()
    run = lambda seed: generation.generate_ids(model, tok, [[3, 9], [4]] * 2, temperature=1.5,  # noqa: E731
                                               max_new_tokens=6, batch_size=2, seed=seed, progress=False)
    assert run(5) == run(5) and run(5) != run(6)


def test_model_eos_ids_also_stop_generation():
    model, tok = qa_model(), qa_tokenizer()
    model.generation_config.eos_token_id = [1, 9]
    assert generation.stop_ids(model, tok) == [1, 9]
    assert generation.cut_at_stop([5, 6, 9, 7, 1], {1, 9}, tok) == [5, 6]
    outs = generation.generate_ids(model, tok, [[3, 4], [3, 5, 6]], temperature=1.5, max_new_tokens=8,
                                   progress=False)
    assert all(9 not in ids and 1 not in ids for ids in outs)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(batch_size=0), "batch_size"), (dict(max_new_tokens=True), "max_new_tokens"),
])
def test_bad_generation_arguments_are_input_errors(kwargs, needle):
    with pytest.raises(InputError, match=needle):
        generation.generate_ids(None, qa_tokenizer(), [[3]], **kwargs)


def test_empty_prompt_is_refused():
    with pytest.raises(InputError, match="at least one token"):
        generation.generate_ids(qa_model(), qa_tokenizer(), [[3], []], progress=False)


def test_shared_settings_check_their_values():
    assert generation.ModelStageSettings().batch_size == 16
    with pytest.raises(InputError, match="batch_size must be > 0"):
        generation.ModelStageSettings(batch_size=0)
    with pytest.raises(InputError, match="dtype must be one of"):
        generation.ModelStageSettings(dtype="int8")


def test_resolve_settings_applies_overrides_and_checks_them():
    base = generation.ModelStageSettings(batch_size=4)
    assert generation.resolve_settings(generation.ModelStageSettings, base, {"progress": False}) == \
        generation.ModelStageSettings(batch_size=4, progress=False)
    assert generation.resolve_settings(generation.ModelStageSettings, None, {}) == generation.ModelStageSettings()
    with pytest.raises(InputError, match="batch_size must be > 0"):
        generation.resolve_settings(generation.ModelStageSettings, None, {"batch_size": -1})
    with pytest.raises(TypeError):
        generation.resolve_settings(generation.ModelStageSettings, None, {"batch": 1})
    with pytest.raises(TypeError, match="settings must be a ModelStageSettings"):
        generation.resolve_settings(generation.ModelStageSettings, {"batch_size": 1}, {})


def test_each_continuation_says_whether_it_reached_a_stop_token(monkeypatch):
    model, tok = qa_model(), qa_tokenizer()  # stop token: <eos> = 1, pad = 0
    new = torch.tensor([[5, 1, 0], [5, 6, 7], [1, 0, 0]])
    monkeypatch.setattr(model, "generate", lambda input_ids, **k: torch.cat([input_ids, new[: len(input_ids)]], 1))
    out = generation.generate_sequences(model, tok, [[3], [4], [3, 4]], max_new_tokens=3, batch_size=3,
                                        progress=False)
    # prompts are batched shortest first: [3], [4], [3, 4] get rows 0, 1, 2
    assert out == [generation.Generated([5], True), generation.Generated([5, 6, 7], False),
                   generation.Generated([], True)]
    assert generation.generate_ids(model, tok, [[3], [4], [3, 4]], max_new_tokens=3, batch_size=3,
                                   progress=False) == [[5], [5, 6, 7], []]


def test_each_batch_depends_only_on_its_prompts_and_seed_plus_its_index():
    """What lets torchrun ranks share the batches (docs/DESIGN.md, "Distributed"): batch b of
    a call, generated alone under seed + b, is the same sample."""
    from pdengine import distributed

    model, tok = qa_model(), qa_tokenizer()
    prompt_list = [[3, 9], [4, 10], [5, 11], [6, 12], [7, 13]]  # equal lengths: batches keep the input order
    sample = dict(temperature=1.5, max_new_tokens=5, batch_size=2, progress=False)
    full = generation.generate_ids(model, tok, prompt_list, seed=7, **sample)
    assert generation.generate_ids(model, tok, prompt_list[2:4], seed=8, **sample) == full[2:4]
    assert generation.generate_ids(model, tok, prompt_list[4:], seed=9, **sample) == full[4:]
    assert generation.generate_ids(model, tok, prompt_list, seed=7, ctx=distributed.Context(), **sample) == full
    assert generation.generate_ids(model, tok, prompt_list[2:4], seed=7, **sample) != full[2:4]  # the seed matters
