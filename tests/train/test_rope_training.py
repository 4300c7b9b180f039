"""Training a DINOv3-family (RoPE) student with what works for the learned-position one: FSDP2 and the meta-device
start, compiled branches with the rope, activation checkpointing, bitwise resume and resume on another number of
processes, a high-resolution phase (nothing resampled) and Gram anchoring. The student is tiny_cpu's tiny ViT as a
RoPE backbone with DINOv3's released settings (storage tokens, mask_k_bias, layernormbf16, coordinate rescaling in
training: random draws in every block) and DINOv3's heads (separate iBOT head, plain last layers)."""

import copy
import shutil
import subprocess
import sys

import pytest
import torch
from dist_step_worker import global_batch, rank_share
from launch_helpers import TINY, subprocess_env, torchrun
from test_checkpoint import losses_by_iteration
from test_continue import dinoreg
from test_meta_start import cpu_build, sharded_start

from dinoreg import load_backbone
from dinoreg.config import build_backbone_from_config, load_config
from dinoreg.distributed import DistributedEnvironment
from dinoreg.models import RopeVisionTransformer
from dinoreg.run_dir import BACKBONE_FILE, CHECKPOINT_DIR
from dinoreg.ssl.gram import gram_loss, resize_patch_features
from dinoreg.train.build import build_model_and_optimizer
from dinoreg.train.checkpoint_reader import CheckpointReader

# tiny_cpu's student as a RoPE backbone (the workers of the distributed tests build tiny_cpu)
ROPE = [*TINY, "student.pos_embed_type=rope", "student.interpolate_antialias=false", "student.interpolate_offset=0.1",
        "student.mask_k_bias=true", "student.norm_layer=layernormbf16", "student.pos_embed_rope_rescale_coords=2.0",
        "student.pos_embed_rope_dtype=fp32", "student.num_register_tokens=4", "ibot.separate_head=true",
        "dino.head_weight_norm=false", "ibot.head_weight_norm=false"]
RUN = [*ROPE, "train.batch_size_per_gpu=4", "train.num_workers=0", "optim.epochs=1", "train.epoch_length=4",
       "optim.warmup_epochs=0", "evaluation.knn_enabled=false", "monitor.period=0", "checkpoint.period=2",
       "train.log_every=1", "train.sharding=full_shard"]


def build(*overrides):
    torch.manual_seed(0)
    return build_model_and_optimizer(load_config("tiny_cpu", [*RUN, *overrides]), DistributedEnvironment(),
                                     torch.device("cpu"))


def test_a_sharded_rope_start_gathered_equals_one_process(tmp_path):
    overrides = [*ROPE, "train.sharding=full_shard"]
    reference, after_reference = cpu_build("tiny_cpu", overrides)
    started = sharded_start(tmp_path, 2, *overrides)
    assert started["state"].keys() == reference.keys()
    assert [name for name in reference if not torch.equal(started["state"][name], reference[name])] == []
    assert torch.equal(started["after"], after_reference)
    # the RoPE periods and the key-bias masks are buffers: replicated, as built
    assert {"student.backbone.rope_embed.periods", "teacher.backbone.blocks.1.attn.qkv.bias_mask"} <= set(started["buffers"])
    assert all(torch.equal(value, reference[name]) for name, value in started["buffers"].items())


def _block_and_ropes(recipe, *overrides):
    """A block of ``recipe`` (tiny width; LayerScale 1 so that the branches show) and the ropes of a global and a
    local crop group of 2 and 3 images, as the backbone gives them in training."""
    cfg = load_config(recipe, ["student.embed_dim=64", "student.num_heads=2", "student.depth=1", *overrides])
    torch.manual_seed(0)
    backbone = build_backbone_from_config(cfg, stochastic_depth=False).train()
    block = backbone.blocks[0]
    torch.nn.init.ones_(block.ls1.gamma)
    torch.nn.init.ones_(block.ls2.gamma)
    grids = [(4, 4), (2, 2)]
    ropes = next(backbone.block_ropes(grids))
    prefix = 1 + backbone.n_storage_tokens
    shapes = [(2, prefix + 16), (3, prefix + 4)]
    tokens = torch.randn(sum(b * n for b, n in shapes), 64, generator=torch.Generator().manual_seed(1))
    return block, ropes, tokens, shapes


