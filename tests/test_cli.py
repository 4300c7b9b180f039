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
