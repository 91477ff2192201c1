"""``i2e-deploy parity A B``: is model B faithful to model A on the same inputs?

Like Polygraphy's comparator, this only sees runners: any two model files (checkpoint, ONNX,
engine) run the same preprocessed batch and their outputs are compared.

Pass criteria per precision (the lower precision of A and B decides; flags override):

====== ============ ===== ===== =============== ====== ==========
prec.  median|Δ|    top-1 top-5 decisive flips  events tie margin
====== ============ ===== ===== =============== ====== ==========
fp32   <= 1e-4      >=99% >=98% 0               100%   0.05
fp16   <= 2e-2      >=99% >=95% not checked     99.9%  0.05
int8   <= 1e-1      >=98% >=90% not checked     100%   0.05
====== ============ ===== ===== =============== ====== ==========

"decisive flips" are top-1 disagreements on inputs whose reference top-2 logit margin exceeds
the tie margin: a spike flipping by float rounding may swap a near-tie, nothing else. Max
|Δlogit| is reported and only checked when ``max_abs`` is given. Converter-only graphs are
compared by event agreement (the fraction of equal event bits; the converter stays FP32 in
every precision, so FP32 and INT8 must match bit for bit).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import I2EError
from .fileio import atomic_output
from .runtime.preprocess import load_image_folder, synthetic_images
from .runtime.runners import Runner, TorchRunner, load_runner

PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_LIMIT = 100
DEFAULT_RANDOM = 32


@dataclass
class Thresholds:
    median_abs: float | None
    top1: float
    top5: float
    decisive: int | None
    events: float
    tie_margin: float = 0.05
    max_abs: float | None = None


DEFAULT_THRESHOLDS = {
    "fp32": Thresholds(median_abs=1e-4, top1=0.99, top5=0.98, decisive=0, events=1.0),
    "fp16": Thresholds(median_abs=2e-2, top1=0.99, top5=0.95, decisive=None, events=0.999),
    "int8": Thresholds(median_abs=1e-1, top1=0.98, top5=0.90, decisive=None, events=1.0),
}


def thresholds_for(precision: str, **overrides: float | int | None) -> Thresholds:
    """Default thresholds for a precision with the non-None overrides applied."""
    if precision not in DEFAULT_THRESHOLDS:
        raise I2EError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    changes: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(DEFAULT_THRESHOLDS[precision], **changes)


def lower_precision(*precisions: str) -> str:
    known = [p for p in precisions if p in PRECISIONS]
    return max(known, key=PRECISIONS.index) if known else "fp32"


@dataclass
class Check:
    name: str
    value: float
    limit: float
    passed: bool
    at_most: bool  # True: value must be <= limit; False: >= limit


@dataclass
class ParityReport:
    models: list[dict[str, Any]]
    inputs: dict[str, Any]
    precision: str
    thresholds: dict[str, Any]
    metrics: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    layers: list[dict[str, Any]] | None = None

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        return data


def logit_metrics(reference: np.ndarray, other: np.ndarray, tie_margin: float) -> dict[str, Any]:
    """|Δlogit| statistics, top-1 agreement (overall and where the reference is decisive) and
    top-5 overlap of two ``[N, classes]`` logit arrays."""
    diff = np.abs(other.astype(np.float64) - reference.astype(np.float64))
    top1_ref, top1_other = reference.argmax(1), other.argmax(1)
    agree = top1_ref == top1_other
    ranked = np.sort(reference, axis=1)
    margin = ranked[:, -1] - ranked[:, -2] if reference.shape[1] > 1 else np.full(len(reference), np.inf)
    k = min(5, reference.shape[1])
    top_ref = np.argsort(-reference, axis=1)[:, :k]
    top_other = np.argsort(-other, axis=1)[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(top_ref, top_other)]
    return {
        "count": int(len(reference)),
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "median_abs": float(np.median(diff)),
        "top1_agreement": float(agree.mean()),
        "top1_mismatches": int((~agree).sum()),
        "decisive_mismatches": int((~agree & (margin > tie_margin)).sum()),
        "near_ties": int((margin <= tie_margin).sum()),
        "top5_overlap": float(np.mean(overlap)),
    }


def event_metrics(reference: np.ndarray, other: np.ndarray) -> dict[str, Any]:
    equal = reference.astype(np.uint8) == other.astype(np.uint8)
    return {"count": int(len(reference)), "event_agreement": float(equal.mean()),
            "event_mismatches": int((~equal).sum()),
            "event_rate": float(reference.astype(bool).mean())}


def _checks(metrics: dict[str, Any], limits: Thresholds) -> list[Check]:
    def at_most(name, value, limit):
        return Check(name, value, limit, value <= limit, True)

    def at_least(name, value, limit):
        return Check(name, value, limit, value >= limit, False)

    if "event_agreement" in metrics:
        return [at_least("event agreement", metrics["event_agreement"], limits.events)]
    checks = [at_least("top-1 agreement", metrics["top1_agreement"], limits.top1),
              at_least("top-5 overlap", metrics["top5_overlap"], limits.top5)]
    if limits.median_abs is not None:
        checks.append(at_most("median |Δlogit|", metrics["median_abs"], limits.median_abs))
    if limits.max_abs is not None:
        checks.append(at_most("max |Δlogit|", metrics["max_abs"], limits.max_abs))
    if limits.decisive is not None:
        checks.append(at_most("decisive top-1 flips", metrics["decisive_mismatches"],
                              limits.decisive))
    return checks


def _outputs(runner: Runner, batch: np.ndarray, want_events: bool, batch_size: int) -> np.ndarray:
    chunks = []
    for start in range(0, len(batch), batch_size):
        chunk = batch[start:start + batch_size]
        if want_events and runner.output != "events":
            if not isinstance(runner, TorchRunner):
                raise I2EError(f"{runner.path.name} outputs logits and cannot be compared with "
                               "a converter-only graph; compare that graph with the checkpoint")
            chunks.append(runner.events(chunk))
        else:
            chunks.append(runner.infer(chunk))
    return np.concatenate(chunks)


def check_cards_match(a: Runner, b: Runner) -> None:
    for key in ("arch", "input", "num_classes", "imgsz", "T", "ratio"):
        va, vb = getattr(a.card, key), getattr(b.card, key)
        if va != vb:
            raise I2EError(f"the models differ in {key} ({a.path.name}: {va}, {b.path.name}: "
                           f"{vb}); parity compares two forms of the same model")


def check_input_flags(data: str | os.PathLike | None, random: int | None) -> None:
    if data is not None and random is not None:
        raise I2EError("give either --data DIR or --random N, not both")
    if random is not None and random < 1:
        raise I2EError(f"--random must be at least 1, got {random}")
    if data is not None and not Path(data).is_dir():
        raise I2EError(f"image folder not found: {data}")


def parity_inputs(card, data: str | os.PathLike | None, random: int | None,
                  limit: int | None, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """The comparison batch: preprocessed images of a folder, or structured random ones."""
    check_input_flags(data, random)
    if card.input == "events":
        if data is not None:
            raise I2EError("event-input models take events, not images; use --random N")
        rng = np.random.default_rng(seed)
        count = random or DEFAULT_RANDOM
        shape = (count, card.T, 2, card.imgsz, card.imgsz)
        return (rng.random(shape) < 0.1).astype(np.float32), {"source": "random events",
                                                              "count": count, "seed": seed}
    if data is not None:
        images, paths = load_image_folder(data, card, limit or DEFAULT_LIMIT)
        return images, {"source": str(data), "count": len(images)}
    count = random or DEFAULT_RANDOM
    return synthetic_images(count, card, seed), {"source": "structured random images",
                                                 "count": count, "seed": seed}


def compare(a: Runner, b: Runner, batch: np.ndarray, limits: Thresholds,
            batch_size: int = 8) -> tuple[dict[str, Any], list[Check]]:
    """Run both runners on ``batch`` (A is the reference) and judge B against ``limits``."""
    want_events = "events" in (a.output, b.output)
    out_a = _outputs(a, batch, want_events, batch_size)
    out_b = _outputs(b, batch, want_events, batch_size)
    if out_a.shape != out_b.shape:
        raise I2EError(f"output shapes differ: {list(out_a.shape)} vs {list(out_b.shape)}")
    metrics = (event_metrics(out_a, out_b) if want_events
               else logit_metrics(out_a, out_b, limits.tie_margin))
    return metrics, _checks(metrics, limits)


def layer_agreement(runner: TorchRunner, batch: np.ndarray,
                    batch_size: int = 8) -> list[dict[str, Any]]:
    """Per-LIF-layer spike agreement between the reference model and its deploy module
    (BN folded, LIF unrolled), in network order."""
    import torch

    from .export.deploy import deploy, spike_maps

    model = runner.model
    if model is None:
        raise I2EError(f"{runner.path.name}: the runner is closed")
    device = next(model.parameters()).device
    deployed = deploy(model).to(device)
    flips: dict[str, int] = {}
    spikes: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for start in range(0, len(batch), batch_size):  # chunks: spike maps are large
        x = torch.from_numpy(runner._adapt(batch[start:start + batch_size])).to(device)
        reference, derived = spike_maps(model, x), spike_maps(deployed, x)
        for name, ref in reference.items():
            flips[name] = flips.get(name, 0) + int((ref != derived[name]).sum())
            spikes[name] = spikes.get(name, 0) + int(ref.sum())
            sizes[name] = sizes.get(name, 0) + ref.numel()
    return [{"layer": name, "agreement": 1.0 - flips[name] / sizes[name], "flips": flips[name],
             "rate": spikes[name] / sizes[name]} for name in flips]


def run_parity(model_a: str, model_b: str, *, data: str | os.PathLike | None = None,
               random: int | None = None, limit: int | None = None,
               precision: str | None = None, overrides: dict[str, Any] | None = None,
               layers: bool = False, device: str = "cpu", threads: int | None = None,
               batch_size: int = 8, seed: int = 0) -> ParityReport:
    """Compare model B with model A (the reference) and judge it; see the module docstring."""
    if batch_size < 1:
        raise I2EError(f"--batch must be at least 1, got {batch_size}")
    if precision is not None:
        thresholds_for(precision)  # fail on a bad flag before loading models
    check_input_flags(data, random)
    with load_runner(model_a, device=device, threads=threads, warmup=0) as a, \
            load_runner(model_b, device=device, threads=threads, warmup=0) as b:
        check_cards_match(a, b)
        batch, inputs = parity_inputs(a.card, data, random, limit, seed)
        precision = precision or lower_precision(a.precision, b.precision)
        limits = thresholds_for(precision, **(overrides or {}))
        metrics, checks = compare(a, b, batch, limits, batch_size)
        layer_rows = None
        if layers:
            reference = next((r for r in (a, b) if isinstance(r, TorchRunner)), None)
            if reference is None:
                raise I2EError("--layers needs a PyTorch checkpoint as A or B (it compares the "
                               "reference model with its deploy module)")
            layer_rows = layer_agreement(reference, batch, batch_size)
        models = [{"path": str(r.path), "backend": r.name, "precision": r.precision,
                   "input_format": r.input_format, "output": r.output} for r in (a, b)]
    return ParityReport(models=models, inputs=inputs, precision=precision,
                        thresholds=dataclasses.asdict(limits), metrics=metrics, checks=checks,
                        layers=layer_rows)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a report atomically (temp file + rename): never a half-written file."""
    with atomic_output(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def render(report: ParityReport, console) -> None:
    """Print the report as rich tables."""
    from rich.table import Table

    a, b = report.models
    title = (f"parity: {Path(b['path']).name} ({b['backend']}, {b['precision']}) vs "
             f"{Path(a['path']).name} ({a['backend']}) on {report.inputs['count']} "
             f"{report.inputs['source']}")
    table = Table(title=title)
    for column in ("check", "value", "limit", "result"):
        table.add_column(column)
    for check in report.checks:
        sign = "<=" if check.at_most else ">="
        table.add_row(check.name, _fmt(check.value), f"{sign} {_fmt(check.limit)}",
                      "[green]pass[/green]" if check.passed else "[red]FAIL[/red]")
    checked = {"count", "median_abs", "top1_agreement", "top5_overlap", "event_agreement",
               "decisive_mismatches"}
    for key, value in report.metrics.items():
        if key not in checked and not (key == "max_abs" and report.thresholds["max_abs"]):
            table.add_row(key.replace("_", " "), _fmt(value), "", "")
    console.print(table)
    if report.layers:
        layer_table = Table(title="spike agreement per LIF layer (reference vs deploy module)")
        for column in ("layer", "agreement", "flipped spikes", "spike rate"):
            layer_table.add_column(column)
        for row in report.layers:
            style = "" if row["agreement"] == 1.0 else "yellow"
            layer_table.add_row(row["layer"], f"{row['agreement']:.6f}", str(row["flips"]),
                                f"{row['rate']:.4f}", style=style)
        console.print(layer_table)
        first = next((row["layer"] for row in report.layers if row["flips"]), None)
        console.print(f"first diverging layer: {first or 'none'}")
    verdict = "[green]PASS[/green]" if report.passed else "[red]FAIL[/red]"
    console.print(f"{verdict} ({report.precision} thresholds)")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)