def _output_and_gradients(block, tokens, shapes, ropes):
    tokens = tokens.clone().requires_grad_(True)
    out = block.forward_packed(tokens, shapes, batch_subset=False, rope=ropes)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {"tokens": tokens.grad, **{name: p.grad for name, p in block.named_parameters()}}


@pytest.mark.parametrize("recipe", ["tiny_rope_cpu", "vitl16_im1k"])  # fp32 and bf16 sines
def test_rope_block_branches_compile_to_one_graph_each(recipe):
    torch._dynamo.reset()
    block, ropes, tokens, shapes = _block_and_ropes(recipe)
    eager = copy.deepcopy(block)
    block.compile_residuals(fullgraph=True, backend="aot_eager")  # a graph break raises
    out, grads = _output_and_gradients(block, tokens, shapes, ropes)
    expected_out, expected_grads = _output_and_gradients(eager, tokens, shapes, ropes)
    torch.testing.assert_close(out, expected_out)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=lambda m, name=name: f"{name}: {m}")
    without_rope, _ = _output_and_gradients(eager, tokens, shapes, None)
    assert not torch.allclose(without_rope, expected_out)  # the rope took part
    torch._dynamo.reset()


def test_activation_checkpointing_keeps_a_rope_students_gradients():
    cfg = load_config("tiny_cpu", [*ROPE, "student.drop_path_rate=0.3", "student.layerscale=1.0"])
    torch.manual_seed(0)
    model = build_backbone_from_config(cfg, stochastic_depth=True).train()
    assert isinstance(model, RopeVisionTransformer) and model.rope_embed.augments
    crops = [torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)]
    grads = {}
    for mode in ("none", "selective", "full"):
        model.set_checkpointing(mode)
        torch.manual_seed(5)  # the same coordinate rescaling and stochastic-depth draws in every run
        outputs = model.forward_features(crops, masks=None)
        sum(o["x_norm_patchtokens"].pow(2).mean() + o["x_norm_clstoken"].sum() for o in outputs).backward()
        grads[mode] = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
    for mode in ("selective", "full"):  # the recomputation replays the same forward, the block's draws included
        assert grads[mode].keys() == grads["none"].keys()
        for name, grad in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], grad, rtol=1e-6, atol=1e-7, msg=name)


def _cli(run, *overrides):
    return ["-m", "dinoreg", "train", "--output-dir", str(run), *RUN, *overrides]


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    """A finished 32 px RoPE run of 4 iterations in one process, checkpoints after 2 and 4 (its centres and moments
    are no longer zero)."""
    run = tmp_path_factory.mktemp("rope") / "straight"
    dinoreg("train", "--output-dir", run, *RUN)
    return run


