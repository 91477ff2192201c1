"""ONNX Runtime INT8 vs FP32 on this CPU: speed at batch 1, and agreement / accuracy of the
bundled model on held-out CIFAR-10 images.

Graphs compared (all from the project's own export):

- FP32: ``i2e-deploy export`` as is;
- FP32 + fast LIF: the same graph with the exact, cheaper neuron chains of
  ``calibration.lif`` (bit-identical outputs), to separate what INT8 buys from what the neuron
  rewrite buys (left out when the export already emits that form);
- INT8 U8S8: ``export --int8`` for CPUs (``calibration.quantize``, ONNX Runtime lowering);
- INT8 S8S8: the TensorRT Q/DQ flavour, run here on ONNX Runtime CPU for reference;
- FP16 (accuracy and spike flips only: this CPU has no fast FP16 convolutions).

Speed: MS-ResNet-18 @128 (10 classes, random weights with firing neurons) and the bundled
model at its own size, batch 1, ``--threads`` intra-op threads, interleaved rounds so that
load on this shared box hits all graphs alike (one session alive at a time); medians of the
per-round medians, and the best round. ``int8 before`` is the INT8 graph of revision
``--before`` (default: the last one before the row-layout lowering), built by that
revision's own code from ``git archive`` in a subprocess, so before and after are timed in
the same run. Session settings: the bundled FP32 and INT8 graphs on 1, 2 and 4 threads, with
and without spinning worker threads.
Where the time goes: ONNX Runtime's profiler, kernel time per run grouped into convolutions
/ GEMMs, neuron chains and residual sums, im2col and layout ops, the converter, the rest
(profiling adds a fixed cost per node, so small ops weigh more than in the plain timings),
and per operator type, before and after; the JSON also lists each conv / GEMM kernel.
Accuracy: ``--count`` images of the bundled model's held-out split (named by its card:
``val_split`` images of the training folder with ``seed``), from ``--data`` (the CIFAR-10
training JPEGs in ImageFolder layout, as the model was trained from). ``--int8-exact CKPT``
adds a checkpoint made by ``calibration.qat.finetune_int8`` (weights on the INT8 grid).

    python benchmarks/int8.py --data /tmp/cifar/train [--count 1000] [--threads 2]

Prints a Markdown table and writes JSON + Markdown to benchmarks/results/ (int8.json,
int8.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from i2e_deploy.assets import DEFAULT_MODEL
from i2e_deploy.calibration.flips import spike_agreement
from i2e_deploy.calibration.half import half_graph
from i2e_deploy.calibration.lif import rewrite_lif
from i2e_deploy.calibration.quantize import lower_for_onnxruntime, quantize_qdq
from i2e_deploy.card import ModelCard
from i2e_deploy.compare import judge, limits_for
from i2e_deploy.device import cpu_name
from i2e_deploy.export.onnx import export_onnx
from i2e_deploy.images import load_images, synthetic_images
from i2e_deploy.model.checkpoint import load_checkpoint, save_checkpoint
from i2e_deploy.model.msresnet import build_model
from i2e_deploy.runtime.layer_times import OP_GROUPS, op_group, profile_events
from i2e_deploy.training.data import image_folder, split_indices

RESULTS = Path(__file__).resolve().parent / "results"
SPEED_GRAPHS = ("fp32", "fp32 + fast LIF", "int8 before", "int8 u8s8", "int8 s8s8")
BEFORE = "04f8d6e"  # INT8 lowering with NCHW between GEMMs and a per-row LIF rewrite
REPO = Path(__file__).resolve().parent.parent
_BEFORE_SCRIPT = """
import sys, onnx
from pathlib import Path
from i2e_deploy.calibration.quantize import lower_for_onnxruntime, quantize_qdq
from i2e_deploy.export.onnx import export_onnx
for checkpoint, folder in zip(sys.argv[1::2], sys.argv[2::2]):
    folder = Path(folder)
    fp32 = export_onnx(checkpoint, folder / "fp32.onnx").path
    quantize_qdq(fp32, folder / "u8.onnx", unsigned=True)
    onnx.save(lower_for_onnxruntime(onnx.load(str(folder / "u8.onnx"))), str(folder / "int8.onnx"))
