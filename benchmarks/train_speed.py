"""Training speed: images/s of one optimizer step (MS-ResNet-18, the training code's own
``train_step``), fp32 against the new default precision, side by side in one run.

    python benchmarks/train_speed.py [--device cpu|cuda] [--imgsz 32] [--batch 64]
                                     [--rounds 6] [--steps 3] [--profile] [--json PATH]

Rows: fp32 as training ran before this release (a step-by-step LIF, the autograd graph of one
Python step per timestep, and every 3x3 conv over its whole kernel: the "before" row), fp32
with the fused LIF and the training convs that skip padding-only taps, and every
reduced precision the device runs natively (bf16; fp16 too on a GPU). Rows take turns
(``--steps`` steps each per round, ``--rounds`` rounds), so load on a shared machine falls on
all alike; each row reports the median and best round. Prints a Markdown table and writes JSON
(default ``benchmarks/results/train_speed[_cuda].json``); ``--profile`` adds, on a CPU, where a
step's time goes per op group (PyTorch profiler).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from step_lif import step_by_step  # noqa: E402

from i2e_deploy import __version__  # noqa: E402
from i2e_deploy.device import cpu_has_native_bf16, cpu_name  # noqa: E402
from i2e_deploy.model import msresnet, neuron  # noqa: E402
from i2e_deploy.model.msresnet import msresnet18  # noqa: E402
from i2e_deploy.training.precision import resolve_precision  # noqa: E402
from i2e_deploy.training.train import TrainForward, train_step  # noqa: E402


def _step_by_step_forward(self, x):
    """The LIF as training ran it before the fused neuron: autograd through every step."""
    if (self.tau, self.v_threshold) != (2.0, 1.0):
        raise ValueError("the step-by-step reference has the SPEC's tau 2 and threshold 1")
    seq = x if self.T is None else x.unflatten(0, (self.T, -1))
    out = step_by_step(seq)
    return out if self.T is None else out.flatten(0, 1)


@contextmanager
def previous_training_path(enabled: bool):
    """The step-by-step LIF and whole-kernel convs, while ``enabled``."""
    fused, cropping = neuron.LIF.forward, msresnet.Conv2d._conv_forward
    if enabled:
        neuron.LIF.forward = _step_by_step_forward  # type: ignore[method-assign]
        msresnet.Conv2d._conv_forward = nn.Conv2d._conv_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        neuron.LIF.forward = fused  # type: ignore[method-assign]
        msresnet.Conv2d._conv_forward = cropping  # type: ignore[method-assign]


class Row:
    def __init__(
        self,
        label: str,
        precision: str,
        previous: bool,
        device: torch.device,
        imgsz: int,
        batch: int,
    ):
        torch.manual_seed(0)
        self.label, self.previous = label, previous
        self.precision = resolve_precision(precision, device)
        model = msresnet18(10, 0.23).to(device, memory_format=torch.channels_last)
        self.net = TrainForward(model).train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.scaled)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.inputs = torch.rand(batch, 3, imgsz, imgsz, device=device)
        self.targets = torch.randint(0, 10, (batch,), device=device)
        self.device, self.batch, self.rounds = device, batch, []

    def run(self, steps: int) -> float:
        with previous_training_path(self.previous):
            began = time.perf_counter()
            for _ in range(steps):
                loss, _ = train_step(
                    self.net,
                    self.inputs,
                    self.targets,
                    self.criterion,
                    self.optimizer,
                    self.scaler,
                    self.precision,
                )
            loss.item()  # waits for the GPU
            return time.perf_counter() - began


GROUPS = (
    ("conv backward", ("convolution_backward",)),
    ("conv forward", ("mkldnn_convolution", "cudnn_convolution", "_convolution")),
    ("BatchNorm", ("batch_norm",)),
    ("copies and casts", ("aten::copy_", "aten::_to_copy")),
)


def where_time_goes(row: Row, steps: int = 2) -> dict[str, float]:
    """PyTorch profiler: ms per step by op group (self time; elementwise ops, the LIF's
    among them, are 'other'), and the fused LIF's forward + backward inclusive of its ops."""
    from torch.profiler import profile

    with profile() as prof:
        row.run(steps)
    shares = {name: 0.0 for name, _ in GROUPS} | {"other": 0.0, "LIF, inclusive": 0.0}
    for event in prof.key_averages():
        group = next((name for name, keys in GROUPS if any(k in event.key for k in keys)), "other")
        shares[group] += event.self_cpu_time_total / 1e3 / steps
        if event.key in ("MultiStepLIF", "MultiStepLIFBackward"):
            shares["LIF, inclusive"] += event.cpu_time_total / 1e3 / steps
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--imgsz", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--profile", action="store_true", help="also record where a step's time goes, per op group"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    reduced = (
        ["bf16", "fp16"] if device.type == "cuda" else (["bf16"] if cpu_has_native_bf16() else [])
    )
    shape = (device, args.imgsz, args.batch)
    rows = [
        Row("fp32, before (step-by-step LIF, whole kernels)", "fp32", True, *shape),
        Row("fp32", "fp32", False, *shape),
    ]
    rows += [Row(p, p, False, *shape) for p in reduced]
    for row in rows:  # warm-up: allocator, oneDNN / cuDNN kernel selection
        row.run(2)
    for _ in range(args.rounds):
        for row in rows:
            row.rounds.append(args.batch * args.steps / row.run(args.steps))
    base = statistics.median(rows[0].rounds)
    fp32 = statistics.median(rows[1].rounds)
    results = []
    print(
        f"| training step ({args.imgsz} px, batch {args.batch}) | median img/s | best img/s "
        f"| vs before | vs fp32 |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        median = statistics.median(row.rounds)
        results.append(
            {
                "row": row.label,
                "precision": row.precision.name,
                "previous_training_path": row.previous,
                "median_images_per_s": median,
                "best_images_per_s": max(row.rounds),
                "rounds": row.rounds,
                "speedup_vs_before": median / base,
                "speedup_vs_fp32": median / fp32,
            }
        )
        print(
            f"| {row.label} | {median:.1f} | {max(row.rounds):.1f} | {median / base:.2f}x "
            f"| {median / fp32:.2f}x |"
        )
    if args.profile and device.type == "cpu":
        print("\nms per step (PyTorch profiler, self time):\n")
        print("| row | " + " | ".join(name for name, _ in GROUPS) + " | other | LIF, inclusive |")
        print("|---" * (len(GROUPS) + 3) + "|")
        for row, result in zip(rows, results):
            result["ms_per_step_by_group"] = shares = where_time_goes(row)
            print(f"| {row.label} | " + " | ".join(f"{v:.0f}" for v in shares.values()) + " |")
    machine = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{cpu_name()}, {args.threads} threads"
    )
    print(f"\n{machine}; torch {torch.__version__}")
    out = args.json or REPO / "benchmarks" / "results" / (
        "train_speed.json" if device.type == "cpu" else f"train_speed_{device.type}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "train_speed",
                "i2e_deploy": __version__,
                "torch": torch.__version__,
                "device": machine,
                "cpu_native_bf16": cpu_has_native_bf16(),
                "imgsz": args.imgsz,
                "batch": args.batch,
                "rounds": args.rounds,
                "steps_per_round": args.steps,
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "rows": results,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
