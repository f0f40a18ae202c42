"""Imports run one way: from the command lines down through the packages by job to the
foundations, never back up and never in a circle. Every import counts, those inside functions
too (a lazy import hides a cycle from Python, not from the next reader). A package added to
mnist_sweep must be given its layer here; a module inside a package gets its package's."""

from __future__ import annotations

import ast
import graphlib
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mnist_sweep"

# Lowest first. A module may import modules of its own package or of packages below.
LAYERS = [
    "base",        # errors, URLs and masking, signals, Hydra's glue
    "servers",     # the stores: SQLite files; PostgreSQL, PgBouncer, the MLflow server
    "trial",       # data, models, schedules, config checks, the training loop
    "population",  # many trials stacked into one model, and its trainer
    "tracking",    # MLflow: runs, the members' run writer, deep links, registry, datasets
    "search",      # the sweep: space, sweep file, study, storage, driver, workers, report
    "",            # the command lines at the top: train, sweep, server, seed_table, dashboard
]


def module_name(path: Path, root: Path) -> str:
    """'search.driver' for search/driver.py, 'train' for train.py, 'search' for its __init__."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    return module.split(".")[0] if "." in module or module in LAYERS else ""


def imports_of(path: Path, root: Path) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mnist_sweep":
            target = node.module.split(".", 1)[1] if "." in node.module else ""
            for alias in node.names:  # `from mnist_sweep.trial import data`: the module data
                name = f"{target}.{alias.name}".strip(".")
                found.add(name if (root / (name.replace(".", "/") + ".py")).exists() else target)
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("mnist_sweep.")}
    return found - {module_name(path, root), ""}


def graph(root: Path | None = None) -> dict[str, set[str]]:
    root = root or PACKAGE
    return {module_name(path, root): imports_of(path, root) for path in sorted(root.rglob("*.py"))}


def test_every_package_has_a_layer():
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages - set(LAYERS) == set(), "give the new package its layer in LAYERS"
    assert set(LAYERS) - {""} - packages == set(), "a package in LAYERS no longer exists"


def upward_imports(root: Path | None = None) -> list[str]:
    layer = {package: i for i, package in enumerate(LAYERS)}
    return [f"{module} ({package_of(module) or 'top'}) imports {target} ({package_of(target) or 'top'})"
            for module, targets in graph(root).items() for target in targets
            if layer[package_of(target)] > layer[package_of(module)]]


def test_no_import_runs_upwards():
    assert upward_imports() == []


def test_no_import_cycles():
    graphlib.TopologicalSorter(graph()).prepare()  # raises CycleError naming the cycle


def test_the_checks_see_an_upward_and_a_circular_import(tmp_path):
    """The checks themselves: a lazy import of the driver from the training loop is caught."""
    root = tmp_path / "mnist_sweep"
    shutil.copytree(PACKAGE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert upward_imports(root) == []
    loop = root / "trial" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _late():\n    from mnist_sweep.search.driver import run_sweep\n")
    assert "trial.loop (trial) imports search.driver (search)" in upward_imports(root)
    try:
        graphlib.TopologicalSorter(graph(root)).prepare()
    except graphlib.CycleError:
        pass
    else:
        raise AssertionError("a cycle was not caught")
