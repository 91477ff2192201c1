"""``i2e-deploy profile MODEL --data DIR``: how often each layer fires, what that costs in
synaptic operations and energy, and where the backend spends its time.

Any model file runs (checkpoint, ONNX graph, engine, ``default``) through
:func:`i2e_deploy.targets.resolve_runner`. Firing rates come from the spikes that backend
computes (:mod:`i2e_deploy.runtime.activity`), so a reduced-precision graph shows its own;
MACs from the reference model's layer table (:func:`i2e_deploy.model.profile.layer_table`);
milliseconds from the backend's own profiler (:mod:`i2e_deploy.runtime.layer_times`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..card import ModelCard
from ..errors import I2EError
from ..images import spread_images
from ..model.profile import layer_table
from ..runtime.activity import ENERGY_AC_PJ, ENERGY_MAC_PJ, ActivityCounter, SpikeReader, totals
from ..runtime.layer_times import OTHER, SHARES, layer_times
from ..targets import resolve_runner
from .parity import write_json, write_text

ENERGY_SOURCE = "45 nm CMOS, Horowitz, ISSCC 2014 (32-bit float add 0.9 pJ, mult-add 4.6 pJ)"


@dataclass
class ProfileReport:
    model: dict[str, Any]
    source: str
    images: int
    T: int
    layers: list[dict[str, Any]]
    total: dict[str, Any]  # the SNN's entries None where spikes are not exposed
    energy: dict[str, Any]
    timing: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.source,
            "images": self.images,
            "T": self.T,
            "layers": self.layers,
            "total": self.total,
            "energy": self.energy,
            "timing": self.timing,
            "notes": self.notes,
        }


def profile_inputs(card: ModelCard, data: str | os.PathLike, limit: int) -> tuple[np.ndarray, str]:
    """What the model takes from ``data``: ``limit`` images spread over an image folder, or
    for an event-input model the windows of an event recording, the samples of an I2E event
    dataset, or images through the converter."""
    path = Path(data)
    if not path.exists():
        raise I2EError(
            f"--data {data} not found: give an image folder"
            + (", an event recording or an I2E event dataset" if card.input == "events" else "")
        )
    if card.input == "events":
        from ..training.eventsets import is_event_folder

        if path.is_file():
            return _recording_windows(card, path, limit)
        if is_event_folder(path):
            return _event_samples(card, path, limit)
        from ..images import model_inputs

        return model_inputs(card, path, limit)
    if not path.is_dir():
        raise I2EError(f"--data {data} is not a folder: give a folder of images")
    loaded = spread_images(path, card, limit)
    if not len(loaded.images):
        raise I2EError(f"no readable images under {data}")
    return loaded.images, f"{len(loaded.images)} images from {data}"


def _recording_windows(card: ModelCard, path: Path, limit: int) -> tuple[np.ndarray, str]:
    from ..runtime.sources import open_source

    windows = []
    with open_source(str(path), card=card) as source:
        for frame in source:
            if frame.events is None:
                raise I2EError(f"{path} is not an event recording")
            windows.append(frame.events)
            if len(windows) == limit:
                break
    if not windows:
        raise I2EError(f"{path}: no event windows in the recording")
    return (np.stack(windows).astype(np.float32), f"{len(windows)} event windows of {path.name}")


def _event_samples(card: ModelCard, path: Path, limit: int) -> tuple[np.ndarray, str]:
    from ..training.eventsets import EventFolder, read_sample

    samples = EventFolder(path).samples
    picks = np.linspace(0, len(samples) - 1, min(limit, len(samples))).round().astype(int)
    events = np.stack([read_sample(samples[i][0]) for i in picks]).astype(np.float32)
    expected = (card.T, 2, card.imgsz, card.imgsz)
    if events.shape[1:] != expected:
        raise I2EError(
            f"{path}: samples are {list(events.shape[1:])}, the model takes {list(expected)}"
        )
    return events, f"{len(events)} event samples of {path}"


def _check_data(data: Path) -> None:
    """One line for --data that cannot hold inputs of any kind; what a model reads from it is
    checked with its card."""
    if not data.exists():
        raise I2EError(f"--data {data}: no such file or folder")
    if data.is_dir() and not any(p.is_file() for p in data.rglob("*")):
        raise I2EError(
            f"--data {data}: the folder is empty; give images, an event recording or "
            "an I2E event dataset"
        )


def run_profile(
    model: str | os.PathLike,
    data: str | os.PathLike,
    *,
    limit: int = 100,
    backend: str = "auto",
    precision: str = "auto",
    device: str = "cpu",
    threads: int | None = None,
    batch: int = 1,
    runs: int = 20,
    energy_ac: float = ENERGY_AC_PJ,
    energy_mac: float = ENERGY_MAC_PJ,
    log: Callable[[str], None] | None = None,
    **overrides,
) -> ProfileReport:
    """Profile ``model`` on ``limit`` inputs of ``data``: spikes counted over all of them,
    ``runs`` profiled calls at batch ``batch`` for the times. See the module docstring."""
    for name, value in (("--energy-ac", energy_ac), ("--energy-mac", energy_mac)):
        if not value > 0:
            raise I2EError(f"{name} must be positive (pJ per operation), got {value}")
    if batch < 1:
        raise I2EError(f"--batch must be at least 1, got {batch}")
    if limit < 1:
        raise I2EError(f"--limit must be at least 1, got {limit}")
    if runs < 1:
        raise I2EError(f"--runs must be at least 1, got {runs}")
    _check_data(Path(data))  # before a runner is chosen, exported or verified
    with resolve_runner(
        model,
        backend=backend,
        precision=precision,
        device=device,
        threads=threads,
        log=log,
        warmup=0,
        **overrides,
    ) as runner:
        card = runner.card
        if runner.output != "logits":
            raise I2EError(f"{runner.path.name} is a converter-only graph; profile a model")
        inputs, source = profile_inputs(card, data, limit)
        table = layer_table(card)
        notes: list[str] = []
        counter = ActivityCounter(table, card.T)
        if runner.exposes_spikes:
            read = SpikeReader(runner, table)
            for start in range(0, len(inputs), 8):
                counter.add(read(inputs[start : start + 8])[1])
        else:
            notes.append(
                f"the {runner.name} backend does not expose spike maps: no firing rates or SOPs"
            )
        rates = counter.rates()
        missing = [
            layer.name
            for layer in table
            if layer.kind in ("lif", "events") and layer.name not in rates
        ]
        if rates and missing:
            notes.append(
                f"this graph does not expose the spikes of {', '.join(missing)}: no "
                "firing rate there, nor SOPs for the layers reading them"
            )
        timing_batch = (
            inputs[:batch]
            if len(inputs) >= batch
            else np.concatenate([inputs] * -(-batch // len(inputs)))[:batch]
        )
        times = layer_times(runner, timing_batch, table, runs)
        models = {
            "name": str(model),
            "path": str(runner.path),
            "backend": runner.name,
            "precision": runner.precision,
            "device": device,
            "arch": card.arch,
            "imgsz": card.imgsz,
            "input": card.input,
            "classes": card.num_classes,
        }
    sops = counter.sops()
    layers = []
    for layer in table:
        row: dict[str, Any] = {"name": layer.name, "kind": layer.kind}
        if layer.name in rates:
            row["firing_rate"] = float(rates[layer.name].mean())
            row["firing_rate_per_step"] = [float(r) for r in rates[layer.name]]
        if layer.macs:
            row["input"] = layer.source
            row["macs"] = layer.macs
            if layer.name in sops:
                row["sops"] = sops[layer.name]
        if layer.name in times.per_layer:
            row["ms"] = times.per_layer[layer.name]
        layers.append(row)
    if OTHER in times.per_layer:
        layers.append({"name": OTHER, "kind": OTHER, "ms": times.per_layer[OTHER]})
    found = totals(table, rates, sops, energy_ac=energy_ac, energy_mac=energy_mac)
    total: dict[str, Any] = {
        "macs": found.macs,
        "sops": found.sops,
        "firing_rate": found.firing_rate,
        "energy_snn_pj": found.energy_snn_pj,
        "energy_ann_pj": found.energy_ann_pj,
        "ms": times.total_ms,
    }
    if not rates:  # without spikes there is no SNN count: say so rather than print zeros
        for key in ("sops", "firing_rate", "energy_snn_pj"):
            total[key] = None
    if times.note and not times.per_layer:
        notes.append(times.note)
    return ProfileReport(
        model=models,
        source=source,
        images=len(inputs),
        T=card.T,
        layers=layers,
        total=total,
        energy={"ac_pj": energy_ac, "mac_pj": energy_mac, "source": ENERGY_SOURCE},
        timing=times.to_dict(),
        notes=notes,
    )


# --- output -----------------------------------------------------------------------------------


def _millions(value: float | None) -> str:
    return "" if value is None else f"{value / 1e6:,.2f}"


def table_rows(report: ProfileReport) -> list[list[str]]:
    """Per layer: name, kind, firing rate (mean and per step), M MACs, M SOPs, ms."""
    rows = []
    for row in report.layers:
        rate = row.get("firing_rate")
        rows.append(
            [
                row["name"],
                row["kind"],
                "" if rate is None else f"{rate:.4f}",
                " ".join(f"{r:.3f}" for r in row.get("firing_rate_per_step", [])),
                _millions(row.get("macs")),
                _millions(row.get("sops")),
                f"{row['ms']:.3f}" if "ms" in row else "",
            ]
        )
    return rows


COLUMNS = ("layer", "kind", "firing rate", "per step t0..", "M MACs", "M SOPs", "ms")
TERMINAL = (0, 1, 2, 4, 5, 6)  # the per-step rates are in the Markdown, JSON and plot


def summary_lines(report: ProfileReport) -> list[str]:
    """The totals and the constants behind them, one fact a line."""
    total, energy, timing, model = report.total, report.energy, report.timing, report.model
    lines = [
        f"{Path(model['path']).name} on {model['backend']} ({model['precision']}, "
        f"{model['device']}), {report.images} inputs: {report.source}",
        f"MACs per image {total['macs'] / 1e6:,.1f} M (dense, all {report.T} steps)",
    ]
    if total["sops"] is not None:
        saving = (
            total["energy_ann_pj"] / total["energy_snn_pj"]
            if total["energy_snn_pj"]
            else float("inf")
        )
        lines += [
            f"SOPs per image {total['sops'] / 1e6:,.1f} M; LIF firing rate "
            f"{total['firing_rate']:.4f}",
            f"energy per image: SNN {total['energy_snn_pj'] / 1e6:,.3f} uJ (SOPs x "
            f"{energy['ac_pj']} pJ per accumulate) vs ANN "
            f"{total['energy_ann_pj'] / 1e6:,.3f} uJ (MACs x {energy['mac_pj']} pJ per "
            f"multiply-accumulate): {saving:.1f}x less; default constants: "
            f"{energy['source']}",
        ]
    if timing["total_ms"]:
        shares = timing["shares_ms"]
        parts = ", ".join(
            f"{name} {100 * shares.get(name, 0) / timing['total_ms']:.0f} %" for name in SHARES
        )
        lines.append(
            f"profiled time {timing['total_ms']:.2f} ms per call (batch "
            f"{timing['batch']}, median of {timing['runs']} calls): {parts}"
        )
    if timing.get("note"):
        lines.append(f"timing: {timing['note']}")
    lines += [f"note: {note}" for note in report.notes]
    return lines


def markdown(report: ProfileReport) -> str:
    """The summary lines and the per-layer table, as Markdown."""
    lines = [f"- {line}" for line in summary_lines(report)]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(report)]
    return "\n".join(lines) + "\n"


def render(report: ProfileReport, console) -> None:
    """The per-layer table and the summary lines (text printed literally: no markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"profile: {Path(report.model['path']).name}"))
    for i in TERMINAL:
        table.add_column(COLUMNS[i], justify="left" if i < 2 else "right", no_wrap=True)
    for cells in table_rows(report):
        table.add_row(*(Text(cells[i]) for i in TERMINAL))
    console.print(table)
    for line in summary_lines(report):
        console.print(Text(line), highlight=False, soft_wrap=True)


