"""The one comparison: does a candidate runner compute what a reference runner computes?

Used by export verification, INT8/FP16 verification, ``parity`` and ``benchmark``. Like
Polygraphy's comparator it only sees runners (anything with ``card``, ``output`` and
``infer``; ``infer_spikes`` where a backend exposes its LIF layers) and a batch of inputs.

A float backend cannot promise the reference's exact spikes: BN folding and another conv
kernel round differently, a membrane within rounding of the threshold flips, and the flip
moves later spikes and the logits a little (the paper's own fp32 and fp64 runs disagree on
near-ties). What it can promise, and what pass/fail rests on:

- no **decisive** top-1 change: a changed top-1 counts only where both runners are sure, the
  reference's top-1 leading its runner-up and the candidate's new top-1 leading the
  reference's class, each by more than ``tie_margin`` times the spread of the logits (the
  cascade of one flipped spike can flip a dozen spikes of the head and move a trained model's
  logits by most of that spread);
- spike maps that agree almost everywhere: per LIF layer (and the converter's events), where
  both runners expose them;
- a small **median |Δlogit|**, relative to the spread of the reference's logits (their
  standard deviation over classes, averaged over inputs), so one limit fits 10 and 1000
  classes and any logit scale.

Raw top-1 agreement, near-tie counts, top-5 overlap and max |Δlogit| are reported, never the
reason for a failure. Converter-only graphs are judged on event agreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .artifacts import PRECISIONS
from .errors import I2EError


@dataclass(frozen=True)
class Limits:
    """What a candidate may differ by (see the module docstring)."""

    tie_margin: float = 1.0  # top-2 margin / logit spread up to which a change is a tie
    decisive: float = 0.0  # max share of inputs whose decisive top-1 changed
    median_rel: float = 0.02  # max median |Δlogit| / reference logit spread
    spike_agreement: float = 0.95  # min agreement of every LIF layer where both expose spikes
    event_agreement: float = 1.0  # min agreement of the converter's events (converter is FP32)


# Reduced precisions round weights (INT8) or conv outputs (FP16) on purpose: more spikes flip.
# How far predictions then move is a property of the model (INT8-exact checkpoints move not
# at all), so these limits say "still the same model", not "bit-exact".
LIMITS = {
    "fp32": Limits(),
    "fp16": Limits(decisive=0.02, median_rel=0.05, spike_agreement=0.9),
    "int8": Limits(decisive=0.02, median_rel=0.05, spike_agreement=0.9),
}
LIMIT_NAMES = tuple(f.name for f in dataclasses.fields(Limits))


def limits_for(precision: str, overrides: dict[str, float] | None = None) -> Limits:
    """The default limits of a precision with ``overrides`` (``{name: value}``) applied."""
    if precision not in LIMITS:
        raise I2EError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(LIMIT_NAMES))
    if unknown:
        raise I2EError(f"unknown tolerance {unknown[0]!r}; choose from {', '.join(LIMIT_NAMES)}")
    for name, value in overrides.items():
        if not np.isfinite(value) or value < 0:
            raise I2EError(f"tolerance {name} must be a number >= 0, got {value}")
    return dataclasses.replace(LIMITS[precision], **overrides)


def parse_tolerances(items: Iterable[str]) -> dict[str, float]:
    """``['median_rel=0.05', 'decisive=0.01']`` -> ``{'median_rel': 0.05, ...}``."""
    parsed = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            parsed[name.strip()] = float(value)
        except ValueError:
            raise I2EError(
                f"--tolerance takes NAME=VALUE (e.g. median_rel=0.05), got "
                f"{item!r}; names: {', '.join(LIMIT_NAMES)}"
            ) from None
    return parsed


def lower_precision(*precisions: str) -> str:
    """The least precise of the given precision names (unknown names count as fp32)."""
    known = [p for p in precisions if p in PRECISIONS]
    return max(known, key=PRECISIONS.index) if known else "fp32"


class Comparable(Protocol):
    """What :func:`compare` needs of a runner."""

    card: Any
    output: str  # 'logits' or 'events'
    exposes_spikes: bool

    def infer(self, batch: np.ndarray) -> np.ndarray: ...

    def infer_spikes(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...


@dataclass
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    at_most: bool  # True: value must be <= limit; False: >= limit


@dataclass
class Comparison:
    """What :func:`compare` found: metrics, the per-layer rows, the checks and the verdict."""

    kind: str  # 'logits' or 'events'
    limits: Limits
    metrics: dict[str, Any]
    checks: list[Check]
    layers: list[dict[str, Any]] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    def summary(self) -> str:
        """One line: the numbers pass/fail rests on, and the reported ones."""
        m = self.metrics
        if self.kind == "events":
            return (
                f"event agreement {m['event_agreement']:.6%} (event rate "
                f"{m['event_rate']:.2%}) on {m['count']} inputs"
            )
        text = (
            f"decisive top-1 changes {m['decisive_mismatches']} of {m['count']}, median "
            f"|Δlogit| {m['median_abs']:.3g} ({m['median_rel']:.2%} of the logit spread "
            f"{m['logit_spread']:.3g})"
        )
        neurons = [row for row in self.layers or () if row["layer"] != "i2e"]
        if neurons:
            worst = min(neurons, key=lambda row: row["agreement"])
            text += f", lowest spike agreement {worst['agreement']:.4%} ({worst['layer']})"
        text += (
            f"; reported: top-1 agreement {m['top1_agreement']:.2%} "
            f"({m['near_ties']} near-ties), max |Δlogit| {m['max_abs']:.3g}"
        )
        return "; ".join([text, *self.notes])

    def failure(self) -> str:
        """The failing checks, as one clause each."""
        return "; ".join(_describe(check) for check in self.failed)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        return data


def _describe(check: Check) -> str:
    relation = "above" if check.at_most else "below"
    return f"{check.name} {_fmt(check.value)} is {relation} the limit {_fmt(check.limit)}"


def _fmt(value: float) -> str:
    if isinstance(value, (int, np.integer)) or float(value).is_integer():
        return str(int(value))
    return f"{value:.4g}"


def logit_metrics(reference: np.ndarray, other: np.ndarray, tie_margin: float) -> dict[str, Any]:
    """Statistics of two ``[N, classes]`` logit arrays (A is the reference). The logit spread
    is the reference's standard deviation over classes, averaged over inputs; ``tie_margin``
    is relative to it."""
    reference = reference.astype(np.float64)
    other = other.astype(np.float64)
    diff = np.abs(other - reference)
    top1, other_top1 = reference.argmax(1), other.argmax(1)
    agree = top1 == other_top1
    if reference.shape[1] > 1:
        ranked = np.sort(reference, axis=1)
        margin = ranked[:, -1] - ranked[:, -2]
    else:
        margin = np.full(len(reference), np.inf)
    spread = float(reference.std(axis=1).mean())
    tie = tie_margin * spread
    rows = np.arange(len(reference))
    other_margin = other[rows, other_top1] - other[rows, top1]  # 0 where the top-1 agrees
    decisive = ~agree & (margin > tie) & (other_margin > tie)
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_other = np.argsort(-other, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other)]
    median = float(np.median(diff))
    return {
        "count": int(len(reference)),
        "decisive_mismatches": int(decisive.sum()),
        "decisive_rate": float(decisive.mean()),
        "median_abs": median,
        "logit_spread": spread,
        "median_rel": median / spread if spread > 0 else (0.0 if median == 0 else np.inf),
        "top1_agreement": float(agree.mean()),
        "top1_mismatches": int((~agree).sum()),
        "near_ties": int((margin <= tie).sum()),
        "tie_margin_abs": tie,
        "top5_overlap": float(np.mean(overlap)),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
    }


def event_metrics(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    equal = reference.astype(np.uint8) == other.astype(np.uint8)
    return {
        "count": int(len(reference)),
        "event_agreement": float(equal.mean()),
        "event_mismatches": int((~equal).sum()),
        "event_rate": float(reference.astype(bool).mean()),
    }


class _LayerTally:
    """Per-layer flips, spikes and sizes, accumulated chunk by chunk (spike maps are large)."""

    def __init__(self) -> None:
        self.flips: dict[str, int] = {}
        self.spikes: dict[str, int] = {}
        self.sizes: dict[str, int] = {}

    def add(self, reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> None:
        for name, ref in reference.items():
            if name not in other:
                continue
            got = other[name]
            if got.shape != ref.shape:
                raise I2EError(
                    f"spike maps of layer {name} differ in shape "
                    f"({list(ref.shape)} vs {list(got.shape)})"
                )
            self.flips[name] = self.flips.get(name, 0) + int(np.count_nonzero(ref != got))
            self.spikes[name] = self.spikes.get(name, 0) + int(np.count_nonzero(ref))
            self.sizes[name] = self.sizes.get(name, 0) + ref.size

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "layer": name,
                "agreement": 1.0 - self.flips[name] / self.sizes[name],
                "flips": self.flips[name],
                "rate": self.spikes[name] / self.sizes[name],
            }
            for name in self.flips
        ]


def compare(
    reference: Comparable,
    candidate: Comparable,
    inputs: np.ndarray,
    limits: Limits,
    *,
    batch_size: int = 8,
    spikes: bool = True,
) -> Comparison:
    """Run both runners on ``inputs`` (chunks of ``batch_size``) and judge the candidate
    against ``limits``. Spike maps are compared when ``spikes`` and both runners expose them."""
    if batch_size < 1:
        raise I2EError(f"--batch must be at least 1, got {batch_size}")
    if len(inputs) == 0:
        raise I2EError("no inputs to compare on")
    kind = "events" if "events" in (reference.output, candidate.output) else "logits"
    with_spikes = (
        spikes and kind == "logits" and reference.exposes_spikes and candidate.exposes_spikes
    )
    tally = _LayerTally()
    outputs: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        if with_spikes:
            (ref_out, ref_maps), (cand_out, cand_maps) = (
                reference.infer_spikes(chunk),
                candidate.infer_spikes(chunk),
            )
            tally.add(ref_maps, cand_maps)
        else:
            ref_out, cand_out = _output(reference, chunk, kind), _output(candidate, chunk, kind)
        outputs[0].append(ref_out)
        outputs[1].append(cand_out)
    layers = tally.rows() if with_spikes else None
    comparison = judge(
        np.concatenate(outputs[0]), np.concatenate(outputs[1]), limits, kind=kind, layers=layers
    )
    if spikes and kind == "logits" and not with_spikes:
        who = (
            "one runner does"
            if reference.exposes_spikes or candidate.exposes_spikes
            else "the runners do"
        )
        comparison.notes.append(f"judged on logits only: {who} not expose spike maps")
    elif with_spikes and not any(row["layer"] != "i2e" for row in layers or ()):
        comparison.notes.append(
            "LIF spike maps not compared: no LIF layer of one runner is "
            "found in the other (rewritten neurons keep no spike tensor)"
        )
    return comparison


def judge(
    reference: np.ndarray,
    candidate: np.ndarray,
    limits: Limits,
    *,
    kind: str = "logits",
    layers: list[dict[str, Any]] | None = None,
) -> Comparison:
    """The verdict on outputs already computed (``reference`` first) and, optionally, the
    per-layer spike rows of :func:`compare`."""
    if reference.shape != candidate.shape:
        raise I2EError(f"output shapes differ: {list(reference.shape)} vs {list(candidate.shape)}")
    if kind == "events":
        metrics = event_metrics(reference, candidate)
        checks = [_at_least("event agreement", metrics["event_agreement"], limits.event_agreement)]
        return Comparison(kind, limits, metrics, checks)
    metrics = logit_metrics(reference, candidate, limits.tie_margin)
    checks = [
        _at_most("decisive top-1 changes", metrics["decisive_rate"], limits.decisive),
        _at_most("median |Δlogit| / logit spread", metrics["median_rel"], limits.median_rel),
    ]
    neurons = [row for row in layers or () if row["layer"] != "i2e"]
    events = [row for row in layers or () if row["layer"] == "i2e"]
    if neurons:
        worst = min(neurons, key=lambda row: row["agreement"])
        checks.append(
            _at_least(
                f"lowest spike agreement ({worst['layer']})",
                worst["agreement"],
                limits.spike_agreement,
            )
        )
    if events:
        checks.append(_at_least("event agreement", events[0]["agreement"], limits.event_agreement))
    return Comparison(kind, limits, metrics, checks, layers)


def _output(runner: Comparable, chunk: np.ndarray, kind: str) -> np.ndarray:
    if kind == "events" and runner.output != "events":
        events = getattr(runner, "events", None)
        if events is None:
            raise I2EError(
                "a converter-only graph compares with a checkpoint (its reference "
                "converter) or another converter graph, not with a classifier graph"
            )
        return events(chunk)
    return runner.infer(chunk)


def _at_most(name: str, value: float, limit: float) -> Check:
    return Check(name, float(value), float(limit), bool(value <= limit), True)


def _at_least(name: str, value: float, limit: float) -> Check:
    return Check(name, float(value), float(limit), bool(value >= limit), False)
