"""Does ``stream`` pick the fast runner by itself? A released-format checkpoint of
MS-ResNet-18 at 128x128 (the paper's CIFAR-10 setting) streams the street clip through the
real command, ``i2e-deploy stream CKPT --source bikes.mp4 --output none``, once with the
default ``--backend auto`` and once with ``--backend torch``, in interleaved rounds (the order
alternates) so that the shared machine's load falls on both alike.

    python benchmarks/stream_auto.py [--rounds 3] [--frames 120]

The checkpoint holds the bundled model's trained weights in the paper's release format
(``{"epoch", "state_dict" with "module." names, "best_acc1"}``), so the card is inferred as
for a released file (10 classes: 128 px, ratio 0.07). The export into the cache happens once,
before the timed runs. Prints a Markdown table; writes JSON (default
benchmarks/results/stream_auto.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import psutil
import torch

from i2e_deploy.apps.stream import write_json_atomic
from i2e_deploy.assets import DEFAULT_MODEL
from i2e_deploy.cache import cache_dir
from i2e_deploy.device import cpu_name
from i2e_deploy.model.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BIKES = REPO.parent / "shared" / "data" / "video" / "bikes.mp4"


def released_checkpoint() -> Path:
    """The bundled weights in the paper's release format, made once into the cache."""
    path = cache_dir() / "benchmarks" / "cifar10_msresnet18_released.pth.tar"
    if not path.is_file():
        model, _ = load_checkpoint(DEFAULT_MODEL)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save({"epoch": 42, "state_dict": state, "best_acc1": torch.tensor(81.62)}, path)
    return path


def stream(checkpoint: Path, backend: str | None, frames: int, stats: Path) -> dict:
    """One run of the real command in its own process; its first line and stats."""
    command = [
        "i2e-deploy",
        "stream",
        str(checkpoint),
        "--source",
        str(BIKES),
        "--output",
        "none",
        "--max-frames",
        str(frames),
        "--json",
        str(stats),
    ]
    if backend:
        command += ["--backend", backend]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return {"first_line": done.stdout.splitlines()[0], **json.loads(stats.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=120)
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "stream_auto.json"))
    args = parser.parse_args()
    if not BIKES.is_file():
        sys.exit(f"{BIKES} not found (the shared data)")
    checkpoint = released_checkpoint()
    runs: dict[str, list[dict]] = {"auto": [], "torch": []}
    with tempfile.TemporaryDirectory() as scratch:
        stats = Path(scratch) / "stats.json"
        warm = stream(checkpoint, None, 1, stats)  # the one export into the cache
        print(f"warm-up: {warm['first_line']}")
        for turn in range(args.rounds):
            order = ("auto", "torch") if turn % 2 == 0 else ("torch", "auto")
            for name in order:
                result = stream(checkpoint, None if name == "auto" else name, args.frames, stats)
                runs[name].append(result)
                print(
                    f"round {turn + 1} {name}: {result['fps']:.2f} FPS "
                    f"({result['backend']}; {result['first_line']})"
                )
    fps = {name: [r["fps"] for r in results] for name, results in runs.items()}
    median = {name: float(np.median(values)) for name, values in fps.items()}
    ratios = [a / t for a, t in zip(fps["auto"], fps["torch"])]
    print(
        f"\nMS-ResNet-18 128x128 (released format), bikes.mp4, {args.frames} frames, "
        f"{cpu_name()}, {psutil.cpu_count()} CPUs; {args.rounds} interleaved rounds\n"
    )
    print("| command | runner picked | FPS per round | median FPS |")
    print("|---|---|---|---|")
    for name in runs:
        flag = "" if name == "auto" else " --backend torch"
        print(
            f"| stream{flag} | {runs[name][0]['backend']} | "
            f"{', '.join(f'{v:.2f}' for v in fps[name])} | {median[name]:.2f} |"
        )
    print(
        f"\nauto / torch: {median['auto'] / median['torch']:.2f}x (median FPS); per round "
        f"{', '.join(f'{r:.2f}x' for r in ratios)}"
    )
    write_json_atomic(
        args.json,
        {
            "machine": {
                "cpu": cpu_name(),
                "cpus": psutil.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "load_avg": os.getloadavg(),
            },
            "model": "MS-ResNet-18, 10 classes, 128x128, ratio 0.07 (released format, bundled "
            "weights)",
            "source": BIKES.name,
            "frames": args.frames,
            "rounds": args.rounds,
            "auto_first_line": runs["auto"][0]["first_line"],
            "fps": fps,
            "median_fps": median,
            "speedup_median": median["auto"] / median["torch"],
            "speedup_per_round": ratios,
            "runs": runs,
        },
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
