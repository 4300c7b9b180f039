"""`dinoreg export`: a short training run -> every format -> each loads and gives the teacher's features."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from launch_helpers import TINY, tmpfs

from dinoreg import load_backbone
from dinoreg.cli import main
from dinoreg.config import load_config
from dinoreg.export.source import ExportError, read_backbone, resolve_reader
from dinoreg.run_dir import BACKBONE_FILE
from dinoreg.train.build import build_ssl_model

# 64-dimensional heads, as every official model: a plain .pth then needs no arguments to load
RUN = [*TINY, "student.embed_dim=64", "student.num_heads=1", "train.batch_size_per_gpu=8", "train.num_workers=0",
       "optim.epochs=2", "train.epoch_length=5", "evaluation.knn_enabled=false", "student.layerscale=1.0"]
IMAGES = torch.Generator().manual_seed(0)
NATIVE = torch.rand(3, 3, 32, 32, generator=IMAGES)
RESAMPLED = torch.rand(2, 3, 48, 48, generator=IMAGES)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    assert main(["train", "--output-dir", str(run), *RUN]) == 0
    return run


@pytest.fixture(scope="module")
def teacher(run_dir):
    """The teacher as the training loop itself wrote it at the end of the run."""
    return load_backbone(run_dir / BACKBONE_FILE)


def features(model, images):
    with torch.no_grad():
        out = model.forward_features(images)
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], 1)


def export(run_dir, tmp_path, fmt, name, *flags):
    output = tmp_path / name
    assert main(["export", str(run_dir), "--format", fmt, "--output", str(output), *flags]) == 0
    return output


@pytest.mark.parametrize("fmt, name", [("dinov2", "b.pth"), ("safetensors", "b.safetensors")])
def test_native_formats_reproduce_the_teacher(run_dir, teacher, tmp_path, fmt, name):
    path = export(run_dir, tmp_path, fmt, name)
    loaded = load_backbone(path)
    assert not loaded.training
    torch.testing.assert_close(features(loaded, NATIVE), features(teacher, NATIVE), atol=1e-5, rtol=0)
    torch.testing.assert_close(features(loaded, RESAMPLED), features(teacher, RESAMPLED), atol=1e-5, rtol=0)
    if fmt == "dinov2":  # a plain state dict with exactly the backbone's (official) keys: loads strictly
        state = torch.load(path, weights_only=True)
        assert set(state) == set(teacher.state_dict())
        teacher.load_state_dict(state, strict=True)


def test_hf_export_loads_in_transformers_and_back(run_dir, teacher, tmp_path):
    import transformers

    path = export(run_dir, tmp_path, "hf", "hf_model")
    assert sorted(p.name for p in path.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "preprocessor_config.json"]
    model = transformers.AutoModel.from_pretrained(path)
    assert type(model).__name__ == "Dinov2WithRegistersModel" and not model.training
    for images in (NATIVE, RESAMPLED):  # the native 4x4 grid and a resampled 6x6 one
        with torch.no_grad():
            hidden = model(pixel_values=images).last_hidden_state  # [B, 1 + R + HW, D]
        torch.testing.assert_close(hidden, features(teacher, images), atol=1e-4, rtol=0)
        torch.testing.assert_close(features(load_backbone(path), images), features(teacher, images), atol=1e-5,
                                   rtol=0)


def test_hf_export_is_a_complete_folder_for_the_pipeline(run_dir, teacher, tmp_path):
    """pipeline("image-feature-extraction") and AutoImageProcessor need preprocessor_config.json (they raised
    OSError); it holds DINOv2's evaluation preprocessing, which is dinoreg's: the same pixels, except that an odd
    crop margin puts Hugging Face's crop 1 px before torchvision's."""
    import numpy as np
    import transformers
    from PIL import Image

    from dinoreg.data import IMAGENET_MEAN, IMAGENET_STD
    from dinoreg.data.loader import EvalTransform

    path = export(run_dir, tmp_path, "hf", "hf_model")
    pipeline = transformers.pipeline("image-feature-extraction", model=str(path))
    processor = transformers.AutoImageProcessor.from_pretrained(path)
    normalise = lambda pixels: ((pixels.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1))  # noqa: E731
                                / torch.tensor(IMAGENET_STD).view(3, 1, 1))[None]
    for height, width in ((40, 52), (70, 90)):
        image = Image.fromarray((np.random.default_rng(0).random((height, width, 3)) * 255).astype("uint8"))
        ours = normalise(EvalTransform(32)(image))  # the training resolution, resize 37 (32 * 256 / 224)
        processed = processor(image, return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(pipeline(image, return_tensors=True), features(load_backbone(path), processed),
                                   atol=1e-4, rtol=0)
        if (height, width) == (40, 52):  # resized to 37 x 48: even margins, bit-identical pixels
            assert torch.equal(processed, ours)
        else:  # resized to 37 x 47 (both truncate the long side): a 15 px margin, which torchvision (DINOv2's
            # evaluation, and dinoreg's) rounds half to even (8) and Hugging Face floor-divides (7)
            resized = torch.from_numpy(np.asarray(image.resize((47, 37), Image.BICUBIC))).permute(2, 0, 1)
            assert torch.equal(ours, normalise(resized[:, 2:34, 8:40]))
            assert torch.equal(processed, normalise(resized[:, 2:34, 7:39]))
    card = (path / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card and "| register tokens | 4 |" in card
    assert "| training data | `synthetic" in card and "| iterations | 10 of 10 |" in card


def test_timm_export_follows_timms_layout_and_loads_back(run_dir, teacher, tmp_path):
    path = export(run_dir, tmp_path, "timm", "timm.pth", "--timm-name", "vit_small_patch14_reg4_dinov2")
    saved = torch.load(path, weights_only=True)
    tensors = saved["state_dict"]
    assert saved["model_name"] == "vit_small_patch14_reg4_dinov2"  # asked for: timm has none for this tiny model
    assert saved["model_kwargs"]["reg_tokens"] == 4 and saved["model_kwargs"]["no_embed_class"] is True
    assert saved["model_kwargs"]["dynamic_img_size"] is True  # tiny_cpu resizes as timm does
    # timm resizes to floor(32 / crop_pct): 37, as dinoreg's round(32 * 256 / 224) (0.875 would give 36)
    assert saved["pretrained_cfg"] == {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 32 / 37.5,
                                       "crop_mode": "center", "mean": [0.485, 0.456, 0.406],
                                       "std": [0.229, 0.224, 0.225], "num_classes": 0}
    assert "reg_token" in tensors and "register_tokens" not in tensors and "mask_token" not in tensors
    assert tensors["pos_embed"].shape == (1, 16, 64)  # no cls slot: folded into cls_token, as timm does
    torch.testing.assert_close(tensors["cls_token"], teacher.cls_token + teacher.pos_embed[:, :1], atol=0, rtol=0)
    for images in (NATIVE, RESAMPLED):
        torch.testing.assert_close(features(load_backbone(path), images), features(teacher, images), atol=1e-5,
                                   rtol=0)


def test_timm_export_without_a_timm_name_is_refused_with_one_that_works(run_dir, tmp_path, capsys):
    output = tmp_path / "timm.pth"
    assert main(["export", str(run_dir), "--format", "timm", "--output", str(output)]) == 1
    error = capsys.readouterr().err
    assert "timm registers no DINOv2 model for embed_dim=64" in error
    assert "--timm-name 'vit_small_patch14_reg4_dinov2' works" in error and not output.exists()


def test_safetensors_records_architecture_and_provenance(run_dir, tmp_path):
    from safetensors import safe_open

    path = export(run_dir, tmp_path, "safetensors", "b.safetensors")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    arch = json.loads(metadata["dinoreg_arch"])
    source = json.loads(metadata["dinoreg_source"])
    assert (arch["patch_size"], arch["num_register_tokens"], arch["img_size"]) == (8, 4, 32)
    assert arch["interpolate_antialias"] is True and arch["interpolate_offset"] == 0.0  # tiny_cpu's
    assert source["iteration"] == 10 and source["part"] == "teacher" and source["world_size"] == 1
    assert len(source["config_digest"]) == 16 and source["dtype"] == "fp32"


def test_img_size_and_dtype(run_dir, teacher, tmp_path):
    path = export(run_dir, tmp_path, "safetensors", "big.safetensors", "--img-size", "48", "--dtype", "bf16")
    loaded = load_backbone(path)
    assert loaded.pos_embed.shape[1] == 1 + 6 * 6
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("pos_embed").dtype == torch.bfloat16
    # the resampled pos_embed is the one the teacher computes on the fly at 48 px (up to bf16 rounding)
    torch.testing.assert_close(features(loaded, RESAMPLED), features(teacher, RESAMPLED), atol=0.05, rtol=0.05)


def test_student_part_and_sharded_read_without_fsdp(run_dir, teacher):
    checkpoint = resolve_reader(run_dir).checkpoint
    assert checkpoint.name == "10"
    model, source = read_backbone(checkpoint)
    for name, value in teacher.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    student, _ = read_backbone(checkpoint, part="student")
    assert not torch.equal(student.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_existing_output_is_kept_without_force(run_dir, tmp_path, capsys):
    path = tmp_path / "b.pth"
    path.write_bytes(b"precious")
    assert main(["export", str(run_dir), "--format", "dinov2", "--output", str(path)]) == 1
    assert "--force" in capsys.readouterr().err and path.read_bytes() == b"precious"
    assert main(["export", str(run_dir), "--format", "dinov2", "--output", str(path), "--force"]) == 0
    assert set(torch.load(path, weights_only=True)) >= {"cls_token", "pos_embed", "register_tokens"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pth"]  # no temporary files left


def test_bad_inputs_have_clear_errors(run_dir, tmp_path, capsys):
    def fails(*args):
        assert main(["export", *map(str, args)]) == 1
        return capsys.readouterr().err

    assert "does not exist" in fails(tmp_path / "nowhere", "--format", "dinov2", "--output", tmp_path / "x.pth")
    (tmp_path / "empty").mkdir()
    assert "neither a training output directory" in fails(tmp_path / "empty", "--format", "dinov2", "--output",
                                                          tmp_path / "x.pth")
    assert "writes .safetensors" in fails(run_dir, "--format", "safetensors", "--output", tmp_path / "x.pth")
    with pytest.raises(SystemExit):
        main(["export", str(run_dir), "--format", "onnx", "--output", str(tmp_path / "x")])
    # a damaged copy of the checkpoint: the error names the truncated file
    damaged = tmp_path / "damaged"
    os.system(f"cp -r {resolve_reader(run_dir).checkpoint} {damaged}")
    shard = next(damaged.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    assert shard.name in fails(damaged, "--format", "dinov2", "--output", tmp_path / "x.pth")
    # bytes overwritten with the size unchanged (issue 13: exporting the student crashed inside DCP's reader)
    overwritten = tmp_path / "overwritten"
    os.system(f"cp -r {resolve_reader(run_dir).checkpoint} {overwritten}")
    shard = next(overwritten.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 4096])
    shard.write_bytes(bytes(data))
    error = fails(overwritten, "--part", "student", "--format", "safetensors", "--output", tmp_path / "s.safetensors")
    assert "damaged checkpoint" in error and shard.name in error and "saved content" in error
    assert "Traceback" not in error and len(error.splitlines()) <= 2
    with pytest.raises(ExportError, match="holds no teacher backbone|unknown part"):
        read_backbone(resolve_reader(run_dir).checkpoint, part="heads")
    assert not (tmp_path / "x.pth").exists()


def test_torch_hub_entry_loads_an_export(run_dir, tmp_path):
    path = export(run_dir, tmp_path, "safetensors", "b.safetensors")
    repo = Path(__file__).resolve().parents[2]
    with pytest.raises(Exception, match="not dinoreg_vits14_reg4"):
        torch.hub.load(str(repo), "dinoreg_vits14_reg4", weights=str(path), source="local")
    random_init = torch.hub.load(str(repo), "dinoreg_vits14_reg4", source="local", img_size=224, pretrained=False)
    assert random_init.pos_embed.shape == (1, 1 + 16 * 16, 384) and random_init.num_register_tokens == 4


def test_pretrained_weights_initialise_student_and_teacher(run_dir, teacher, tmp_path):
    path = export(run_dir, tmp_path, "dinov2", "b.pth")
    cfg = load_config("tiny_cpu", [*RUN, f"student.pretrained_weights={path}", "crops.global_crops_size=48"])
    model = build_ssl_model(cfg)
    for backbone in (model.student["backbone"], model.teacher["backbone"]):
        torch.testing.assert_close(features(backbone.eval(), RESAMPLED), features(teacher, RESAMPLED), atol=1e-5,
                                   rtol=0)
    with pytest.raises(ValueError, match="student.pretrained_weights: .* does not exist"):
        build_ssl_model(load_config("tiny_cpu", [*RUN, f"student.pretrained_weights={tmp_path / 'missing.pth'}"]))
    with pytest.raises(Exception, match="does not fit the configured student"):
        build_ssl_model(load_config("tiny_cpu", [*RUN, f"student.pretrained_weights={path}", "student.depth=3"]))


def test_torch_hub_entry_loads_a_fitting_file(tmp_path):
    from dinoreg.models import build_backbone
    from dinoreg.models.weights import save_backbone

    torch.manual_seed(3)
    model = build_backbone("vit_small", patch_size=14, img_size=224, num_register_tokens=4, init_values=1.0,
                           interpolate_antialias=True, interpolate_offset=0.0).eval()
    path = tmp_path / "vits14_reg4.safetensors"
    save_backbone(model, path)
    repo = Path(__file__).resolve().parents[2]
    loaded = torch.hub.load(str(repo), "dinoreg_vits14_reg4", weights=str(path), source="local", img_size=224)
    images = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(features(loaded, images), features(model, images), atol=1e-5, rtol=0)


def test_torch_hub_speaks_the_official_dialect(run_dir, tmp_path):
    from dinoreg.models import build_backbone
    from dinoreg.models.weights import save_backbone

    repo = str(Path(__file__).resolve().parents[2])

    def hub(name, **kwargs):
        return torch.hub.load(repo, name, source="local", **kwargs)

    random_init = hub("dinoreg_vits14_reg4", pretrained=False)  # was a TypeError
    assert random_init.num_register_tokens == 4 and random_init.pos_embed.shape[1] == 1 + 37 * 37
    with pytest.raises(ValueError, match="ships no weights"):
        hub("dinoreg_vits14_reg4", pretrained=True)
    with pytest.raises(ValueError, match="ships no weights"):  # the official default is pretrained=True
        hub("dinov2_vits14_reg")
    with pytest.raises(FileNotFoundError, match="downloads dinoreg does not make"):
        hub("dinov2_vits14_reg", weights="LVD142M")  # the official hub's weights name
    torch.manual_seed(5)
    small = build_backbone("vit_small", patch_size=14, img_size=224, num_register_tokens=4, init_values=1.0,
                           interpolate_antialias=True, interpolate_offset=0.0).eval()
    path = tmp_path / "vits14_reg4_224.safetensors"
    save_backbone(small, path)
    with pytest.raises(ValueError, match="pretrained=False builds random weights"):
        hub("dinoreg_vits14_reg4", pretrained=False, weights=str(path))
    # the official name is an alias; the file's own 224 px grid is kept (no silent resampling to 518)
    official = hub("dinov2_vits14_reg", weights=str(path))
    assert official.pos_embed.shape == small.pos_embed.shape
    images = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(features(official, images), features(small, images), atol=1e-5, rtol=0)
    assert hub("dinov2_vits14", pretrained=False).num_register_tokens == 0
    # one entry for any export: here the tiny run's, which no released architecture fits
    exported = export(run_dir, tmp_path, "safetensors", "any.safetensors")
    anything = hub("dinoreg_backbone", weights=str(exported))
    assert anything.embed_dim == load_backbone(exported).embed_dim and not anything.training


def test_force_keeps_the_old_output_when_the_new_export_fails(tmp_path):
    from dinoreg.export.writers import export_backbone
    from dinoreg.models import build_backbone

    # registers with the legacy interpolation: transformers' class would compute something else, so refused
    legacy = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1, num_register_tokens=4,
                            interpolate_antialias=False, interpolate_offset=0.1)
    good = tmp_path / "hf"
    good.mkdir()
    (good / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="allow_interpolation_mismatch"):
        export_backbone(legacy, None, fmt="hf", output=good, force=True)
    assert (good / "config.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    export_backbone(legacy, None, fmt="hf", output=good, force=True, allow_interpolation_mismatch=True)
    assert sorted(p.name for p in good.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "preprocessor_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the old directory is gone, no temporaries


def test_resume_does_not_reread_pretrained_weights(run_dir, tmp_path):
    path = export(run_dir, tmp_path, "dinov2", "b.pth")
    run = tmp_path / "continued"
    args = ["train", "--output-dir", str(run), *RUN, "optim.epochs=1", f"student.pretrained_weights={path}"]
    assert main(args) == 0
    path.unlink()  # e.g. a requeued job on a node where the file is gone: the checkpoint has every weight
    assert main([*args[:-1], "optim.epochs=2", f"student.pretrained_weights={path}",
                 "--allow-config-change"]) == 0
    assert (run / "checkpoints" / "10").is_dir()


def test_dinov2_export_names_what_a_plain_pth_cannot_hold(tmp_path, capsys):
    from dinoreg.export.writers import official_load_overrides
    from dinoreg.models import build_backbone

    odd = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=32, num_heads=2,
                         num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0)
    assert official_load_overrides(odd) == {"num_heads": 2}
    standard = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=1, num_register_tokens=4,
                              interpolate_antialias=True, interpolate_offset=0.0)
    assert official_load_overrides(standard) == {}


def one_line_error(args, capsys):
    assert main(["export", *map(str, args)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    return captured.err.strip()


@pytest.mark.parametrize("fmt, name", [("dinov2", "b.pth"), ("safetensors", "b.safetensors"), ("hf", "hf"),
                                       ("timm", "b.pth")])
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(run_dir, tmp_path, capsys, fmt, name):
    """Issue 24: a 29-line traceback. 64 KiB cannot hold the run's backbone (446 KiB) in any format."""
    with tmpfs(tmp_path / "small", "size=64k") as small:
        flags = ["--timm-name", "vit_small_patch14_reg4_dinov2"] if fmt == "timm" else []
        error = one_line_error([run_dir, "--format", fmt, "--output", small / name, *flags], capsys)
        assert error.startswith(f"dinoreg export: could not write {small / name}: no space left on device (")
        assert re.search(rf"\(\d+ KiB free in {re.escape(str(small))}; the export needs about 446 KiB\)", error)
        assert "free space there or choose an --output on another disk (no partial file was left)" in error
        assert list(small.iterdir()) == []


