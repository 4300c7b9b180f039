"""Decoding an image's bytes in memory (a shard member's) gives exactly what ``load_image`` gives for the file."""

import io

import numpy as np
import pytest
from PIL import Image

from dinoreg.data.datasets import load_image


def decode(data: bytes, draft):
    """What the shard reader does with a member's bytes."""
    return load_image(io.BytesIO(data), draft_size=draft)


def _photo(width=96, height=72, seed=0) -> np.ndarray:
    """A smooth gradient with noise: JPEG's chroma subsampling and DCT both have work to do."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def files(tmp_path):
    paths = {}
    rgb = Image.fromarray(_photo())
    rgb.save(paths.setdefault("jpeg", tmp_path / "a.jpg"), quality=90)
    rgb.convert("L").save(paths.setdefault("gray_jpeg", tmp_path / "g.jpg"), quality=90)
    rgb.convert("CMYK").save(paths.setdefault("cmyk_jpeg", tmp_path / "c.jpg"), quality=90)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray((_photo(seed=1)[..., 0] > 128).astype(np.uint8) * 255))
    rgba.save(paths.setdefault("rgba_png", tmp_path / "t.png"))
    rgb.convert("P").save(paths.setdefault("palette_png", tmp_path / "p.png"))
    return paths


@pytest.mark.parametrize("draft", [None, 20, 40])
def test_bytes_in_memory_decode_as_the_same_file(files, draft):
    for kind, path in files.items():
        expected = load_image(path, draft_size=draft)
        decoded = decode(path.read_bytes(), draft)
        assert decoded is not None and decoded.mode == "RGB", kind
        assert decoded.size == expected.size, kind
        assert np.array_equal(np.asarray(decoded), np.asarray(expected)), kind


def test_draft_reduces_jpegs_only_and_keeps_both_sides_at_least_the_draft_size(files):
    data = files["jpeg"].read_bytes()  # 96 x 72
    assert decode(data, 9).size == (12, 9)  # 1/8
    assert decode(data, 20).size == (48, 36)  # 1/4 would give 18 < 20
    assert decode(data, 36).size == (48, 36)
    assert decode(data, 37).size == (96, 72)  # 1/2 would give 36 < 37
    assert decode(files["rgba_png"].read_bytes(), 20).size == (96, 72)  # not a JPEG: never reduced


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0" + b"\x00" * 40])
def test_undecodable_bytes_give_none(data):
    assert decode(data, None) is None
    assert decode(data, 64) is None


def test_a_truncated_jpeg_gives_none(files):
    data = files["jpeg"].read_bytes()
    assert decode(data[: len(data) // 2], None) is None


def test_simplejpeg_gives_pillows_pixels_as_measured(files):
    """Why no second decoder is offered (docs/BENCHMARKS.md): simplejpeg (libjpeg-turbo, ISLOW DCT, fancy upsampling, as Pillow's) gives
    the same pixels, and only the decode (a small part of a worker's cost) is faster. Checks the claim where installed."""
    simplejpeg = pytest.importorskip("simplejpeg")
    data = files["jpeg"].read_bytes()
    for draft, scale in ((None, 1), (36, 2)):
        ours = np.asarray(decode(data, draft))
        theirs = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=96 // scale, min_height=72 // scale)
        assert theirs.shape == ours.shape
        assert np.array_equal(theirs, ours)


def test_the_buffer_is_not_needed_after_decoding(files):
    buffer = bytearray(files["jpeg"].read_bytes())
    image = decode(bytes(buffer), None)
    buffer[:] = b"\x00" * len(buffer)
    image.load()
    assert np.array_equal(np.asarray(image), np.asarray(decode(files["jpeg"].read_bytes(), None)))
