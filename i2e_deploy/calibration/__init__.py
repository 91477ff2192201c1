"""Calibration data and reduced precision: SNN-aware INT8 (exact 0/1 activations) and FP16."""
from .half import export_fp16
from .quantize import export_int8

__all__ = ["export_fp16", "export_int8"]
