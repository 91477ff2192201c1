"""The package's dependency direction, from the import graph of its source: each module
imports only its own layer and the layers below, and no modules import each other (directly
or round a longer loop); every import counts, also those inside functions. Importing
``i2e_deploy.errors`` or the CLI, and ``i2e-deploy --help``, load no PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import i2e_deploy

PACKAGE = Path(i2e_deploy.__file__).parent

# Lowest first. A module belongs to the layer of the longest prefix listed.
LAYERS = [
    ("base", ["errors", "fileio", "card", "version", "device"]),
    ("model", ["model"]),
    ("shared", ["artifacts", "images", "compare", "assets", "cache"]),
    ("build", ["export", "calibration", "training"]),
    ("runtime", ["runtime"]),
    ("targets", ["targets"]),
    ("apps", ["apps", "cli", ""]),
]


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(("i2e_deploy", *parts))] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base += f".{node.module}" if node.module else ""
            else:
                base = node.module or ""
            # `from . import x` names a module x, or an attribute of the package.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    relative = name[len("i2e_deploy.") :] if name != "i2e_deploy" else ""
    best, level = -1, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (relative == prefix or relative.startswith(prefix + ".") or prefix == "") and len(
                prefix
            ) > best:
                best, level = len(prefix), index
    return level


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_every_import_points_down_or_sideways():
    upward = [
        f"{name} ({LAYERS[layer_of(name)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
        for name, deps in graph().items()
        for dep in sorted(deps)
        if layer_of(dep) > layer_of(name)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    edges = graph()
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for dep in sorted(edges[name]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[name] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)
    assert not cycles, "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_check_sees_real_imports():
    edges = graph()
    assert "i2e_deploy.model.msresnet" in edges["i2e_deploy.model.checkpoint"]
    assert "i2e_deploy.errors" in edges["i2e_deploy.card"]
    assert (
        layer_of("i2e_deploy.apps.stream")
        > layer_of("i2e_deploy.targets")
        > layer_of("i2e_deploy.runtime.runners")
        > layer_of("i2e_deploy.export.onnx")
        > layer_of("i2e_deploy.compare")
        > layer_of("i2e_deploy.model.msresnet")
        > layer_of("i2e_deploy.errors")
    )


def _loads_torch(code: str) -> bool:
    result = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1] == "True"


def test_errors_cli_and_help_do_not_import_torch():
    assert not _loads_torch("import i2e_deploy.errors")
    assert not _loads_torch("import i2e_deploy.cli")
    assert not _loads_torch(
        "import sys\nfrom i2e_deploy.cli import app\nsys.argv = "
        "['i2e-deploy', '--help']\ntry:\n    app()\nexcept SystemExit:\n"
        "    pass"
    )
    assert _loads_torch("import i2e_deploy\ni2e_deploy.MSResNet")  # the API loads on use
