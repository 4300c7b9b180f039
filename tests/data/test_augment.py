import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

import dinoreg.data.augment as augment
from dinoreg.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropGeometric,
    Photometric,
    RandomColorJitter,
    sample_resized_crop_params,
)

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return x * STD + MEAN


# ---------------------------------------------------------------- geometric


@pytest.mark.parametrize("scale", [(0.32, 1.0), (0.05, 0.32)])
def test_resized_crop_params_within_bounds(scale):
    rng = random.Random(0)
    width, height = 200, 150
    areas, ratios = [], []
    for _ in range(3000):
        top, left, h, w = sample_resized_crop_params(width, height, scale, (3 / 4, 4 / 3), rng)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    # rounding w and h to integers moves area and ratio a little past the bounds on small boxes
    assert areas.min() >= scale[0] * 0.9 and areas.max() <= scale[1] * 1.02
    assert ratios.min() >= 0.75 * 0.9 and ratios.max() <= 4 / 3 * 1.1
    # spread over the whole range; ratio log-uniform (median ratio ~1)
    assert areas.min() < scale[0] + 0.02 and areas.max() > scale[1] - 0.05
    if scale[1] < 0.5:  # small boxes always fit: area uniform over the range (large ones retry, biased down)
        assert areas.mean() == pytest.approx(sum(scale) / 2, rel=0.05)
        assert np.median(np.log(ratios)) == pytest.approx(0.0, abs=0.05)


def test_resized_crop_params_fallback_is_the_central_crop_at_clamped_ratio():
    # A 100x10 strip cannot hold a box of >= 90% area at ratio <= 4/3: every attempt fails.
    assert sample_resized_crop_params(100, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (0, 43, 10, 13)
    assert sample_resized_crop_params(10, 100, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0)) == (43, 0, 13, 10)
    # Square image, area 100%: only ratio exactly 1 would fit; fallback = whole image.
    assert sample_resized_crop_params(50, 50, (1.0, 1.0), (3 / 4, 4 / 3), random.Random(1)) == (0, 0, 50, 50)


def test_multicrop_geometric_shapes_dtype_and_determinism():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8))
    geometric = MultiCropGeometric(48, 24, 4)
    a, b = geometric(image, random.Random(5)), geometric(image, random.Random(5))
    assert [t.shape for t in a["global_crops"]] == [(3, 48, 48)] * 2
    assert [t.shape for t in a["local_crops"]] == [(3, 24, 24)] * 4
    assert all(t.dtype == torch.uint8 for t in a["global_crops"] + a["local_crops"])
    for x, y in zip(a["global_crops"] + a["local_crops"], b["global_crops"] + b["local_crops"]):
        assert torch.equal(x, y)
    assert not torch.equal(a["global_crops"][0], a["global_crops"][1])  # crops are independent
    c = geometric(image, random.Random(6))
    assert not torch.equal(a["global_crops"][0], c["global_crops"][0])
    assert MultiCropGeometric(8, 8, 0)(image, random.Random(0))["local_crops"] == []


def test_crop_resizes_the_box_bicubically():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    geometric = MultiCropGeometric(32, 16, 0)
    rng_params, rng_crop = random.Random(3), random.Random(3)
    top, left, h, w = sample_resized_crop_params(60, 40, (0.32, 1.0), (3 / 4, 4 / 3), rng_params)
    flipped = rng_params.random() < 0.5
    expected = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
    if flipped:
        expected = expected.transpose(Image.FLIP_LEFT_RIGHT)
    crop = geometric.random_resized_crop(image, 32, (0.32, 1.0), rng_crop)
    difference = np.abs(crop.permute(1, 2, 0).numpy().astype(int) - np.asarray(expected).astype(int))
    # resize(box=...) lets the bicubic taps read real pixels just outside the box where crop-then-resize
    # (torchvision) replicates the edge: they agree away from the border.
    assert difference[3:-3, 3:-3].max() <= 1


