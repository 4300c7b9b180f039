"""Evaluation features: the encoders against a plain recomputation, the data layout checks, subsampling,
and extraction that keeps track of which images it encoded."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinoreg.data import SyntheticShapes, build_eval_loader
from dinoreg.eval.features import (EvalInputError, block_tokens_encoder, eval_splits, extract_dataset_features,
                                   gather_by_index, knn_encoder, subsample_indices)
from dinoreg.models import build_backbone


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_backbone("vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=3, num_heads=2,
                          num_register_tokens=2, init_values=1e-5).eval()


@torch.no_grad()
def test_knn_encoder_equals_recomputation(model):
    images = torch.randn(3, 3, 32, 32)
    tokens = model.prepare_tokens_with_masks(images)
    for block in model.blocks:
        tokens = block(tokens)
    tokens = model.norm(tokens)  # [B, 1 + R + HW, D]
    cls, patches = tokens[:, 0], tokens[:, 1 + model.num_register_tokens:]
    cls_only = knn_encoder(model)(images)
    torch.testing.assert_close(cls_only, cls / cls.norm(dim=-1, keepdim=True))
    pooled = knn_encoder(model, avgpool=True)(images)
    plain = torch.cat([cls, patches.mean(dim=1)], dim=-1)
    torch.testing.assert_close(pooled, plain / plain.norm(dim=-1, keepdim=True))
    assert pooled.shape == (3, 64)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(3))


@torch.no_grad()
def test_block_tokens_encoder_equals_recomputation(model):
    images = torch.randn(2, 3, 32, 32)
    tokens = model.prepare_tokens_with_masks(images)
    per_block = []
    for block in model.blocks:
        tokens = block(tokens)
        per_block.append(model.norm(tokens))
    features = block_tokens_encoder(model, n_last_blocks=2)(images)  # [B, 3, D]
    assert features.shape == (2, 3, 32)
    torch.testing.assert_close(features[:, 0], per_block[1][:, 0])
    torch.testing.assert_close(features[:, 1], per_block[2][:, 0])
    torch.testing.assert_close(features[:, 2], per_block[2][:, 1 + model.num_register_tokens:].mean(dim=1))


def test_subsample_is_deterministic_sorted_and_bounded():
    first = subsample_indices(100, 10, seed=0)
    assert first == subsample_indices(100, 10, seed=0) == sorted(first)
    assert len(set(first)) == 10 and first != list(range(10))
    assert subsample_indices(100, 10, seed=1) != first
    assert subsample_indices(5, 10) == subsample_indices(5, None) == [0, 1, 2, 3, 4]


def _image(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (value, 255 - value, 40)).save(path)


def test_eval_splits_folder_layout(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            _image(tmp_path / "ok" / split / name / "a.png")
    train, val, classes = eval_splits(str(tmp_path / "ok"))
    assert classes == ["cat", "dog"] and len(train) == len(val) == 2 and train.targets == [0, 1]

    _image(tmp_path / "flat" / "cat" / "a.png")  # class folders but no train/ and val/
    with pytest.raises(EvalInputError, match="no train/ sub-folder.*train/<class>"):
        eval_splits(str(tmp_path / "flat"))
    _image(tmp_path / "noclass" / "train" / "a.png")
    _image(tmp_path / "noclass" / "val" / "x" / "a.png")
    with pytest.raises(EvalInputError, match="no class sub-folders"):
        eval_splits(str(tmp_path / "noclass"))
    _image(tmp_path / "differ" / "train" / "cat" / "a.png")
    _image(tmp_path / "differ" / "val" / "dog" / "a.png")
    with pytest.raises(EvalInputError, match="different class sub-folders"):
        eval_splits(str(tmp_path / "differ"))
    with pytest.raises(EvalInputError, match="not a folder"):
        eval_splits(str(tmp_path / "missing"))
    with pytest.raises(EvalInputError, match="synthetic dataset option"):
        eval_splits("synthetic:sise=3")
    train, val, classes = eval_splits("synthetic:size=50,image_size=16")
    assert (len(train), len(val), len(classes)) == (50, 10, 8)


def test_extraction_order_subset_and_bad_files(tmp_path, model):
    for i in range(3):
        _image(tmp_path / "train" / "a" / f"{i}.png", value=60 * i)
    _image(tmp_path / "train" / "b" / "0.png")
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"not an image")
    _image(tmp_path / "val" / "a" / "0.png")
    _image(tmp_path / "val" / "b" / "0.png")
    train, _, _ = eval_splits(str(tmp_path))
    encode = knn_encoder(model)
    result = extract_dataset_features(encode, train, image_size=32, batch_size=2, num_workers=0)
    assert result.indices.tolist() == [0, 1, 2, 3]  # index 4 (the bad file) is absent, the rest in order
    assert result.labels.tolist() == [0, 0, 0, 1]
    images, _ = next(iter(build_eval_loader(train, image_size=32, batch_size=4, num_workers=0)))
    with torch.no_grad():
        torch.testing.assert_close(result.features, encode(images), atol=1e-5, rtol=1e-5)
    subset = extract_dataset_features(encode, train, indices=[1, 3, 4], image_size=32, batch_size=8, num_workers=0)
    assert subset.indices.tolist() == [1, 3]
    torch.testing.assert_close(subset.features, result.features[[1, 3]], atol=1e-5, rtol=1e-5)


def test_gather_by_index_single_process_sorts():
    features, indices = gather_by_index(torch.tensor([[3.0], [1.0], [2.0]]), torch.tensor([7, 2, 5]))
    assert indices.tolist() == [2, 5, 7] and features[:, 0].tolist() == [1.0, 2.0, 3.0]


def test_synthetic_extraction_matches_direct_loader(model):
    dataset = SyntheticShapes("val", size=6, image_size=32)
    encode = knn_encoder(model, avgpool=True)
    result = extract_dataset_features(encode, dataset, image_size=32, resize_size=37, batch_size=4, num_workers=0)
    images, labels = next(iter(build_eval_loader(dataset, image_size=32, resize_size=37, batch_size=6,
                                                 num_workers=0)))
    with torch.no_grad():
        torch.testing.assert_close(result.features, F.normalize(encode(images), dim=-1), atol=1e-5, rtol=1e-5)
    assert result.labels.tolist() == labels.tolist()
