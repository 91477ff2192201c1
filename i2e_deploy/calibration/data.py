"""Calibration data: images from a folder, preprocessed per the model card, in fixed batches.

One plain batching class (:class:`CalibrationBatches`) feeds both ONNX Runtime's quantization
tools (:class:`OrtCalibrationReader`, a ``CalibrationDataReader``) and the TensorRT INT8
calibrator (``export.tensorrt``), so both see exactly the same data.
"""

from __future__ import annotations

import os

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from ..card import ModelCard
from ..errors import I2EError
from ..images import spread_images, synthetic_images

DEFAULT_CALIB_SIZE = 512


def load_calibration_images(
    data: str | os.PathLike | None, card: ModelCard, size: int = DEFAULT_CALIB_SIZE, seed: int = 0
) -> np.ndarray:
    """Up to ``size`` images of a folder (recursive) as a uint8 NHWC batch at the card's size.

    A folder with more images is sampled evenly over its sorted file list, so every class
    folder of an ImageFolder layout contributes. ``data=None`` gives structured synthetic
    images (enough for the SNN-aware INT8 graph, whose activation ranges are known).
    """
    if card.input != "images":
        raise I2EError(
            "calibration images apply to image-input models; event-input models "
            "need no calibration data for INT8 (events and spikes are exactly 0/1)"
        )
    if size < 1:
        raise I2EError(f"--calib-size must be at least 1, got {size}")
    if data is None:
        return synthetic_images(size, card, seed=seed)
    return spread_images(data, card, size).images


def to_graph_input(images: np.ndarray, input_format: str) -> np.ndarray:
    """uint8 NHWC images -> what the graph takes: unchanged for 'uint8', float NCHW in
    [0, 1] for 'float'."""
    if input_format == "uint8":
        return np.ascontiguousarray(images)
    if input_format == "float":
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32) / 255.0
    raise I2EError(f"calibration needs an image graph (uint8 or float input), got {input_format!r}")


class CalibrationBatches:
    """Fixed-size batches over a calibration set: ``next_batch()`` -> array or None.

    Engines are calibrated at one batch shape, so a trailing partial batch is dropped
    (``len(self)`` counts the full batches); a set smaller than one batch is an error.
    """

    def __init__(self, samples: np.ndarray, batch_size: int):
        if batch_size < 1:
            raise I2EError(f"calibration batch size must be at least 1, got {batch_size}")
        if len(samples) < batch_size:
            raise I2EError(
                f"{len(samples)} calibration images are fewer than one batch of "
                f"{batch_size}; give more images or a smaller batch"
            )
        self.samples = samples
        self.batch_size = batch_size
        self._next = 0

    def __len__(self) -> int:
        return len(self.samples) // self.batch_size

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch_size, *self.samples.shape[1:])

    def next_batch(self) -> np.ndarray | None:
        if self._next >= len(self):
            return None
        start = self._next * self.batch_size
        self._next += 1
        return np.ascontiguousarray(self.samples[start : start + self.batch_size])

    def reset(self) -> None:
        self._next = 0


class OrtCalibrationReader(CalibrationDataReader):
    """``onnxruntime.quantization.CalibrationDataReader`` over :class:`CalibrationBatches`."""

    def __init__(self, batches: CalibrationBatches, input_name: str):
        self.batches = batches
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = self.batches.next_batch()
        return None if batch is None else {self.input_name: batch}

    def rewind(self) -> None:
        self.batches.reset()

    def __len__(self) -> int:
        return len(self.batches)