def plot(report: ProfileReport, path: str | os.PathLike) -> None:
    """One PNG: firing rate per spiking layer and time step (heatmap) beside SOPs and ms per
    layer (bars), the layers in network order from top to bottom."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise I2EError("--plot needs matplotlib: pip install 'i2e-deploy[plot]'") from None
    from ..fileio import atomic_output

    spiking = [row for row in report.layers if "firing_rate_per_step" in row]
    rows = [row for row in report.layers if "macs" in row or "ms" in row]
    fig = plt.figure(figsize=(16, max(7.0, 0.2 * len(rows) + 2.0)), layout="constrained")
    grid = fig.add_gridspec(1, 2, width_ratios=[1.1, 2.0], wspace=0.06)
    heat = fig.add_subplot(grid[0])
    pair = grid[1].subgridspec(1, 2, wspace=0.03)
    bars = fig.add_subplot(pair[0])
    clock = fig.add_subplot(pair[1], sharey=bars)
    model, total = report.model, report.total
    fig.suptitle(
        f"{model['name']}: {model['arch']} at {model['imgsz']} px, "
        f"{model['backend']} {model['precision']}, {report.images} inputs",
        fontsize=12,
    )
    if spiking:
        rates = np.array([row["firing_rate_per_step"] for row in spiking])
        image = heat.imshow(rates, aspect="auto", cmap="magma", vmin=0)
        heat.set_yticks(
            range(len(spiking)),
            [f"{row['name']}  {row['firing_rate']:.3f}" for row in spiking],
            fontsize=7,
        )
        heat.set_xticks(range(report.T), [f"t{t}" for t in range(report.T)], fontsize=8)
        fig.colorbar(image, ax=heat, fraction=0.05, pad=0.02, label="firing rate")
        heat.set_title(
            f"firing rate per layer and time step\n(all LIF neurons: {total['firing_rate']:.3f})",
            fontsize=9,
        )
    else:
        heat.text(0.5, 0.5, "spikes not exposed\nby this backend", ha="center", va="center")
        heat.set_axis_off()
    # SOPs and ms share one row per layer, in network order.
    y = np.arange(len(rows))
    bars.barh(y, [row.get("macs", 0) / 1e6 for row in rows], color="#dddddd", label="MACs (dense)")
    bars.barh(y, [row.get("sops", 0) / 1e6 for row in rows], color="#3b75af", label="SOPs")
    bars.set_yticks(y, [row["name"] for row in rows], fontsize=7)
    bars.set_ylim(len(rows) - 0.5, -0.5)
    bars.set_xlabel("millions per image")
    title = "SOPs (spike-driven) and dense MACs per layer"
    if total["sops"] is not None:
        title += (
            f"\nSNN {total['sops'] / 1e6:,.0f} M x {report.energy['ac_pj']} pJ = "
            f"{total['energy_snn_pj'] / 1e6:.1f} µJ, ANN {total['macs'] / 1e6:,.0f} M x "
            f"{report.energy['mac_pj']} pJ = {total['energy_ann_pj'] / 1e6:,.0f} µJ"
        )
    bars.set_title(title, fontsize=9)
    bars.legend(loc="lower right", fontsize=8)
    colours = {
        "events": "#8c564b",
        "conv": "#3b75af",
        "linear": "#3b75af",
        "lif": "#e3822b",
        "residual": "#55a868",
        OTHER: "#999999",
    }
    timing = report.timing
    if timing["total_ms"]:
        clock.barh(
            y,
            [row.get("ms", 0) for row in rows],
            color=[colours.get(row["kind"], "#999999") for row in rows],
        )
        clock.tick_params(labelleft=False)
        clock.set_xlabel(f"ms per call (batch {timing['batch']})")
        shares, total_ms = timing["shares_ms"], timing["total_ms"]
        clock.set_title(
            f"{timing['backend']} profiler: {timing['total_ms']:.1f} ms per call\n"
            + ", ".join(
                f"{k.split(' /')[0]} {100 * shares.get(k, 0) / total_ms:.0f}%" for k in SHARES[1:4]
            ),
            fontsize=9,
        )
        from matplotlib.patches import Patch

        clock.legend(
            handles=[
                Patch(color=colours[k], label=label)
                for k, label in (
                    ("events", "converter"),
                    ("conv", "conv / linear"),
                    ("lif", "neurons"),
                    ("residual", "residual sums"),
                    (OTHER, OTHER),
                )
            ],
            loc="lower right",
            fontsize=8,
        )
    else:
        clock.text(0.5, 0.5, "no per-layer profile\non this backend", ha="center", va="center")
        clock.set_axis_off()
    with atomic_output(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)


def write_reports(
    report: ProfileReport,
    *,
    json_path: str | os.PathLike | None = None,
    markdown_path: str | os.PathLike | None = None,
    plot_path: str | os.PathLike | None = None,
) -> None:
    if json_path:
        write_json(json_path, report.to_dict())
    if markdown_path:
        write_text(markdown_path, markdown(report))
    if plot_path:
        plot(report, plot_path)
