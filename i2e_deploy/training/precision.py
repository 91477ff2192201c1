"""Training precision: bf16 convolutions where the hardware has native bf16, else fp32.

Under ``bf16`` (and ``fp16``) the convolutions and the linear head run in reduced precision
through autocast, channels_last; everything autocast leaves alone stays as it is: the LIF
keeps its membrane in float32 (its spikes, 0 or 1, are exact in bf16), BatchNorm keeps
float32 parameters and running statistics, and the master weights and optimizer are float32.
``fp16`` (GPUs without bf16) scales the loss; bf16 has float32's range and needs no scaling.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..device import cpu_has_native_bf16
from ..errors import I2EError

TRAINING_PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_has_native_bf16(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere and newer


@dataclass(frozen=True)
class Precision:
    name: str  # fp32 | bf16 | fp16
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES[self.name]

    @property
    def scaled(self) -> bool:
        """Whether the loss needs scaling (fp16's narrow range)."""
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def resolve_precision(name: str, device: torch.device) -> Precision:
    """``auto`` -> bf16 on hardware with native bf16 (CPUs with AVX512-BF16/AMX, GPUs from
    Ampere on), fp16 on older CUDA GPUs, else fp32."""
    if name not in TRAINING_PRECISIONS:
        raise I2EError(
            f"unknown precision {name!r}; choose one of {', '.join(TRAINING_PRECISIONS)}"
        )
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if _cuda_has_native_bf16(device) else "fp16"
        else:
            name = "bf16" if cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise I2EError("--precision fp16 trains on CUDA GPUs only; use bf16 or fp32 on a CPU")
    return Precision(name, device.type)