"""


def firing_model(card: ModelCard, seed: int = 0):
    """Random MS-ResNet whose neurons fire: untrained BatchNorm statistics leave it silent."""
    torch.manual_seed(seed)
    model = build_model(card)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.2, 0.2)
                m.weight.uniform_(0.5, 1.0)
                m.bias.uniform_(0.0, 0.5)
    return model.eval()


def build_graphs(model, card: ModelCard, folder: Path, precisions) -> dict[str, Path]:
    """The graphs of one model: FP32 export and the forms derived from it."""
    fp32 = export_onnx(model, card, folder / "fp32.onnx").path
    graphs = {"fp32": fp32}
    if "fp32 + fast LIF" in precisions:
        fast = onnx.load(str(fp32))
        if rewrite_lif(fast):  # else the export already has the fast neuron form
            onnx.save(fast, str(folder / "fp32_lif.onnx"))
            graphs["fp32 + fast LIF"] = folder / "fp32_lif.onnx"
    if "int8 u8s8" in precisions:
        quantize_qdq(fp32, folder / "u8.onnx", unsigned=True)
        onnx.save(
            lower_for_onnxruntime(onnx.load(str(folder / "u8.onnx"))),
            str(folder / "int8_u8s8.onnx"),
        )
        graphs["int8 u8s8"] = folder / "int8_u8s8.onnx"
    if "int8 s8s8" in precisions:
        graphs["int8 s8s8"] = quantize_qdq(fp32, folder / "int8_s8s8.onnx")
    if "fp16" in precisions:
        onnx.save(half_graph(onnx.load(str(fp32))), str(folder / "fp16.onnx"))
        graphs["fp16"] = folder / "fp16.onnx"
    return graphs


def before_graphs(revision: str, checkpoints: dict[str, Path], scratch: Path) -> dict[str, Path]:
    """INT8 graphs of ``checkpoints`` made by the package as it was at ``revision``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "i2e_deploy"], check=True, capture_output=True
    ).stdout
    code = scratch / "before_code"
    code.mkdir()
    with tarfile.open(fileobj=__import__("io").BytesIO(archive)) as tar:
        tar.extractall(code, filter="data")
    args = []
    for label, checkpoint in checkpoints.items():
        (scratch / f"before_{label}").mkdir()
        args += [str(checkpoint), str(scratch / f"before_{label}")]
    env = {**os.environ, "PYTHONPATH": str(code), "I2E_CACHE": str(scratch / "before_cache")}
    subprocess.run(
        [sys.executable, "-c", _BEFORE_SCRIPT, *args],
        check=True,
        env=env,
        cwd=scratch,
        capture_output=True,
    )
    return {label: scratch / f"before_{label}" / "int8.onnx" for label in checkpoints}


def session(path: Path, threads: int, spinning: bool = True):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def speed(
    graphs: dict[str, Path],
    image: np.ndarray,
    threads: int,
    rounds: int,
    iters: int,
    spinning: bool = True,
) -> dict[str, dict[str, float]]:
    """ms per image at batch 1: the median over rounds of each round's median (typical) and
    the fastest round's median (least disturbed by the other jobs on this box). One session
    lives at a time: the spinning worker threads of an idle session would slow the next."""
    per_round: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(rounds):
        for name, path in graphs.items():
            s = session(path, threads, spinning)
            for _ in range(3):
                s.run(None, {"images": image})
            times = []
            for _ in range(iters):
                began = time.perf_counter()
                s.run(None, {"images": image})
                times.append((time.perf_counter() - began) * 1e3)
            per_round[name].append(statistics.median(times))
            del s
    return {name: {"median": statistics.median(v), "best": min(v)} for name, v in per_round.items()}


