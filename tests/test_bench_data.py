"""`dinoreg bench data`: the report's fields and their relations on a few tiny JPEGs (timings not asserted), and its
one-line refusals."""

import json
import sys

import numpy as np
import pytest
from PIL import Image

from dinoreg.cli import main

TINY = ["train.batch_size_per_gpu=2", "crops.local_crops_number=2"]


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for i in range(5):
        folder = root / f"class{i % 2}"
        folder.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (60 + 4 * i, 80, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def test_the_report_has_sane_relations(jpegs, tmp_path, capsys):
    out = tmp_path / "data.json"
    assert main(["bench", "data", "--config", "tiny_cpu", "--data", str(jpegs), "--images", "5", "--warmup", "1",
                 "--workers", "1", "--gpu-img-s", "400", "--steps", "2", "--json", str(out), *TINY]) == 0
    result = json.loads(out.read_text())
    parts = [result[f"{part}_s_per_image"] for part in ("decode", "crops", "collate")]
    assert all(part > 0 for part in parts)
    assert result["total_s_per_image"] == pytest.approx(sum(parts))
    assert result["total_s_per_image"] >= max(parts)
    assert result["images_per_s_per_core"] == pytest.approx(1 / result["total_s_per_image"])
    assert result["cores_per_gpu_at_400_img_s"] == pytest.approx(2 * result["cores_per_gpu_at_200_img_s"])
    assert result["cores_per_gpu"] == pytest.approx(result["cores_per_gpu_at_400_img_s"])
    assert result["images_timed"] == 5 and result["bad_files"] == 0 and result["dataset_size"] == 5
    assert result["photometric_cpu_s_per_image"] > 0
    assert result["index_bytes_per_image"] is None  # a folder has no index
    wait = result["data_wait"]
    assert wait["workers"] == 1 and wait["steps"] == 2
    assert wait["step_seconds"] == pytest.approx(2 / 400)  # batch 2 at 400 img/s
    assert 0.0 <= wait["wait_share"] <= 1.0 and wait["wait_median_s"] >= 0
    report = capsys.readouterr().out
    assert "images/s per core" in report and "index: no index" in report and "data wait:" in report


def test_the_official_leg_refuses_a_missing_checkout_in_one_line(jpegs, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["bench", "data", "--data", str(jpegs), "--compare", "official", "--official", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"dinoreg bench data: --official {missing}: no dinov2/data/augmentations.py there; clone "
                   "https://github.com/facebookresearch/dinov2 and pass the folder that holds dinov2/")


def test_the_official_leg_needs_its_checkout(jpegs, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "data", "--data", str(jpegs), "--compare", "official"])
    assert stop.value.code == 2
    assert "--compare official needs --official DIR" in capsys.readouterr().err


def test_a_missing_dataset_is_named(tmp_path, capsys):
    assert main(["bench", "data", "--data", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinoreg bench data: invalid configuration: train.dataset_path:") and "\n" not in err


def test_the_official_leg_refuses_shards_before_measuring(jpegs, tmp_path, capsys):
    from dinoreg.data.shards import pack  # noqa: PLC0415

    pack(str(jpegs), tmp_path / "shards", shard_size=2**20, progress=False)
    checkout = tmp_path / "dinov2_checkout"
    (checkout / "dinov2" / "data").mkdir(parents=True)
    (checkout / "dinov2" / "data" / "augmentations.py").write_text("")
    assert main(["bench", "data", "--data", str(tmp_path / "shards"), "--compare", "official", "--official",
                 str(checkout), "--official-python", sys.executable]) == 1
    captured = capsys.readouterr()
    assert captured.err.strip().endswith("the official code cannot read tar shards; pass the folder, list or index "
                                         "the shards were packed from") and "per image" not in captured.out
