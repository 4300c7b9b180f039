"""End to end: a few iterations of a shrunken tiny_cpu, and the ways a run must stop."""

import json
import math

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dinoreg import load_backbone
from dinoreg.cli import main
from dinoreg.config import load_config
from dinoreg.run_dir import BACKBONE_FILE
from dinoreg.ssl import meta_arch
from dinoreg.train import loop
from dinoreg.train.loop import NonFiniteLossError, train

FAST = ["student.embed_dim=64", "student.num_heads=2", "student.depth=2", "crops.global_crops_size=32",
        "crops.local_crops_size=16", "crops.local_crops_number=2", "train.batch_size_per_gpu=16",
        "train.num_workers=0", "dino.head_n_prototypes=256", "ibot.head_n_prototypes=256",
        "evaluation.knn_train_images=200", "evaluation.knn_eval_images=100", "train.seed=1"]


def run(tmp_path, *overrides):
    cfg = load_config("tiny_cpu", [*FAST, f"train.output_dir={tmp_path}", *overrides])
    return cfg, train(cfg)


def rows(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_short_run_writes_everything_and_losses_fall(tmp_path):
    cfg, final = run(tmp_path, "optim.epochs=2", "train.epoch_length=20", "optim.warmup_epochs=1",
                     "evaluation.eval_period_iterations=20")
    records = rows(tmp_path)
    train_rows = [r for r in records if "total_loss" in r]
    eval_rows = [r for r in records if "knn_top1" in r]
    assert [r["iteration"] for r in train_rows] == list(range(40))
    promised = {"iteration", "total_loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss",
                "ibot_loss", "lr", "wd", "momentum", "teacher_temp", "grad_norm", "images_per_sec", "data_wait",
                "teacher_entropy", "teacher_batch_entropy"}
    assert promised <= set(train_rows[0])
    assert all(math.isfinite(r[k]) for r in train_rows for k in promised)
    # DINO's cross-entropy is the teacher's entropy (which rises by design as the teacher temperature
    # warms up) plus KL(teacher || student): what the student controls, and what must fall, is the KL.
    def dino_kl(r):
        return r["dino_local_crops_loss"] + r["dino_global_crops_loss"] - r["teacher_entropy"]

    first, last = train_rows[:5], train_rows[-5:]
    for term in (dino_kl, lambda r: r["ibot_loss"], lambda r: r["koleo_loss"]):
        assert sum(map(term, last)) < sum(map(term, first))
    assert all(dino_kl(r) >= -1e-4 for r in train_rows)  # a KL is never negative
    assert [r["iteration"] for r in eval_rows] == [0, 19, 39] and 0 <= final["knn_top1"] <= 1
    # schedules reach the logs: warmup from lr 0, teacher temperature from its warmup value
    assert train_rows[0]["lr"] == 0.0 and train_rows[0]["teacher_temp"] == pytest.approx(0.04)
    assert train_rows[0]["last_layer_lr"] == 0.0 and train_rows[25]["last_layer_lr"] > 0
    # the resolved config is written and reloads to the same values
    saved = load_config(tmp_path / "config.yaml")
    assert saved.optim.lr == cfg.optim.lr > 0 and saved.student.embed_dim == 64
    # TensorBoard: one run, named after the output directory, every scalar in its group, the config as hparams
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == [tmp_path.name]
    events = EventAccumulator(str(tmp_path / "tensorboard" / tmp_path.name))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/koleo", "loss/teacher_entropy", "optim/lr", "optim/momentum", "grad_norm/backbone",
            "grad_norm/dino_head", "eval/knn_top1", "data/images_per_sec", "data/data_wait"} <= tags
    assert {tag.split("/")[0] for tag in tags} == {"loss", "optim", "grad_norm", "eval", "data", "monitor"}
    assert len(events.Scalars("loss/total")) == 40
    from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: PLC0415

    summaries = events.SummaryMetadata
    start = plugin_data_pb2.HParamsPluginData.FromString(
        summaries("_hparams_/session_start_info").plugin_data.content).session_start_info
    assert start.hparams["optim.epochs"].number_value == 2 and start.hparams["student.arch"].string_value
    assert start.hparams["train.output_dir"].string_value == str(tmp_path)
    end = plugin_data_pb2.HParamsPluginData.FromString(summaries("_hparams_/session_end_info").plugin_data.content)
    assert end.session_end_info.status == 1  # STATUS_SUCCESS: the run finished
    # the teacher backbone file loads by itself and is the registers model that was trained
    backbone = load_backbone(tmp_path / BACKBONE_FILE)
    assert backbone.num_register_tokens == 4 and backbone.embed_dim == 64 and backbone.interpolate_antialias


