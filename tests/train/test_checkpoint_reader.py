"""One reader of checkpoint folders (dinoreg/train/checkpoint_reader.py): whoever reads a run (export, train.init_from,
phase.start_from with its AdamW moments) checksums each of its files once and unpickles its DCP index once."""

from collections import Counter

import pytest
import torch
from launch_helpers import TINY

from dinoreg.cli import main
from dinoreg.config import load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models.weights import read_heads
from dinoreg.train import checkpoint, checkpoint_reader
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.initial_weights import read_weights

RUN = [*TINY, "train.batch_size_per_gpu=4", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=2",
       "evaluation.knn_enabled=false", "monitor.period=0", "ibot.separate_head=true"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("reader") / "run"
    assert main(["train", "--output-dir", str(run), *RUN]) == 0
    return run


class Reads:
    """What the readers did: the files checksummed, the DCP indexes unpickled, the keys of each DCP read."""

    def __init__(self, monkeypatch):
        self.checksums, self.indexes, self.loads = Counter(), [], []
        crc32, index, load = checkpoint.file_crc32, checkpoint_reader.read_dcp_metadata, checkpoint_reader.safe_dcp_load
        monkeypatch.setattr(checkpoint, "file_crc32", lambda path, *a, **k: self.checksums.update([path]) or
                            crc32(path, *a, **k))
        monkeypatch.setattr(checkpoint_reader, "read_dcp_metadata",
                            lambda path: self.indexes.append(path) or index(path))
        monkeypatch.setattr(checkpoint_reader, "safe_dcp_load", lambda state, *a, **k: self.loads.append(sorted(state))
                            or load(state, *a, **k))

    def assert_verified_once(self, checkpoint_dir):
        files = checkpoint.read_meta(checkpoint_dir)["files"]
        assert self.checksums == Counter(checkpoint_dir / name for name in files)  # each file once, every one
        assert self.indexes == [checkpoint_dir]


def test_an_export_with_heads_checksums_each_file_once_and_reads_the_tensors_in_one_go(run, tmp_path, monkeypatch):
    reads = Reads(monkeypatch)
    output = tmp_path / "heads.safetensors"
    assert main(["export", str(run), "--format", "safetensors", "--with-heads", "--output", str(output)]) == 0
    reads.assert_verified_once(run / "checkpoints" / "2")
    [keys] = reads.loads  # backbone and heads together
    assert {key.split(".")[2] for key in keys} == {"backbone", "dino_head", "ibot_head"}
    saved, written = checkpoint_reader.CheckpointReader(run / "checkpoints" / "2").weights().heads, read_heads(output)
    assert all(torch.equal(written[head][k], v) for head in saved for k, v in saved[head].items())


def test_init_from_a_run_checksums_each_file_once(run, monkeypatch):
    reads = Reads(monkeypatch)
    weights = read_weights(str(run), key="train.init_from")
    reads.assert_verified_once(run / "checkpoints" / "2")
    assert len(reads.loads) == 1 and sorted(weights.heads) == ["dino_head", "ibot_head"]


def test_a_phase_carrying_the_optimizer_verifies_its_source_once(run, monkeypatch):
    """One build opens the source once for phase_tensors and carry_optimizer_state: it is resolved and verified
    once, then the model state and the moments are read, each tensor once."""
    reads = Reads(monkeypatch)
    cfg = load_config("tiny_cpu", [*RUN, f"phase.start_from={run}", "phase.optimizer=carry"])
    _, optimizer = build_model_and_optimizer(cfg, DistributedEnvironment(), torch.device("cpu"))
    reads.assert_verified_once(run / "checkpoints" / "2")
    model_keys, moments = reads.loads
    assert {key.split(".")[0] for key in model_keys} == {"model"} and set(model_keys).isdisjoint(moments)
    assert moments and all(key.startswith("optimizer.state.") for key in moments) and optimizer.state