def test_horizontal_flip_half_the_time():
    left_dark = np.zeros((32, 32, 3), dtype=np.uint8)
    left_dark[:, 16:] = 255
    image = Image.fromarray(left_dark)
    geometric = MultiCropGeometric(32, 16, 0, global_crops_scale=(1.0, 1.0))  # the whole image every time
    rng, flips = random.Random(0), 0
    for _ in range(200):
        crop = geometric(image, rng)["global_crops"][0]
        left, right = crop[:, :, :8].float().mean(), crop[:, :, -8:].float().mean()
        assert {left.item(), right.item()} == {0.0, 255.0}
        flips += int(left > right)
    assert 70 < flips < 130


def test_min_source_side():
    geometric = MultiCropGeometric(224, 96, 8)
    # local crops need most: 96 / sqrt(0.05 * 3/4) = 495.8
    assert geometric.min_source_side == math.ceil(96 / math.sqrt(0.05 * 0.75))
    assert MultiCropGeometric(224, 96, 0).min_source_side == math.ceil(224 / math.sqrt(0.32 * 0.75))


# ---------------------------------------------------------------- photometric


def _quiet(**overrides) -> Photometric:
    """Photometric with every random step disabled unless overridden; blur sigma >= 1 so a blur always shows."""
    kwargs = dict(blur_prob_global1=0.0, blur_prob_global2=0.0, blur_prob_local=0.0,
                  solarization_prob_global2=0.0, color_jitter_prob=0.0, grayscale_prob=0.0, blur_sigma=(1.0, 2.0))
    kwargs.update(overrides)
    return Photometric(**kwargs)


def test_constant_image_normalisation_matches_hand_computation():
    colour = torch.tensor([200, 100, 30], dtype=torch.uint8).view(1, 3, 1, 1)
    global_crops = colour.expand(4, 3, 16, 16).contiguous()
    local_crops = colour.expand(6, 3, 8, 8).contiguous()
    out_global, out_local = _quiet()(global_crops, local_crops)
    expected = [(200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (30 / 255 - 0.406) / 0.225]
    for out in (out_global, out_local):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.tensor(expected))
        assert out.std(dim=(0, 2, 3)).max() < 1e-5
    assert out_global.shape == (4, 3, 16, 16) and out_local.shape == (6, 3, 8, 8)
    # float input in [0, 1] is the same as uint8 / 255
    torch.testing.assert_close(_quiet()(global_crops.float() / 255, local_crops.float() / 255)[0], out_global)


def test_solarisation_on_view_2_only():
    values = torch.tensor([200, 100, 129], dtype=torch.uint8).view(1, 3, 1, 1)  # 129/255 > 0.5, 100/255 < 0.5
    global_crops = values.expand(6, 3, 12, 12).contiguous()  # B = 3: rows 0-2 view 1, rows 3-5 view 2
    local_crops = values.expand(3, 3, 12, 12).contiguous()
    out_global, out_local = _quiet(solarization_prob_global2=1.0)(global_crops, local_crops)
    pixel_global = _unnormalise(out_global)[:, :, 0, 0]
    x = torch.tensor([200, 100, 129]) / 255
    solarised = torch.where(x >= 0.5, 1 - x, x)
    torch.testing.assert_close(pixel_global[:3], x.expand(3, 3))
    torch.testing.assert_close(pixel_global[3:], solarised.expand(3, 3))
    assert pixel_global[3, 0].item() == pytest.approx(55 / 255, abs=1e-6)
    torch.testing.assert_close(_unnormalise(out_local)[:, :, 0, 0], x.expand(3, 3))


def test_grayscale_makes_channels_equal():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    out_global, out_local = _quiet(grayscale_prob=1.0)(images, images)
    for out in (out_global, out_local):
        rgb = _unnormalise(out)
        torch.testing.assert_close(rgb[:, 0], rgb[:, 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(rgb[:, 1], rgb[:, 2], atol=1e-5, rtol=0)
        expected = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2]).float() / 255
        torch.testing.assert_close(rgb[:, 0], expected, atol=1e-3, rtol=0)


