import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from dinoreg import load_backbone
from dinoreg.models import CheckpointMismatchError, build_backbone, save_backbone
from dinoreg.models.weights import METADATA_KEY, WeightsFileError, infer_arch_kwargs, read_checkpoint_and_heads


def official_like(registers=4, ffn="mlp", depth=4, init_values=1.0):
    torch.manual_seed(1)
    model = build_backbone("vit_small", embed_dim=128, num_heads=2, depth=depth, patch_size=4, img_size=16,
                           num_register_tokens=registers, init_values=init_values, ffn_layer=ffn,
                           interpolate_antialias=registers > 0, interpolate_offset=0.0 if registers else 0.1)
    return model.eval()


def same_outputs(a, b, size=16):
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(a.forward_features(x)["x_prenorm"], b.forward_features(x)["x_prenorm"])


@pytest.mark.parametrize("registers,ffn", [(4, "mlp"), (0, "mlp"), (2, "swiglufused")])
def test_architecture_is_inferred_from_shapes(registers, ffn):
    model = official_like(registers, ffn)
    kwargs = infer_arch_kwargs(model.state_dict())
    assert kwargs["embed_dim"] == 128 and kwargs["depth"] == 4 and kwargs["num_heads"] == 2
    assert kwargs["patch_size"] == 4 and kwargs["img_size"] == 16 and kwargs["num_register_tokens"] == registers
    assert kwargs["ffn_layer"] == ("mlp" if ffn == "mlp" else "swiglufused")
    assert kwargs["interpolate_antialias"] is (registers > 0)
    assert kwargs["interpolate_offset"] == (0.0 if registers else 0.1)
    loaded = load_backbone(model.state_dict())
    assert not loaded.training
    same_outputs(loaded, model, size=24)  # off-grid size: the interpolation flags matter too


def _chunk(sd, chunks=2, depth=4):
    size = depth // chunks
    return {(k.replace(f"blocks.{k.split('.')[1]}.", f"blocks.{int(k.split('.')[1]) // size}.{k.split('.')[1]}.", 1)
             if k.startswith("blocks.") else k): v for k, v in sd.items()}


@pytest.mark.parametrize("wrap", [
    lambda sd: _chunk(sd),
    lambda sd: {"module." + k: v for k, v in sd.items()},
    lambda sd: {"backbone." + k: v for k, v in sd.items()},
    lambda sd: {"model": {"teacher.backbone." + k: v for k, v in sd.items()}
                | {"student.backbone." + k: torch.zeros_like(v) for k, v in sd.items()}
                | {"teacher.dino_head.mlp.0.weight": torch.randn(3, 3)}},
    lambda sd: {"teacher": {"backbone." + k: v for k, v in _chunk(sd).items()} | {"dino_head.w": torch.ones(1)}},
    lambda sd: {"model": sd},
], ids=["chunked", "module", "backbone", "train-ckpt-teacher-wins", "teacher-ckpt-chunked", "model-wrapper"])
def test_official_layouts_load(wrap):
    model = official_like()
    same_outputs(load_backbone(wrap(model.state_dict())), model)


def test_files_pth_and_safetensors_with_metadata(tmp_path):
    model = official_like(registers=4)
    pth = tmp_path / "backbone.pth"
    torch.save(model.state_dict(), pth)
    same_outputs(load_backbone(pth), model)
    # embedded metadata wins over shape inference: here it says legacy interpolation
    legacy = dict(model.arch_kwargs, interpolate_antialias=False, interpolate_offset=0.1)
    st = tmp_path / "backbone.safetensors"
    save_file(model.state_dict(), st, metadata={METADATA_KEY: json.dumps(legacy)})
    loaded = load_backbone(st)
    assert loaded.interpolate_antialias is False and loaded.interpolate_offset == 0.1
    # ... and explicit overrides win over the metadata
    assert load_backbone(st, interpolate_antialias=True).interpolate_antialias is True


def test_resamples_pos_embed_for_another_image_size():
    model = official_like(registers=4)
    bigger = load_backbone(model.state_dict(), img_size=32)
    assert bigger.pos_embed.shape == (1, 1 + 8 * 8, 128)
    # resampling once at load equals the original model interpolating on the fly
    same_outputs(bigger, model, size=32)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys():
    sd = official_like(registers=4).state_dict()
    del sd["blocks.1.norm1.weight"]
    sd["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_backbone(sd, num_register_tokens=2)
    message = str(info.value)
    assert "missing (1): blocks.1.norm1.weight" in message
    assert "unexpected (1): blocks.0.attn.extra" in message
    assert "register_tokens: checkpoint (1, 4, 128) vs model (1, 2, 128)" in message


def test_not_a_backbone_and_missing_file_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="not a ViT backbone"):
        load_backbone({"fc.weight": torch.zeros(2, 2)})
    with pytest.raises(WeightsFileError, match="nope.pth does not exist; give a backbone"):
        load_backbone(tmp_path / "nope.pth")


