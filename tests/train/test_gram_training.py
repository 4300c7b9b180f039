"""Gram anchoring in training: the Gram teacher's load and refresh schedule, the loss term the step adds (against a
computation by hand from the Gram teacher), a run unchanged until the Gram teacher exists, checkpoints that carry
it, exact resume, the meta-device start, strict export."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F
from launch_helpers import TINY, torchrun
from test_checkpoint import losses_by_iteration
from test_continue import dinoreg

from dinoreg import load_backbone
from dinoreg.config import ConfigError, load_config
from dinoreg.data import TrainingBatch, build_dataset, normalise_uint8
from dinoreg.distributed import DistributedEnvironment
from dinoreg.run_dir import CHECKPOINT_DIR
from dinoreg.ssl.gram import gram_loss, resize_patch_features
from dinoreg.train.build import (build_model_and_optimizer, build_photometric, build_ssl_model, construct_ssl_model,
                                 initialisation_steps, training_batches)
from dinoreg.train.features import build_features
from dinoreg.train.features.gram import GramSchedule
from dinoreg.train.loop import augment_on_device
from dinoreg.train.parallel import materialise
from dinoreg.train.checkpoint_reader import CheckpointReader

RUN = [*TINY, "train.batch_size_per_gpu=8", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=8",
       "evaluation.knn_enabled=false", "monitor.period=0", "checkpoint.period=1", "checkpoint.keep_last=20"]
# the Gram teacher: copied from the EMA teacher before iteration 3, refreshed after iteration 5 only (6 % 2 == 0 and
# 6 >= 5; 8 would be next but max_updates is 1)
GRAM = ["gram.use_loss=true", "gram.it_load_ema_teacher=3", "gram.update_frequency=2", "gram.it_first_update=5",
        "gram.max_updates=1", "gram.compute_stats=true"]


def test_schedule_loads_refreshes_and_weighs_as_dinov3():
    cfg = load_config("tiny_cpu", [*RUN, *GRAM, "gram.max_updates=null", "gram.update_frequency=3",
                                   "gram.it_first_update=4", "train.epoch_length=20"])
    schedule = GramSchedule(cfg, 20)
    # refreshes after the iterations i with (i + 1) a multiple of 3 and i + 1 >= 4: 6, 9, ..., 18 -> i = 5, 8, ...
    assert [it for it in range(20) if schedule.refresh_after(it)] == [5, 8, 11, 14, 17]
    assert schedule.copy_before == 3 and [schedule.weight(it) for it in (0, 2, 3, 19)] == [0.0, 0.0, 1.0, 1.0]
    capped = GramSchedule(load_config("tiny_cpu", [*RUN, *GRAM, "train.epoch_length=20", "gram.max_updates=2",
                                                   "gram.update_frequency=3", "gram.it_first_update=4"]), 20)
    assert [it for it in range(20) if capped.refresh_after(it)] == [5, 8]
    # a weight schedule in epochs of train.epoch_length: linear 0 -> 2 over 2 epochs of 5, then a cosine to 1
    cfg = load_config("tiny_cpu", [*RUN, *GRAM, "train.epoch_length=5", "optim.epochs=4", "gram.it_load_ema_teacher=0",
                                   "gram.loss_weight_schedule={start: 0, peak: 2, end: 1, warmup_epochs: 2}"])
    weights = GramSchedule(cfg, 20)
    assert [weights.weight(it) for it in (0, 5, 10, 19)] == pytest.approx([0.0, 1.0, 2.0, 1.0])
    assert weights.weight(13) == pytest.approx(1.5 + 0.5 * torch.cos(torch.tensor(torch.pi * 3 / 9)).item())
    # the EMA teacher as Gram teacher is there from the start and never copied
    ema = GramSchedule(load_config("tiny_cpu", [*RUN, "gram.use_loss=true", "gram.ema_teacher=true",
                                                "gram.rep_update=false"]), 8)
    assert ema.copy_before is None and ema.weight(0) == 1.0 and not any(ema.refresh_after(it) for it in range(8))


def test_inconsistent_gram_options_are_all_reported():
    with pytest.raises(ConfigError) as error:
        load_config("tiny_cpu", ["gram.use_loss=true", "gram.tokens_used=masked", "gram.img_level=true",
                                 "gram.remove_neg=true", "gram.remove_only_teacher_neg=true",
                                 "crops.gram_teacher_crops_size=50"])
    message = str(error.value)
    for part in ("gram.it_load_ema_teacher: a Gram teacher needs a start", "gram.tokens_used: masked/unmasked",
                 "gram.remove_only_teacher_neg: excludes gram.remove_neg", "crops.gram_teacher_crops_size: must be a "
                 "multiple of student.patch_size=8"):
        assert part in message


@pytest.mark.parametrize("no_distortions", [True, False])
def test_the_step_adds_the_gram_loss_of_the_gram_teacher_at_its_own_resolution(no_distortions):
    cfg = load_config("tiny_cpu", [*RUN, *GRAM, "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=48",
                                   f"crops.gram_teacher_no_distortions={no_distortions}", "gram.remove_neg=true"])
    torch.manual_seed(0)
    model, _ = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    with torch.no_grad():  # a Gram teacher unlike the student, so that the term is not the trivial one
        for parameter in model.gram_teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.train()
    torch.manual_seed(1)
    b, n = 2, (32 // 8) ** 2
    masks = torch.rand(2 * b, n) < 0.3
    masks[:, 0] = True
    batch = TrainingBatch(global_crops=torch.randn(2 * b, 3, 32, 32), local_crops=torch.randn(2 * b, 3, 16, 16),
                          n_global_crops=2, n_local_crops=2, masks=masks, mask_indices=masks.flatten().nonzero().flatten(),
                          masks_weight=(1 / masks.sum(-1).clamp(min=1)).repeat_interleave(masks.sum(-1)),
                          n_masked_patches=torch.tensor([int(masks.sum())]), gram_crops=torch.randn(2 * b, 3, 48, 48))
    twin = copy.deepcopy(model)  # a step updates the centres: each call gets the same model
    _, without = twin.forward_loss(batch, teacher_temp=0.04, values={"gram_loss_weight": 0.0})
    total, metrics = model.forward_loss(batch, teacher_temp=0.04, values={"gram_loss_weight": 0.5})
    # by hand: the student's global-crop patch tokens against the Gram teacher's on the 48 px crops, whose 6 x 6 grid
    # is resized (bicubic) to the student's 4 x 4; one batch-level Gram matrix over all 2B x 16 tokens
    with torch.no_grad():
        student = model.student["backbone"]([batch.global_crops], masks=[masks], is_training=True)[0]
        target = model.gram_teacher["backbone"](batch.gram_crops, is_training=True)["x_norm_patchtokens"]
        expected = gram_loss(student["x_norm_patchtokens"], resize_patch_features(target, 6, 4), apply_norm=True,
                             img_level=False, remove_neg=True)
    assert metrics["gram_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert without["gram_loss"].item() == 0.0
    other = total.item() - 0.5 * metrics["gram_loss"].item()
    assert other == pytest.approx(without["total_loss"].item(), rel=1e-5)
    assert {"gram_masked_loss", "gram_unmasked_loss"} <= set(metrics)
    assert not any(p.requires_grad for p in model.gram_teacher.parameters())


@pytest.fixture(scope="module")
def gram_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gram")
    dinoreg("train", "--output-dir", root / "plain", *RUN)
    dinoreg("train", "--output-dir", root / "gram", *RUN, *GRAM)
    return root


def test_the_gram_teacher_is_loaded_refreshed_and_checkpointed_on_schedule(gram_run):
    run = gram_run / "gram"
    teacher = {it: CheckpointReader(run / CHECKPOINT_DIR / str(it)).weights().backbone for it in range(1, 9)}
    gram = {it: CheckpointReader(run / CHECKPOINT_DIR / str(it)).weights(part="gram_teacher").backbone
            for it in range(1, 9)}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(gram[4], teacher[3]) and same(gram[5], teacher[3])  # the copy before iteration 3 (after 3 done)
    assert not same(gram[5], teacher[5])
    assert same(gram[6], teacher[6]) and same(gram[8], teacher[6])  # refreshed after iteration 5, once only
    assert not same(gram[8], teacher[8])
    # until the Gram teacher exists the run is the run without it, bitwise; from then on the loss is added
    plain, anchored = losses_by_iteration(gram_run / "plain"), losses_by_iteration(run)
    assert [anchored[it]["total_loss"] for it in range(3)] == [plain[it]["total_loss"] for it in range(3)]
    assert all(anchored[it]["gram_loss"] == 0.0 for it in range(3))
    assert all(anchored[it]["gram_loss"] > 0 for it in range(3, 8))


def test_a_resume_inside_gram_anchoring_is_bitwise_and_the_export_loads_strictly(gram_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(gram_run / "gram", resumed)
    for it in range(5, 9):  # resumed after iteration 4: before the refresh, after the load
        shutil.rmtree(resumed / CHECKPOINT_DIR / str(it))
    (resumed / CHECKPOINT_DIR / "latest").write_text("4\n")
    dinoreg("train", "--output-dir", resumed, *RUN, *GRAM)
    assert losses_by_iteration(resumed) == losses_by_iteration(gram_run / "gram")
    export = tmp_path / "teacher.safetensors"
    dinoreg("export", gram_run / "gram", "--format", "safetensors", "--output", export)
    exported = load_backbone(export).state_dict()
    final = CheckpointReader(gram_run / "gram" / CHECKPOINT_DIR / "8").weights().backbone
    assert all(torch.equal(exported[k], final[k]) for k in final)


def test_the_meta_device_start_gives_the_gram_teacher_the_one_process_values():
    overrides = [*RUN, *GRAM]
    torch.manual_seed(0)
    reference = construct_ssl_model(load_config("tiny_cpu", overrides)).state_dict()  # the constructors' draws
    after_reference = torch.rand(4)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = build_ssl_model(load_config("tiny_cpu", overrides))
    template = copy.deepcopy(model)
    model.to_empty(device="cpu")
    materialise(model, initialisation_steps(template))
    assert torch.equal(torch.rand(4), after_reference)
    state = model.state_dict()
    assert [name for name in reference if not torch.equal(state[name], reference[name])] == []
    assert torch.equal(state["gram_teacher.backbone.pos_embed"], state["teacher.backbone.pos_embed"])


def saved_until(run, iteration, copy):
    """A copy of the 8-iteration ``run`` as it was when checkpoint ``iteration`` was its newest."""
    shutil.copytree(run, copy)
    for it in range(iteration + 1, 9):
        shutil.rmtree(copy / CHECKPOINT_DIR / str(it))
    (copy / CHECKPOINT_DIR / "latest").write_text(f"{iteration}\n")
    return copy


def test_gram_anchoring_can_be_turned_on_in_a_run_saved_without_it(gram_run, tmp_path):
    # DINOv3 anchors a running pretraining: resumed from the plain run's checkpoint 3 with the Gram options, the run
    # is the one that had them from the start (its Gram teacher is first copied before iteration 3)
    later = saved_until(gram_run / "plain", 3, tmp_path / "later")
    refused = dinoreg("train", "--output-dir", later, *RUN, *GRAM, check=False)
    assert refused.returncode != 0 and "gram.use_loss" in refused.stderr and "--allow-config-change" in refused.stderr
    dinoreg("train", "--output-dir", later, *RUN, *GRAM, "--allow-config-change")
    resumed, anchored = losses_by_iteration(later), losses_by_iteration(gram_run / "gram")
    assert [resumed[it] for it in range(3, 8)] == [anchored[it] for it in range(3, 8)]
    # a checkpoint after the Gram teacher's copy must hold it: the strict load says what is missing
    too_late = saved_until(gram_run / "plain", 4, tmp_path / "too_late")
    failed = dinoreg("train", "--output-dir", too_late, *RUN, *GRAM, "--allow-config-change", check=False)
    assert failed.returncode != 0 and "missing ['gram_teacher.backbone" in failed.stderr


def test_two_processes_anchor_on_shards_with_distorted_high_resolution_gram_crops(tmp_path):
    # FSDP2: the Gram teacher sharded as a frozen model, its copy and refresh on shards, its 48 px crops distorted
    # at 48 px before the student's 32 px crops are resized down; the teacher's segmentation probe on the shards
    run = tmp_path / "two"
    overrides = [*RUN, "train.batch_size_per_gpu=4", *GRAM, "gram.it_load_ema_teacher=1", "gram.it_first_update=3",
                 "crops.gram_teacher_crops_size=48", "evaluation.segmentation_enabled=true",
                 "evaluation.segmentation_train_images=32", "evaluation.segmentation_eval_images=16",
                 "evaluation.segmentation_iterations=5", "evaluation.eval_period_iterations=4"]
    result = torchrun(2, "-m", "dinoreg", "train", "--output-dir", str(run), *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    losses = losses_by_iteration(run)
    assert sorted(losses) == list(range(8)) and losses[0]["gram_loss"] == 0.0
    assert all(losses[it]["gram_loss"] > 0 for it in range(1, 8))
    teacher = {it: CheckpointReader(run / CHECKPOINT_DIR / str(it)).weights().backbone for it in (1, 3, 4, 5)}
    gram = {it: CheckpointReader(run / CHECKPOINT_DIR / str(it)).weights(part="gram_teacher").backbone
            for it in (2, 3, 4, 5)}
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(gram[2], teacher[1]) and same(gram[3], teacher[1])  # copied before iteration 1, gathered from shards
    assert same(gram[4], teacher[4]) and same(gram[5], teacher[4])  # refreshed after iteration 3 only
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines() if "segmentation_miou" in line]
    assert len(rows) == 3


@pytest.mark.parametrize("undistorted", [True, False])
def test_a_gram_teachers_own_crops_are_dinov3s(undistorted):
    cfg = load_config("tiny_cpu", [*RUN, *GRAM, "crops.gram_teacher_crops_size=48",
                                   f"crops.gram_teacher_no_distortions={undistorted}"])
    features = build_features(cfg)
    raw = next(training_batches(cfg, build_dataset("synthetic:size=16"), DistributedEnvironment(), position=0,
                                features=features))
    torch.manual_seed(0)
    batch = augment_on_device(raw, build_photometric(cfg, torch.device("cpu")), features)
    assert batch.global_crops.shape[-1] == 32 and batch.gram_crops.shape[-1] == 48
    if undistorted:  # cut by the workers from the same boxes, only normalised
        assert torch.equal(batch.gram_crops, normalise_uint8(raw.gram_crops))
    else:  # the workers cut the global crops at 48 px, distorted there; the student's are those resized down
        assert raw.global_crops.shape[-1] == 48 and raw.gram_crops is None
        expected = F.interpolate(batch.gram_crops, size=(32, 32), mode="bicubic", align_corners=False, antialias=True)
        assert torch.equal(batch.global_crops, expected)


def test_a_gram_teacher_read_from_a_file_is_read_when_turned_on_in_a_resumed_run(gram_run, tmp_path):
    # gram.ckpt turned on at a resume of a run saved without Gram anchoring: the checkpoint holds no Gram teacher,
    # so the file's values are the Gram teacher's (they were left at the initialisation before issue 26's review)
    later = saved_until(gram_run / "plain", 3, tmp_path / "later")
    source = gram_run / "plain" / "teacher_backbone.safetensors"
    dinoreg("train", "--output-dir", later, *RUN, "optim.epochs=1", "train.epoch_length=5", "gram.use_loss=true",
            f"gram.ckpt={source}", "gram.rep_update=false", "--allow-config-change")
    expected = load_backbone(source).state_dict()
    gram = CheckpointReader(later / CHECKPOINT_DIR / "5").weights(part="gram_teacher").backbone
    assert all(torch.equal(gram[k], expected[k]) for k in expected)
