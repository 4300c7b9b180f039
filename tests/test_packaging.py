"""What a user of the installed package sees: license, metadata, typing marker, extras."""

import importlib.metadata
from pathlib import Path

import dinoreg

ROOT = Path(__file__).resolve().parents[1]


def test_the_code_is_licensed_apache_2():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text  # the whole text, not a stub
    metadata = importlib.metadata.metadata("dinoreg")
    # setuptools >= 77 writes the SPDX expression as License-Expression, older ones as License
    assert "Apache-2.0" in (metadata.get("License-Expression"), metadata.get("License"))
    assert "LICENSE" in (metadata.get_all("License-File") or [])


def test_metadata_says_what_the_package_is_for_and_needs():
    metadata = importlib.metadata.metadata("dinoreg")
    assert metadata["Version"] == dinoreg.__version__
    assert metadata["Requires-Python"] == ">=3.10"
    classifiers = metadata.get_all("Classifier")
    assert "Topic :: Scientific/Engineering :: Artificial Intelligence" in classifiers
    assert "Typing :: Typed" in classifiers
    assert {"hf", "timm", "xformers", "dev"} <= set(metadata.get_all("Provides-Extra"))
    requires = metadata.get_all("Requires-Dist")
    assert any(r.startswith("transformers") and 'extra == "hf"' in r for r in requires)
    assert any(r.startswith("timm") and 'extra == "timm"' in r for r in requires)


def test_package_is_marked_typed():
    assert (Path(dinoreg.__file__).parent / "py.typed").is_file()
    setup = (ROOT / "setup.py").read_text(encoding="utf-8")
    assert '"dinoreg": ["py.typed"]' in setup  # shipped in wheels too, not only in the source tree
