"""What the export buys on this CPU: the paper's eager model (SpikingJelly, tests/paper_model.py),
our reference PyTorch model and ONNX Runtime FP32 on the exported graph, in one run.

    python benchmarks/export_speed.py [--json benchmarks/results/export_speed.json] [--quick]

MS-ResNet-18 at 128 px (10 classes, ratio 0.07) and 224 px (1000 classes, ratio 0.12), batch 1
and 8, all three on the same weights (a random model with measured BatchNorm statistics, so
its neurons fire; dense compute does not depend on the weights). PyTorch and ONNX Runtime get
2 threads each. The models run round-robin, one call each per round, and each gets the median
over rounds: a training job shares the cores, so only ratios measured this way mean much.
Peak RSS of ONNX Runtime inference at batch 8 is measured in a fresh process that imports
only onnxruntime and numpy. Prints a Markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from export_models import firing_model  # noqa: E402
from paper_model import paper_msresnet18  # noqa: E402

from i2e_deploy import __version__  # noqa: E402
from i2e_deploy.card import ModelCard  # noqa: E402
from i2e_deploy.device import cpu_name  # noqa: E402
from i2e_deploy.export.onnx import export_onnx  # noqa: E402
from i2e_deploy.images import synthetic_images  # noqa: E402

THREADS = 2
CONFIGS = [  # (imgsz, classes, ratio, batch, rounds)
    (128, 10, 0.07, 1, 40),
    (128, 10, 0.07, 8, 12),
    (224, 1000, 0.12, 1, 16),
    (224, 1000, 0.12, 8, 5),
]

# VmHWM, not getrusage: Linux carries ru_maxrss over fork+exec from this big parent process.
RSS_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.intra_op_num_threads = {threads}
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).integers(0, 256, ({batch}, {size}, {size}, 3), dtype=np.uint8)
for _ in range(3):
    session.run(None, {{"images": x}})
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]) * 1024)
"""


def build(imgsz: int, classes: int, ratio: float, workdir: Path):
    import onnxruntime as ort

    model, card = firing_model("msresnet18", imgsz=imgsz, seed=0)
    card.num_classes, card.ratio = classes, ratio
    if classes != 10:  # a 1000-class head on the same trunk
        model.fc = torch.nn.Linear(512, classes)
    model.i2e.ratio = ratio
    model.eval()
    paper = paper_msresnet18(classes, ratio).eval()
    paper.load_state_dict(model.state_dict())
    onnx_path = workdir / f"msresnet18_{imgsz}.onnx"
    export_onnx(model, card, onnx_path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return model, paper, session, onnx_path


def time_round_robin(fns: dict, rounds: int) -> tuple[dict[str, float], dict[str, float]]:
    """(median, min) seconds per call of each function, calls interleaved round by round."""
    for fn in fns.values():  # warm-up
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return (
        {name: statistics.median(v) for name, v in times.items()},
        {name: min(v) for name, v in times.items()},
    )


def peak_rss(onnx_path: Path, batch: int, size: int) -> int:
    script = RSS_SCRIPT.format(threads=THREADS, batch=batch, size=size)
    out = subprocess.run(
        [sys.executable, "-c", script, str(onnx_path)], check=True, capture_output=True, text=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "export_speed.json"
    )
    parser.add_argument("--quick", action="store_true", help="128 px only, fewer rounds")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    configs = (
        [c[:4] + (max(2, c[4] // 4),) for c in CONFIGS if c[0] == 128] if args.quick else CONFIGS
    )
    rows, rss = [], {}
    started, load_before = time.time(), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        built = {}
        for imgsz, classes, ratio, batch, rounds in configs:
            if imgsz not in built:
                built[imgsz] = build(imgsz, classes, ratio, Path(tmp))
            model, paper, session, onnx_path = built[imgsz]
            images = synthetic_images(batch, ModelCard(imgsz=imgsz, resize=imgsz), seed=batch)
            as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
            as_uint8 = torch.from_numpy(images)
            seconds, fastest = time_round_robin(
                {
                    "paper": lambda: paper(as_float),  # noqa: B023 (run in this iteration)
                    "reference": lambda: model(as_uint8),  # noqa: B023
                    "ort": lambda: session.run(None, {"images": images}),  # noqa: B023
                },
                rounds,
            )
            per_image = {k: v * 1000 / batch for k, v in seconds.items()}
            best = {k: v * 1000 / batch for k, v in fastest.items()}
            rows.append(
                {
                    "model": "MS-ResNet-18",
                    "imgsz": imgsz,
                    "classes": classes,
                    "batch": batch,
                    "rounds": rounds,
                    "ms_per_image": per_image,
                    "min_ms_per_image": best,
                    "ort_vs_paper": per_image["paper"] / per_image["ort"],
                    "ort_vs_reference": per_image["reference"] / per_image["ort"],
                    "reference_vs_paper": per_image["paper"] / per_image["reference"],
                }
            )
            print(
                f"{imgsz} px batch {batch}: "
                + ", ".join(f"{k} {v:.1f} ms/img" for k, v in per_image.items()),
                flush=True,
            )
        for imgsz, (_, _, _, onnx_path) in built.items():
            rss[imgsz] = peak_rss(onnx_path, 8, imgsz)
    result = {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": THREADS,
            "load_before": load_before,
            "load_after": os.getloadavg(),
        },
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "i2e_deploy": __version__,
            "python": platform.python_version(),
        },
        "seconds": round(time.time() - started, 1),
        "rows": rows,
        "ort_peak_rss_batch8_bytes": {str(k): v for k, v in rss.items()},
    }
    print()
    print(
        "| model | px | classes | batch | paper eager ms/img | reference ms/img | ORT FP32 ms/img "
        "| ORT vs paper | ORT vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ms = r["ms_per_image"]
        print(
            f"| {r['model']} | {r['imgsz']} | {r['classes']} | {r['batch']} | {ms['paper']:.1f} "
            f"| {ms['reference']:.1f} | {ms['ort']:.1f} | {r['ort_vs_paper']:.2f}x "
            f"| {r['ort_vs_reference']:.2f}x |"
        )
    for imgsz, value in rss.items():
        print(
            f"\nORT FP32 peak RSS at batch 8, {imgsz} px: {value / 2**20:.0f} MiB "
            "(fresh process: onnxruntime + numpy + the session)"
        )
    print(
        f"\nload average before/after: {load_before[0]:.1f} / {os.getloadavg()[0]:.1f} "
        f"(2 cores, shared)"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
