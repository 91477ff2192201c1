"""Image-to-event conversion speed on this machine, on real CIFAR-10 images at 128x128:

(a) our converter kernel (``convert_uint8``) from uint8 NHWC batches to bool events, on one
    thread and on all of torch's threads, plus ``convert`` (float events, what the model eats);
(b) the paper's converter (``tests/paper_model.py paper_convert``: max, replicate pad, conv,
    threshold) on the same images as float NCHW, the input it takes;
(c) ``i2e-deploy convert`` end to end: JPEG decode + resize in worker processes, conversion,
    compression and atomic writes, for both dataset layouts.

    python benchmarks/convert_speed.py [--images 1024] [--batch 256] [--repeats 5]

All rows come from one run (the box is shared, so compare rows with each other rather than
with other runs). Prints a Markdown table and writes JSON
(default benchmarks/results/convert_speed.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from i2e_deploy.card import ModelCard
from i2e_deploy.device import cpu_name
from i2e_deploy.images import load_image_folder
from i2e_deploy.model.converter import convert, convert_uint8
from i2e_deploy.training.convert import convert_folder

REPO = Path(__file__).resolve().parents[1]
CIFAR_TAR = REPO.parent / "shared" / "data" / "cifar10-train.tar.gz"
sys.path.insert(0, str(REPO / "tests"))
from paper_model import paper_convert  # noqa: E402  (the independent reference)

SIZE, RATIO = 128, 0.07


def extract(count: int, root: Path) -> Path:
    """The first ``count`` JPEGs of the CIFAR-10 tarball, ImageFolder layout."""
    folder = root / "cifar"
    taken = 0
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 3 and member.name.endswith(".jpg"):
                target = folder / parts[1] / parts[2]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                taken += 1
                if taken == count:
                    break
    return folder


def rates(run, batches: list, repeats: int) -> dict[str, float]:
    """Images per second over ``repeats`` passes of ``batches``: median and best pass by the
    wall clock, and the median per CPU-second this process used (all its threads), which
    other jobs on a shared box disturb far less."""
    run(batches[0])  # warm-up (lookup tables, allocator)
    wall, cpu = [], []
    count = sum(len(b) for b in batches)
    for _ in range(repeats):
        began, began_cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            run(batch)
        wall.append(count / (time.perf_counter() - began))
        cpu.append(count / (time.process_time() - began_cpu))
    return {
        "median": statistics.median(wall),
        "best": max(wall),
        "per_cpu_second": statistics.median(cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--paper-images", type=int, default=256, help="images for the (slow) paper converter"
    )
    parser.add_argument(
        "--output", type=Path, default=REPO / "benchmarks" / "results" / "convert_speed.json"
    )
    args = parser.parse_args()
    if not CIFAR_TAR.is_file():
        sys.exit(f"needs {CIFAR_TAR}")
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="i2e-convert-bench-"))
    try:
        folder = extract(args.images, work)
        card = ModelCard(imgsz=SIZE, resize=SIZE)
        images = load_image_folder(folder, card).images
        uint8_batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
        buffers = {len(b): np.empty((len(b), 8, 2, SIZE, SIZE), np.bool_) for b in uint8_batches}
        paper_batches = [
            torch.from_numpy(b).permute(0, 3, 1, 2).float().div(255) for b in uint8_batches
        ]
        paper_batches = [b[: args.paper_images] for b in paper_batches[:1]]

        rows = []

        def row(name: str, what: str, measured: dict[str, float], **extra) -> None:
            rows.append({"name": name, "what": what, **measured, **extra})

        for count in (1, threads):
            row(
                f"ours: convert_uint8, {count} thread{'s' * (count > 1)}",
                "uint8 NHWC -> bool events [B, 8, 2, H, W]",
                rates(
                    lambda b, c=count: convert_uint8(
                        b, RATIO, time_major=False, threads=c, out=buffers[len(b)]
                    ),
                    uint8_batches,
                    args.repeats,
                ),
                threads=count,
            )
        tensors = [torch.from_numpy(b) for b in uint8_batches]
        row(
            "ours: convert (model input)",
            "uint8 NHWC -> float events [8, B, 2, H, W]",
            rates(lambda b: convert(b, RATIO), tensors, args.repeats),
            threads=threads,
        )
        row(
            "paper: paper_convert",
            "float NCHW -> float events [8, B, 2, H, W]",
            rates(lambda b: paper_convert(b, RATIO), paper_batches, max(2, args.repeats // 2)),
            threads=threads,
        )
        for fmt in ("packed", "npz"):
            out = work / f"events_{fmt}"
            began = time.perf_counter()
            stats = convert_folder(
                folder, out, fmt, ratio=RATIO, imgsz=SIZE, batch=args.batch, workers=2
            )
            seconds = time.perf_counter() - began
            size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            rate = stats.written / seconds
            row(
                f"end to end: i2e-deploy convert --format {fmt}",
                "JPEG decode + resize (2 workers), convert, write",
                {"median": rate, "best": rate, "per_cpu_second": None},
                bytes_per_sample=size / stats.written,
            )
            shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    paper = next(r for r in rows if r["name"].startswith("paper"))["median"]
    print(
        f"\nI2E conversion, {len(images)} real CIFAR-10 images at {SIZE}x{SIZE}, ratio {RATIO}; "
        f"{cpu_name()}, {os.cpu_count()} cores, torch threads "
        f"{threads}, load average before {load_before[0]:.1f}\n"
    )
    paper_cpu = next(r for r in rows if r["name"].startswith("paper"))["per_cpu_second"]
    print(
        "| path | input -> output | images/s (median) | best | vs paper | "
        "images per CPU-second | vs paper |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cpu = r["per_cpu_second"]
        cpu_cells = f"{cpu:,.0f} | {cpu / paper_cpu:.1f}x" if cpu else "- | -"
        print(
            f"| {r['name']} | {r['what']} | {r['median']:,.0f} | {r['best']:,.0f} | "
            f"{r['median'] / paper:.1f}x | {cpu_cells} |"
        )
    result = {
        "images": len(images),
        "size": SIZE,
        "ratio": RATIO,
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "load_average_before": load_before[0],
        "machine": platform.machine(),
        "cpu": cpu_name(),
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.output)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
