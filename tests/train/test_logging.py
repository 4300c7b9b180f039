"""The training logger's progress: an ETA of training steps only, ETA and loss first, activities announced."""

import pytest
from tqdm import tqdm

from dinoreg.train import logging as training_logging
from dinoreg.train.logging import TrainingLogger


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(training_logging.time, "perf_counter", fake)
    return fake


ROW = {"total_loss": 8.134, "dino_local_crops_loss": 4.403, "koleo_loss": 0.02984, "images_per_sec": 43.7}


def test_eta_counts_training_steps_only(tmp_path, clock, capsys):
    logger = TrainingLogger(tmp_path, total_iterations=100, print_every=10)
    with logger.activity("kNN evaluation of the teacher at iteration 0", label="kNN"):
        clock.now += 240  # a 4-minute evaluation before the first step (it made the first ETA 41 min)
    clock.now += 2  # the first step
    logger.log(0, ROW)
    assert logger.eta(0) == pytest.approx(2 * 99)
    for it in range(1, 10):
        clock.now += 1
        logger.log(it, ROW)
    with logger.activity("saving checkpoint 10", label="checkpoint"):
        clock.now += 60
    assert logger.eta(9) == pytest.approx(11 / 10 * 90)  # 11 s of steps for 10 iterations, 90 to go
    logger.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "kNN evaluation of the teacher at iteration 0..."
    assert out[1] == "kNN evaluation of the teacher at iteration 0: done in 240.0 s"
    # ETA first, then loss and img/s, then the loss terms
    assert out[2] == "[1/100] eta 0:03:18 loss 8.134 img/s 43.7 dino_l 4.403 koleo 0.02984"
    assert out[-1] == "saving checkpoint 10: done in 60.0 s"


def test_quiet_activities_and_the_terminal_bar_fit_80_columns(tmp_path, clock, capsys):
    logger = TrainingLogger(tmp_path, total_iterations=600, print_every=10)
    with logger.activity("artifact monitor", label="monitor", log=False):
        clock.now += 1
    assert capsys.readouterr().out == "" and logger.paused == 1
    logger.close()
    # the bar a terminal shows at its widest in a tiny_cpu run: during the kNN evaluation at iteration 199
    postfix = "eta 0:05:54 loss 8.134 img/s 43.7 knn 0.478"
    line = tqdm.format_meter(191, 600, 80.0, ncols=80, prefix="train [kNN]", bar_format=training_logging.BAR_FORMAT,
                             postfix=postfix)
    assert line == "train [kNN] |███▏      | 191/600, eta 0:05:54 loss 8.134 img/s 43.7 knn 0.478"
    assert len(line) <= 80


def test_tensorboard_groups_every_figure_the_loop_logs():
    from dinoreg.train.logging import tensorboard_tag

    expected = {"total_loss": "loss/total", "dino_local_crops_loss": "loss/dino_local_crops",
                "koleo_loss": "loss/koleo", "ibot_loss": "loss/ibot", "teacher_entropy": "loss/teacher_entropy",
                "lr": "optim/lr", "wd": "optim/wd", "momentum": "optim/momentum",
                "teacher_temp": "optim/teacher_temp", "last_layer_lr": "optim/last_layer_lr",
                "grad_norm_backbone": "grad_norm/backbone", "grad_norm_ibot_head": "grad_norm/ibot_head",
                "knn_top1": "eval/knn_top1", "images_per_sec": "data/images_per_sec", "data_wait": "data/data_wait",
                "bad_files": "data/bad_files", "monitor/norm_p99/b03": "monitor/norm_p99/b03",
                "grad_norm": None,  # the backbone's norm once more (kept in metrics.jsonl for old readers)
                "something_new": "other/something_new"}
    assert {key: tensorboard_tag(key) for key in expected} == expected


def test_hparams_are_the_flattened_config():
    from dinoreg.train.logging import hparam_values

    config = {"optim": {"lr": 0.004, "epochs": 2, "scaling_rule": None}, "student": {"arch": "vit_tiny"},
              "crops": {"global_crops_scale": [0.32, 1.0]}, "train": {"compile": False}}
    assert hparam_values(config) == {"optim.lr": 0.004, "optim.epochs": 2, "student.arch": "vit_tiny",
                                     "crops.global_crops_scale": "[0.32, 1.0]", "train.compile": False}
