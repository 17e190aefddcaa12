"""The paper's restore (``finetune_epoch``): one epoch at each hospital is exactly dvlib.train.fit for one
epoch at that hospital, with the visit's learning rate, seed and the hospital's class weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dvlib import restore
from dvlib.loader import ImageCache, Shard
from dvlib.models import build
from dvlib.seeds import derive
from dvlib.train import fit

SIZE, BATCH, K = 16, 8, 3


def make_shard(name: str, labels: list[int], seed: int) -> Shard:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (len(labels), 3, 19, 19), generator=g, dtype=torch.uint8)
    cache = ImageCache(data, [f"{name}_{i}" for i in range(len(labels))])
    return Shard(name, cache, torch.arange(len(labels)), torch.tensor(labels))


def hand_class_weights(labels: list[int]) -> torch.Tensor:
    # n / (C * n_c): the hospital's inverse class frequencies, every class present here
    counts = np.bincount(labels, minlength=K)
    return torch.tensor(len(labels) / (K * counts), dtype=torch.float32)


def fresh():
    return build("smallcnn", num_classes=K, weights="random", seed=0)


def state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SHARD_A = ([0] * 12 + [1] * 6 + [2] * 3, 1)  # imbalanced: the class weights matter
SHARD_B = ([0] * 4 + [1] * 9 + [2] * 5, 2)


def reference_fit(model, shard: Shard, labels, *, lr: float, seed: int):
    fit(model, shard.cache, shard.rows, shard.labels, epochs=1, batch_size=BATCH, lr=lr, size=SIZE, seed=seed,
        device="cpu", class_weight=hand_class_weights(labels), progress=False)


@pytest.mark.parametrize("lr", [3e-3, 5e-2])
def test_epoch_visit_is_one_epoch_of_fit_at_its_lr(lr):
    labels, s = SHARD_A
    shard = make_shard("a", labels, s)
    start = state(fresh())
    got = fresh()
    rec = restore.epoch_visit(got, shard, size=SIZE, batch_size=BATCH, lr=lr, seed=7, num_classes=K, device="cpu")
    ref = fresh()
    reference_fit(ref, shard, labels, lr=lr, seed=7)
    assert not same(state(ref), start)  # the epoch moves the weights
    assert same(state(got), state(ref))  # bit for bit on the CPU
    assert rec["lr"] == lr and rec["images"] == len(labels) and rec["loss"] is not None


def test_restore_epoch_learning_rate_changes_the_weights():
    labels, s = SHARD_A
    shard = make_shard("a", labels, s)
    out = []
    for lr in (1e-3, 3e-2):
        m = fresh()
        restore.epoch_visit(m, shard, size=SIZE, batch_size=BATCH, lr=lr, seed=7, num_classes=K, device="cpu")
        out.append(state(m))
    assert not same(*out)


def test_visit_seeds_the_epoch_from_its_index():
    labels, s = SHARD_B
    shard = make_shard("b", labels, s)
    got = fresh()
    rec = restore.visit(got, "finetune_epoch", shard, index=3, reset=False, seed=11, size=SIZE, batch_size=BATCH,
                        lr=2e-2, num_classes=K, device="cpu")
    ref = fresh()
    reference_fit(ref, shard, labels, lr=2e-2, seed=derive(11, 3))
    assert same(state(got), state(ref))
    assert (rec["site"], rec["mode"], rec["lr"]) == ("b", "finetune_epoch", 2e-2)


def test_finetune_epoch_restore_is_one_fit_per_hospital_in_turn():
    shards = [(make_shard(n, labels, s), labels) for n, (labels, s) in (("a", SHARD_A), ("b", SHARD_B))]
    start = state(fresh())
    got = fresh()
    visits = restore.restore(got, "finetune_epoch", [sh for sh, _ in shards], seed=5, size=SIZE, batch_size=BATCH,
                             lr=1e-2, num_classes=K, device="cpu")
    ref = fresh()
    after_a = None
    for i, (shard, labels) in enumerate(shards):
        reference_fit(ref, shard, labels, lr=1e-2, seed=derive(5, i))
        after_a = after_a or state(ref)
    assert not same(after_a, start) and not same(state(ref), after_a)  # both epochs move the weights
    assert same(state(got), state(ref))
    assert [(v["site"], v["mode"]) for v in visits] == [("a", "finetune_epoch"), ("b", "finetune_epoch")]
