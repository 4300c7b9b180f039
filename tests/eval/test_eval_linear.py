"""The linear protocol: input layout, the official grid and lr scaling, training to separation, the
held-out split and the choice of the configuration on it."""

import pytest
import torch

from dinoreg.eval.linear import (LEARNING_RATES, evaluate_linear_classifiers, heldout_split, linear_configs,
                                 linear_input, linear_probe, select_best, train_linear_classifiers)


def blobs(n, *, num_classes=4, dim=16, seed=0, noise=0.3):
    """``[n, 2, dim]`` features: slot 0 (a "cls token") separates the classes, slot 1 (an "avgpool") is noise."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.arange(n) % num_classes
    cls = centers[labels] + noise * torch.randn(n, dim, generator=generator)
    return torch.stack([cls, torch.randn(n, dim, generator=generator)], dim=1), labels


def test_linear_input_layout():
    features = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)  # 4 blocks' cls, then the avgpool
    torch.testing.assert_close(linear_input(features, n_last_blocks=1, avgpool=False), features[:, 3])
    torch.testing.assert_close(linear_input(features, n_last_blocks=4, avgpool=True), features.flatten(1))
    torch.testing.assert_close(linear_input(features, n_last_blocks=1, avgpool=True),
                               torch.cat([features[:, 3], features[:, 4]], dim=1))
    with pytest.raises(ValueError, match="last 4 blocks"):
        linear_input(features, n_last_blocks=5, avgpool=False)


def test_official_grid_and_lr_scaling():
    configs = linear_configs(n_last_blocks=[1, 4], learning_rates=LEARNING_RATES, batch_size=128)
    assert len(configs) == 2 * 2 * 13 == len({c.name for c in configs})
    assert configs[0].lr == pytest.approx(1e-5 * 128 / 256) and configs[-1].lr == pytest.approx(0.05)
    assert (configs[0].n_last_blocks, configs[0].avgpool, configs[13].avgpool) == (1, False, True)
    assert configs[-1].name == "classifier_4_blocks_avgpool_True_lr_0_05"


def test_heldout_split_is_stratified_deterministic_and_disjoint():
    labels = torch.tensor([0] * 20 + [1] * 10 + [2] * 2 + [3])
    fit, heldout = heldout_split(labels, fraction=0.1)
    again = heldout_split(labels, fraction=0.1)
    assert torch.equal(fit, again[0]) and torch.equal(heldout, again[1])
    assert sorted(fit.tolist() + heldout.tolist()) == list(range(33))
    assert torch.bincount(labels[heldout], minlength=4).tolist() == [2, 1, 1, 0]  # >= 1 per class of 2+, 0 of 1
    assert not torch.equal(heldout_split(labels, fraction=0.1, seed=1)[1], heldout)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        heldout_split(labels, fraction=1.0)


def test_separable_features_reach_full_accuracy_shuffled_labels_do_not():
    train, train_labels = blobs(400)
    val, val_labels = blobs(100, seed=1)
    kwargs = dict(num_classes=4, n_last_blocks=[1], learning_rates=[0.01, 0.1, 1.0], epochs=10, batch_size=32,
                  val_fraction=0.2, show_progress=False)
    result = linear_probe(train, train_labels, val, val_labels, **kwargs)
    assert result["val_top1"] >= 0.99 and result["best"]["heldout_top1"] >= 0.99
    assert (result["fit_images"], result["heldout_images"], result["iterations"]) == (320, 80, 100)
    shuffled = train_labels[torch.randperm(400, generator=torch.Generator().manual_seed(5))]
    chance = linear_probe(train, shuffled, val, val_labels, **kwargs)
    assert chance["val_top1"] < 0.6


def test_choice_is_made_on_heldout_never_on_val():
    train, train_labels = blobs(200, noise=1.5)
    val, val_labels = blobs(60, seed=1, noise=1.5)
    kwargs = dict(num_classes=4, n_last_blocks=[1], learning_rates=[1e-4, 0.01, 1.0], epochs=3, batch_size=32,
                  val_fraction=0.25, show_progress=False)
    result = linear_probe(train, train_labels, val, val_labels, **kwargs)
    heldout = [row["heldout_top1"] for row in result["configs"]]
    assert result["best"]["name"] == result["configs"][select_best(heldout)]["name"]
    assert 0.0 <= result["val_top1"] <= result["best"]["val_top5"] <= 1.0
    # Other val labels change the reported accuracy, never the choice nor the held-out figures.
    other = linear_probe(train, train_labels, val, (val_labels + 1) % 4, **kwargs)
    assert other["configs"] == result["configs"] and other["best"]["name"] == result["best"]["name"]
    assert other["val_top1"] != result["val_top1"]


def test_select_best_first_on_ties():
    assert select_best([0.1, 0.5, 0.5, 0.2]) == 1
    with pytest.raises(ValueError):
        select_best([])


def test_training_is_deterministic_and_evaluation_shapes():
    features, labels = blobs(64)
    configs = linear_configs(n_last_blocks=[1], learning_rates=[0.1], batch_size=16)
    first = train_linear_classifiers(features, labels, configs=configs, num_classes=4, epochs=2, batch_size=16,
                                     show_progress=False)
    second = train_linear_classifiers(features, labels, configs=configs, num_classes=4, epochs=2, batch_size=16,
                                      show_progress=False)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert first[1].weight.shape == (4, 32)  # avgpool: cls + mean patch token
    scores = evaluate_linear_classifiers(first, configs, features, labels, chunk_size=10)
    assert len(scores) == 2 and all(0 <= s["top1"] <= s["top5"] <= 1 for s in scores)
