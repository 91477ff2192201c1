"""`i2e-deploy train` end to end in fp32 and in bf16 on the same images and seed: the loss
curves side by side (does bf16 lose accuracy?) and the wall time of each command.

    python benchmarks/train_precision.py --data cifar10/train [--per-class 500] [--epochs 3]
                                         [--json benchmarks/results/train_precision.json]

Takes the first ``--per-class`` images of every class folder of ``--data`` (linked into a
temporary ImageFolder), holds out a tenth (``--val-split``, seed 0) and runs the real command,
one precision after the other, at 32 px (ratio 0.23, batch 64, one loader worker). Prints a
Markdown table and writes JSON with every epoch of both logs.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from i2e_deploy.device import cpu_name  # noqa: E402
from i2e_deploy.version import __version__  # noqa: E402

PRECISIONS = ("fp32", "bf16")


def subset(data: Path, per_class: int, into: Path) -> int:
    count = 0
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        (into / folder.name).mkdir(parents=True)
        for image in sorted(folder.iterdir())[:per_class]:
            (into / folder.name / image.name).symlink_to(image.resolve())
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "train_precision.json"
    )
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = subset(args.data, args.per_class, Path(tmp) / "data")
        held = images // 10
        for precision in PRECISIONS:
            out = Path(tmp) / precision
            command = [
                sys.executable,
                "-m",
                "i2e_deploy.cli",
                "train",
                str(Path(tmp) / "data"),
                "--imgsz",
                "32",
                "--ratio",
                "0.23",
                "--epochs",
                str(args.epochs),
                "--batch",
                "64",
                "--val-split",
                str(held),
                "--workers",
                "1",
                "--seed",
                "0",
                "--precision",
                precision,
                "-o",
                str(out),
            ]
            began = time.perf_counter()
            subprocess.run(
                command,
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            with open(out / "log.csv") as fh:
                epochs = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
            runs[precision] = {"wall_s": time.perf_counter() - began, "epochs": epochs}
    print(
        "| epoch | "
        + " | ".join(f"{p} loss | {p} held-out top-1 | {p} s" for p in PRECISIONS)
        + " |"
    )
    print("|---" * (1 + 3 * len(PRECISIONS)) + "|")
    for i in range(args.epochs):
        cells = [
            f"{runs[p]['epochs'][i]['train_loss']:.4f} | {runs[p]['epochs'][i]['val_top1']:.1f}"
            f" % | {runs[p]['epochs'][i]['seconds']:.0f}"
            for p in PRECISIONS
        ]
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    walls = {p: runs[p]["wall_s"] for p in PRECISIONS}
    print(
        "\nwhole command: "
        + ", ".join(f"{p} {s:.0f} s" for p, s in walls.items())
        + f" (fp32 / bf16 {walls['fp32'] / walls['bf16']:.2f}x); {images - held} training "
        f"and {held} held-out images; {cpu_name()}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "benchmark": "train_precision",
                "i2e_deploy": __version__,
                "cpu": cpu_name(),
                "cores": os.cpu_count(),
                "train_images": images - held,
                "heldout_images": held,
                "imgsz": 32,
                "batch": 64,
                "seed": 0,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