def time_shares(path: Path, image: np.ndarray, threads: int, runs: int = 30) -> dict:
    """Profiled kernel ms per run, and each op group's share of it (see the module doc)."""
    events = profile_events(Path(path).read_bytes(), {"images": image}, runs, threads=threads)
    totals = dict.fromkeys([*OP_GROUPS, "converter", "other"], 0.0)
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])  # ms per run, nodes
    kernels: dict[str, float] = defaultdict(float)
    for event in events:
        group = "converter" if event["node"].startswith("/i2e/") else op_group(event["op"])
        totals[group] += event["ms"] / runs
        per_op[event["op"]][0] += event["ms"] / runs
        per_op[event["op"]][1] += 1 / runs
        if group == "conv / GEMM":
            kernels[event["node"]] += event["ms"] / runs
    total = sum(totals.values())
    return {
        "kernel_ms": total,
        **{g: 100 * t / total for g, t in totals.items()},
        "ops": {
            op: {"ms": ms, "nodes": round(n)}
            for op, (ms, n) in sorted(per_op.items(), key=lambda item: -item[1][0])
        },
        "kernels": dict(kernels),
    }


def logits(path: Path, images: np.ndarray, threads: int, batch: int = 50) -> np.ndarray:
    s = session(path, threads)
    return np.concatenate(
        [s.run(None, {"images": images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    )


def heldout(card: ModelCard, data: Path, count: int) -> tuple[np.ndarray, np.ndarray, str]:
    """``count`` images of the card's held-out split, spread evenly over it."""
    folder = image_folder(data)
    holdout, seed = card.provenance.get("val_split"), card.provenance.get("seed", 0)
    if not holdout:
        raise SystemExit("the model's card names no held-out split (provenance.val_split)")
    _, held = split_indices(folder.targets, holdout, seed)
    picks = [held[i] for i in np.linspace(0, len(held) - 1, min(count, len(held))).astype(int)]
    paths = [Path(folder.samples[i][0]) for i in picks]
    labels = np.array([folder.samples[i][1] for i in picks])
    source = (
        f"{len(picks)} of the {len(held)} held-out images (val_split={holdout}, "
        f"seed={seed}) of {data}"
    )
    loaded = load_images(paths, card)
    label_of = dict(zip(paths, labels))
    return loaded.images, np.array([label_of[p] for p in loaded.paths]), source


def accuracy_rows(graphs: dict[str, Path], images, labels, threads, reference: str = "fp32"):
    outputs = {name: logits(path, images, threads) for name, path in graphs.items()}
    rows = {}
    for name, out in outputs.items():
        precision = "fp16" if "fp16" in name else "int8" if "int8" in name else "fp32"
        found = judge(outputs[reference], out, limits_for(precision))
        metrics = found.metrics
        rows[name] = {
            "top1": float((out.argmax(1) == labels).mean() * 100),
            "agreement_vs_fp32": metrics["top1_agreement"] * 100,
            "decisive_mismatches": metrics["decisive_mismatches"],
            "median_abs_dlogit": metrics["median_abs"],
            "max_abs_dlogit": metrics["max_abs"],
            "parity": "pass" if found.passed else "fail",
        }
    return rows, outputs


def markdown(report: dict) -> str:
    lines = [
        f"# ONNX Runtime INT8 vs FP32, {report['machine']}",
        "",
        f"ONNX Runtime {report['onnxruntime']}, {report['threads']} intra-op thread(s), "
        f"batch 1, {report['rounds']} interleaved rounds x {report['iters']} runs; "
        f"load average {report['load_average']} at start, {report['load_average_end']} at "
        f"the end; `int8 before` = the INT8 graph of revision {report['before']}; "
        f"{report['seconds']:.0f} s for the whole run.",
        "",
        "| model | graph | ms / image (median) | speedup | ms / image (best round) | speedup |",
        "|---|---|---|---|---|---|",
    ]
    for model, rows in report["speed"].items():
        base = rows["fp32"]
        for name, t in rows.items():
            lines.append(
                f"| {model} | {name} | {t['median']:.2f} | "
                f"{base['median'] / t['median']:.2f}x | {t['best']:.2f} | "
                f"{base['best'] / t['best']:.2f}x |"
            )
    lines += [
        "",
        "Session settings, bundled model (ms / image, median of rounds):",
        "",
        "| graph | threads | spinning | ms / image | best round |",
        "|---|---|---|---|---|",
    ]
    for row in report["settings"]:
        lines.append(
            f"| {row['graph']} | {row['threads']} | {row['spinning']} | "
            f"{row['median']:.2f} | {row['best']:.2f} |"
        )
    groups = [*OP_GROUPS, "converter", "other"]
    lines += [
        "",
        "Where the time goes (ONNX Runtime profiler, % of kernel time per run):",
        "",
        "| model | graph | kernel ms | " + " | ".join(groups) + " |",
        "|---|---|---|" + "---|" * len(groups),
    ]
    for model, rows in report["time_shares"].items():
        for name, row in rows.items():
            lines.append(
                f"| {model} | {name} | {row['kernel_ms']:.2f} | "
                + " | ".join(f"{row[g]:.0f}" for g in groups)
                + " |"
            )
    lines += [
        "",
        "The convolution floor: with every other node free, INT8 would take its conv / "
        "GEMM kernel time; the FP32 graph's whole kernel time over it bounds the speedup "
        "(profiled times):",
        "",
        "| model | FP32 kernel ms | INT8 conv / GEMM ms | "
        "best possible speedup | measured (profiled) |",
        "|---|---|---|---|---|",
    ]
    for model, rows in report["time_shares"].items():
        fp32, int8 = rows["fp32"]["kernel_ms"], rows["int8 u8s8"]
        floor = int8["kernel_ms"] * int8["conv / GEMM"] / 100
        lines.append(
            f"| {model} | {fp32:.2f} | {floor:.2f} | {fp32 / floor:.2f}x | "
            f"{fp32 / int8['kernel_ms']:.2f}x |"
        )
    for model, rows in report["time_shares"].items():
        names = list(rows)
        ops = sorted(
            {op for row in rows.values() for op in row["ops"]},
            key=lambda op: -max(row["ops"].get(op, {"ms": 0})["ms"] for row in rows.values()),
        )
        lines += [
            "",
            f"Per operator, {model} (profiled kernel ms per run, nodes run):",
            "",
            "| operator | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for op in ops:
            cells = [
                f"{rows[n]['ops'][op]['ms']:.3f} ({rows[n]['ops'][op]['nodes']})"
                if op in rows[n]["ops"]
                else ""
                for n in names
            ]
            lines.append(f"| {op} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Held-out accuracy: {report['accuracy_source']}.",
        "",
        "| model | graph | top-1 % | agreement vs its FP32 % | decisive flips | "
        "median abs Δlogit |",
        "|---|---|---|---|---|---|",
    ]
    for model, rows in report["accuracy"].items():
        for name, row in rows.items():
            lines.append(
                f"| {model} | {name} | {row['top1']:.2f} | "
                f"{row['agreement_vs_fp32']:.2f} | {row['decisive_mismatches']} | "
                f"{row['median_abs_dlogit']:.3g} |"
            )
    for model, extra in report.get("cross", {}).items():
        lines.append(f"\n{model}: {extra}")
    lines += [
        "",
        f"Spike agreement per LIF layer vs FP32 (first {report['flip_images']} held-out images):",
        "",
        "| layer | spike rate | " + " | ".join(report["flips"]) + " |",
        "|---|---|" + "---|" * len(report["flips"]),
    ]
    first = next(iter(report["flips"].values()))
    for i, row in enumerate(first):
        cells = [f"{report['flips'][k][i]['agreement'] * 100:.3f}" for k in report["flips"]]
        lines.append(f"| {row['layer']} | {row['rate']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="CIFAR-10 training JPEGs, ImageFolder layout (the held-out split is taken from it)",
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--int8-exact", type=Path, help="checkpoint from finetune_int8")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--flip-images", type=int, default=64)
    parser.add_argument("--before", default=BEFORE, help="git revision of the 'before' graphs")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    began = time.perf_counter()
    model, card = load_checkpoint(args.model)
    report = {
        "machine": f"{cpu_name()} ({torch.get_num_threads()} threads "
        "visible, shared with other jobs)",
        "cpu": cpu_name(),
        "cpus_visible": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "iters": args.iters,
        "model": str(args.model.name),
        "before": args.before,
        "load_average": load_average(),
        "speed": {},
        "settings": [],
        "time_shares": {},
        "accuracy": {},
        "cross": {},
    }
    big_label, bundled_label = "MS-ResNet-18 @128 (random weights)", f"bundled @{card.imgsz}"
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        big_card = ModelCard(imgsz=128, resize=128)
        (scratch / "r18_128").mkdir()
        (scratch / "bundled").mkdir()
        big_model = firing_model(big_card)
        save_checkpoint(scratch / "r18_128.pt", big_model, big_card)
        print("building graphs ...", flush=True)
        before = before_graphs(
            args.before, {"r18_128": scratch / "r18_128.pt", "bundled": args.model}, scratch
        )
        big = build_graphs(big_model, big_card, scratch / "r18_128", SPEED_GRAPHS)
        bundled = build_graphs(model, card, scratch / "bundled", SPEED_GRAPHS + ("fp16",))
        big["int8 before"], bundled["int8 before"] = before["r18_128"], before["bundled"]
        big = {k: big[k] for k in SPEED_GRAPHS if k in big}
        images, labels, source = heldout(card, args.data, args.count)
        report["accuracy_source"] = source

        print("timing ...", flush=True)
        big_image = synthetic_images(1, big_card, seed=1)
        report["speed"][big_label] = speed(big, big_image, args.threads, args.rounds, args.iters)
        report["speed"][bundled_label] = speed(
            {k: bundled[k] for k in SPEED_GRAPHS if k in bundled},
            images[:1],
            args.threads,
            args.rounds,
            args.iters,
        )
        for threads in (1, 2, 4):
            for spinning in (True, False):
                found = speed(
                    {k: bundled[k] for k in ("fp32", "int8 u8s8")},
                    images[:1],
                    threads,
                    3,
                    args.iters,
                    spinning,
                )
                report["settings"] += [
                    {"graph": name, "threads": threads, "spinning": spinning, **t}
                    for name, t in found.items()
                ]

        print("profiling ...", flush=True)
        for label, graphs, image in (
            (big_label, big, big_image),
            (bundled_label, bundled, images[:1]),
        ):
            report["time_shares"][label] = {
                name: time_shares(graphs[name], image, args.threads)
                for name in ("fp32", "int8 before", "int8 u8s8")
            }

        print("accuracy ...", flush=True)
        rows, outputs = accuracy_rows(bundled, images, labels, args.threads)
        report["accuracy"][bundled_label] = rows
        u8, s8, old = outputs["int8 u8s8"], outputs["int8 s8s8"], outputs["int8 before"]
        report["cross"]["bundled: INT8 U8S8 vs S8S8"] = (
            f"top-1 agreement {np.mean(u8.argmax(1) == s8.argmax(1)) * 100:.2f} %, max |Δlogit| "
            f"{np.abs(u8 - s8).max():.3g}"
        )
        report["cross"]["bundled: INT8 U8S8 vs int8 before"] = (
            f"top-1 agreement {np.mean(u8.argmax(1) == old.argmax(1)) * 100:.2f} %, max |Δlogit| "
            f"{np.abs(u8 - old).max():.3g}"
        )
        report["flip_images"] = args.flip_images
        report["flips"] = {
            name: spike_agreement(bundled["fp32"], bundled[name], images[: args.flip_images])
            for name in ("int8 u8s8", "fp16")
        }
        if args.int8_exact:
            exact_model, exact_card = load_checkpoint(args.int8_exact)
            (scratch / "exact").mkdir()
            exact = build_graphs(exact_model, exact_card, scratch / "exact", ("int8 u8s8",))
            exact_rows, exact_out = accuracy_rows(exact, images, labels, args.threads)
            report["accuracy"][f"INT8-exact ({args.int8_exact.name})"] = exact_rows
            original = outputs["fp32"].argmax(1)
            report["cross"][f"INT8-exact ({args.int8_exact.name})"] = (
                "top-1 agreement with the original bundled FP32: FP32 graph "
                f"{np.mean(exact_out['fp32'].argmax(1) == original) * 100:.2f} %, INT8 graph "
                f"{np.mean(exact_out['int8 u8s8'].argmax(1) == original) * 100:.2f} %"
            )
            report["flips"]["INT8-exact int8 vs its fp32"] = spike_agreement(
                exact["fp32"], exact["int8 u8s8"], images[: args.flip_images]
            )
    report["load_average_end"] = load_average()
    report["seconds"] = time.perf_counter() - began
    args.output.mkdir(parents=True, exist_ok=True)
    text = markdown(report)
    (args.output / "int8.md").write_text(text)
    (args.output / "int8.json").write_text(json.dumps(report, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
