"""train.sampler_order: today's randperm order unchanged, the bijection a seeded permutation in constant memory, and
the global stream (sharding, start, resume with another world size) the same for both."""

import itertools

import numpy as np
import pytest
from launch_helpers import TINY
from omegaconf import OmegaConf

from dinoreg.config import ConfigError, load_config
from dinoreg.data import loader
from dinoreg.data.datasets import build_dataset
from dinoreg.data.loader import FeistelPermutation, InfiniteShardedSampler, build_loader
from dinoreg.distributed import DistributedEnvironment
from dinoreg.train.build import training_batches
from dinoreg.train.checkpoint import config_differences

ORDERS = ("randperm", "bijection")


def _indices(sampler, count):
    return [index for index, _ in itertools.islice(iter(sampler), count)]


def _stream(sampler, count):
    return list(itertools.islice(iter(sampler), count))


def _whole(n, seed, epoch):
    return FeistelPermutation(n, seed, epoch)[np.arange(n)]


# ------------------------------------------------------------------------ the default order is today's


def test_the_randperm_order_is_unchanged():
    """Values drawn on main before train.sampler_order existed (torch.randperm seeded by _mix(seed, epoch))."""
    assert _indices(InfiniteShardedSampler(10, seed=0), 25) == [7, 4, 8, 6, 3, 5, 0, 1, 9, 2, 6, 9, 4, 5, 7, 1, 2, 8,
                                                                3, 0, 1, 2, 9, 7, 4]
    assert _indices(InfiniteShardedSampler(7, seed=3, rank=1, world_size=2, start=5), 25) == [
        0, 1, 4, 0, 6, 2, 0, 4, 6, 4, 2, 3, 5, 1, 2, 1, 4, 0, 0, 4, 6, 2, 2, 6, 0]
    assert _indices(InfiniteShardedSampler(1000, seed=123, order="randperm"), 12) == [
        718, 947, 793, 661, 786, 829, 178, 656, 280, 5, 26, 57]
    assert InfiniteShardedSampler(1000, seed=123).permutation(4)[:6].tolist() == [425, 678, 974, 636, 280, 936]


# ------------------------------------------------------------------------ the bijection


@pytest.mark.parametrize("n", [1, 2, 3, 7, 1000, 1024, 2048, 1025, 4097, 7919, 65537])
def test_the_bijection_is_a_permutation(n):
    for seed, epoch in ((0, 0), (5, 3)):
        perm = _whole(n, seed, epoch)
        assert perm.dtype == np.int64 and np.array_equal(np.sort(perm), np.arange(n))


def test_the_bijection_depends_on_seed_and_epoch_and_nothing_else():
    n = 1000
    base = _whole(n, 0, 0)
    assert np.array_equal(base, _whole(n, 0, 0))  # deterministic: a new instance gives the same order
    others = [_whole(n, 0, 1), _whole(n, 1, 0), _whole(n, 0, 2), _whole(n, 2**40, 0)]
    for other in others:
        assert (other != base).mean() > 0.95  # unrelated orders, not a shift of one another
    assert not np.array_equal(base, np.arange(n))
    # any subset of offsets, in any order, gives those positions' items: a block is a slice of the whole
    offsets = np.array([999, 0, 512, 3, 3])
    assert np.array_equal(FeistelPermutation(n, 0, 0)[offsets], base[offsets])
    assert FeistelPermutation(n, 0, 0)[512] == base[512] and FeistelPermutation(n, 0, 0)[[[1, 2]]].shape == (1, 2)
    with pytest.raises(IndexError, match=r"\[0, 1000\)"):
        FeistelPermutation(n, 0, 0)[np.array([1000])]