class RunsCode:
    """Unpickling this runs a shell command that creates ``marker``: what a crafted file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("make, problem", [
    (lambda tmp, sd: _write(tmp, "text.pth", b"hello\n"), "is neither a torch nor a safetensors file: it starts with b'hello"),
    (lambda tmp, sd: _write(tmp, "text.safetensors", b"hello\n"), "is not a complete safetensors file"),
    (lambda tmp, sd: _write(tmp, "empty.pth", b""), "is empty (0 bytes)"),
    (lambda tmp, sd: _cut(_saved(torch.save, sd, tmp / "cut.pth")), "is a truncated or damaged torch file"),
    (lambda tmp, sd: _cut(_saved(save_file, sd, tmp / "cut.safetensors")), "is not a complete safetensors file"),
    (lambda tmp, sd: _saved(torch.save, [sd], tmp / "list.pth"), "holds a list, not a mapping of names to tensors"),
    (lambda tmp, sd: _saved(torch.save, {"a": torch.zeros(2)}, tmp / "other.pth"), "holds no ViT backbone"),
    (lambda tmp, sd: _saved(torch.save, {**sd, METADATA_KEY: {"depth": 2, "evil": 1}}, tmp / "meta.pth"),
     "has dinoreg_arch entries no backbone takes: evil"),
    (lambda tmp, sd: _saved(save_file, sd, tmp / "meta.safetensors", metadata={METADATA_KEY: "{not json"}),
     "has a dinoreg_arch metadata entry that is not JSON"),
    (lambda tmp, sd: _saved(torch.save, {"cls_token": torch.zeros(3), "pos_embed": torch.zeros(3),
                                         "patch_embed.proj.weight": torch.zeros(3)}, tmp / "flat.pth"),
     "holds no ViT backbone (not a ViT backbone checkpoint: IndexError"),
    (lambda tmp, sd: tmp, "is a folder without config.json and model.safetensors"),
], ids=["text", "text-safetensors", "empty", "truncated-pth", "truncated-safetensors", "list", "no-backbone",
        "unknown-metadata", "metadata-not-json", "flat-tensors", "folder"])
def test_a_file_that_is_no_checkpoint_is_one_line_naming_it_and_the_fix(make, problem, tmp_path):
    path = make(tmp_path, official_like(depth=1).state_dict())
    with pytest.raises(WeightsFileError) as info:
        load_backbone(path)
    message = str(info.value)
    assert message.startswith(f"{path} {problem}") and "; give a " in message and "\n" not in message, message
    assert info.value.path == str(path) and isinstance(info.value, ValueError)


def test_a_run_folder_given_as_weights_points_to_its_teacher_backbone(tmp_path):
    save_backbone(official_like(depth=1), tmp_path / "teacher_backbone.safetensors")
    with pytest.raises(WeightsFileError, match=f"give {tmp_path / 'teacher_backbone.safetensors'} "
                                               r"\(the run's teacher backbone\) or a `dinoreg export --format hf` folder"):
        load_backbone(tmp_path)


def _saved(save, payload, path, **kwargs):
    save(payload, str(path), **kwargs)
    return path


@pytest.mark.parametrize("crafted", [
    lambda sd, marker: {"model": sd, "extra": RunsCode(marker)},
    lambda sd, marker: {METADATA_KEY: RunsCode(marker), **sd},
], ids=["value", "metadata"])
@pytest.mark.parametrize("bare", [False, True], ids=["torch.save", "pickle.dumps"])
def test_a_crafted_pickle_runs_nothing_and_says_so(crafted, bare, tmp_path):
    marker, path = tmp_path / "code_ran", tmp_path / "shared.pth"
    payload = crafted(official_like(depth=1).state_dict(), marker)
    path.write_bytes(pickle.dumps(payload)) if bare else torch.save(payload, path)
    for read in (load_backbone, read_checkpoint_and_heads):
        with pytest.raises(WeightsFileError, match="holds pickled objects other than tensors and plain values .*: "
                                                   "refused unread, nothing in it was run"):
            read(path)
    assert not marker.exists(), "the crafted pickle ran"