def test_a_rope_run_resumes_bitwise_and_on_another_number_of_processes(rope_run, tmp_path):
    reference = losses_by_iteration(rope_run)
    assert sorted(reference) == [0, 1, 2, 3]

    def from_checkpoint_2(name):
        run = tmp_path / name
        shutil.copytree(rope_run, run, ignore=shutil.ignore_patterns("4"))
        (run / CHECKPOINT_DIR / "latest").write_text("2\n")
        (run / BACKBONE_FILE).unlink()
        return run

    again = from_checkpoint_2("again")
    result = subprocess.run([sys.executable, *_cli(again)], env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert losses_by_iteration(again) == reference  # the RoPE rescaling draws continue as they were
    assert (again / BACKBONE_FILE).read_bytes() == (rope_run / BACKBONE_FILE).read_bytes()

    on_two = from_checkpoint_2("again_on_two")  # FSDP2, the same global batch
    result = torchrun(2, *_cli(on_two, "train.batch_size_per_gpu=2"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "saved by 1 processes and this run has 2" in result.stdout + result.stderr  # RNG streams restart
    resumed = losses_by_iteration(on_two)
    assert [resumed[i] for i in (0, 1)] == [reference[i] for i in (0, 1)]  # the rows before the save are kept
    for i in (2, 3):  # the data and state continue; the augmentation streams restart (per-rank RNG)
        assert resumed[i]["total_loss"] == pytest.approx(reference[i]["total_loss"], rel=0.1)
    assert isinstance(load_backbone(on_two / BACKBONE_FILE), RopeVisionTransformer)


def test_a_high_resolution_phase_continues_a_rope_run_with_nothing_resampled(rope_run):
    saved = CheckpointReader(rope_run / CHECKPOINT_DIR / "4").tensors("model.")
    model, optimizer = build("crops.global_crops_size=64", "crops.local_crops_size=32",
                             f"phase.start_from={rope_run}", "phase.optimizer=carry")
    state = model.state_dict()
    assert state.keys() == saved.keys() and not any("pos_embed" in key for key in state)
    assert [key for key, value in saved.items() if not torch.equal(state[key], value)] == []  # every tensor as saved
    moments = CheckpointReader(rope_run / CHECKPOINT_DIR / "4").tensors("optimizer.state.")
    carried = {p: name for name, p in model.named_parameters()}
    assert len(optimizer.state) == len({k.rsplit(".", 1)[0] for k in moments})  # no moment starts fresh
    for parameter, state_of in optimizer.state.items():
        assert torch.equal(state_of["exp_avg"], moments[f"{carried[parameter]}.exp_avg"])
    # the 64 px crops give an 8 x 8 grid: 64 patches with finer RoPE coordinates over the same [-1, 1] square
    out = model.teacher["backbone"].forward_features(torch.randn(2, 3, 64, 64))
    assert out["x_norm_patchtokens"].shape == (2, 64, 32)


def test_gram_anchoring_of_a_rope_student_at_the_gram_teachers_own_resolution():
    model, _ = build("gram.use_loss=true", "gram.it_load_ema_teacher=0", "crops.gram_teacher_crops_size=64")
    assert isinstance(model.gram_teacher["backbone"], RopeVisionTransformer)
    with torch.no_grad():  # a Gram teacher unlike the student, so that the term is not the trivial one
        for parameter in model.gram_teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.train()
    cfg = load_config("tiny_cpu", RUN)
    batch = rank_share(global_batch(0, cfg), 0, 1)  # 8 images: 2 x 8 global crops of 32 px, masked
    batch = batch.replace(gram_crops=torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    masks = batch.masks
    torch.manual_seed(2)  # the student's RoPE rescaling draws, the same here and below
    _, metrics = copy.deepcopy(model).forward_loss(batch, teacher_temp=0.04, values={"gram_loss_weight": 0.5})
    # by hand: the student's global-crop patch tokens (the same draws: teacher first, then the student) against the
    # Gram teacher's on the 64 px crops, whose 8 x 8 grid is resized (bicubic) to the student's 4 x 4
    torch.manual_seed(2)
    with torch.no_grad():
        model.teacher["backbone"](batch.global_crops, is_training=True)
        student = model.student["backbone"]([batch.global_crops, batch.local_crops], masks=[masks, None],
                                            is_training=True)[0]
        target = model.gram_teacher["backbone"](batch.gram_crops, is_training=True)["x_norm_patchtokens"]
        expected = gram_loss(student["x_norm_patchtokens"], resize_patch_features(target, 8, 4), apply_norm=True,
                             img_level=False, remove_neg=False)
    assert metrics["gram_loss"].item() == pytest.approx(expected.item(), rel=1e-6)
