"""`i2e-deploy profile` of the bundled model on its held-out CIFAR-10 images, on PyTorch,
ONNX Runtime FP32 and ONNX Runtime INT8, and what counting activity costs a stream per frame.

    python benchmarks/profile_default.py --data /tmp/cifar/train [--count 200] [--runs 50]
                                 [--threads 2] [--frames 200]

``--data``: the CIFAR-10 training JPEGs in ImageFolder layout; ``--count`` images of the
bundled model's held-out split (named by its card: ``val_split`` images with ``seed``),
spread evenly over it, are linked into a scratch folder and profiled (spikes counted on all of
them, ``--runs`` profiled calls at batch 1 for the times). The stream part runs the demo clip
through the stream loop with no output, ONNX Runtime INT8 as ``stream`` does on a CPU, with
and without ``--activity``, in interleaved rounds.

Prints Markdown tables and writes benchmarks/results/profile_default.{json,md}, the per-backend
reports benchmarks/results/profile_default_{torch,onnx_fp32,onnx_int8}.json, and the PNG of
the INT8 profile to docs/profile_default_int8.png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from i2e_deploy.apps.parity import write_json, write_text
from i2e_deploy.apps.profile import markdown as profile_markdown
from i2e_deploy.apps.profile import run_profile, write_reports
from i2e_deploy.assets import DEFAULT_MODEL
from i2e_deploy.device import cpu_name
from i2e_deploy.model.checkpoint import load_checkpoint
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.layer_times import SHARES
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.sinks import NullSink
from i2e_deploy.runtime.sources import open_source
from i2e_deploy.targets import resolve_runner
from i2e_deploy.training.data import image_folder, split_indices

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
BACKENDS = {
    "torch": ("torch", "fp32"),
    "onnx_fp32": ("onnx", "fp32"),
    "onnx_int8": ("onnx", "int8"),
}


def heldout_folder(data: Path, count: int, scratch: Path) -> tuple[Path, str]:
    """``count`` of the bundled model's held-out images, linked into ``scratch`` by class."""
    card = load_checkpoint(DEFAULT_MODEL)[1]
    folder = image_folder(data)
    holdout, seed = card.provenance["val_split"], card.provenance.get("seed", 0)
    _, held = split_indices(folder.targets, holdout, seed)
    picks = [held[i] for i in np.linspace(0, len(held) - 1, min(count, len(held))).astype(int)]
    for index in picks:
        path = Path(folder.samples[index][0])
        target = scratch / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path)
    return scratch, (
        f"{len(picks)} of the {len(held)} held-out images (val_split={holdout}, "
        f"seed={seed}) of {data}"
    )


def stream_cost(frames: int, rounds: int, threads: int) -> dict:
    """ms per frame of the stream loop (demo clip, no output) with and without activity
    counting: medians over interleaved rounds of each round's mean per-frame inference time
    and FPS."""
    runner = resolve_runner("default", backend="onnx", precision="auto", threads=threads)
    results: dict[str, dict[str, list[float]]] = {
        name: {"infer_ms": [], "fps": []} for name in ("off", "on")
    }
    try:
        plain, counting = Classifier(runner), Classifier(runner, activity=True)
        for _ in range(rounds):
            for name, classifier in (("off", plain), ("on", counting)):
                source = open_source("demo", loop=True)
                stats = Stream(classifier, [source], NullSink(), max_frames=frames).run()
                results[name]["infer_ms"].append(stats.stages["infer"].mean)
                results[name]["fps"].append(stats.fps)
    finally:
        runner.close()
    summary = {
        name: {key: statistics.median(values) for key, values in found.items()}
        for name, found in results.items()
    }
    summary["extra_ms_per_frame"] = summary["on"]["infer_ms"] - summary["off"]["infer_ms"]
    summary.update(frames=frames, rounds=rounds, backend=f"onnxruntime {runner.precision}")
    return summary


def markdown(report: dict) -> str:
    lines = [
        f"# `i2e-deploy profile default`, {report['machine']}",
        "",
        f"{report['data']}; ONNX Runtime {report['onnxruntime']}, PyTorch "
        f"{report['torch']}, {report['threads']} threads, times: batch 1, per layer the median of "
        f"{report['runs']} profiled calls; load average at start {report['load_average']}.",
        "",
        "| backend | LIF firing rate | M SOPs / image | M MACs / image | SNN µJ | "
        "ANN µJ | profiled ms | " + " | ".join(f"{s} %" for s in SHARES) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(SHARES),
    ]
    for name, row in report["backends"].items():
        total, timing = row["total"], row["timing"]
        shares = " | ".join(
            f"{100 * timing['shares_ms'][s] / timing['total_ms']:.0f}" for s in SHARES
        )
        lines.append(
            f"| {name} | {total['firing_rate']:.4f} | {total['sops'] / 1e6:.1f} | "
            f"{total['macs'] / 1e6:.1f} | {total['energy_snn_pj'] / 1e6:.1f} | "
            f"{total['energy_ann_pj'] / 1e6:.1f} | {timing['total_ms']:.2f} | "
            f"{shares} |"
        )
    cost = report["stream_activity"]
    lines += [
        "",
        f"Stream loop, demo clip, {cost['backend']}, {cost['frames']} frames x "
        f"{cost['rounds']} interleaved rounds (medians): inference "
        f"{cost['off']['infer_ms']:.2f} ms per frame without activity counting, "
        f"{cost['on']['infer_ms']:.2f} ms with it (+{cost['extra_ms_per_frame']:.2f} ms); "
        f"{cost['off']['fps']:.1f} against {cost['on']['fps']:.1f} FPS.",
        "",
        "## ONNX Runtime INT8, per layer",
        "",
        report["int8_table"],
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data", type=Path, required=True, help="CIFAR-10 training JPEGs, ImageFolder layout"
    )
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--frames", type=int, default=200, help="stream frames per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    report: dict = {
        "machine": f"{cpu_name()} ({os.cpu_count()} cores visible, shared with other jobs)",
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "runs": args.runs,
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "backends": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        folder, report["data"] = heldout_folder(args.data, args.count, Path(scratch))
        for name, (backend, precision) in BACKENDS.items():
            print(f"profiling {name} ...", flush=True)
            found = run_profile(
                "default",
                folder,
                limit=args.count,
                backend=backend,
                precision=precision,
                threads=args.threads,
                runs=args.runs,
            )
            found.source = report["data"]
            plot = REPO / "docs" / "profile_default_int8.png" if name == "onnx_int8" else None
            write_reports(found, json_path=RESULTS / f"profile_default_{name}.json", plot_path=plot)
            report["backends"][name] = {"total": found.total, "timing": found.timing}
            if name == "onnx_int8":
                report["int8_table"] = profile_markdown(found)
    print("stream ...", flush=True)
    report["stream_activity"] = stream_cost(args.frames, args.rounds, args.threads)
    text = markdown(report)
    write_text(RESULTS / "profile_default.md", text)
    write_json(RESULTS / "profile_default.json", report)
    print(text)


if __name__ == "__main__":
    main()