def test_a_full_disk_keeps_the_output_it_would_have_replaced(run_dir, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "size=64k") as small:
        (small / "b.safetensors").write_bytes(b"the previous export")
        error = one_line_error([run_dir, "--format", "safetensors", "--output", small / "b.safetensors", "--force"],
                               capsys)
        assert "no space left on device" in error and f"(the existing {small / 'b.safetensors'} is unchanged)" in error
        assert [p.name for p in small.iterdir()] == ["b.safetensors"]
        assert (small / "b.safetensors").read_bytes() == b"the previous export"


def test_read_only_and_directory_destinations_are_one_line_before_anything_is_read(tmp_path, capsys):
    nowhere = tmp_path / "no_run"  # never read: each destination is refused first
    with tmpfs(tmp_path / "ro", "size=64k,ro") as read_only:
        for fmt, output in (("dinov2", read_only / "b.pth"), ("hf", read_only / "new" / "hf")):
            assert one_line_error([nowhere, "--format", fmt, "--output", output], capsys) == (
                f"dinoreg export: cannot write {output}: {read_only} is on a read-only file system; choose an "
                "--output on a writable disk")
    (tmp_path / "folder.pth").mkdir()
    assert one_line_error([nowhere, "--format", "dinov2", "--output", tmp_path / "folder.pth", "--force"], capsys) == (
        f"dinoreg export: {tmp_path / 'folder.pth'} is a directory and --format dinov2 writes one file; name a file, "
        f"e.g. --output {tmp_path / 'folder.pth' / 'backbone.pth'}")
    assert "is a directory" in one_line_error([nowhere, "--format", "safetensors", "--output", tmp_path], capsys)
    (tmp_path / "file").write_text("x")
    assert one_line_error([nowhere, "--format", "hf", "--output", tmp_path / "file", "--force"], capsys) == (
        f"dinoreg export: {tmp_path / 'file'} is a file and --format hf writes a directory; name a new folder for "
        "--output")
    assert one_line_error([nowhere, "--format", "dinov2", "--output", tmp_path / "file" / "b.pth"], capsys) == (
        f"dinoreg export: cannot write {tmp_path / 'file' / 'b.pth'}: {tmp_path / 'file'} is a file, not a folder; "
        "choose another --output")
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "folder.pth").is_dir()
