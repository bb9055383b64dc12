"""The package's structure: every import, function-local ones included, runs down the floors of
docs/extending.md (none up, no circle), and every adapter layer type describes its own tensors."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
from torch import nn

import rigsa
from rigsa.adapter_layer import AdapterLayer

SOURCE = Path(rigsa.__file__).parent
# Bottom to top. A module may import its own floor's modules and those below, never one above. A new module must be
# placed here (the test fails until it is): say in docs/extending.md why it sits where it does.
FLOORS = [
    ("vocabulary", {"rigsa", "rigsa.vocabulary", "rigsa.assets", "rigsa.quantize", "rigsa.evaluate", "rigsa.model_edits",
                    "rigsa.adapter_layer", "rigsa.report_figures", "rigsa.conf", "rigsa.adapters", "rigsa.sparse",
                    "rigsa.tasks", "rigsa.methods", "rigsa.lm_eval_tasks", "rigsa.tuning", "rigsa.early_stopping",
                    "rigsa.report_compare", "rigsa.merging"}),
    ("parts", {"rigsa.config", "rigsa.cache", "rigsa.models", "rigsa.tasks.textual_mnist",
               "rigsa.tasks.text_classification", "rigsa.sparse.products", "rigsa.sparse.unmerged", "rigsa.sparse.engine",
               "rigsa.sparse.selection", "rigsa.sparse.targets", "rigsa.forgetting", "rigsa.tracking", "rigsa.run_folder",
               "rigsa.memory", "rigsa.checkpoints", "rigsa.adapters.read", "rigsa.adapters.write",
               "rigsa.adapters.load", "rigsa.merging.combine", "rigsa.merging.deltas", "rigsa.merging.sources",
               "rigsa.merging.mergekit"}),
    ("methods and readouts", {"rigsa.methods.full", "rigsa.methods.head", "rigsa.methods.lora", "rigsa.methods.rigsa",
                              "rigsa.methods.sparse_mask", "rigsa.methods.none", "rigsa.readout",
                              "rigsa.merging.heads"}),
    ("training", {"rigsa.train", "rigsa.sparse.schedule"}),
    ("validation", {"rigsa.validate"}),
    ("commands", {"rigsa.run", "rigsa.apply", "rigsa.report", "rigsa.merging.run"}),
    ("entry points", {"rigsa.sweep", "rigsa.cli"}),
]
FLOOR = {module: number for number, (_, modules) in enumerate(FLOORS) for module in modules}


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The rigsa modules `path` imports anywhere (top level or inside a function): `from a.b import c` counts as
    a.b.c where that is a module, else a.b."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rigsa":
            found |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "rigsa"}
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: a relative import"
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in SOURCE.rglob("*.py")}
    return {module: imports_of(path, set(paths)) - {module} for module, path in paths.items()}


def test_every_module_has_a_floor_and_imports_run_down():
    graph = import_graph()
    assert {"rigsa.config", "rigsa.validate", "rigsa.adapters.read", "rigsa.methods.rigsa"} <= set(graph)
    unplaced = sorted(set(graph) - set(FLOOR))
    assert not unplaced, f"place these modules on a floor in FLOORS (and docs/extending.md): {unplaced}"
    upward = [f"{module} ({FLOORS[FLOOR[module]][0]}) imports {target} ({FLOORS[FLOOR[target]][0]})"
              for module, targets in graph.items() for target in targets if FLOOR[target] > FLOOR[module]]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            assert state.get(target) != "open", "an import circle: " + " -> ".join(trail + [module, target])
            if target not in state:
                visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_walk_sees_an_upward_import_inside_a_function(tmp_path):
    """The checks above would fail on a lower module importing a higher one inside a function."""
    lower = tmp_path / "models.py"
    lower.write_text("def f():\n    from rigsa.validate import validate\n")
    assert "rigsa.validate" in imports_of(lower, {"rigsa.validate"})
    assert FLOOR["rigsa.validate"] > FLOOR["rigsa.models"]


def adapter_layer_classes() -> list[type]:
    """Every nn.Module class the package defines that stands in for a linear layer (it has in_features)."""
    found = []
    for info in pkgutil.walk_packages(rigsa.__path__, "rigsa."):
        if info.name in ("rigsa.cli",):
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == info.name and issubclass(cls, nn.Module):
                found.append(cls)
    return found


def test_every_adapter_layer_type_describes_its_own_tensors():
    classes = adapter_layer_classes()
    names = {cls.__name__ for cls in classes}
    assert {"SparseDeltaLinear", "DenseGatedLinear"} <= names  # the walk sees the layers
    missing = {cls.__name__: [member for member in ("own_tensors", "positions", "move_to", "float_weight")
                              if not callable(getattr(cls, member, None))] for cls in classes}
    assert not {name: members for name, members in missing.items() if members}, \
        "an adapter layer that does not implement rigsa.adapter_layer.AdapterLayer"


@pytest.mark.parametrize("merged", [True, False])
def test_an_engine_layer_describes_itself(merged):
    import torch

    from rigsa.sparse.engine import SparseDeltaLinear

    torch.manual_seed(0)
    base = nn.Linear(6, 4)
    reference = base.weight.detach().clone()
    layer = SparseDeltaLinear(base, torch.tensor([1, 7, 20]), torch.tensor([0.5, -1.0, 2.0]), gate=0.5, merged=merged)
    assert isinstance(layer, AdapterLayer)
    assert set(layer.own_tensors()) == {"indices", "base_values", "values", "gate"}
    expected = reference.clone().reshape(-1)
    expected[[1, 7, 20]] += torch.tensor([0.25, -0.5, 1.0])
    assert torch.equal(layer.float_weight(), expected.reshape(4, 6))
    layer.move_to(torch.tensor([1, 8, 20]))
    assert layer.positions().tolist() == [1, 8, 20] and layer.values.detach().tolist() == [0.5, 0.0, 2.0]
