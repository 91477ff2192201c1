"""A model that classifies frames: preprocessing per the card, one inference per
micro-batch, top-k with probabilities, and what the network saw for the event view.

Python API, in the style of jetson-inference's examples::

    from i2e_deploy.runtime.classify import Classifier
    from i2e_deploy.runtime.sources import open_source
    from i2e_deploy.runtime.outputs import open_sink

    model = Classifier("model.onnx")
    with open_source("video.mp4") as source, open_sink("out.mp4") as sink:
        for frame in source:
            sink.render(frame, model(frame))
"""

from __future__ import annotations

import os

import numpy as np

from ..card import ModelCard
from ..errors import I2EError
from ..images import preprocess
from .activity import ActivityCounter, SpikeReader, layer_table_of
from .frames import Frame, Prediction, image_to_events
from .runners import Runner, load_runner


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


class Classifier:
    """A model that classifies frames: ``Classifier(path)(frame) -> Prediction``. ``model`` is
    a model file (run on the backend its kind names; ``i2e_deploy.targets.resolve_runner``
    picks others), or an already loaded runner (anything with ``card`` and ``infer``)."""

    def __init__(
        self,
        model: str | os.PathLike | Runner,
        *,
        topk: int = 3,
        device: str = "cpu",
        threads: int | None = None,
        activity: bool = False,
        **overrides,
    ):
        """``activity``: count each prediction's firing rate and synaptic operations from
        the spikes the backend computes (off by default: it costs time per frame)."""
        if topk < 1:
            raise I2EError(f"topk must be >= 1, got {topk}")
        self.runner = (
            load_runner(model, device=device, threads=threads, **overrides)
            if isinstance(model, (str, os.PathLike))
            else model
        )
        if not self.runner.name.startswith("torch"):
            try:
                import torch
            except ImportError:  # exported models run without PyTorch
                pass
            else:
                # Torch only preprocesses here; for such small ops its thread pool costs more
                # than it gives, many times more when the cores are busy.
                torch.set_num_threads(1)
        self.card: ModelCard = self.runner.card
        self.topk = min(topk, self.card.num_classes)
        self.activity: tuple[SpikeReader, ActivityCounter] | None = None
        if activity:
            if not self.runner.exposes_spikes:
                raise I2EError(
                    f"the {self.runner.name} backend does not expose spike maps: "
                    "no firing rates or SOPs; use the ONNX or PyTorch backend"
                )
            table = layer_table_of(self.runner)
            self.activity = SpikeReader(self.runner, table), ActivityCounter(table, self.card.T)

    @property
    def name(self) -> str:
        precision = getattr(self.runner, "precision", "fp32")
        return self.runner.name if precision == "fp32" else f"{self.runner.name} {precision}"

    def prepare(self, frame: Frame) -> np.ndarray:
        """The model input for one frame: the card's crop, or events [T, 2, S, S]."""
        if frame.events is not None:
            if self.card.input != "events":
                raise I2EError("event-camera frames need an event-input model")
            return frame.events
        crop = preprocess(frame.image, self.card)
        if self.card.input == "events":  # an event model watching a camera: I2E makes events
            return image_to_events(crop, self.card.ratio)
        return crop

    def classify(self, inputs: list[np.ndarray]) -> list[Prediction]:
        """One inference over a micro-batch of prepared inputs."""
        batch = np.stack(inputs)
        rates: list[float | None] = [None] * len(inputs)
        sops: list[float | None] = [None] * len(inputs)
        if self.activity is None:
            logits = self.runner.infer(batch)
        else:
            read, counter = self.activity
            logits, maps = read(batch)
            rate, ops = counter.per_image(counter.counts(maps))
            rates, sops = rate.tolist(), ops.tolist()
        probs = softmax(logits.astype(np.float64))
        top = np.argsort(-probs, axis=1)[:, : self.topk]
        return [
            Prediction(
                top[i],
                [self.card.label(int(k)) for k in top[i]],
                probs[i, top[i]],
                logits[i],
                inputs[i],
                self.card,
                rates[i],
                sops[i],
            )
            for i in range(len(inputs))
        ]

    def __call__(self, frame: Frame) -> Prediction:
        return self.classify([self.prepare(frame)])[0]

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
