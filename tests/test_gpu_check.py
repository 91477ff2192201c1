"""benchmarks/gpu_check.sh's step runner on the CPU (--cpu): every step is recorded as one JSON
line the moment it ends, within the time budget; steps past the budget are recorded skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.slow
def test_cpu_dry_run_records_each_step_within_the_budget(tmp_path):
    env = dict(
        os.environ,
        GPU_CHECK_BUDGET="15",
        GPU_CHECK_RESULTS=str(tmp_path),
        PYTHON=sys.executable,
        I2E_CACHE=str(tmp_path / "cache"),
    )
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [
        json.loads(line)
        for line in (tmp_path / "gpu_check_steps_cpu.jsonl").read_text().splitlines()
    ]
    names = [row["step"] for row in rows]
    assert names[0] == "environment" and names[-1] == "stream: --backend auto on cpu"
    assert "parity: corrupted graph refused on cpu" in names
    # A step starts only with 10 s of the budget left (the shell counts whole seconds), so the
    # first runs (or hits its limit, cut to the budget): an exit code either way.
    first = rows[0]
    assert isinstance(first["exit"], int) and first["seconds"] <= 15 + 6
    assert first["ok"] == (first["exit"] == 0)
    assert first["output_tail"] or first["timed_out"]  # a loaded machine may need > 15 s
    # Once the budget is spent the rest are recorded, not run.
    skipped = [row["exit"] is None for row in rows]
    assert skipped[-1] and skipped == sorted(skipped)
    for row in rows:
        if row["exit"] is None:
            assert row["ok"] is False and row["seconds"] == 0, row
    refused = rows[names.index("parity: corrupted graph refused on cpu")]
    assert refused["expected_exit"] == 1
    assert "results:" in done.stdout


@pytest.mark.slow
def test_cpu_dry_run_runs_every_step_command_line(tmp_path):
    """With the time it needs, the dry run runs every step, the GPU ones with --device cpu
    (refused where they need a GPU or TensorRT, as expected), and none shows a usage error:
    each command line's options, backends and devices are ones the CLI takes."""
    env = dict(
        os.environ,
        GPU_CHECK_BUDGET="1500",
        GPU_CHECK_LIMIT_SCALE="4",  # CI's shared CPU: the GPU's limits do not fit it
        GPU_CHECK_RESULTS=str(tmp_path),
        PYTHON=sys.executable,
        I2E_CACHE=str(tmp_path / "cache"),
    )
    env.pop("GPU_CHECK_DATA", None)
    done = subprocess.run(
        ["bash", str(SCRIPT), "--cpu"], env=env, capture_output=True, text=True, timeout=1700
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [
        json.loads(line)
        for line in (tmp_path / "gpu_check_steps_cpu.jsonl").read_text().splitlines()
    ]
    for row in rows:
        assert row["ok"] and row["usage_error"] is None, row
    names = [row["step"] for row in rows]
    for step in (
        "stream: PyTorch CUDA graphs",
        "stream: ONNX Runtime GPU (verified on first use)",
        "TensorRT: build an FP16 engine (verified before it is written)",
        "TensorRT: corrupted engine refused by parity",
        "eager CUDA PyTorch and CUDA graphs vs the CPU reference",
    ):
        assert step in names, step
    refused = rows[names.index("TensorRT: build an FP16 engine (verified before it is written)")]
    assert refused["exit"] == 2 and "TensorRT" in "\n".join(refused["output_tail"]), refused
    checked = rows[names.index("eager CUDA PyTorch and CUDA graphs vs the CPU reference")]
    assert "no CUDA GPU" in "\n".join(checked["output_tail"]), checked
