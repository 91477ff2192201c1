"""Running an exported model needs no PyTorch (a Jetson install: TensorRT, ONNX Runtime, no
torch). The CLI runs in a fresh process where ``import torch`` / ``import torchvision`` fail
as on an install without the ``torch`` extra (a ``sys.meta_path`` finder, installed by a
``sitecustomize`` on PYTHONPATH): ``stream``, ``parity`` and ``benchmark`` on an ONNX file
work, and a command that needs PyTorch says so in one line, naming the extra (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_models import shared_model

BLOCKER = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTorch())
"""
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    site = tmp_path_factory.mktemp("no-torch")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "I2E_CACHE": str(site / "cache"),
    }


@pytest.fixture(scope="module")
def without_torch(env):
    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "i2e_deploy.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )

    return cli


def test_the_blocker_blocks(env):
    probe = subprocess.run(
        [sys.executable, "-c", "import torchvision"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert probe.returncode == 1 and "ModuleNotFoundError" in probe.stderr


@pytest.mark.slow
def test_stream_parity_benchmark_run_an_onnx_file_without_torch(without_torch):
    graph = shared_model("onnx")
    streamed = without_torch(
        "stream",
        graph,
        "--source",
        "demo",
        "--output",
        "none",
        "--max-frames",
        "3",
        "--threads",
        "1",
    )
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith("runner: ONNX Runtime fp32 on cpu")
    assert "3 frames" in streamed.stdout

    compared = without_torch("parity", graph, graph, "--random", "4")
    assert compared.returncode == 0, compared.stderr
    assert "PASS" in compared.stdout

    measured = without_torch("benchmark", graph, "--iters", "2", "--warmup", "0", "--threads", "1")
    assert measured.returncode == 0, measured.stderr
    row = next(line for line in measured.stdout.splitlines() if line.startswith("| ONNX Runtime"))
    assert "| cpu |" in row  # the row ran (a row that could not run has no device)


@pytest.mark.slow
def test_stream_json_counts_spikes_without_torch(without_torch, tmp_path):
    """``--json`` counts firing rates and SOPs with the layer table the graph carries (the
    reference model, PyTorch, is not there to build it)."""
    stats = tmp_path / "stats.json"
    streamed = without_torch(
        "stream",
        shared_model("onnx"),
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
    assert streamed.returncode == 0, streamed.stderr
    activity = json.loads(stats.read_text())["activity"]
    assert 0 < activity["firing_rate"] < 1 and activity["sops_per_prediction"] > 0


def test_commands_that_need_torch_say_which_extra(without_torch):
    result = without_torch("info", shared_model("ckpt"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'i2e-deploy[torch]'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    card = without_torch("info", shared_model("onnx"))  # a graph's card needs no torch
    assert card.returncode == 0 and "msresnet18" in card.stdout, card.stderr
