"""pdengine.training.batching and .sources: the one packer and the DataSource interface."""
import pytest
import torch
from train_helpers import K, QA, make_cache, teacher_items, tiny_model

from pdengine.errors import InputError
from pdengine.train import pack_examples
from pdengine.training.batching import pack_sequences
from pdengine.training.sources import DataSource, ExampleSource, as_source


@pytest.fixture(scope="module")
def items():
    return teacher_items(tiny_model())


def test_pack_examples_targets_predict_answer_tokens(items):
    batch = pack_examples(items[:3])
    ids = batch["input_ids"][0]
    assert torch.equal(ids[batch["target_positions"] + 1], batch["labels"])
    assert batch["topk_ids"].shape == (batch["labels"].shape[0], K)
    assert batch["position_ids"][0, len(items[0]["student_input_ids"])] == 0  # restarts per sequence
    assert batch["segment_ids"].tolist() == [n for n, item in enumerate(items[:3])
                                             for _ in item["student_input_ids"]]


def test_plain_examples_pack_as_cross_entropy():
    batch = pack_examples([{"input_ids": [5, 6, 7, 8], "answer_start": 2}, {"input_ids": [9, 10], "answer_start": 1}])
    assert batch["cross_entropy_only"]
    assert batch["labels"].tolist() == [7, 8, 10] and batch["target_positions"].tolist() == [1, 2, 4]
    assert torch.equal(batch["topk_ids"][:, 0], batch["labels"]) and not batch["topk_logprobs"].any()


def test_bad_examples_are_input_errors(items):
    with pytest.raises(InputError, match="empty list"):
        pack_sequences([])
    with pytest.raises(InputError, match="answer_start 4 does not fit"):
        pack_examples([{"input_ids": [1, 2, 3], "answer_start": 4}])
    with pytest.raises(InputError, match="cannot share a batch"):
        pack_examples([items[0], {"input_ids": [1, 2, 3], "answer_start": 1}])
    with pytest.raises(InputError, match="got keys"):
        ExampleSource([{"ids": [1]}])


def test_teacher_cache_batches_are_pack_examples_of_its_items(tmp_path):
    """One layout: the cache's collate and pack_examples give the same tensors."""
    _, _, cache = make_cache(tmp_path, QA * 2, shard_size=3)
    for batch in cache.batches(40, seed=3, epoch=1):
        want = pack_examples([cache[i] for i in batch["indices"]], indices=batch["indices"])
        assert batch.keys() == want.keys()
        for key in batch:
            assert (batch[key] == want[key]) if key == "indices" else torch.equal(batch[key], want[key]), key


def test_both_sources_implement_the_data_source_interface(tmp_path, items):
    _, _, cache = make_cache(tmp_path)
    examples = as_source(items, "cache")
    for source in (cache, examples):
        assert isinstance(source, DataSource)
        n = source.num_batches(40, seed=0, epoch=2)
        assert n == len(list(source.batches(40, seed=0, epoch=2))) and n > 0
        assert len(list(source.batches(40, seed=0, epoch=2, start=1))) == n - 1
        assert source.identity()["content"] == as_source(source, "x").identity()["content"]
    assert cache.min_batch_tokens() == max(cache.student_lengths()) and examples.min_batch_tokens() == 1
    assert ExampleSource(items[:3]).identity()["content"] != examples.identity()["content"]


def test_as_source_refuses_what_is_not_a_source():
    class LooksLikeOne:  # duck-typed batches() is not enough: the interface is stated
        def __len__(self):
            return 1

        def batches(self, *args, **kwargs):
            return iter(())

    with pytest.raises(InputError, match="must be a TeacherCache or a list of examples, got LooksLikeOne"):
        as_source(LooksLikeOne(), "cache")
    with pytest.raises(InputError, match="cache is empty"):
        as_source([], "cache")


def test_example_ids_outside_the_vocabulary_are_refused(items):
    model = tiny_model()
    bad = [dict(items[0], student_input_ids=[*items[0]["student_input_ids"][:-1], 48])]
    with pytest.raises(InputError, match="token id 48 .*vocabulary of 48 tokens"):
        ExampleSource(bad).check_compatible(model)
    ExampleSource(items).check_compatible(model)
