"""``i2e-deploy parity A B``: is model B faithful to model A on the same inputs?

Like Polygraphy's comparator, this only sees runners: any two model files (checkpoint, ONNX,
engine) run the same preprocessed batch and :func:`i2e_deploy.compare.compare` judges B
against A with the limits of the lower precision of the two (``--precision`` to choose,
``--tolerance NAME=VALUE`` to override one): no decisive top-1 change, spike maps that agree
almost everywhere where both backends expose them (PyTorch and ONNX Runtime do), and a small
median |Δlogit|. Raw top-1 agreement and near-ties are reported, never the reason for a
failure. Converter-only graphs are compared by event agreement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..compare import Comparison, compare, limits_for, lower_precision
from ..errors import I2EError
from ..fileio import atomic_output
from ..images import load_image_folder, synthetic_images
from ..runtime.runners import Runner
from ..targets import resolve_runner

DEFAULT_LIMIT = 100
DEFAULT_RANDOM = 32


@dataclass
class ParityReport:
    models: list[dict[str, Any]]
    inputs: dict[str, Any]
    precision: str
    comparison: Comparison

    @property
    def passed(self) -> bool:
        return self.comparison.passed

    def to_dict(self) -> dict[str, Any]:
        found = self.comparison.to_dict()
        return {
            "models": self.models,
            "inputs": self.inputs,
            "precision": self.precision,
            "passed": self.passed,
            "limits": found["limits"],
            "metrics": found["metrics"],
            "checks": found["checks"],
            "layers": found["layers"],
            "notes": found["notes"],
        }


def check_cards_match(a: Runner, b: Runner) -> None:
    for key in ("arch", "input", "num_classes", "imgsz", "T", "ratio"):
        va, vb = getattr(a.card, key), getattr(b.card, key)
        if va != vb:
            raise I2EError(
                f"the models differ in {key} ({a.path.name}: {va}, {b.path.name}: "
                f"{vb}); parity compares two forms of the same model"
            )


def check_input_flags(data: str | os.PathLike | None, random: int | None) -> None:
    if data is not None and random is not None:
        raise I2EError("give either --data DIR or --random N, not both")
    if random is not None and random < 1:
        raise I2EError(f"--random must be at least 1, got {random}")
    if data is not None and not Path(data).is_dir():
        raise I2EError(f"image folder not found: {data}")


def parity_inputs(
    card, data: str | os.PathLike | None, random: int | None, limit: int | None, seed: int = 0
) -> tuple[np.ndarray, dict[str, Any]]:
    """The comparison batch: preprocessed images of a folder, or structured random ones."""
    check_input_flags(data, random)
    if card.input == "events":
        if data is not None:
            raise I2EError("event-input models take events, not images; use --random N")
        rng = np.random.default_rng(seed)
        count = random or DEFAULT_RANDOM
        shape = (count, card.T, 2, card.imgsz, card.imgsz)
        return (rng.random(shape) < 0.1).astype(np.float32), {
            "source": "random events",
            "count": count,
            "seed": seed,
        }
    if data is not None:
        loaded = load_image_folder(data, card, limit or DEFAULT_LIMIT)
        return loaded.images, {
            "source": str(data),
            "count": len(loaded.images),
            "skipped": len(loaded.skipped),
        }
    count = random or DEFAULT_RANDOM
    return synthetic_images(count, card, seed), {
        "source": "structured random images",
        "count": count,
        "seed": seed,
    }


def run_parity(
    model_a: str,
    model_b: str,
    *,
    data: str | os.PathLike | None = None,
    random: int | None = None,
    limit: int | None = None,
    precision: str | None = None,
    tolerances: dict[str, float] | None = None,
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    log=None,
) -> ParityReport:
    """Compare model B with model A (the reference) and judge it; see the module docstring.
    Each file runs on its own backend (a checkpoint on PyTorch: parity compares files, and
    is itself the verification, so neither is verified first)."""
    if batch_size < 1:
        raise I2EError(f"--batch must be at least 1, got {batch_size}")
    limits_for(precision or "fp32", tolerances)  # fail on a bad flag before loading models
    check_input_flags(data, random)
    opened: list[str] = []  # the runner lines, printed once both files are open and match

    def open_file(model: str | os.PathLike, tag: str):
        return resolve_runner(
            model,
            backend="own",
            device=device,
            threads=threads,
            warmup=0,
            verify=False,
            log=lambda msg: opened.append(f"{tag} {msg}"),
        )

    with open_file(model_a, "A") as a, open_file(model_b, "B") as b:
        check_cards_match(a, b)
        for line in opened:
            (log or (lambda _msg: None))(line)
        batch, inputs = parity_inputs(a.card, data, random, limit, seed)
        precision = precision or lower_precision(a.precision, b.precision)
        comparison = compare(a, b, batch, limits_for(precision, tolerances), batch_size=batch_size)
        models = [
            {
                "path": str(r.path),
                "backend": r.name,
                "precision": r.precision,
                "input_format": r.input_format,
                "output": r.output,
            }
            for r in (a, b)
        ]
    return ParityReport(models=models, inputs=inputs, precision=precision, comparison=comparison)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a report atomically (temp file + rename): never a half-written file."""
    with atomic_output(path, "w") as fh:
        fh.write(text)


def write_json(path: str | os.PathLike, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


def render(report: ParityReport, console, layers: bool = False) -> None:
    """Print the report as tables (text printed literally: no markup)."""
    from rich.table import Table
    from rich.text import Text

    a, b = report.models
    found = report.comparison
    title = (
        f"parity: {Path(b['path']).name} ({b['backend']}, {b['precision']}) vs "
        f"{Path(a['path']).name} ({a['backend']}) on {report.inputs['count']} "
        f"{report.inputs['source']}"
    )
    table = Table(title=Text(title))
    for column in ("check", "value", "limit", "result"):
        table.add_column(column)
    for check in found.checks:
        sign = "<=" if check.at_most else ">="
        table.add_row(
            Text(check.name),
            _fmt(check.value),
            f"{sign} {_fmt(check.limit)}",
            Text("pass", "green") if check.passed else Text("FAIL", "red"),
        )
    judged = {"count", "decisive_rate", "median_rel", "event_agreement"}
    for key, value in found.metrics.items():
        if key not in judged:
            table.add_row(Text(key.replace("_", " ")), _fmt(value), "", Text("reported"))
    console.print(table)
    if layers and found.layers:
        layer_table = Table(title="spike agreement per layer (i2e: the converter's events)")
        for column in ("layer", "agreement", "flipped spikes", "spike rate"):
            layer_table.add_column(column)
        for row in found.layers:
            style = "" if row["agreement"] == 1.0 else "yellow"
            layer_table.add_row(
                row["layer"],
                f"{row['agreement']:.6f}",
                str(row["flips"]),
                f"{row['rate']:.4f}",
                style=style,
            )
        console.print(layer_table)
        first = next((row["layer"] for row in found.layers if row["flips"]), None)
        console.print(Text(f"first diverging layer: {first or 'none'}"))
    for note in found.notes:
        console.print(Text(f"note: {note}"))
    verdict = Text("PASS", "green") if report.passed else Text("FAIL", "red")
    console.print(Text.assemble(verdict, f" ({report.precision} limits)"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if value and abs(value) < 1e-3 else f"{value:.4f}"
    return str(value)