def test_the_bijection_is_roughly_uniform():
    """Where item 0 lands over 2,000 seeds (10 cells, 200 expected each), and whether consecutive positions
    rise, are what a uniform shuffle gives. Deterministic (fixed seeds); the bounds are loose: chi-square with 9
    degrees of freedom exceeds 40 with probability 5e-6."""
    n, seeds = 10, 2000
    landing = np.bincount([int(np.flatnonzero(_whole(n, seed, 0) == 0)[0]) for seed in range(seeds)], minlength=n)
    expected = seeds / n
    assert ((landing - expected) ** 2 / expected).sum() < 40, landing
    perm = _whole(100_000, 7, 0)
    assert abs((np.diff(perm) > 0).mean() - 0.5) < 0.01  # no monotone runs
    assert abs(np.corrcoef(np.arange(perm.size), perm)[0, 1]) < 0.02  # position says nothing about the item
    halves = np.bincount(perm[:50_000] * 10 // perm.size, minlength=10)  # the first half draws from every decile
    assert halves.min() > 4500 and halves.max() < 5500, halves


def test_a_bijection_epoch_in_the_stream_visits_every_item_once():
    n = 37
    stream = _indices(InfiniteShardedSampler(n, seed=4, order="bijection"), 3 * n)
    epochs = [stream[e * n:(e + 1) * n] for e in range(3)]
    assert all(sorted(epoch) == list(range(n)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs == [_whole(n, 4, e).tolist() for e in range(3)]
    assert epochs[0] == InfiniteShardedSampler(n, seed=4, order="bijection").permutation(0).tolist()
    assert epochs[0] != _indices(InfiniteShardedSampler(n, seed=4), n)  # another order than randperm's


# ------------------------------------------------------------------------ the global stream, for both orders


@pytest.mark.parametrize("block", [4096, 5])  # the default block, and blocks that end mid-epoch
@pytest.mark.parametrize("order", ORDERS)
def test_sharding_and_start_keep_the_global_stream(order, block, monkeypatch):
    monkeypatch.setattr(loader, "SAMPLER_BLOCK", block)
    n, seed = 23, 9
    single = _stream(InfiniteShardedSampler(n, seed=seed, order=order), 120)
    assert [p for _, p in single] == list(range(120))
    # ranks 0 and 1 of world 2 interleave to world 1's stream, across several epochs
    ranks = [_stream(InfiniteShardedSampler(n, seed=seed, rank=r, world_size=2, order=order), 60) for r in range(2)]
    assert [item for pair in zip(*ranks) for item in pair] == single
    # three ranks from a start that is no multiple of anything
    ranks = [_stream(InfiniteShardedSampler(n, seed=seed, rank=r, world_size=3, start=31, order=order), 29)
             for r in range(3)]
    assert [item for triple in zip(*ranks) for item in triple] == single[31:31 + 3 * 29]
    # a run of 2 ranks resumed by 1 at iteration 5 of global batch 8
    assert _stream(InfiniteShardedSampler(n, seed=seed, start=40, order=order), 80) == single[40:]


def test_the_sampler_and_build_loader_take_the_order():
    with pytest.raises(ValueError, match="randperm, bijection.*'feistel'"):
        InfiniteShardedSampler(10, seed=0, order="feistel")
    class Keys:  # a dataset of 10 items indexed by (index, position), as MultiCropDataset
        def __len__(self):
            return 10

        def __getitem__(self, key):
            return key

    data = build_loader(Keys(), batch_size=4, num_workers=0, seed=1, order="bijection",
                        collate_fn=lambda items: [index for index, _ in items])
    assert data.sampler.order == "bijection"
    assert next(iter(data)) == _whole(10, 1, 0)[:4].tolist()
    plain = InfiniteShardedSampler(10, seed=0, shuffle=False, order="bijection")  # no shuffle: either order
    assert _indices(plain, 12) == list(range(10)) + [0, 1]


# ------------------------------------------------------------------------ the config


def test_the_config_key_is_validated_and_reaches_the_loader():
    assert load_config("tiny_cpu").train.sampler_order == "randperm"
    with pytest.raises(ConfigError) as caught:
        load_config("tiny_cpu", ["train.sampler_order=feistel"])
    assert "train.sampler_order: got 'feistel'; allowed: randperm, bijection" in str(caught.value)
    cfg = load_config("tiny_cpu", [*TINY, "train.batch_size_per_gpu=4", "train.num_workers=0",
                                     "train.sampler_order=bijection", "train.seed=3"])
    batch = next(training_batches(cfg, build_dataset("synthetic:size=16"), DistributedEnvironment(rank=1, world_size=2),
                                  position=8))
    # rank 1 of 2 from global position 8: positions 9, 11, 13, 15 of the seed-3 bijection
    assert batch.positions.tolist() == [9, 11, 13, 15]
    assert batch.indices.tolist() == _whole(16, 3, 0)[[9, 11, 13, 15]].tolist()


def test_a_resume_with_another_order_is_a_change_of_the_data_order():
    """As train.seed: a checkpoint's run resumes with its order, or with --allow-config-change; a checkpoint from
    before the key existed resumes with the default (the order it had)."""
    saved = load_config("tiny_cpu")
    breaking, _ = config_differences(saved, load_config("tiny_cpu", ["train.sampler_order=bijection"]))
    assert breaking == ["train.sampler_order: 'randperm' -> 'bijection'"]
    older = OmegaConf.create(OmegaConf.to_container(saved))
    del older.train["sampler_order"]
    assert config_differences(older, load_config("tiny_cpu")) == ([], ["train.sampler_order: '<absent>' -> 'randperm'"])
    breaking, _ = config_differences(older, load_config("tiny_cpu", ["train.sampler_order=bijection"]))
    assert breaking == ["train.sampler_order: '<absent>' -> 'bijection'"]
