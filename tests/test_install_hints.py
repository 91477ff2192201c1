"""Every install hint names what pyproject.toml installs: each extra a hint or the README
names exists, each requirement a TensorRT hint quotes is in its extra, and one command per
CUDA major puts exactly one ONNX Runtime distribution in the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from i2e_deploy.device import GPU_INSTALL
from i2e_deploy.export import tensorrt

tomllib = pytest.importorskip("tomllib")
REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]
ONNXRUNTIMES = ("onnxruntime", "onnxruntime-gpu")


def name_of(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def expand(extras: list[str]) -> list[str]:
    """The requirements ``pip install 'i2e-deploy[extras]'`` installs (self-references
    followed)."""
    found = list(PROJECT["dependencies"])
    for extra in extras:
        for requirement in EXTRAS[extra]:
            own = re.fullmatch(r"i2e-deploy\[(.+)\]", requirement)
            found += expand(own.group(1).split(",")) if own else [requirement]
    return found


def hinted_extras() -> set[str]:
    """Extras named as ``i2e-deploy[...]``, ``.[...]`` or ``whl[...]`` in the package, the
    README, docs and benchmarks (an extra's name starts with a letter: ``.[0-9]`` is a glob)."""
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    files += [*(REPO / "i2e_deploy").rglob("*.py"), *(REPO / "benchmarks").glob("*.sh")]
    names: set[str] = set()
    for path in files:
        for group in re.findall(r"(?:i2e-deploy|\.|\.whl)\[([a-z][a-z0-9,-]*)\]", path.read_text()):
            names.update(group.split(","))
    return names


def test_every_named_extra_exists():
    named = hinted_extras()
    assert {"cpu", "torch", "gpu-cu12", "gpu-cu13"} <= named
    assert named <= set(EXTRAS), named - set(EXTRAS)


def test_one_onnxruntime_per_install():
    assert not [r for r in PROJECT["dependencies"] if name_of(r) in ONNXRUNTIMES]
    for extra in EXTRAS:
        runtimes = {name_of(r) for r in expand([extra]) if name_of(r) in ONNXRUNTIMES}
        assert len(runtimes) <= 1, (extra, runtimes)
    for major in ("cu12", "cu13"):
        (requirement,) = EXTRAS[f"gpu-{major}"]  # onnxruntime-gpu, nothing else
        assert requirement.startswith("onnxruntime-gpu[cuda,cudnn]"), requirement
        assert f"i2e-deploy[gpu-{major}]" in GPU_INSTALL


def test_tensorrt_hints_quote_their_extras():
    cu12, cu13 = tensorrt._PIP_CUDA.split(" or ")  # "... on a CUDA 12 driver, or ..."
    for half, extra in ((cu12, "tensorrt-cu12"), (cu13, "tensorrt-cu13")):
        quoted = set(re.findall(r"'([^']+)'", half))
        assert quoted and quoted <= set(EXTRAS[extra]), (extra, quoted - set(EXTRAS[extra]))
