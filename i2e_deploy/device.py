"""Device names (``cpu``, ``cuda``, ``cuda:N``) and what this machine's CPU is."""

from __future__ import annotations

import platform
import re
import sys
from pathlib import Path

from .errors import I2EError

# The one install of ONNX Runtime's GPU providers per CUDA major (pyproject.toml's extras;
# tests/test_install_hints.py ties every hint to them).
GPU_INSTALL = (
    "pip install 'i2e-deploy[gpu-cu12]' on a CUDA 12 driver or 'i2e-deploy[gpu-cu13]' on a "
    "CUDA 13 (R580+) driver, in an environment without the `onnxruntime` package"
)


def parse_device(device: str) -> tuple[str, int]:
    """'cpu' -> ('cpu', 0); 'cuda' / 'cuda:N' -> ('cuda', N)."""
    match = re.fullmatch(r"(cpu|cuda)(?::(\d+))?", device.strip().lower())
    if not match or (match.group(1) == "cpu" and match.group(2)):
        raise I2EError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return match.group(1), int(match.group(2) or 0)


def torch_device(device: str):
    """A ``torch.device`` PyTorch can use here, or one line saying why not."""
    import torch

    kind, index = parse_device(device)
    if kind == "cuda" and not torch.cuda.is_available():
        raise I2EError(
            f"--device {device}: CUDA is not available on this machine; use --device cpu"
        )
    return torch.device(kind, index) if kind == "cuda" else torch.device("cpu")


def _cpuinfo() -> str:
    if not sys.platform.startswith("linux"):
        return ""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


# The vector extensions that set INT8 and bf16 speed, widest first; one VM model name ("AMD
# EPYC") covers hosts with and without AVX-512, so benchmarks name them beside the model.
_VECTOR_FLAGS = (
    ("amx_int8", "AMX-INT8"),
    ("amx_bf16", "AMX-BF16"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512_vnni", "AVX512-VNNI"),
    ("avx512f", "AVX-512"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx2", "AVX2"),
)


def cpu_name() -> str:
    """The CPU's model name and its widest vector extensions, e.g. ``AMD EPYC (AVX2)`` (as
    benchmarks report it next to their numbers)."""
    info = _cpuinfo()
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    flags = next(
        (
            set(line.split(":", 1)[1].split())
            for line in info.splitlines()
            if line.startswith("flags")
        ),
        set(),
    )
    found = [label for flag, label in _VECTOR_FLAGS if flag in flags]
    if "AVX-512" in found:
        found = [label for label in found if label != "AVX2"]
    return f"{name} ({', '.join(found)})" if found else name


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX-BF16 (bf16 dot products in hardware)."""
    flags = _cpuinfo()
    return "avx512_bf16" in flags or "amx_bf16" in flags
