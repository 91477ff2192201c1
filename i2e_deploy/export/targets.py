"""What `export` writes beyond the FP32 graph: a precision (``--int8``, ``--half``) and a
format (``--format onnx|engine|triton``).

The FP32 graph is always exported (and verified) first; the reduced-precision graph is derived
from it and verified against it; an engine or a Triton repository is built from the result.
INT8 comes in the flavour the target runs fast: U8S8 for ONNX Runtime on CPUs, S8S8 Q/DQ
(zero point 0) for TensorRT and GPUs.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..card import ModelCard
from ..errors import I2EError

FORMATS = ("onnx", "engine", "triton")
DEFAULT_VERIFY_COUNT = 64


def int8_flavour(fmt: str, device: str) -> str:
    """'tensorrt' (S8S8 Q/DQ) for engines and GPUs, 'onnxruntime' (U8S8) for CPUs."""
    return "tensorrt" if fmt == "engine" or device.startswith("cuda") else "onnxruntime"


def target_output(fp32_output: Path, fmt: str, precision: str) -> Path:
    """Default file next to the FP32 default: ``m.onnx`` -> ``m.int8.onnx``, ``m.engine``,
    ``m.fp16.engine``..."""
    tag = "" if precision == "fp32" else f".{precision}"
    if fmt == "triton":
        raise I2EError("--format triton needs --output REPO (the model repository folder)")
    return fp32_output.with_suffix(f"{tag}.{'engine' if fmt == 'engine' else 'onnx'}")


def export_target(model, card: ModelCard, output: str | os.PathLike, *, fmt: str = "onnx",
                  precision: str = "fp32", device: str = "cpu",
                  data: str | os.PathLike | None = None, calib_size: int = 512,
                  verify: bool = True, name: str | None = None, max_batch: int | None = None,
                  tolerances: dict[str, float] | None = None, log=None,
                  **export_options) -> Path:
    """Export ``model`` to ``output`` in ``fmt`` and ``precision``; returns the path written
    (a file, or the Triton model folder). ``max_batch``: the engine profile's max (default
    8; a static graph has its own batch), or Triton's max batch size (default 8)."""
    from ..calibration.half import to_fp16
    from ..calibration.quantize import to_int8
    from ..fileio import copy_into_place
    from .onnx import export_onnx

    if fmt not in FORMATS:
        raise I2EError(f"unknown format {fmt!r}; choose {', '.join(FORMATS)}")
    if precision not in ("fp32", "fp16", "int8"):
        raise I2EError(f"unknown precision {precision!r}")
    if calib_size < 1:
        raise I2EError(f"--calib-size must be at least 1, got {calib_size}")
    count = calib_size if data else DEFAULT_VERIFY_COUNT
    output = Path(output)
    # The FP32 graph is an intermediate here: keep its verification lines, not its path.
    quiet = (lambda msg: None if msg.startswith("wrote ") else log(msg)) if log else None
    with tempfile.TemporaryDirectory() as scratch:
        fp32 = export_onnx(model, card, Path(scratch) / "model.onnx", verify=verify, data=data,
                           tolerances=tolerances if precision == "fp32" else None, log=quiet,
                           **export_options).path
        graph = fp32
        if precision == "int8":
            graph = to_int8(fp32, Path(scratch) / "model.int8.onnx", data=data, verify=verify,
                            flavour=int8_flavour(fmt, device), verify_count=count,
                            tolerances=tolerances, log=log)
        elif precision == "fp16":
            graph = to_fp16(fp32, Path(scratch) / "model.fp16.onnx", data=data, verify=verify,
                            verify_count=count, tolerances=tolerances, log=log)
        if fmt == "engine":  # TensorRT is needed from here on: the graphs are checked first
            from .tensorrt import build_engine
            return build_engine(graph, output, precision=precision, max_batch=max_batch,
                                device=device if device.startswith("cuda") else "cuda")
        if fmt == "triton":
            from .triton import write_repository
            target = write_repository(graph, output, name=name, max_batch_size=max_batch,
                                      instance_kind="KIND_GPU" if device.startswith("cuda")
                                      else "KIND_CPU")
            if log:
                log(f"wrote Triton model {target} ({precision})")
            return target
        written = copy_into_place(graph, output)
        if log:
            log(f"wrote {written} ({precision})")
        return written
