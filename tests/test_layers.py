"""The package's layering (docs/DESIGN.md), as import-linter contracts in .importlinter: the tree keeps them,
and each contract breaks when one of the imports it exists to forbid is put back into a copy of the package."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOORS = "Floors: an import only goes down"
ACYCLIC = "No import cycles between sibling modules"
CONFIG_AT_EDGES = "The config is read at the edges"
FEATURES_INDEPENDENT = "A training feature is one module"
FEATURES_UNNAMED = "The house names no feature"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` (found first on the path), with the project's contracts."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--config", str(ROOT / ".importlinter"), "--no-cache"]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def broken_contracts(output: str) -> set[str]:
    return {name for name in (FLOORS, ACYCLIC, CONFIG_AT_EDGES, FEATURES_INDEPENDENT, FEATURES_UNNAMED)
            if any(line.startswith(name) and line.rstrip().endswith("BROKEN") for line in output.splitlines())}


def test_the_package_keeps_every_contract():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 5 kept, 0 broken." in result.stdout


# One import each that the refactor removed (issue 12), put back into a copy of the package.
VIOLATIONS = [
    # training scored kNN through the evaluation tools above it
    ("train/loop.py", "from dinoreg.eval.knn import evaluate_knn", {FLOORS}),
    # the monitor took the patch norms from the analysis tools
    ("train/monitor.py", "from dinoreg.analysis.norms import run_norms", {FLOORS}),
    # analysis tools took their argument types from the CLI (which imports them: a cycle too)
    ("analysis/lost.py", "from dinoreg.cli.common import add_recipe_arguments", {FLOORS, ACYCLIC}),
    # the SLURM job imported the CLI that imports it: a cycle, and launch sits below cli
    ("launch.py", "from dinoreg.cli import run", {FLOORS, ACYCLIC}),
    # checkpoint formats and weights imported each other
    ("models/formats.py", "from dinoreg.models.weights import read_checkpoint", {ACYCLIC}),
    # the DINOv3 layouts sit below the family dispatch of formats, which imports them
    ("models/rope_formats.py", "from dinoreg.models.formats import to_hf", {ACYCLIC}),
    # the process module at the ground must not reach up into training (which imports it)
    ("distributed.py", "from dinoreg.train.signals import SignalWatcher", {FLOORS, ACYCLIC}),
    # the tools are above training and below the command line (which imports them)
    ("eval/context.py", "from dinoreg.cli.common import add_recipe_arguments", {FLOORS, ACYCLIC}),
    # the measuring tools sit above the training they run (so training importing them is a cycle too); their
    # memory helpers sit below the tools that use them
    ("train/loop.py", "from dinoreg.tools.memory import resident_bytes", {FLOORS, ACYCLIC}),
    ("tools/memory.py", "from dinoreg.tools.heads import benchmark_heads", {ACYCLIC}),
    # one floor, independent modules: the models know nothing of the data, the process of the run files
    ("models/vit.py", "from dinoreg.data import build_dataset", {FLOORS}),
    ("distributed.py", "from dinoreg.run_dir import RunDir", {FLOORS}),
    # the user-error base is below everything that raises one
    ("errors.py", "from dinoreg.run_dir import RunDir", {FLOORS, ACYCLIC}),
    # measurements take tensors, not the config
    ("metrics/knn.py", "from omegaconf import DictConfig", {CONFIG_AT_EDGES}),
    # the meta-architecture read the config during the forward pass
    ("ssl/meta_arch.py", "from omegaconf import DictConfig", {CONFIG_AT_EDGES}),
    # (config shares the algorithm's floor, so the floors allow it; the schema takes its centerings from ssl,
    # so it is a cycle too)
    ("ssl/meta_arch.py", "from dinoreg.config import load_config", {ACYCLIC, CONFIG_AT_EDGES}),
    # the value checks are the config's too: training's mechanics take arguments (the checks import no train module)
    ("train/signals.py", "from dinoreg.config_checks import validate", {CONFIG_AT_EDGES}),
    # FSDP2's wrapping takes its mode, mesh and precision as arguments (issue 26: the contract reaches into train)
    ("train/parallel.py", "from omegaconf import DictConfig", {CONFIG_AT_EDGES}),
    # the loop called the Gram teacher's refresh by name (issue 26: features behind the protocol of ssl/feature.py)
    ("train/loop.py", "from dinoreg.train.features.gram import refresh", {FEATURES_UNNAMED}),
    # one feature reaching into another
    ("train/features/gram.py", "from dinoreg.train.features.distillation import NAME", {FEATURES_INDEPENDENT}),
]


@pytest.mark.parametrize("module, line, broken", VIOLATIONS, ids=[f"{m}:{line.split()[1]}" for m, line, _ in VIOLATIONS])
def test_each_contract_breaks_on_the_import_it_forbids(tmp_path, module, line, broken):
    shutil.copytree(ROOT / "dinoreg", tmp_path / "dinoreg", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "dinoreg" / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n{line}  # deliberate violation\n", encoding="utf-8")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout
    assert broken_contracts(result.stdout) == broken, result.stdout
    assert Path(module).stem in result.stdout  # the report names the importing module


def test_the_package_root_imports_only_the_models():
    """``dinoreg/__init__.py`` is no floor of the contracts (every module imports it): it stays at the ground."""
    tree = ast.parse((ROOT / "dinoreg" / "__init__.py").read_text(encoding="utf-8"))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert imported == {"dinoreg.models"}
