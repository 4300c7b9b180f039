"""dinoreg.run_dir: a run's file names, and the one atomic write every writer of the package goes through."""

import json
import os
import stat

import pytest

from dinoreg import run_dir
from dinoreg.run_dir import RunDir, publish, write_atomically, write_json, write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_run_dir_names_the_files_a_run_writes(tmp_path):
    run = RunDir(str(tmp_path))
    assert run.config == tmp_path / "config.yaml" and run.metrics == tmp_path / "metrics.jsonl"
    assert run.tensorboard == tmp_path / "tensorboard" and run.checkpoints == tmp_path / "checkpoints"
    assert run.backbone == tmp_path / "teacher_backbone.safetensors"
    assert run.training_outputs() == []
    run.config.write_text("x")  # the config alone is no earlier run
    run.checkpoints.mkdir()
    run.metrics.write_text("{}\n")
    assert run.training_outputs() == [run.checkpoints, run.metrics]


def test_write_json_replaces_the_file_whole_with_plain_permissions(tmp_path, umask_022):
    path = tmp_path / "sub" / "results.json"
    assert write_json(path, {"a": 1}) == path
    write_json(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]} and path.read_text().endswith("\n")
    assert os.listdir(path.parent) == ["results.json"]  # no temporary file left
    # a plain open() under umask 022 gives 0644; tempfile's owner-only 0600 would hide runs from colleagues
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "latest"
    write_text(path, "7\n")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(path, half_then_crash)
    assert path.read_text() == "7\n" and os.listdir(tmp_path) == ["latest"]


def test_publish_directory_replaces_an_existing_one_and_keeps_it_on_failure(tmp_path, umask_022):
    output = tmp_path / "hf"
    with publish(output, directory=True) as tmp:
        (tmp / "config.json").write_text("old")
    assert stat.S_IMODE(output.stat().st_mode) == 0o755
    with pytest.raises(ValueError):
        with publish(output, directory=True) as tmp:
            (tmp / "config.json").write_text("broken")
            raise ValueError("conversion failed")
    assert (output / "config.json").read_text() == "old" and os.listdir(tmp_path) == ["hf"]
    with publish(output, directory=True) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("weights")
    assert sorted(os.listdir(output)) == ["config.json", "model.safetensors"]
    assert (output / "config.json").read_text() == "new" and os.listdir(tmp_path) == ["hf"]  # nothing aside left


def test_replace_directory_puts_the_old_one_back_when_the_rename_fails(tmp_path, monkeypatch):
    final, new = tmp_path / "600", tmp_path / ".tmp-600"
    final.mkdir()
    (final / "meta.json").write_text("old")
    new.mkdir()
    (new / "meta.json").write_text("new")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src) == str(new):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(run_dir.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        run_dir.replace_directory(new, final)
    assert (final / "meta.json").read_text() == "old"  # the complete old version is back in place
    assert sorted(os.listdir(tmp_path)) == [".tmp-600", "600"]


def test_links_are_written_through_and_devices_in_place(tmp_path):
    target = tmp_path / "real.json"
    write_json(target, {"v": 1})
    link = tmp_path / "link.json"
    link.symlink_to(target)
    write_json(link, {"v": 2})
    assert link.is_symlink() and json.loads(target.read_text()) == {"v": 2}
    # `--json /dev/stdout`: a device cannot be replaced by rename (as root that would replace the device node)
    device = tmp_path / "stdout"
    device.symlink_to(os.devnull)
    write_json(device, {"v": 3})
    assert device.is_symlink() and stat.S_ISCHR(os.stat(os.devnull).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json", "stdout"]


def test_is_temporary_knows_every_name_an_interrupted_write_leaves():
    assert run_dir.is_temporary(".tmp-600")  # a checkpoint being written
    assert run_dir.is_temporary(".latest.tmp-123-0a1b2c3d")  # a file being replaced
    assert run_dir.is_temporary(".600.old-k2j3h4")  # a checkpoint moved aside
    assert not run_dir.is_temporary("600") and not run_dir.is_temporary("latest")
    assert not run_dir.is_temporary(".nfs000000001234")  # NFS's own: not ours to delete


def test_an_output_that_cannot_be_created_is_named_as_asked(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    asked = tmp_path / "file" / "teacher.pth"
    with pytest.raises(OSError) as error:
        write_atomically(asked, lambda tmp: tmp.write_bytes(b"weights"))
    assert f"cannot write {asked}" in str(error.value) and ".tmp-" not in str(error.value)
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        with pytest.raises(OSError, match=f"cannot write {read_only / 'x.json'}"):
            write_json(read_only / "x.json", {})


def test_published_files_get_the_umask_permissions_whatever_their_writer_chose(tmp_path, umask_022):
    """safetensors creates its files 0600: a published export must still be readable by colleagues (0644)."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    with publish(tmp_path / "weights.safetensors") as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert stat.S_IMODE((tmp_path / "weights.safetensors").stat().st_mode) == 0o644
    with publish(tmp_path / "folder", directory=True) as tmp:
        (tmp / "inner").mkdir(mode=0o700)
        save_file({"x": torch.zeros(2)}, str(tmp / "inner" / "model.safetensors"))
    assert stat.S_IMODE((tmp_path / "folder" / "inner").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "folder" / "inner" / "model.safetensors").stat().st_mode) == 0o644
