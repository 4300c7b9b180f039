from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dinoreg.data.synthetic import CLASSES, SyntheticShapes


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_item_format_and_defaults():
    train, val = SyntheticShapes(), SyntheticShapes("val")
    assert (len(train), len(val)) == (10000, 2000)
    image, label = train[3]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
    assert label == 3 and train.targets[3] == 3
    assert train.classes == CLASSES and len(CLASSES) >= 6
    with pytest.raises(IndexError):
        train[10000]


def test_deterministic_across_instances():
    a, b = SyntheticShapes(size=50, seed=7), SyntheticShapes(size=50, seed=7)
    for i in (0, 1, 17, 49):
        np.testing.assert_array_equal(_pixels(a[i][0]), _pixels(b[i][0]))
        assert a.boxes(i) == b.boxes(i) == a.sample(i)["boxes"]


def test_splits_and_seeds_differ():
    train, val, other = SyntheticShapes(size=20), SyntheticShapes("val", size=20), SyntheticShapes(size=20, seed=1)
    for i in range(20):
        assert train[i][1] == val[i][1] == other[i][1]  # same label, different image
        assert np.abs(_pixels(train[i][0]) - _pixels(val[i][0])).mean() > 5
        assert np.abs(_pixels(train[i][0]) - _pixels(other[i][0])).mean() > 5


def test_images_are_pairwise_different():
    data = SyntheticShapes(size=40, image_size=32)
    flat = np.stack([_pixels(data[i][0]).ravel() for i in range(40)])
    distances = np.abs(flat[:, None] - flat[None]).mean(-1)
    assert distances[~np.eye(40, dtype=bool)].min() > 3


def test_balanced_labels_and_all_classes_present():
    data = SyntheticShapes(size=8 * 25)
    counts = Counter(data.targets)
    assert sorted(counts) == list(range(len(CLASSES)))
    assert set(counts.values()) == {25}
    assert [data[i][1] for i in range(16)] == data.targets[:16]


def _check_box(box, mask, image_size):
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
    outside = mask.copy()
    outside[y0:y1, x0:x1] = 0
    assert outside.max() == 0  # nothing of the object outside its box
    inside = mask[y0:y1, x0:x1]
    # tight: every border row/column of the box is touched by the object
    assert inside[0].max() > 0 and inside[-1].max() > 0 and inside[:, 0].max() > 0 and inside[:, -1].max() > 0
    return max(x1 - x0, y1 - y0)


@pytest.mark.parametrize("image_size", [32, 64])
def test_single_object_boxes_hold_the_object(image_size):
    data = SyntheticShapes(size=200, image_size=image_size, objects=(1, 1))
    for i in range(200):
        s = data.sample(i)
        assert s["boxes"] == [s["box"]]
        longer = _check_box(s["box"], s["mask"], image_size)
        assert 0.25 * image_size - 1 <= longer <= 0.70 * image_size + 2
        # the object stands out: its base colour is brighter than the background's by >= 64 on average
        pixels = _pixels(s["image"]).astype(np.float64)
        foreground, background = pixels[s["mask"] > 0.99].mean(0), pixels[s["mask"] < 0.01].mean(0)
        assert (foreground - background).mean() > 50


def test_several_objects_of_one_shape_with_their_own_colours():
    data = SyntheticShapes(size=100, objects=(2, 4))
    counts = Counter()
    for i in range(100):
        s = data.sample(i)
        counts[len(s["boxes"])] += 1
        masks = s["masks"]
        assert len(masks) == len(s["boxes"])
        pixels = _pixels(s["image"]).astype(np.float64)
        colours = []
        for box, mask in zip(s["boxes"], masks):
            longer = _check_box(box, mask, 64)
            assert 0.20 * 64 - 1 <= longer <= 0.42 * 64 + 2
            visible = (mask > 0.99) & (np.max([m for m in masks if m is not mask] + [mask * 0], axis=0) < 0.01)
            colours.append(pixels[visible].mean(0))
        # every object has its own colour: the typical pair differs by far more than the texture amplitude
        gaps = [np.linalg.norm(a - b) for j, a in enumerate(colours) for b in colours[j + 1:]]
        counts["far"] += int(np.median(gaps) > 30)
        np.testing.assert_array_equal(np.max(masks, axis=0), s["mask"])
    assert sorted(k for k in counts if k != "far") == [2, 3, 4] and min(counts[k] for k in (2, 3, 4)) > 15
    assert counts["far"] > 85


def test_objects_option_is_validated():
    for bad in ((0, 1), (3, 2)):
        with pytest.raises(ValueError, match="objects"):
            SyntheticShapes(objects=bad)


def _radial_profile(mask: np.ndarray) -> np.ndarray:
    """Rotation-, scale- and translation-invariant silhouette descriptor."""
    ys, xs = np.nonzero(mask > 0.5)
    weights = mask[ys, xs]
    cy, cx = np.average(ys, weights=weights), np.average(xs, weights=weights)
    radius = np.hypot(ys - cy, xs - cx)
    hist, _ = np.histogram(radius / radius.max(), bins=8, range=(0, 1), weights=weights)
    return hist / hist.sum()


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    half = len(labels) // 2
    centroids = np.stack([features[:half][labels[:half] == c].mean(0) for c in range(len(CLASSES))])
    predicted = ((features[half:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return float((predicted == labels[half:]).mean())


def test_shape_is_in_the_silhouette_and_colour_is_a_nuisance():
    data = SyntheticShapes(size=480, objects=(1, 1))
    samples = [data.sample(i) for i in range(480)]
    labels = np.array(data.targets)
    silhouette = np.stack([_radial_profile(s["mask"]) for s in samples])
    colour = np.stack([_pixels(s["image"]).reshape(-1, 3).mean(0) for s in samples])
    assert _nearest_centroid_accuracy(silhouette, labels) > 0.85  # measured ~0.98
    assert _nearest_centroid_accuracy(colour, labels) < 0.35  # chance is 1/8

