"""Where training batches come from: the `DataSource` interface and a resumable stream.

Two sources implement `DataSource`: `pdengine.cache.TeacherCache` (a prefill's cache)
and `ExampleSource` (a list of cache items or plain `{"input_ids", "answer_start"}`
examples). The trainer only ever talks to this interface.
"""
from __future__ import annotations

import abc
import hashlib
import random

import torch

from pdengine.errors import InputError
from pdengine.modeling import greedy_pack
from pdengine.training.batching import item_sequence, mix_seed, pack_examples


class DataSource(abc.ABC):
    """Items that pack into student batches, in an order that is a pure function of
    (batch_tokens, seed, epoch): what makes resumption exact."""

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def __getitem__(self, i: int) -> dict:
        """Item i (a cache item for `TeacherCache`; online_kl reads its teacher sequence)."""

    @abc.abstractmethod
    def batches(self, batch_tokens: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True,
                start: int = 0):
        """Packed student batches (`pdengine.training.batching`), skipping the first `start`."""

    @abc.abstractmethod
    def num_batches(self, batch_tokens: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True) -> int:
        """How many batches `batches` yields with start=0."""

    @abc.abstractmethod
    def min_batch_tokens(self) -> int:
        """The smallest `batch_tokens` this source accepts."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """What identifies the data (recorded in run.json; a resume must see the same).
        Its "path" entry, when present, is informative only and never compared."""

    @abc.abstractmethod
    def check_compatible(self, model, tokenizer=None, temperature: float | None = None) -> None:
        """InputError unless the data was made for this model (and temperature, when given)."""


class ExampleSource(DataSource):
    """A list of examples; greedy packing up to `batch_tokens` (a sequence longer than
    that gets a batch of its own)."""

    def __init__(self, examples):
        self.examples = list(examples)
        for item in self.examples:
            item_sequence(item)  # validates the keys up front

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def _plan(self, batch_tokens, seed, epoch, shuffle) -> list[list[int]]:
        order = list(range(len(self.examples)))
        if shuffle:
            gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
            order = torch.randperm(len(order), generator=gen).tolist()
        sizes = [len(item_sequence(self.examples[i])[0]) for i in order]
        return [[order[j] for j in part] for part in greedy_pack(sizes, batch_tokens)]

    def batches(self, batch_tokens, *, seed=0, epoch=0, shuffle=True, start=0):
        for group in self._plan(batch_tokens, seed, epoch, shuffle)[start:]:
            yield pack_examples([self.examples[i] for i in group], indices=group)

    def num_batches(self, batch_tokens, *, seed=0, epoch=0, shuffle=True) -> int:
        return len(self._plan(batch_tokens, seed, epoch, shuffle))

    def min_batch_tokens(self) -> int:
        return 1

    def identity(self) -> dict:
        digest = hashlib.sha256()
        for item in self.examples:
            seq, start, top_ids, top_lp = item_sequence(item)
            digest.update(seq.numpy().tobytes() + start.to_bytes(8, "little"))
            if top_ids is not None:
                digest.update(torch.as_tensor(top_ids, dtype=torch.long).numpy().tobytes())
                digest.update(torch.as_tensor(top_lp, dtype=torch.float32).numpy().tobytes())
        return {"kind": "examples", "items": len(self.examples), "content": digest.hexdigest()[:32]}

    def check_compatible(self, model, tokenizer=None, temperature=None) -> None:
        from pdengine.modeling import output_layer

        vocab = output_layer(model).weight.shape[0]
        for n, item in enumerate(self.examples):
            seq, _, top_ids, _ = item_sequence(item)
            ids = seq if top_ids is None else torch.cat([seq, torch.as_tensor(top_ids).reshape(-1)])
            if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                raise InputError(f"example {n} holds token id {int(ids.max())} (or a negative one), "
                                 f"outside the model's vocabulary of {vocab} tokens")


def as_source(data, name: str) -> DataSource | None:
    """`data` as a DataSource (a list or tuple of examples becomes an ExampleSource)."""
    if data is None:
        return None
    if isinstance(data, (list, tuple)):
        data = ExampleSource(data)
    if not isinstance(data, DataSource):
        raise InputError(f"{name} must be a TeacherCache or a list of examples, got {type(data).__name__}")
    if len(data) == 0:
        raise InputError(f"{name} is empty: it holds no examples")
    return data


class Stream:
    """Batches of a source, epoch after epoch, with a resumable position."""

    def __init__(self, source: DataSource, batch_tokens, seed, epoch=0, index=0, cycle=False):
        self.source, self.batch_tokens, self.seed, self.cycle = source, batch_tokens, seed, cycle
        self.epoch, self.index = epoch, index
        self._it = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def at(self, position: dict) -> "Stream":
        """The same stream at a saved `position`."""
        return Stream(self.source, self.batch_tokens, self.seed, cycle=self.cycle,
                      epoch=int(position["epoch"]), index=int(position["index"]))

    def next(self):
        """The next batch, or None at the end of an epoch (when not cycling)."""
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.source.batches(
                    self.batch_tokens, seed=self.seed, epoch=self.epoch, shuffle=True, start=self.index))
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            if not self.cycle:
                return None
        raise InputError("the replay data yields no batches")


VALIDATION_ORDER_SEED = "pdengine-validation"  # one held-out set whatever the training seed


class SubsetSource(DataSource):
    """Some items of another source, packed greedily like `ExampleSource`: the trained or
    the held-out share of a cache (`split_validation`). Items load on demand."""

    def __init__(self, source: DataSource, indices):
        self.source, self.indices = source, list(indices)
        self._lengths = None

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.source[self.indices[i]]

    def lengths(self) -> list[int]:
        if self._lengths is None:
            if hasattr(self.source, "student_lengths"):  # a TeacherCache knows them without decoding
                every = self.source.student_lengths()
                self._lengths = [every[i] for i in self.indices]
            else:
                self._lengths = [len(item_sequence(self[i])[0]) for i in range(len(self))]
        return self._lengths

    def _plan(self, batch_tokens, seed, epoch, shuffle) -> list[list[int]]:
        order = list(range(len(self)))
        if shuffle:
            gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
            order = torch.randperm(len(order), generator=gen).tolist()
        lengths = self.lengths()
        return [[order[j] for j in part] for part in greedy_pack([lengths[i] for i in order], batch_tokens)]

    def batches(self, batch_tokens, *, seed=0, epoch=0, shuffle=True, start=0):
        for group in self._plan(batch_tokens, seed, epoch, shuffle)[start:]:
            yield pack_examples([self[i] for i in group], indices=group)

    def num_batches(self, batch_tokens, *, seed=0, epoch=0, shuffle=True) -> int:
        return len(self._plan(batch_tokens, seed, epoch, shuffle))

    def min_batch_tokens(self) -> int:
        return self.source.min_batch_tokens()

    def identity(self) -> dict:
        digest = hashlib.sha256(",".join(map(str, self.indices)).encode()).hexdigest()[:16]
        return {**self.source.identity(), "items": len(self), "subset": digest}

    def check_compatible(self, model, tokenizer=None, temperature=None) -> None:
        self.source.check_compatible(model, tokenizer, temperature)


def split_validation(source: DataSource, fraction: float) -> tuple[DataSource, DataSource | None]:
    """(trained items, held-out items) of `source`: `fraction` of its QA pairs, at least one,
    chosen by a fixed seed so every run on this cache holds out the same ones."""
    if fraction <= 0:
        return source, None
    n = len(source)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise InputError(f"val_fraction {fraction} holds out {n_val} of the {n} QA pairs: none would be "
                         "left to train on")
    order = list(range(n))
    random.Random(VALIDATION_ORDER_SEED).shuffle(order)
    held_out = set(order[:n_val])
    trained = [i for i in range(n) if i not in held_out]
    return SubsetSource(source, trained), SubsetSource(source, sorted(held_out))
