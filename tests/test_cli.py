"""The `dinoreg` command line: real outputs, and argument errors that name the option."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dinoreg.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_analyze_flops_json(tmp_path, capsys):
    path = tmp_path / "out" / "flops.json"
    args = ["analyze", "flops", "--arch", "vit_tiny", "--patch-size", "16", "--img-size", "64",
            "--registers", "0,4", "--json", str(path)]
    assert main(args) == 0
    rows = json.loads(path.read_text())
    assert [row["registers"] for row in rows] == [0, 4]
    for row in rows:
        assert set(row) == {"registers", "params", "flops"}
        assert all(isinstance(value, int) for value in row.values())
    assert rows[1]["params"] - rows[0]["params"] == 4 * 192
    assert rows[1]["flops"] > rows[0]["flops"]
    out = capsys.readouterr().out
    assert "GFLOPs" in out and "multiply-add" in out


def test_analyze_flops_png(tmp_path):
    path = tmp_path / "flops.png"
    assert main(["analyze", "flops", "--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32",
                 "--registers", "0,4,16", "--png", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_flops_baseline_added_when_missing(capsys):
    assert main(["analyze", "flops", "--arch", "vit_tiny", "--patch-size", "16", "--img-size", "32",
                 "--registers", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split()[0] == "4" and lines[-1].endswith("%")


def test_model_info_prints_params_and_shapes(tmp_path, capsys):
    path = tmp_path / "info.json"
    assert main(["model-info", "--arch", "vit_small", "--patch-size", "14", "--registers", "4",
                 "--img-size", "224", "--batch-size", "2", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "GFLOPs" in out
    assert "x_norm_clstoken      [2, 384]" in out
    assert "x_norm_regtokens     [2, 4, 384]" in out
    assert "x_norm_patchtokens   [2, 256, 384]" in out
    assert "x_prenorm            [2, 261, 384]" in out
    info = json.loads(path.read_text())
    assert info["params"] > 20_000_000
    assert info["crops"][0]["shapes"]["x_norm_regtokens"] == [2, 4, 384]


@pytest.mark.parametrize("interpolation", ["antialias", "legacy"])
def test_model_info_local_crop(interpolation, capsys):
    """The README's main command: local crops of 98 px go through the pos-embed resampling, which
    fvcore traces with torch.jit (sizes are traced values there, not Python ints)."""
    assert main(["model-info", "--arch", "vit_small", "--patch-size", "14", "--registers", "4",
                 "--img-size", "224", "--local-size", "98", "--interpolation", interpolation]) == 0
    out = capsys.readouterr().out
    assert "local crop 98x98" in out
    assert "x_norm_patchtokens   [1, 49, 384]" in out


@pytest.mark.parametrize("args, option", [
    (["model-info", "--arch", "vit_huge"], "--arch"),
    (["model-info", "--img-size", "225", "--patch-size", "14"], "--img-size"),
    (["model-info", "--local-size", "100"], "--local-size"),
    (["model-info", "--registers", "-1"], "--registers"),
    (["model-info", "--interpolation", "nearest"], "--interpolation"),
    (["analyze", "flops", "--registers", "0,two"], "--registers"),
    (["analyze", "flops", "--registers", "4,4"], "--registers"),
    (["analyze", "flops", "--img-size", "100", "--patch-size", "16"], "--img-size"),
    (["analyze"], "<analysis>"),
])
def test_bad_arguments_exit_with_message(args, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code != 0
    assert option in capsys.readouterr().err


def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "dinoreg", "analyze", "flops", "--help"],
                            cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "--registers" in result.stdout


def test_version_is_the_package_version(capsys):
    version = re.search(r'^__version__ = "([^"]+)"', (ROOT / "dinoreg" / "__init__.py").read_text(), re.M).group(1)
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dinoreg {version}"


def test_model_info_of_a_dinov3_preset_shows_its_storage_tokens(tmp_path, capsys):
    path = tmp_path / "vits16.json"
    assert main(["model-info", "--arch", "vits16", "--batch-size", "2", "--local-size", "512", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "vits16/16 (DINOv3, RoPE), 4 storage tokens" in out and "21,601,152" in out  # the official count
    assert "x_storage_tokens     [2, 4, 384]" in out and "x_norm_patchtokens   [2, 196, 384]" in out
    assert "local crop 512x512: 32x32 = 1024 patches" in out  # any multiple of the patch: nothing is resampled
    info = json.loads(path.read_text())
    assert (info["pos_embed_type"], info["patch_size"], info["ffn_layer"], info["interpolation"]) == \
        ("rope", 16, "mlp", None)
    assert info["crops"][1]["shapes"]["x_prenorm"] == [2, 1 + 4 + 1024, 384]


def test_model_info_lists_the_dinov3_presets(tmp_path, capsys):
    path = tmp_path / "presets.json"
    assert main(["model-info", "--presets", "--sizes", "448", "--json", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[-1] == "GFLOPs@448"
    assert [line.split()[0] for line in lines[2:9]] == ["vits16", "vits16plus", "vitb16", "vitl16", "vitl16plus",
                                                       "vith16plus", "vit7b16"]
    rows = json.loads(path.read_text())
    assert rows[1]["ffn_layer"] == "swiglu" and rows[1]["ffn_ratio"] == 6.0 and rows[1]["params"] == 28_697_472
    assert list(rows[0]["flops"]) == ["448"]
    assert rows[6]["ffn_layer"] == "swiglu64" and rows[6]["embed_dim"] == 4096


@pytest.mark.parametrize("args, message", [
    (["model-info", "--arch", "vitl16", "--interpolation", "legacy"], "no position embedding to resample"),
    (["model-info", "--arch", "vitl16", "--ffn-layer", "swiglufused"], "use one of mlp, swiglu, swiglu32"),
    (["model-info", "--arch", "vit_small", "--ffn-layer", "swiglu64"], "use one of mlp, swiglu, swiglufused"),
    (["model-info", "--arch", "vitb16", "--img-size", "220"], "not a multiple of --patch-size 16"),
    (["model-info", "--presets", "--sizes", "100"], "--sizes 100 is not a multiple"),
    (["analyze", "flops", "--arch", "vits16", "--ffn-layer", "swiglufused"], "--ffn-layer swiglufused"),
])
def test_options_that_do_not_fit_the_family_are_refused_in_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and message in error[0]
