"""The architecture as a test: which package may import which, read from every module's import statements
(those inside functions too), so an arrow that points the wrong way fails here, not in review."""
from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("lpt_core", "experiments", "orchestration", "benchmarks")
# orchestration's rooms, lowest first: a room imports only rooms before it in this order
ROOMS = ("tracking", "plan", "cluster", "reporting", "execute")
COMMANDS = ("orchestration.sweep", "orchestration.report")  # thin commands on top of every room
FRAMEWORKS = ("ray", "mlflow", "hydra", "omegaconf", "optuna")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module(path): _imports(path) for package in PACKAGES for path in (REPO / package).rglob("*.py")}


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "orchestration" and len(parts) > 2 and parts[1] in ROOMS else None


def test_packages_point_one_way() -> None:
    allowed = {"lpt_core": {"lpt_core"}, "experiments": {"lpt_core", "experiments"},
               "orchestration": {"lpt_core", "experiments", "orchestration"}, "benchmarks": set(PACKAGES)}
    wrong = [(module, name) for module, names in _graph().items() for name in names
             if name.split(".")[0] in PACKAGES and name.split(".")[0] not in allowed[module.split(".")[0]]]
    assert wrong == []


def test_lpt_core_imports_no_orchestration_framework() -> None:
    """The same run_stage runs in a plain process and inside a Ray trial."""
    wrong = [(module, name) for module, names in _graph().items() if module.startswith("lpt_core")
             for name in names if name.split(".")[0] in FRAMEWORKS]
    assert wrong == []


def test_orchestration_rooms_point_one_way() -> None:
    arrows = defaultdict(set)
    for module, names in _graph().items():
        room = _room(module)
        for name in names:
            target = _room(name)
            if room and target and target != room:
                arrows[room].add(target)
            if module not in COMMANDS and module.startswith("orchestration.") and name in COMMANDS:
                arrows[module].add(name)
    upward = {(room, target) for room, targets in arrows.items() for target in targets
              if room not in ROOMS or ROOMS.index(target) > ROOMS.index(room)}
    assert upward == set(), f"imports against the order {' < '.join(ROOMS)}"


def test_the_ablation_registry_and_the_schema_import_no_torch_or_hydra() -> None:
    graph = _graph()
    for module in ("experiments.ablations", "experiments.schema"):
        heavy = {name for name in graph[module] if name.split(".")[0] in ("torch", "timm", *FRAMEWORKS)}
        assert heavy == set(), module
        local = {name for name in graph[module] if name.split(".")[0] in PACKAGES}
        assert all(name.startswith(("lpt_core.config", "lpt_core.stages", "lpt_core.suggest", "experiments.schema"))
                   for name in local), (module, local)


@pytest.mark.parametrize("package", PACKAGES)
def test_module_names_are_unique_across_the_tree(package: str) -> None:
    names = defaultdict(list)
    for path in (REPO / package).rglob("*.py"):
        if path.name != "__init__.py":
            names[path.name].append(path)
    for other in PACKAGES:
        for path in (REPO / other).rglob("*.py"):
            if other != package and path.name != "__init__.py" and path.name in names:
                names[path.name].append(path)
    assert {name: paths for name, paths in names.items() if len(paths) > 1} == {}


def test_importing_the_registry_loads_no_heavy_library() -> None:
    """What the direct imports above cannot see: nothing they import in turn pulls torch or Hydra in."""

    code = ("import sys, experiments.ablations, experiments.schema; "
            "print(sorted(m for m in ('torch', 'timm', 'hydra', 'ray', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("modules, heavy", [
    # the input and storage checks run in a fresh Ray worker on every node, which imports their modules: the
    # dataset code (torch) and no more; timm, MLflow, Tune, Hydra and Optuna would add about 2 s of CPU per node
    (["orchestration.cluster.input_check", "orchestration.cluster.storage_check"],
     ["timm", "mlflow", "ray.tune", "hydra", "omegaconf", "optuna", "pandas"]),
    # a SLURM job's launcher (submit, wait-for-nodes) and Ray's connection: no torch either
    (["orchestration.cluster.slurm", "orchestration.cluster.ray_connection"], ["torch", "timm", "mlflow", "ray.tune"]),
])
def test_what_runs_on_every_node_or_in_every_job_loads_no_training_stack(modules: list[str], heavy: list[str]) -> None:
    code = f"import sys, {', '.join(modules)}; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
