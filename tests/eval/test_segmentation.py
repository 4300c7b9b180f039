"""The linear segmentation probe: its scores by hand, the ignore label, the label-map files, a planted backbone
against random init, the command line and the training loop's periodic mIoU."""

import json
import math
import subprocess

import numpy as np
import pytest
import torch
from launch_helpers import TORCHRUN, free_port, subprocess_env
from PIL import Image

from dinoreg.cli import main
from dinoreg.data import (
    IGNORE_LABEL,
    SegmentationFolder,
    SyntheticSegmentation,
    SyntheticShapes,
    build_segmentation_loader,
    decode_label_map,
    encode_label_map,
)
from dinoreg.data.datasets import DatasetError
from dinoreg.metrics.segmentation import (
    confusion_matrix,
    fit_segmentation_head,
    patch_feature_maps,
    score_segmentation_head,
    segmentation_scores,
)
from dinoreg.models.vit import DinoVisionTransformer
from dinoreg.models.weights import save_backbone


def test_scores_equal_a_hand_computed_case():
    # 3 classes; the pixel labelled IGNORE_LABEL is predicted 2 but must count nowhere.
    labels = torch.tensor([[0, 0, 1], [1, 1, IGNORE_LABEL]])
    predictions = torch.tensor([[0, 1, 1], [1, 0, 2]])
    confusion = confusion_matrix(predictions, labels, 3)
    # rows: true class, columns: predicted class
    assert confusion.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    scores = segmentation_scores(confusion)
    # class 0: TP 1, FP 1 (a 1 predicted 0), FN 1 -> 1/3; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: absent -> NaN
    assert scores["iou"][0] == pytest.approx(1 / 3) and scores["iou"][1] == pytest.approx(0.5)
    assert math.isnan(scores["iou"][2])
    assert scores["miou"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["accuracy"][:2] == pytest.approx([1 / 2, 2 / 3]) and scores["pixels"] == [2, 3, 0]
    # a class only predicted (never labelled) has IoU 0, not NaN: it counts against the mean
    assert segmentation_scores(confusion_matrix(torch.tensor([2, 0]), torch.tensor([0, 0]), 3))["iou"][2] == 0.0


def test_label_values_map_to_contiguous_classes_for_any_ignore_value():
    values = np.array([0, 1, 2, 150, 255])
    assert decode_label_map(values, 0).tolist() == [IGNORE_LABEL, 0, 1, 149, 254]  # ADE20k
    assert decode_label_map(values, 255).tolist() == [0, 1, 2, 150, IGNORE_LABEL]
    for ignore in (0, 255, 7):
        assert encode_label_map(decode_label_map(values, ignore), ignore).tolist() == values.tolist()


def test_ignored_pixels_neither_train_nor_score():
    # Features say "class 0" everywhere; half the pixels are labelled 1 but ignored. A head that learnt from the
    # ignored pixels (or scored them) would predict 1 somewhere or lose accuracy.
    features = torch.zeros(8, 4, 2, 2)
    features[:, 0] = 1.0
    labels = torch.zeros(8, 4, 4, dtype=torch.long)
    labels[:, :, 2:] = IGNORE_LABEL
    head = fit_segmentation_head(features, labels, num_classes=2, iterations=30, batch_size=4, lr=0.05,
                                 batch_norm=False)
    scores = score_segmentation_head(head, features, labels, num_classes=2)
    assert scores["pixel_accuracy"] == 1.0 and scores["pixels"] == [8 * 4 * 2, 0]
    assert scores["confusion"] == [[64, 0], [0, 0]]


def _planted_backbone(patch_size: int = 4) -> DinoVisionTransformer:
    """A ViT whose patch tokens say how bright their patch is (objects are brighter than the background in the
    synthetic images); every block is the identity and positions are zero. Channel 0 carries the mean normalised
    brightness minus a threshold, channel 1 its negative, channels 2 and 3 the constants 1 and -1, so that the final
    LayerNorm keeps the brightness (monotonically) instead of only its sign."""
    torch.manual_seed(0)
    model = DinoVisionTransformer(img_size=32, patch_size=patch_size, embed_dim=16, depth=1, num_heads=2,
                                  num_register_tokens=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        weight, bias = model.patch_embed.proj.weight, model.patch_embed.proj.bias  # [D, 3, p, p], [D]
        weight[0] = 1.0 / weight[0].numel()
        weight[1] = -weight[0]
        bias[:4] = torch.tensor([-1.0, 1.0, 1.0, -1.0])
        model.norm.weight.fill_(1.0)
    return model.eval()


def _object_or_background_miou(backbone, train, val):
    """The probe's mIoU on the two-class task "background or object" (shapes are all one class here)."""
    features = {name: [] for name in ("train", "val")}
    labels = {name: [] for name in ("train", "val")}
    for name, dataset in (("train", train), ("val", val)):
        for images, batch_labels, _ in build_segmentation_loader(dataset, image_size=32, batch_size=64, num_workers=0):
            features[name].append(patch_feature_maps(backbone, images))
            labels[name].append((batch_labels > 0).long())
    fit = [torch.cat(features["train"]), torch.cat(labels["train"])]
    head = fit_segmentation_head(*fit, num_classes=2, iterations=150, batch_size=16)
    return score_segmentation_head(head, torch.cat(features["val"]), torch.cat(labels["val"]), num_classes=2)["miou"]


def test_a_backbone_that_separates_objects_scores_clearly_higher_than_random_init():
    train = SyntheticSegmentation(SyntheticShapes("train", size=96, image_size=32))
    val = SyntheticSegmentation(SyntheticShapes("val", size=48, image_size=32))
    planted = _object_or_background_miou(_planted_backbone(), train, val)
    torch.manual_seed(0)
    random = _object_or_background_miou(DinoVisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1,
                                                              num_heads=2, num_register_tokens=2).eval(), train, val)
    # measured: 0.786 against 0.713 (a random patch embedding is a random projection of the pixels, which already
    # tells bright from dark; the 8 x 8 grid of 4 px patches bounds both)
    assert planted > random + 0.05, (planted, random)


def test_synthetic_label_maps_are_the_union_of_the_object_masks():
    shapes = SyntheticShapes("train", size=16, image_size=32)
    for index in range(16):
        sample, labels = shapes.sample(index), shapes.segmentation(index)
        assert set(np.unique(labels)) <= {0, 1 + sample["label"]}
        assert np.array_equal(labels > 0, sample["mask"] >= 0.5)


def test_export_synthetic_writes_what_the_folder_reader_reads_back(tmp_path):
    out = tmp_path / "shapes"
    assert main(["data", "export-synthetic", str(out), "--size", "16", "--val-size", "8", "--image-size", "32"]) == 0
    classes = (out / "classes.txt").read_text().split()
    assert classes[:2] == ["background", "disc"] and len(classes) == 9
    folder = SegmentationFolder(out / "images" / "train", out / "masks" / "train", classes=classes)
    shapes = SyntheticShapes("train", size=16, image_size=32)
    assert len(folder) == 16
    for image_path, _ in folder.samples[:6]:
        index = int(image_path.rsplit("/", 1)[1][:-4])
        position = [p for p, _ in folder.samples].index(image_path)
        image, labels = folder.get(position)
        assert np.array_equal(np.asarray(image), np.asarray(shapes.sample(index)["image"]))
        assert np.array_equal(labels, shapes.segmentation(index))
    # the ImageNet layout as well: class sub-folders under images/<split>
    assert sorted(p.name for p in (out / "images" / "val").iterdir()) == sorted(classes[1:])


def test_bad_label_maps_are_named_with_the_fix(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir(), masks.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (16, 16)).save(images / f"{name}.jpg")
    Image.fromarray(np.ones((16, 16), np.uint8)).save(masks / "a.png")
    with pytest.raises(DatasetError, match=r"1 of 2 images .* have no label map \(expected .*b\.png\)"):
        SegmentationFolder(images, masks)
    Image.new("RGB", (16, 16)).save(masks / "b.png")
    with pytest.raises(DatasetError, match="is a RGB image; a label map is a single-channel PNG"):
        SegmentationFolder(images, masks)
    Image.fromarray(np.ones((8, 16), np.uint8)).save(masks / "b.png")
    with pytest.raises(DatasetError, match="is 16x8 but its image .* is 16x16"):
        SegmentationFolder(images, masks, num_classes=1).get(1)


def test_cli_scores_the_probe_and_writes_results_overlays_and_tensorboard(tmp_path, capsys):
    weights = tmp_path / "planted.safetensors"
    save_backbone(_planted_backbone(), weights)
    out = tmp_path / "eval"
    code = main(["eval", "segmentation", "--weights", str(weights), "--images", "synthetic:size=64,image_size=32",
                 "--output-dir", str(out), "--iterations", "60", "--num-workers", "0", "--overlays", "3"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert f"mIoU {100 * results['miou']:.2f} %" in printed and "background" in printed
    assert results["classes"][0] == "background" and len(results["iou"]) == 9
    assert results["train_maps"] == 64 and results["val_maps"] == 12 and results["feature_grid"] == [8, 8]
    assert np.array(results["confusion"]).sum() == 12 * 32 * 32  # every val pixel, none ignored
    assert Image.open(out / "segmentation_overlays.png").size[1] > 200
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    # the data options must fit together: masks are refused for synthetic data, required for a folder
    assert main(["eval", "segmentation", "--weights", str(weights), "--masks", str(tmp_path),
                 "--output-dir", str(out)]) == 2
    assert main(["eval", "segmentation", "--weights", str(weights), "--images", str(tmp_path),
                 "--output-dir", str(out)]) == 2
    assert "--masks DIR (its PNG label maps) is required" in capsys.readouterr().err


def test_training_logs_the_teachers_segmentation_miou_and_is_not_perturbed_by_it(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: PLC0415

    from dinoreg.config import load_config  # noqa: PLC0415
    from dinoreg.train.loop import train  # noqa: PLC0415

    # the kNN evaluator is off: the segmentation probe is what must leave the training as it was
    fast = ["student.embed_dim=64", "student.num_heads=2", "student.depth=2", "crops.global_crops_size=32",
            "crops.local_crops_size=16", "crops.local_crops_number=2", "train.batch_size_per_gpu=8",
            "train.num_workers=0", "evaluation.knn_enabled=false",
            "optim.epochs=2", "train.epoch_length=4", "evaluation.eval_period_iterations=4", "monitor.period=0"]
    segmentation = ["evaluation.segmentation_enabled=true", "evaluation.segmentation_train_images=48",
                    "evaluation.segmentation_eval_images=16", "evaluation.segmentation_iterations=10"]
    for name, extra in (("plain", []), ("segmentation", segmentation)):
        train(load_config("tiny_cpu", [*fast, *extra, f"train.output_dir={tmp_path / name}"]))
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("plain", "segmentation")}
    evaluated = [r for r in rows["segmentation"] if "segmentation_miou" in r]
    assert [r["iteration"] for r in evaluated] == [0, 3, 7]
    assert all(0 < r["segmentation_miou"] <= 1 and 0 < r["segmentation_pixel_accuracy"] <= 1 for r in evaluated)
    # the probe draws from its own generators: the training itself is bitwise the same with or without it
    losses = {name: [r["total_loss"] for r in rows[name] if "total_loss" in r] for name in rows}
    assert losses["segmentation"] == losses["plain"] and len(losses["plain"]) == 8
    events = EventAccumulator(str(tmp_path / "segmentation" / "tensorboard" / "segmentation"))
    events.Reload()
    assert len(events.Scalars("eval/segmentation_miou")) == 3


def test_two_processes_score_what_one_process_scores(tmp_path):
    weights = tmp_path / "planted.safetensors"
    save_backbone(_planted_backbone(), weights)
    common = ["eval", "segmentation", "--weights", str(weights), "--images", "synthetic:size=40,image_size=32",
              "--iterations", "20", "--num-workers", "0", "--batch-size", "8", "--overlays", "0"]
    assert main([*common, "--output-dir", str(tmp_path / "one")]) == 0
    command = [*TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "dinoreg", *common,
               "--output-dir", str(tmp_path / "two")]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    assert one["confusion"] == two["confusion"] and one["miou"] == two["miou"] and two["world_size"] == 2
