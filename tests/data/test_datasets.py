import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinoreg.data.augment import MultiCropGeometric
from dinoreg.data.datasets import FileList, ImageFolder, build_dataset, load_image
from dinoreg.data.loader import BadSample, MultiCropDataset, build_loader
from dinoreg.data.synthetic import SyntheticShapes


def _save_rgb(path: Path, colour=(10, 200, 30), size=(16, 12), **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **kwargs)
    return path


def _odd_files(folder: Path) -> dict:
    """Every awkward kind of file, keyed by kind; bad ones hold no decodable image."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files["zero_byte"] = folder / "zero.jpg"
    files["zero_byte"].write_bytes(b"")
    good_jpeg = _save_rgb(folder / "tmp_full.jpeg", size=(64, 64)).read_bytes()
    (folder / "tmp_full.jpeg").unlink()
    files["truncated"] = folder / "truncated.jpg"
    files["truncated"].write_bytes(good_jpeg[: len(good_jpeg) // 2])
    files["text"] = folder / "text.jpg"
    files["text"].write_text("this is not an image\n")

    files["cmyk"] = folder / "cmyk.jpg"
    Image.new("CMYK", (20, 20), (0, 255, 255, 0)).save(files["cmyk"])  # pure red in CMYK
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] + [0, 0, 0] * 254)
    palette.paste(1, (10, 0, 20, 20))
    files["palette_transparent"] = folder / "palette.png"
    palette.save(files["palette_transparent"], transparency=0)  # index 0 (left half) transparent
    files["gray16"] = folder / "gray16.png"
    Image.fromarray(np.full((20, 20), 32896, dtype=np.uint16)).save(files["gray16"])  # 32896 / 257 = 128
    files["la"] = folder / "la.png"
    Image.new("LA", (20, 20), (100, 255)).save(files["la"])
    files["gray"] = folder / "gray.bmp"
    Image.new("L", (20, 20), 77).save(files["gray"])
    files["rgba"] = folder / "rgba.png"
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    rgba.paste((0, 255, 0, 255), (0, 0, 10, 20))
    rgba.save(files["rgba"])
    files["tiny"] = _save_rgb(folder / "tiny.PNG", colour=(1, 2, 3), size=(5, 5))
    return files


BAD = ("zero_byte", "truncated", "text")


def test_load_image_converts_or_rejects_every_kind(tmp_path):
    files = _odd_files(tmp_path)
    for kind in BAD:
        assert load_image(files[kind]) is None, kind
    images = {kind: load_image(path) for kind, path in files.items() if kind not in BAD}
    assert all(im is not None and im.mode == "RGB" for im in images.values())
    px = {kind: np.asarray(im)[10, :, :] for kind, im in images.items() if kind != "tiny"}  # middle row
    assert np.abs(px["cmyk"][0].astype(int) - (255, 0, 0)).max() <= 3
    np.testing.assert_array_equal(px["palette_transparent"][0], (255, 255, 255))  # transparent -> white
    np.testing.assert_array_equal(px["palette_transparent"][15], (0, 0, 255))
    np.testing.assert_array_equal(px["gray16"][0], (128, 128, 128))  # scaled, not clipped to 255
    np.testing.assert_array_equal(px["la"][0], (100, 100, 100))
    np.testing.assert_array_equal(px["gray"][0], (77, 77, 77))
    np.testing.assert_array_equal(px["rgba"][0], (0, 255, 0))
    np.testing.assert_array_equal(px["rgba"][15], (255, 255, 255))  # transparent -> white
    assert images["tiny"].size == (5, 5)


def test_jpeg_draft_decodes_at_reduced_size(tmp_path):
    path = _save_rgb(tmp_path / "big.jpg", size=(1024, 768))
    assert load_image(path).size == (1024, 768)
    # 1/4 scale would give 256x192 (< 200 on one side), so libjpeg stops at 1/2.
    assert load_image(path, draft_size=200).size == (512, 384)
    assert load_image(path, draft_size=100).size == (256, 192)  # 1/8 would give 96 < 100
    assert load_image(path, draft_size=96).size == (128, 96)


def test_image_folder_labels_from_subfolders(tmp_path):
    root = tmp_path / "data"
    _save_rgb(root / "zebra" / "b.jpg")
    _save_rgb(root / "zebra" / "nested" / "deep" / "a.PNG")
    _save_rgb(root / "ant" / "x.webp")
    _save_rgb(root / "ant" / "y.JPEG")
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / "empty_dir").mkdir()
    dataset = ImageFolder(root)
    assert dataset.classes == ["ant", "zebra"]
    relative = [(Path(p).relative_to(root).as_posix(), label) for p, label in dataset.samples]
    assert relative == [("ant/x.webp", 0), ("ant/y.JPEG", 0), ("zebra/b.jpg", 1), ("zebra/nested/deep/a.PNG", 1)]
    image, label = dataset[3]
    assert image.mode == "RGB" and image.size == (16, 12) and label == 1
    assert dataset.targets == [0, 0, 1, 1]


def test_image_folder_without_subfolders_has_unknown_labels(tmp_path):
    for name in ("b.png", "a.jpg", "c.tif"):
        _save_rgb(tmp_path / name)
    dataset = ImageFolder(tmp_path)
    assert [Path(p).name for p, _ in dataset.samples] == ["a.jpg", "b.png", "c.tif"]
    assert dataset.targets == [-1, -1, -1] and dataset.classes == []


def test_file_list(tmp_path):
    a = _save_rgb(tmp_path / "imgs" / "a.png", colour=(1, 1, 1))
    b = _save_rgb(tmp_path / "elsewhere" / "b.png", colour=(2, 2, 2))
    listing = tmp_path / "lists" / "train.txt"
    listing.parent.mkdir()
    listing.write_text(f"# a comment\n\n../imgs/a.png\n  {b}\t3\n../imgs/missing.png\n")
    dataset = FileList(listing)
    assert [Path(p).resolve() for p, _ in dataset.samples] == [a.resolve(), b.resolve(),
                                                               (tmp_path / "imgs" / "missing.png").resolve()]
    assert dataset.targets == [-1, 3, -1]
    assert np.asarray(dataset[0][0])[0, 0, 0] == 1
    assert dataset[2] is None
    assert dataset.bad_files.count == 1 and dataset.bad_files.paths == [dataset.samples[2][0]]


def test_build_dataset_specs(tmp_path):
    synthetic = build_dataset("synthetic")
    assert isinstance(synthetic, SyntheticShapes) and len(synthetic) == 10000
    custom = build_dataset("synthetic:size=100, image_size=32,seed=3")
    assert (len(custom), custom.image_size, custom.seed) == (100, 32, 3)
    assert build_dataset("synthetic:size=100", split="val").split == "val"
    assert synthetic.objects == (2, 4)
    assert build_dataset("synthetic:objects=1").objects == (1, 1)
    assert build_dataset("synthetic:objects=2-3,size=50").objects == (2, 3)
    with pytest.raises(ValueError, match="colour"):
        build_dataset("synthetic:colour=1")
    with pytest.raises(ValueError, match="objects=A-B"):
        build_dataset("synthetic:objects=two")
    with pytest.raises(ValueError, match="1 <= min <= max"):
        build_dataset("synthetic:objects=3-2")

    _save_rgb(tmp_path / "train" / "cat" / "1.png")
    _save_rgb(tmp_path / "val" / "dog" / "1.png")
    assert build_dataset(str(tmp_path)).classes == ["cat"]  # root/train used for split="train"
    assert build_dataset(str(tmp_path), split="val").classes == ["dog"]
    listing = tmp_path / "list.txt"
    listing.write_text("train/cat/1.png\n")
    assert isinstance(build_dataset(str(listing)), FileList)


def test_build_dataset_errors_name_the_path_and_the_fix(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError, match="does not exist") as error:
        build_dataset(str(missing))
    assert str(missing) in str(error.value) and "synthetic" in str(error.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="no images") as error:
        build_dataset(str(empty))
    assert str(empty) in str(error.value)
    blank_list = tmp_path / "blank.txt"
    blank_list.write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="lists no images"):
        build_dataset(str(blank_list))
    other = tmp_path / "file.csv"
    other.write_text("x")
    with pytest.raises(ValueError, match="neither a folder nor a .txt"):
        build_dataset(str(other))


def test_bad_files_never_crash_a_dataloader(tmp_path):
    files = _odd_files(tmp_path / "odd")
    dataset = ImageFolder(tmp_path / "odd")
    assert len(dataset) == len(files)
    multicrop = MultiCropDataset(dataset, MultiCropGeometric(16, 8, 2), seed=0)
    bad = multicrop[(dataset.samples.index((str(files["text"]), -1)), 0)]
    assert isinstance(bad, BadSample) and bad.path == str(files["text"])

    loader = build_loader(multicrop, batch_size=5, num_workers=2, seed=0, collate_fn=None, shuffle=False)
    iterator = iter(loader)
    seen_bad, n_good = [], 0
    for _ in range(2):  # 10 positions = exactly one pass over the 10 files
        batch = next(iterator)
        seen_bad += batch.bad_files
        n_good += batch.batch_size
        if batch.batch_size:
            assert batch.global_crops.shape == (2 * batch.batch_size, 3, 16, 16)
            assert batch.global_crops.dtype == torch.uint8
    del iterator
    assert sorted(seen_bad) == sorted(str(files[k]) for k in BAD)
    assert n_good == len(files) - len(BAD)


def test_crops_smaller_than_source_are_upscaled(tmp_path):
    path = _save_rgb(tmp_path / "tiny.png", colour=(9, 8, 7), size=(5, 5))
    crops = MultiCropGeometric(32, 16, 2)(load_image(path), random.Random(0))
    assert crops["global_crops"][0].shape == (3, 32, 32)
    assert crops["local_crops"][1].shape == (3, 16, 16)
    assert crops["global_crops"][0][:, 10, 10].tolist() == [9, 8, 7]
