"""The real onnxruntime-gpu wheel, installed as a GPU user installs it (the `gpu-cu*` extra's
one ONNX Runtime, no PyTorch), on a machine whose CUDA provider cannot load (no GPU, no CUDA
libraries): ``--device cuda`` is refused in one line (exit 2) before ONNX Runtime's own
fallback could run it on the CPU ("EP Error"), nothing is recorded as verified, and the CPU
path, ``stream --json`` included, works.

The test builds its own environment (a virtualenv kept in ``$I2E_TEST_VENVS``, default
~/.cache/i2e-deploy-tests, reused while it is intact) with pip from the registry; it skips
only where pip cannot resolve onnxruntime-gpu there."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from runtime_models import shared_model

tomllib = pytest.importorskip("tomllib")
REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
# What `pip install 'i2e-deploy[gpu-cu13]'` installs for ONNX Runtime, less the CUDA and cuDNN
# wheels (GiBs that a machine without a GPU cannot use either way).
WHEEL = re.sub(r"\[[^\]]*\]", "", PROJECT["optional-dependencies"]["gpu-cu13"][0])
pytestmark = pytest.mark.slow


def pip(python: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ready(python: Path) -> bool:
    """The environment is intact: onnxruntime-gpu is its one ONNX Runtime, and no torch."""
    if not python.is_file():
        return False
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m, importlib.util as u, sys; "
            "names = {d.metadata['Name'].lower() for d in m.distributions()}; "
            "sys.exit(not ('onnxruntime-gpu' in names and 'onnxruntime' not in names "
            "and u.find_spec('torch') is None and u.find_spec('cv2') is not None))",
        ],
        capture_output=True,
        timeout=120,
    )
    return probe.returncode == 0


@pytest.fixture(scope="module")
def gpu_python() -> Path:
    root = Path(os.environ.get("I2E_TEST_VENVS", Path.home() / ".cache" / "i2e-deploy-tests"))
    folder = root / f"onnxruntime-gpu-py{sys.version_info.major}{sys.version_info.minor}"
    python = folder / "bin" / "python"
    if ready(python):
        return python
    venv.create(folder, clear=True, with_pip=True)
    resolved = pip(python, "install", "--dry-run", "-q", WHEEL, timeout=600)
    if resolved.returncode != 0:
        last = (resolved.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"pip cannot resolve {WHEEL} here: {last}")
    # The project's own requirements, then the wheel; i2e-deploy itself from this checkout.
    done = pip(python, "install", "-q", *PROJECT["dependencies"], WHEEL)
    assert done.returncode == 0, done.stderr[-3000:]
    assert ready(python), "the environment has another ONNX Runtime, or torch"
    return python


def cli(python: Path, tmp_path: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-m", "i2e_deploy.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "I2E_CACHE": str(tmp_path / "cache")},
    )


def test_cuda_is_refused_in_one_line_and_never_run_on_the_cpu(gpu_python, tmp_path):
    graph = shared_model("onnx")
    args = ("--source", "demo", "--output", "none", "--max-frames", "2", "--threads", "1")
    for device in ("cuda", "cuda:1"):
        result = cli(gpu_python, tmp_path, "stream", graph, "--device", device, *args)
        assert result.returncode == 2, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert "gpu-cu12" in lines[0] and "--device cpu" in lines[0]
        assert "TensorrtExecutionProvider: " in lines[0] and "CUDAExecutionProvider: " in lines[0]
        assert "EP Error" not in result.stdout + result.stderr
        assert "frames" not in result.stdout  # nothing ran
        assert "verified" not in result.stdout
    assert not list((tmp_path / "cache").rglob("verified/*.json"))


def test_listed_providers_that_cannot_load_are_not_asked_for(gpu_python):
    """onnxruntime-gpu lists its TensorRT and CUDA providers whether or not their libraries
    are here; the probe loads them as ONNX Runtime would and says why it cannot."""
    probe = subprocess.run(
        [
            str(gpu_python),
            "-c",
            "import onnxruntime as ort; from i2e_deploy.runtime.runners import provider_problem\n"
            "for name in ('TensorrtExecutionProvider', 'CUDAExecutionProvider'):\n"
            "    print(name in ort.get_available_providers(), provider_problem(name))",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert probe.returncode == 0, probe.stderr
    for line in probe.stdout.strip().splitlines():
        listed, why = line.split(" ", 1)
        assert listed == "True" and why != "None", probe.stdout
    assert not probe.stderr.strip()  # no ONNX Runtime error lines: nothing was asked of it


def test_the_cpu_streams_with_json_there(gpu_python, tmp_path):
    stats = tmp_path / "stats.json"
    graph = shared_model("onnx")
    result = cli(
        gpu_python,
        tmp_path,
        "stream",
        graph,
        "--source",
        "demo",
        "--output",
        "none",
        "--max-frames",
        "2",
        "--threads",
        "1",
        "--json",
        stats,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("runner: ONNX Runtime fp32 on cpu")
    assert json.loads(stats.read_text())["activity"]["sops_per_prediction"] > 0