def _high_frequency_energy(x: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared difference of horizontal neighbours."""
    return (x[..., 1:] - x[..., :-1]).pow(2).mean(dim=(1, 2, 3))


def test_blur_reduces_high_frequencies_with_each_views_probability():
    checker = ((torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2 * 255).to(torch.uint8)
    global_crops = checker.expand(8, 3, 16, 16).contiguous()  # B = 4
    local_crops = checker.expand(8, 3, 16, 16).contiguous()
    torch.manual_seed(0)
    out_global, out_local = _quiet(blur_prob_global1=1.0)(global_crops, local_crops)
    reference = _high_frequency_energy(_quiet()(global_crops)[0])
    energy_global, energy_local = _high_frequency_energy(out_global), _high_frequency_energy(out_local)
    assert (energy_global[:4] < 0.5 * reference[:4]).all()  # view 1: blurred, p = 1
    torch.testing.assert_close(energy_global[4:], reference[4:])  # view 2: p = 0
    torch.testing.assert_close(energy_local, reference)  # locals: p = 0

    out_global, out_local = _quiet(blur_prob_global2=1.0, blur_prob_local=1.0)(global_crops, local_crops)
    energy_global, energy_local = _high_frequency_energy(out_global), _high_frequency_energy(out_local)
    torch.testing.assert_close(energy_global[:4], reference[:4])
    assert (energy_global[4:] < 0.5 * reference[4:]).all() and (energy_local < 0.5 * reference).all()


def test_default_probabilities_per_view():
    torch.manual_seed(0)
    batch = 400
    # blur: a dark checker (40 / 100 < 128, never solarised); its high-frequency energy drops iff blurred
    checker = ((torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2 * 60 + 40).to(torch.uint8)
    crops = checker.expand(2 * batch, 3, 16, 16).contiguous()
    photometric = Photometric(color_jitter_prob=0.0, grayscale_prob=0.0, blur_sigma=(1.0, 2.0))  # 1.0/0.1/0.5
    out_global, out_local = photometric(crops, crops[:batch])
    reference = _high_frequency_energy(_quiet()(crops[:2])[0][:1])
    blurred = lambda out: (_high_frequency_energy(out) < 0.99 * reference).float().mean().item()  # noqa: E731
    assert blurred(out_global[:batch]) == 1.0
    assert 0.06 < blurred(out_global[batch:]) < 0.15
    assert 0.43 < blurred(out_local) < 0.57
    # solarisation (p 0.2, view 2 only): a constant 200 image (unchanged by blur) becomes 55
    constant = torch.full((2 * batch, 3, 8, 8), 200, dtype=torch.uint8)
    out_global, out_local = photometric(constant, constant[:batch])
    solarised = lambda out: (_unnormalise(out)[:, :, 0, 0] < 0.5).all(dim=1).float().mean().item()  # noqa: E731
    assert solarised(out_global[:batch]) == 0.0 and solarised(out_local) == 0.0
    assert 0.15 < solarised(out_global[batch:]) < 0.25


def test_color_jitter_brightness_factor_range_and_probability():
    torch.manual_seed(0)
    images = torch.rand(1000, 3, 4, 4) * 0.5 + 0.1  # factors <= 1.4 never clip
    out = RandomColorJitter(0.4, 0.0, 0.0, 0.0, p=0.8)(images)
    factors = (out / images).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out, images * factors.view(-1, 1, 1, 1))  # one factor per image
    changed = (factors - 1).abs() > 1e-6
    assert 0.75 < changed.float().mean().item() < 0.85
    assert factors.min() >= 0.6 - 1e-5 and factors.max() <= 1.4 + 1e-5
    assert factors[changed].std() == pytest.approx(0.8 / math.sqrt(12), rel=0.1)  # uniform on [0.6, 1.4]


def _hue_turns(rgb: torch.Tensor) -> torch.Tensor:
    """Hue in turns [0, 1) of [N, 3] RGB rows (the standard hexcone formula)."""
    r, g, b = rgb.unbind(1)
    return torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b).div(2 * math.pi).remainder(1.0)


@pytest.mark.parametrize("hue", [0.1, 0.5])
def test_color_jitter_config_sets_the_hue_range(hue):
    torch.manual_seed(0)
    red = torch.tensor([200, 40, 40], dtype=torch.uint8).view(1, 3, 1, 1).expand(400, 3, 8, 8).contiguous()
    photometric = _quiet(color_jitter_prob=1.0, color_jitter=(0.0, 0.0, 0.0, hue))
    out, _ = photometric(red, red[:0])
    shift = _hue_turns(_unnormalise(out)[:, :, 0, 0])
    shift = torch.where(shift > 0.5, shift - 1.0, shift)  # red is hue 0: the shift is the hue itself
    assert shift.abs().max() <= hue + 0.01
    assert shift.abs().max() > 0.9 * hue and shift.std() == pytest.approx(2 * hue / math.sqrt(12), rel=0.15)


def test_color_jitter_order_is_drawn_per_image():
    # brightness x2 and saturation x0 (grayscale) do not commute when brightness clips at 1:
    # gray(clip(2x)) != clip(2 gray(x)); both orders must show up in one batch.
    jitter = RandomColorJitter(0.0, 0.0, 0.0, 0.0, p=1.0)
    jitter.ranges = ((2.0, 2.0), (1.0, 1.0), (0.0, 0.0), (0.0, 0.0))
    torch.manual_seed(0)
    image = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1).expand(200, 3, 2, 2).contiguous()
    out = jitter(image)[:, 0, 0, 0]
    gray = 0.299 * 0.9 + 0.587 * 0.1 + 0.114 * 0.1
    brightness_first = (0.299 * 1.0 + 0.587 * 0.2 + 0.114 * 0.2)
    saturation_first = min(1.0, 2 * gray)
    is_brightness_first = torch.isclose(out, torch.tensor(brightness_first))
    is_saturation_first = torch.isclose(out, torch.tensor(saturation_first))
    assert (is_brightness_first | is_saturation_first).all()
    assert 0.35 < is_brightness_first.float().mean() < 0.65


def test_default_blur_sigma_range_blurs_on_average():
    torch.manual_seed(0)
    noise = torch.randint(0, 256, (200, 3, 16, 16), dtype=torch.uint8)
    reference = _high_frequency_energy(_quiet()(noise)[0])
    blurry = _quiet(blur_prob_global1=1.0, blur_prob_global2=1.0, blur_sigma=(0.1, 2.0))
    blurred = _high_frequency_energy(blurry(noise)[0])
    ratio = blurred / reference
    assert (ratio <= 1 + 1e-4).all()
    assert ratio.min() < 0.1 and ratio.max() > 0.95  # sigma 2 wipes the noise out, sigma 0.1 is ~identity
    assert 0.2 < ratio.mean() < 0.5


def test_photometric_is_seedable_and_leaves_inputs_alone():
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    locals_ = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8)
    copy = images.clone()
    photometric = Photometric()
    torch.manual_seed(3)
    a = photometric(images, locals_)
    torch.manual_seed(3)
    b = photometric(images, locals_)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(images, copy)
    empty_global, empty_local = photometric(images, images.new_zeros((0, 3, 8, 8)))
    assert empty_local.shape == (0, 3, 8, 8) and empty_global.shape == images.shape
    with pytest.raises(ValueError):
        photometric(images[:3], locals_)


def test_docstrings_document_the_official_blur_bug():
    for doc in (augment.__doc__, Photometric.__doc__):
        assert "1 - p" in doc and "crops.blur_prob_global1=0.0 crops.blur_prob_global2=0.9" in doc
