"""Imports run one way: from the command lines down to the foundations, never back up and never
in a circle. Every import counts, those inside functions too (a lazy import hides a cycle from
Python, not from the next reader). A module added to the package must be given its layer here."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mnist_sweep"

# Lowest first. A module may import modules of its own layer or below.
LAYERS = [
    # foundations: errors, URLs and masking, signals, the SQLite stores, deep links
    {"__init__", "errors", "urls", "interrupts", "sqlite_stores", "review"},
    # a trial's parts and Hydra's glue; the servers for other machines
    {"hydra_config", "space", "data", "models", "schedules", "validation", "datasets", "member_schedules",
     "stacked", "servers"},
    # the two stores: MLflow runs, Optuna's storage
    {"tracking", "storage"},
    # training: one trial, a population, the model registry, the population's MLflow writer
    {"train", "registry", "run_writer", "population"},
    # the study and a worker's Optuna work
    {"study", "bookkeeping"},
    # what the user wrote, checked
    {"sweepfile"},
    # the solo worker
    {"worker"},
    # the population worker (built on the solo worker's parts), the report, the note's table
    {"population_worker", "report", "seed_table"},
    # what a worker process runs
    {"worker_process"},
    # the sweep's driver
    {"driver"},
    # the command line
    {"sweep"},
]


def imports_of(path: Path) -> set[str]:
    """The package's modules that `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mnist_sweep":
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {alias.name for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("mnist_sweep.")}
    return found - {path.stem}


def graph() -> dict[str, set[str]]:
    return {path.stem: imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(graph()) - placed == set(), "give the new module its layer in LAYERS"
    assert placed - set(graph()) == set(), "a module in LAYERS no longer exists"


def test_no_import_runs_upwards():
    layer = {module: i for i, modules in enumerate(LAYERS) for module in modules}
    upwards = [f"{module} (layer {layer[module]}) imports {target} (layer {layer[target]})"
               for module, targets in graph().items() for target in targets
               if layer.get(target, -1) > layer.get(module, len(LAYERS))]
    assert upwards == []


def test_no_import_cycles():
    graphlib.TopologicalSorter(graph()).prepare()  # raises CycleError naming the cycle


def test_the_checks_see_an_upward_and_a_circular_import(tmp_path, monkeypatch):
    """The checks themselves: a lazy import of the driver from the trial's module is caught."""
    for path in PACKAGE.glob("*.py"):
        (tmp_path / path.name).write_text(path.read_text())
    train = tmp_path / "train.py"
    train.write_text(train.read_text() + "\n\ndef _late():\n    from mnist_sweep.driver import run_sweep\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", tmp_path)
    try:
        test_no_import_runs_upwards()
    except AssertionError as error:
        assert "train (layer 3) imports driver (layer 9)" in str(error)
    else:
        raise AssertionError("an upward import was not caught")
    try:
        test_no_import_cycles()
    except graphlib.CycleError:
        pass
    else:
        raise AssertionError("a cycle was not caught")
