"""`dinoreg eval knn|linear` end to end on the synthetic dataset with a tiny random backbone, under torchrun,
and the errors for bad inputs (exit code 2, a message naming the fix)."""

import json
import math
import subprocess

import pytest
import torch
from launch_helpers import TORCHRUN, free_port, subprocess_env
from PIL import Image

from dinoreg.cli import main
from dinoreg.models import build_backbone
from dinoreg.models.weights import save_backbone
from dinoreg.run_dir import BACKBONE_FILE

DATA = "synthetic:size=200,image_size=32"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=4, num_heads=2,
                           num_register_tokens=2, init_values=1e-5)
    path = tmp_path_factory.mktemp("backbone") / "tiny.safetensors"
    save_backbone(model, path)
    return path


def _fraction(value):
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_knn_end_to_end(weights, tmp_path, capsys):
    out = tmp_path / "knn"
    assert main(["eval", "knn", "--weights", str(weights), "--data", DATA, "--output-dir", str(out),
                 "--num-workers", "0", "--avgpool", "--max-val-images", "30"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 %" in printed and "results.json" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "knn" and results["avgpool"] is True and results["temperature"] == 0.07
    assert (results["train_features"], results["val_features"], results["feature_dim"]) == (200, 30, 64)
    assert [row["k"] for row in results["knn"]] == [10, 20, 100, 200]
    assert [row["k_used"] for row in results["knn"]] == [10, 20, 100, 200]
    for row in results["knn"]:
        assert _fraction(row["top1"]) and _fraction(row["top5"]) and row["top1"] <= row["top5"]
    assert (results["img_size"], results["resize_size"], len(results["classes"])) == (32, 37, 8)
    assert list((out / "tensorboard" / out.name).glob("events.out.tfevents.*"))  # the run named after its folder


def test_linear_end_to_end_and_feature_cache(weights, tmp_path, capsys):
    out = tmp_path / "linear"
    args = ["eval", "linear", "--weights", str(weights), "--data", DATA, "--output-dir", str(out), "--num-workers", "0",
            "--epochs", "2", "--classifier-batch-size", "32", "--learning-rates", "0.01", "0.1"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"] == "linear" and results["n_last_blocks"] == [1, 4]
    assert len(results["configs"]) == 2 * 2 * 2 and not results["features_cached"]
    assert (results["fit_images"] + results["heldout_images"], results["val_features"]) == (200, 40)
    assert all(_fraction(row["heldout_top1"]) for row in results["configs"])
    assert results["best"]["name"] in {row["name"] for row in results["configs"]}
    assert _fraction(results["val_top1"]) and results["val_top1"] == results["best"]["val_top1"]
    assert math.isclose(results["configs"][1]["lr"], 0.1 * 32 / 256)
    assert "chosen classifier_" in capsys.readouterr().out
    # The second run reads the cached features and, everything being seeded, reproduces the results.
    assert main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["features_cached"] and again["configs"] == results["configs"]
    # Other images: the cache does not match and is rebuilt.
    assert main([*args, "--max-train-images", "100"]) == 0
    assert "differs in train_indices" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["train_features"] == 100


def test_run_dir_defaults_output_and_reads_the_run_backbone(weights, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / BACKBONE_FILE).write_bytes(weights.read_bytes())
    assert main(["eval", "knn", "--run", str(run), "--data", "synthetic:size=40,image_size=32", "--ks", "5", "100",
                 "--num-workers", "0"]) == 0
    results = json.loads((run / "eval_knn" / "results.json").read_text())
    assert [row["k_used"] for row in results["knn"]] == [5, 40]  # k beyond the bank is clipped


def test_distributed_extraction_equals_single_process(weights, tmp_path):
    common = ["eval", "knn", "--weights", str(weights), "--data", "synthetic:size=60,image_size=32",
              "--num-workers", "0", "--batch-size", "8", "--save-features"]
    assert main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    command = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "dinoreg", *common,
               "--output-dir", str(tmp_path / "two")]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / name / "knn_features.pt") for name in ("one", "two"))
    for split in ("train", "val"):
        assert torch.equal(one[split]["indices"], two[split]["indices"])
        assert torch.equal(one[split]["labels"], two[split]["labels"])
        torch.testing.assert_close(one[split]["features"], two[split]["features"], atol=1e-6, rtol=1e-5)
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert results[0]["knn"] == results[1]["knn"] and results[1]["world_size"] == 2


