"""The real large recipes across processes: vitl14_reg4 and vitg14_reg4 at full width with their real heads
(131,072 prototypes, a separate iBOT head, SwiGLU for g) and 2x224 + 8x98 crops, reduced to one block so that
the suite stays fast, train under 2 gloo ranks with full_shard, checkpoint, and resume from a checkpoint to the
same losses and the same exported teacher, bitwise. Marked ``scale`` (the slowest tests; the suite runs them)."""

import json
import shutil
from pathlib import Path

import pytest
from launch_helpers import torchrun

from dinoreg.run_dir import BACKBONE_FILE, CHECKPOINT_DIR

pytestmark = pytest.mark.scale


def _losses(run_dir: Path) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: {k: v for k, v in r.items() if k.endswith("_loss")} for r in rows if "total_loss" in r}


def assert_two_rank_resume_repeats(straight: Path, resumed: Path, checkpoint: int, command) -> None:
    """A copy of the 2-rank run ``straight`` cut back to its checkpoint ``checkpoint`` (as after a preemption there)
    resumes on 2 ranks to the same losses and the same teacher file, bitwise; both runs' checkpoints (GiBs) are
    deleted after."""
    shutil.copytree(straight, resumed, ignore=shutil.ignore_patterns(str(checkpoint + 1)))
    (resumed / CHECKPOINT_DIR / "latest").write_text(f"{checkpoint}\n")
    (resumed / BACKBONE_FILE).unlink()
    result = torchrun(2, *command(resumed), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout + result.stderr
    assert _losses(resumed) == _losses(straight)
    assert (resumed / BACKBONE_FILE).read_bytes() == (straight / BACKBONE_FILE).read_bytes()
    for run in (straight, resumed):
        shutil.rmtree(run / CHECKPOINT_DIR)


@pytest.mark.parametrize("recipe", ["vitl14_reg4", "vitg14_reg4"])
def test_large_recipe_trains_checkpoints_and_resumes_on_two_ranks(tmp_path, recipe):
    command = lambda run: ["-m", "dinoreg", "train", "--config", recipe, "--output-dir", str(run),  # noqa: E731
                           "student.depth=1", "train.batch_size_per_gpu=2", "train.num_workers=0",
                           "train.sharding=full_shard", "optim.epochs=1", "train.epoch_length=3",
                           "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "monitor.period=0",
                           "checkpoint.period=2", "checkpoint.keep_last=2", "train.log_every=1"]
    straight = tmp_path / "straight"
    result = torchrun(2, *command(straight), timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = _losses(straight)
    assert sorted(reference) == [0, 1, 2]
    assert all(set(row) >= {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
               for row in reference.values())
    # the DINO terms start near log K of 131,072 prototypes (2 + 2 x 8 cross-view pairs, averaged)
    first = reference[0]["dino_local_crops_loss"] + reference[0]["dino_global_crops_loss"]
    assert 0.5 * 11.78 < first < 1.5 * 11.78

    # resume from the checkpoint after iteration 2 (as after a preemption there): the last step again
    assert_two_rank_resume_repeats(straight, tmp_path / "resumed", 2, command)
