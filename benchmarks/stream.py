"""Streaming pipeline cost on this machine: end-to-end FPS, latency p50/p99, the per-stage
split, pipeline overhead (wall time not spent in the network), and RSS growth over a long run.

    python benchmarks/stream.py [--model default|FILE | --standin 128] [--frames 300]
                                [--rss-frames 5000] [--rss-imgsz N]

The model runs on ONNX Runtime (a checkpoint is exported once into the cache). ``--standin N``
(also used when the bundled model is absent) runs a same-architecture stand-in instead:
MS-ResNet-18, 10 classes, NxN, random weights, the same dense compute per frame as a trained
model. The long RSS run may use a smaller input size (``--rss-imgsz``) to fit the time.
Prints a Markdown table and writes JSON (default benchmarks/results/stream.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import psutil

from i2e_deploy.apps.stream import write_json_atomic
from i2e_deploy.assets import DEFAULT_MODEL
from i2e_deploy.cache import cache_dir
from i2e_deploy.card import CIFAR10_CLASSES, ModelCard
from i2e_deploy.device import cpu_name
from i2e_deploy.images import preprocess
from i2e_deploy.model.checkpoint import save_checkpoint
from i2e_deploy.model.msresnet import build_model
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.sinks import JsonlSink, MultiSink, NullSink, VideoSink
from i2e_deploy.runtime.sources import open_source
from i2e_deploy.targets import resolve_runner

REPO = Path(__file__).resolve().parents[1]
BIKES = REPO.parent / "shared" / "data" / "video" / "bikes.mp4"


def stand_in(imgsz: int) -> Path:
    """Made once into the cache, so its ONNX export is cached too."""
    import torch

    path = cache_dir() / "benchmarks" / f"standin_msresnet18_{imgsz}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        card = ModelCard(imgsz=imgsz, resize=imgsz, class_names=list(CIFAR10_CLASSES))
        save_checkpoint(path, build_model(card).eval(), card)
    return path


class RssProbe(NullSink):
    """Records the process RSS every ``every`` frames (a sink, so it sees the real loop)."""

    def __init__(self, every: int):
        self.every, self.frames, self.samples = every, 0, []
        self.process = psutil.Process()

    def write(self, frame, prediction, canvas) -> None:
        self.frames += 1
        if self.frames % self.every == 0:
            self.samples.append((self.frames, self.process.memory_info().rss))


def inference_only(model: Classifier, source_uri: str, frames: int) -> float:
    """ms per frame of runner.infer alone on preprocessed frames (the pipeline's floor)."""
    images = [preprocess(f.image, model.card) for _, f in zip(range(8), open_source(source_uri))]
    model.runner.infer(images[0][None])
    began = time.perf_counter()
    for i in range(frames):
        model.runner.infer(images[i % len(images)][None])
    return (time.perf_counter() - began) * 1e3 / frames


def run(model: Classifier, source_uri: str, sink, frames: int, loop: bool = True) -> dict:
    source = open_source(source_uri, loop=loop)
    return Stream(model, [source], sink, max_frames=frames).run().to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="'default' (bundled) or a file")
    parser.add_argument(
        "--standin",
        type=int,
        default=None,
        help="use a same-architecture stand-in of this input size",
    )
    parser.add_argument("--source", default=None, help="default: ../shared bikes.mp4, else demo")
    parser.add_argument("--frames", type=int, default=300, help="frames per FPS run")
    parser.add_argument("--rss-frames", type=int, default=5000, help="frames of the RSS run")
    parser.add_argument(
        "--rss-imgsz",
        type=int,
        default=None,
        help="input size of the RSS-run model (default: the main model's)",
    )
    parser.add_argument("--threads", type=int, default=None, help="inference threads")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "stream.json"))
    args = parser.parse_args()

    source = args.source or (str(BIKES) if BIKES.is_file() else "demo")
    load_start = os.getloadavg()[0]  # other work on the machine skews every number here
    scratch = Path(tempfile.mkdtemp(prefix="i2e-stream-bench-"))
    notes = []
    if args.standin or (args.model == "default" and not DEFAULT_MODEL.is_file()):
        size = args.standin or 128
        model_path = stand_in(size)
        notes.append(
            f"same-architecture stand-in (MS-ResNet-18, {size}x{size}, random weights)"
            + ("" if args.standin else ": the bundled model is absent")
        )
    else:
        model_path = args.model
    model = Classifier(resolve_runner(str(model_path), backend="onnx", threads=args.threads))
    card = model.card
    label = f"{card.arch} {card.imgsz}x{card.imgsz} ({model.name})"

    infer_ms = inference_only(model, source, min(args.frames, 100))
    rows = {}
    rows["predictions only (JSONL)"] = run(
        model, source, JsonlSink(scratch / "p.jsonl"), args.frames
    )
    rows["annotated video + JSONL"] = run(
        model,
        source,
        MultiSink([VideoSink(scratch / "out.mp4"), JsonlSink(scratch / "q.jsonl")]),
        args.frames,
    )

    rss_model, rss_label = model, label
    if args.rss_imgsz and args.rss_imgsz != card.imgsz:
        rss_model = Classifier(
            resolve_runner(str(stand_in(args.rss_imgsz)), backend="onnx", threads=args.threads)
        )
        rss_label = f"{card.arch} {args.rss_imgsz}x{args.rss_imgsz} stand-in ({rss_model.name})"
        notes.append(f"RSS run at {args.rss_imgsz}x{args.rss_imgsz} to fit the time")
    probe = RssProbe(every=max(1, args.rss_frames // 20))
    rss_stats = run(
        rss_model,
        source,
        MultiSink([probe, VideoSink(scratch / "long.mp4"), JsonlSink(scratch / "long.jsonl")]),
        args.rss_frames,
    )
    # Growth from the first sample (after warm-up allocations) to the last.
    first, last = probe.samples[0][1], probe.samples[-1][1]
    rss = {
        "model": rss_label,
        "frames": rss_stats["frames"],
        "fps": rss_stats["fps"],
        "rss_mb_first": round(first / 2**20, 1),
        "rss_mb_last": round(last / 2**20, 1),
        "rss_mb_max": round(max(s for _, s in probe.samples) / 2**20, 1),
        "growth_pct": round(100 * (last - first) / first, 2),
        "samples": [(n, round(s / 2**20, 1)) for n, s in probe.samples],
    }

    load_end = os.getloadavg()[0]
    print(
        f"\nStream benchmark: {label}, source {Path(source).name}, "
        f"{cpu_name()}, {psutil.cpu_count()} CPUs, "
        f"load average {load_start:.1f} -> {load_end:.1f}\n"
    )
    print(f"Inference alone: {infer_ms:.1f} ms/frame = {1e3 / infer_ms:.1f} FPS\n")
    print(
        "| output | FPS | latency p50 / p99 ms | capture | preprocess | infer | overlay | sink "
        "| overhead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        st = r["stages_ms"]
        print(
            f"| {name} | {r['fps']:.1f} | {r['latency_ms']['p50']:.0f} / "
            f"{r['latency_ms']['p99']:.0f} | {st['capture']:.1f} | {st['preprocess']:.1f} | "
            f"{st['infer']:.1f} | {st['overlay']:.1f} | {st['sink']:.1f} | "
            f"{r['pipeline_overhead_pct']:.1f}% |"
        )
    print(
        f"\nRSS over {rss['frames']} frames ({rss_label}, annotated video + JSONL, "
        f"{rss['fps']:.1f} FPS): {rss['rss_mb_first']} MB -> {rss['rss_mb_last']} MB "
        f"(max {rss['rss_mb_max']} MB), growth {rss['growth_pct']:+.2f}%"
    )
    for note in notes:
        print(f"note: {note}")
    print(
        "Stage columns: mean ms per frame; capture and preprocess run on the capture thread, "
        "in parallel with inference. Overhead: share of wall time not spent inside the "
        "network."
    )

    write_json_atomic(
        args.json,
        {
            "machine": {
                "cpu": cpu_name(),
                "cpus": psutil.cpu_count(),
                "platform": platform.platform(),
                "load_average_start": round(load_start, 2),
                "load_average_end": round(load_end, 2),
            },
            "model": label,
            "source": Path(source).name,
            "notes": notes,
            "inference_only_ms": round(infer_ms, 3),
            "runs": rows,
            "rss": rss,
        },
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