@pytest.mark.parametrize("protocol", ["knn", "linear"])
def test_weights_and_run_exactly_one(protocol, weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as both:
        main(["eval", protocol, "--weights", str(weights), "--run", str(tmp_path), "--output-dir", str(tmp_path)])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as neither:
        main(["eval", protocol, "--output-dir", str(tmp_path)])
    assert neither.value.code == 2 and "one of the arguments --weights --run is required" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_the_fix(weights, tmp_path, capsys):
    flat = tmp_path / "flat" / "cat"
    flat.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    out = ["--output-dir", str(tmp_path / "out")]
    cases = [
        (["--weights", str(weights), "--data", str(tmp_path / "flat"), *out], "has no train/ sub-folder"),
        (["--weights", str(tmp_path / "nope.safetensors"), *out], "does not exist"),
        (["--weights", str(flat / "a.png"), *out], "is neither a torch nor a safetensors file"),
        (["--run", str(tmp_path / "flat")], "holds no teacher_backbone.safetensors"),
        (["--weights", str(weights)], "--output-dir DIR is required"),
        (["--weights", str(weights), "--img-size", "36", *out], "not a multiple of the backbone's patch size 8"),
    ]
    for args, message in cases:
        assert main(["eval", "knn", "--data", "synthetic:size=16,image_size=16", *args]) == 2, args
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit) as bad_fraction:
        main(["eval", "linear", "--weights", str(weights), "--val-fraction", "1.5", *out])
    assert bad_fraction.value.code == 2 and "--val-fraction" in capsys.readouterr().err


def test_random_init_baseline_uses_the_architecture_not_the_weights(tmp_path):
    from dinoreg.eval.context import open_eval

    torch.manual_seed(7)  # not the baseline's seed 0
    weights = tmp_path / "trained.safetensors"
    save_backbone(build_backbone("vit_tiny", patch_size=8, img_size=32, embed_dim=32, depth=2, num_heads=2), weights)
    common = dict(weights=weights, data="synthetic:size=40,image_size=32", image_size=None, resize_size=None,
                  batch_size=8, num_workers=0, max_train_images=None, max_val_images=None)
    trained, fresh = open_eval(**common).backbone, open_eval(**common, random_init=True).backbone
    assert fresh.arch_kwargs == trained.arch_kwargs and not fresh.training
    assert not torch.equal(fresh.blocks[0].attn.qkv.weight, trained.blocks[0].attn.qkv.weight)
    again = open_eval(**common, random_init=True).backbone  # seeded: the same baseline every time
    assert torch.equal(again.blocks[0].attn.qkv.weight, fresh.blocks[0].attn.qkv.weight)
    run = tmp_path / "run"
    run.mkdir()
    (run / BACKBONE_FILE).write_bytes(weights.read_bytes())
    assert main(["eval", "knn", "--run", str(run), "--random-init", "--data", "synthetic:size=40,image_size=32",
                 "--num-workers", "0"]) == 0
    assert json.loads((run / "eval_knn_random_init" / "results.json").read_text())["random_init"] is True
    assert not (run / "eval_knn").exists()


def test_distributed_linear_with_uneven_shards_and_its_cache(weights, tmp_path):
    # 61 train images: the two ranks' shards differ in size, which the gather pads
    common = ["eval", "linear", "--weights", str(weights), "--data", "synthetic:size=61,image_size=32",
              "--num-workers", "0", "--batch-size", "8", "--epochs", "2"]
    assert main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    command = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "dinoreg", *common,
               "--output-dir", str(tmp_path / "two")]
    for _ in range(2):  # extracts, then reuses the cache the main rank wrote
        done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    assert results[1]["world_size"] == 2 and results[1]["features_cached"] is True
    strip = {"world_size", "features_cached", "extract_seconds", "train_seconds"}
    assert {k: v for k, v in results[0].items() if k not in strip} == {k: v for k, v in results[1].items()
                                                                       if k not in strip}
