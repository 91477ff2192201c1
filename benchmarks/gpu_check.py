"""The CUDA PyTorch paths against the CPU reference, on real images: same predictions?
how fast? (part of ``benchmarks/gpu_check.sh``; needs a CUDA GPU).

    python benchmarks/gpu_check.py --model default --data cifar10/train [--onnx model.onnx]
                                   [--limit 1000] [--json benchmarks/results/gpu_check.json]

Runs the PyTorch reference on the CPU, the same checkpoint on CUDA (eager, and replayed as
CUDA graphs: the torch runner's default there), and an exported ONNX graph on ONNX Runtime
(CPU) when given; reports top-1 accuracy, the verdict of ``i2e_deploy.compare`` against the
CPU reference (decisive flips, median |Δlogit|; top-1 agreement reported), and latency /
throughput of each runner. Writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from i2e_deploy.compare import judge, limits_for  # noqa: E402
from i2e_deploy.images import load_labelled_folder  # noqa: E402
from i2e_deploy.runtime.runners import load_runner  # noqa: E402


def in_batches(runner, images: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate(
        [runner.infer(images[i : i + batch]) for i in range(0, len(images), batch)]
    )


def timing(runner, images: np.ndarray, batch: int, iters: int) -> dict:
    x = images[:batch]
    for _ in range(3):
        runner.infer(x)
    times = []
    for _ in range(iters):
        began = time.perf_counter()
        runner.infer(x)
        times.append(time.perf_counter() - began)
    p50 = statistics.median(times)
    return {"batch": batch, "p50_ms": 1e3 * p50, "images_per_s": batch / p50}


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """The one comparison (``i2e_deploy.compare``) with the FP32 limits, as JSON fields."""
    found = judge(reference, candidate, limits_for("fp32"))
    metrics = found.metrics
    return {
        "parity": "pass" if found.passed else "fail",
        "top1_agreement": metrics["top1_agreement"],
        "mismatches": metrics["top1_mismatches"],
        "decisive_mismatches": metrics["decisive_mismatches"],
        "median_abs_dlogit": metrics["median_abs"],
        "max_abs_dlogit": metrics["max_abs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py: PyTorch sees no CUDA GPU")

    runners = {
        "torch-cpu": lambda: load_runner(args.model, threads=4),
        "torch-cuda-eager": lambda: load_runner(args.model, device="cuda", graphs=False),
        "torch-cuda-graphs": lambda: load_runner(args.model, device="cuda"),
    }
    if args.onnx:
        runners["onnxruntime-cpu"] = lambda: load_runner(args.onnx, threads=4)
    rows, logits = [], {}
    labels = None
    for name, open_runner in runners.items():
        began = time.perf_counter()
        with open_runner() as runner:
            if labels is None:
                loaded, labels, _ = load_labelled_folder(args.data, runner.card, args.limit)
                images = loaded.images
            logits[name] = in_batches(runner, images, args.batch)
            row = {
                "runner": name,
                "open_and_run_s": time.perf_counter() - began,
                "top1": float((logits[name].argmax(1) == labels).mean()),
                "batch1": timing(runner, images, 1, args.iters),
                f"batch{args.batch}": timing(runner, images, args.batch, args.iters // 5 + 3),
            }
        row.update(compare(logits["torch-cpu"], logits[name]))
        rows.append(row)
        write(args, rows, len(labels))
        print(
            f"{name:22s} top-1 {100 * row['top1']:.2f}%  agreement "
            f"{100 * row['top1_agreement']:.2f}% (decisive flips {row['decisive_mismatches']})"
            f"  median |dlogit| {row['median_abs_dlogit']:.2e}  b1 p50 "
            f"{row['batch1']['p50_ms']:.2f} ms  b{args.batch} "
            f"{row[f'batch{args.batch}']['images_per_s']:.0f} img/s",
            flush=True,
        )
    print(f"wrote {args.json}")


def write(args, rows: list[dict], images: int) -> None:
    """After every runner, so a run cut short keeps what it measured."""
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "benchmark": "gpu_check",
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "model": str(args.model),
                "images": images,
                "limits": dataclasses.asdict(limits_for("fp32")),
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
