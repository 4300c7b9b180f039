"""launch/make_jpegs.py: ImageNet-like JPEGs, deterministic by seed, in class sub-folders."""

import subprocess
import sys
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "make_jpegs.py"


def _make(out, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--output", str(out), "--count", "4", "--classes", "2",
                           "--leaves", "60", *extra], capture_output=True, text=True, check=True)


def test_same_seed_same_files_in_an_imagenet_layout(tmp_path):
    done = _make(tmp_path / "a")
    _make(tmp_path / "b")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.JPEG"))
    assert len(files) == 4 and {p.parts[0] for p in files} == {"train"} and len({p.parts[1] for p in files}) == 2
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in files)
    for path in files:
        with Image.open(tmp_path / "a" / path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 292 <= min(image.size) <= 408 and 392 <= max(image.size) <= 508  # ImageNet's commonest sizes
    assert "mean" in done.stdout and "kB" in done.stdout
    _make(tmp_path / "c", "--seed", "1")
    other = {p.read_bytes() for p in (tmp_path / "c").rglob("*.JPEG")}
    assert len(other) == 4 and not other & {(tmp_path / "a" / p).read_bytes() for p in files}


def test_bad_counts_are_refused_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path), "--count", "0"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--count must be >= 1, got 0" in result.stderr