def test_non_finite_loss_stops_naming_iteration_and_term(tmp_path, monkeypatch):
    original = meta_arch.SSLMetaArch.forward_loss
    calls = {"n": 0}

    def poisoned(self, batch, **kwargs):
        loss, metrics = original(self, batch, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            metrics["koleo_loss"] = torch.tensor(float("nan"))
        return loss, metrics

    monkeypatch.setattr(meta_arch.SSLMetaArch, "forward_loss", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 2: non-finite loss \(koleo_loss=nan\)"):
        run(tmp_path, "optim.epochs=1", "train.epoch_length=5", "evaluation.knn_enabled=false")
    assert not (tmp_path / BACKBONE_FILE).exists()
    assert max(r["iteration"] for r in rows(tmp_path)) == 1  # the poisoned step was never logged


def test_steps_never_wait_for_the_device_between_reads(tmp_path, monkeypatch):
    """Everything a step does with the model (forward, losses, backward, clipping, AdamW, EMA, keeping the
    figures) reads no tensor on the host; only flush does, every train.log_every. Two reads are of host tensors
    by design, and allowed: AdamW's step counts (on the host for foreach; fused reads them on the device), and
    the photometric augmentation, kornia's, whose argument checks read host-side copies (not trapped: on CPU a
    host tensor and a device tensor cannot be told apart)."""
    reads = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
    trap = {"on": False, "optimizer": None}
    originals = {name: getattr(torch.Tensor, name) for name in reads}

    def guard(name):
        def read(tensor, *args, **kwargs):
            steps = [state["step"] for state in trap["optimizer"].state.values()] if trap["on"] else []
            if trap["on"] and not any(tensor is step for step in steps):
                raise AssertionError(f"Tensor.{name}() inside a step")
            return originals[name](tensor, *args, **kwargs)
        return read

    for name in reads:
        monkeypatch.setattr(torch.Tensor, name, guard(name))

    def trapped(function, optimizer_of):
        def call(*args, **kwargs):
            trap["on"], trap["optimizer"] = True, optimizer_of(args)
            try:
                return function(*args, **kwargs)
            finally:
                trap["on"] = False
        return call

    flushed = []

    def flush(run):
        flushed.append([step.iteration for step in run.pending])
        was, trap["on"] = trap["on"], False
        try:
            original_flush(run)
        finally:
            trap["on"] = was

    original_flush = loop.flush
    monkeypatch.setattr(loop, "flush", flush)
    monkeypatch.setattr(loop, "train_step", trapped(loop.train_step, lambda args: args[1]))
    monkeypatch.setattr(loop, "log_step", trapped(loop.log_step, lambda args: args[0].optimizer))
    run(tmp_path, "optim.epochs=1", "train.epoch_length=10", "train.log_every=4", "evaluation.knn_enabled=false",
        "monitor.period=0", "checkpoint.period=0")
    assert flushed[:4] == [[0], [1, 2, 3], [4, 5, 6, 7], [8, 9]]  # the first step, every 4th, the last
    assert [r["iteration"] for r in rows(tmp_path) if "total_loss" in r] == list(range(10))


def test_compiled_blocks_and_activation_checkpointing_train_as_eager(tmp_path):
    """train.compile=blocks (inductor on CPU) and train.activation_checkpointing: the same losses as the plain
    eager path over 3 steps (the same batches, augmentations and stochastic-depth draws)."""
    common = ("optim.epochs=1", "train.epoch_length=3", "evaluation.knn_enabled=false", "monitor.period=0",
              "optim.warmup_epochs=0", "student.drop_path_rate=0.2")
    losses = {}
    for name, overrides in (("eager", ("train.compile=none",)), ("compiled", ("train.compile=blocks",)),
                            ("checkpointed", ("train.activation_checkpointing=selective",))):
        run(tmp_path / name, *common, *overrides)
        losses[name] = [{k: v for k, v in r.items() if k.endswith("_loss")} for r in rows(tmp_path / name)
                        if "total_loss" in r]
    assert len(losses["eager"]) == 3
    for name in ("compiled", "checkpointed"):
        for ours, eager in zip(losses[name], losses["eager"]):
            assert ours.keys() == eager.keys()
            for key in eager:
                assert ours[key] == pytest.approx(eager[key], abs=1e-5, rel=1e-5), (name, key)


def test_bad_dataset_path_fails_before_any_model_is_built(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the dataset was checked")

    monkeypatch.setattr("dinoreg.train.build.SSLMetaArch", no_model)
    with pytest.raises(ValueError, match="does not exist"):
        run(tmp_path, f"train.dataset_path={tmp_path / 'missing'}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        run(tmp_path, f"train.dataset_path={empty}")


def test_cli_reports_config_errors_and_prints_config(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path), "student.num_registers=4"]) == 2
    assert "did you mean student.num_register_tokens" in capsys.readouterr().err
    assert main(["train", "--output-dir", str(tmp_path), "--print-config", "optim.epochs=3"]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 3" in printed and f"output_dir: {tmp_path}" in printed
    assert not (tmp_path / "metrics.jsonl").exists()


def test_print_config_needs_no_output_dir_and_training_does(capsys):
    assert main(["train", "--print-config", "optim.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "optim.epochs=3"])
    assert exit_info.value.code == 2 and "--output-dir" in capsys.readouterr().err


def test_a_missing_dataset_is_a_bad_config_value_exit_2(tmp_path, capsys):
    code = main(["train", "--output-dir", str(tmp_path / "run"), f"train.dataset_path={tmp_path / 'missing'}"])
    assert code == 2  # as every other bad value of the config (it was 1, as a crash)
    error = capsys.readouterr().err
    assert "invalid configuration" in error and "train.dataset_path" in error and "does not exist" in error
