"""``i2e-deploy benchmark MODEL``: every backend x precision this machine has, in one table.

Each row runs in its own worker process (a fresh interpreter), so one backend's threads,
caches and allocations cannot colour another's numbers. The workers stay loaded and take
turns, one at a time: latency is timed in interleaved rounds, so that a shared machine's slow
spells fall on every row alike and ratios between rows hold. What is measured:

- latency: wall time of ``runner.infer`` at batch 1 (p50 / p99 over ``iters`` calls after
  ``warmup`` calls, in up to ``ROUNDS`` rounds); inputs already preprocessed, so this is the
  model alone;
- throughput: images/s of ``runner.infer`` at ``batch``;
- memory: the worker's peak RSS (``VmHWM``), and that peak minus the RSS after the worker
  imported its libraries (PyTorch where installed, ONNX, ONNX Runtime) and read the inputs:
  the delta is what loading and running the model added;
- accuracy: top-1 on the labelled folder (``--data``, ImageFolder layout);
- parity: each row's outputs against the PyTorch reference's on the same inputs, judged by
  :func:`i2e_deploy.compare.judge` with the limits of the row's precision (decisive top-1
  changes, median |Δlogit| relative to the logit spread); top-1 agreement and max |Δlogit|
  are reported.

A row that cannot run here says why (``TensorRT not installed``) instead of vanishing.
Exports go to a cache folder keyed by the checkpoint's sha256 and the export options.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts import PRECISIONS, kind_of, read_card, read_precision
from ..cache import cache_dir
from ..card import ModelCard
from ..compare import judge, limits_for
from ..device import cpu_name
from ..errors import I2EError
from ..version import __version__

SYNTHETIC_COUNT = 32
ROUNDS = 10
TURN_PAUSE_S = 0.05  # lets the previous worker's spinning pool threads go to sleep


@dataclass
class Row:
    backend: str
    precision: str
    model: str | None = None  # file the worker runs; None when the row cannot run
    reason: str | None = None  # why the row did not run
    device: str = "cpu"
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    throughput_ips: float | None = None
    peak_rss_mb: float | None = None
    model_rss_mb: float | None = None
    accuracy: float | None = None
    # Against the PyTorch reference (i2e_deploy.compare, this row's precision's limits):
    parity: str | None = None  # 'pass', 'fail', or 'reference' for the reference itself
    decisive_mismatches: int | None = None
    median_rel: float | None = None
    top1_agreement: float | None = None  # reported, not judged
    max_abs_logit: float | None = None


@dataclass
class BenchmarkReport:
    model: str
    card: dict[str, Any]
    settings: dict[str, Any]
    environment: dict[str, Any]
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_precisions(precisions: tuple[str, ...]) -> None:
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise I2EError(
            f"unknown precision {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(PRECISIONS)}"
        )


# The exported rows of a checkpoint: ONNX Runtime runs FP32 and SNN-aware INT8 fast on a CPU
# (its FP16 kernels are GPU ones); TensorRT runs every precision.
ORT_PRECISIONS = ("fp32", "int8")


def plan_rows(
    model: Path, cache: Path, device: str, precisions: tuple[str, ...] = PRECISIONS
) -> list[Row]:
    """The rows for a model file: what runs, what must be exported first (through
    :func:`i2e_deploy.targets.cached_artifact`), what cannot run. ``precisions`` filters the
    exported rows; the PyTorch reference always runs."""
    from ..export.tensorrt import tensorrt_unavailable

    _check_precisions(precisions)
    kind = kind_of(model)
    if kind == "engine":
        return [Row("TensorRT", read_precision(model), str(model), device="cuda")]
    if kind == "onnx":
        why = "give the checkpoint to benchmark the reference and build engines"
        return [
            Row("PyTorch (reference)", "fp32", reason=why),
            Row("ONNX Runtime", read_precision(model), str(model), device=device),
            *(Row("TensorRT", precision, reason=why) for precision in precisions),
        ]
    rows = [Row("PyTorch (reference)", "fp32", str(model), device=device)]
    for precision in (p for p in ORT_PRECISIONS if p in precisions):
        rows.append(_exported_row("ONNX Runtime", "onnx", model, precision, device, cache))
    unavailable = tensorrt_unavailable()
    for precision in precisions:
        rows.append(
            Row("TensorRT", precision, reason=unavailable)
            if unavailable
            else _exported_row("TensorRT", "engine", model, precision, "cuda", cache)
        )
    return rows


def _exported_row(
    backend: str, fmt: str, checkpoint: Path, precision: str, device: str, cache: Path
) -> Row:
    """Export (or reuse) the artifact of a row, unverified (the benchmark measures parity
    itself), or say why it failed: one backend failing must not take the table down."""
    from ..targets import ExportRequest, cached_artifact

    try:
        request = ExportRequest(
            str(checkpoint), format=fmt, precision=precision, device=device, verify=False
        )
        path = cached_artifact(request, cache=cache)
    except Exception as exc:
        verb = "build" if fmt == "engine" else "export"
        return Row(backend, precision, reason=f"{verb} failed: {_describe(exc)}")
    return Row(backend, precision, str(path), device=device)


def _describe(exc: Exception) -> str:
    """One line: the message of a user-facing error, type and message of anything else."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, I2EError) else f"{type(exc).__name__}: {text}"


def _load_inputs(
    card: ModelCard, data: str | None, limit: int
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(inputs, labels or None, description)."""
    if card.input == "events":
        if data is not None:
            raise I2EError(
                "event-input models take events; accuracy on an image folder does "
                "not apply (drop --data)"
            )
        rng = np.random.default_rng(0)
        shape = (SYNTHETIC_COUNT, card.T, 2, card.imgsz, card.imgsz)
        return (rng.random(shape) < 0.1).astype(np.float32), None, {"source": "random events"}
    if data is not None:
        from ..images import load_labelled_folder

        loaded, labels, _ = load_labelled_folder(data, card, limit)
        return (
            loaded.images,
            labels,
            {"source": str(data), "count": len(labels), "skipped": len(loaded.skipped)},
        )
    from ..images import synthetic_images

    return (
        synthetic_images(SYNTHETIC_COUNT, card),
        None,
        {"source": "structured random images", "count": SYNTHETIC_COUNT},
    )


def run_benchmark(
    model: str,
    *,
    data: str | None = None,
    limit: int = 500,
    iters: int = 50,
    warmup: int = 5,
    batch: int = 8,
    device: str = "cpu",
    threads: int | None = None,
    cache: str | None = None,
    precisions: tuple[str, ...] = PRECISIONS,
    log: Callable[[str], None] = lambda msg: None,
) -> BenchmarkReport:
    """Benchmark every backend x precision available for ``model`` (see the module doc)."""
    from ..assets import resolve_model

    for name, value, least in (
        ("--iters", iters, 1),
        ("--warmup", warmup, 0),
        ("--batch", batch, 1),
        ("--limit", limit, 1),
    ):
        if value < least:
            raise I2EError(f"{name} must be at least {least}, got {value}")
    _check_precisions(tuple(precisions))
    path = resolve_model(model)
    if not path.is_file():
        raise I2EError(f"model file not found: {path}")
    card = read_card(path)
    inputs, labels, input_info = _load_inputs(card, data, limit)
    log(auto_line(path, card, device))
    folder = Path(cache).expanduser() if cache else cache_dir()
    log(f"exporting into {folder} (cached by checkpoint sha256 + options)")
    rows = plan_rows(path, folder, device, tuple(precisions))
    settings = {
        "iters": iters,
        "rounds": min(iters, ROUNDS),
        "warmup": warmup,
        "batch": batch,
        "device": device,
        "threads": threads,
        "inputs": input_info,
    }
    with tempfile.TemporaryDirectory(prefix="i2e-bench-") as tmp:
        inputs_file = Path(tmp) / "inputs.npy"
        np.save(inputs_file, inputs)
        _measure(
            [row for row in rows if row.model is not None],
            Path(tmp),
            inputs_file,
            labels,
            {"threads": threads, "warmup": warmup, "batch": batch, "iters": iters},
            log,
        )
    return BenchmarkReport(
        model=str(path),
        card=card.to_dict(),
        settings=settings,
        environment=environment(),
        rows=rows,
    )


def auto_line(path: Path, card: ModelCard, device: str) -> str:
    """What ``--backend auto`` runs this model on here, and why (the table has every row)."""
    from ..targets import choose_runner

    if kind_of(path) != "checkpoint":
        return f"auto runner: {path.name} on its own backend; every row below"
    choice = choose_runner(card, "auto", "auto", device)
    return (
        f"auto runner (stream, demo, val): {choice.backend} {choice.precision} "
        f"({choice.why}); every row below"
    )


def _measure(
    rows: list[Row],
    tmp: Path,
    inputs_file: Path,
    labels: np.ndarray | None,
    options: dict[str, Any],
    log: Callable[[str], None],
) -> None:
    workers: list[_Worker] = []
    try:
        for row in rows:
            log(f"loading {row.backend} {row.precision} ...")
            workers.append(
                _Worker(
                    {
                        "model": row.model,
                        "device": row.device,
                        "inputs": str(inputs_file),
                        **options,
                    },
                    tmp,
                )
            )
        iters = options["iters"]
        rounds = min(iters, ROUNDS)
        log(f"timing batch 1: {iters} calls per row in {rounds} interleaved rounds ...")
        latencies: list[list[float]] = [[] for _ in rows]
        for turn in range(rounds):
            calls = iters // rounds + (turn < iters % rounds)
            for times, worker in zip(latencies, workers):
                time.sleep(TURN_PAUSE_S)
                times += worker.ask({"cmd": "latency", "calls": calls}).get("latencies", [])
        reference: np.ndarray | None = None
        for index, (row, worker, times) in enumerate(zip(rows, workers, latencies)):
            log(f"throughput and outputs: {row.backend} {row.precision} ...")
            outputs_file = tmp / f"outputs{index}.npy"
            result = worker.ask({"cmd": "finish", "outputs": str(outputs_file)})
            if "error" in result:
                row.reason = result["error"]
                continue
            row.latency_p50_ms = float(np.percentile(times, 50) * 1e3)
            row.latency_p99_ms = float(np.percentile(times, 99) * 1e3)
            for key in ("throughput_ips", "peak_rss_mb", "model_rss_mb"):
                setattr(row, key, result[key])
            logits = np.load(outputs_file)
            if labels is not None:
                row.accuracy = float((logits.argmax(1) == labels).mean())
            if row.backend.startswith("PyTorch"):
                reference, row.parity = logits, "reference"
            elif reference is not None:
                found = judge(reference, logits, limits_for(row.precision))
                row.parity = "pass" if found.passed else "fail"
                row.decisive_mismatches = found.metrics["decisive_mismatches"]
                row.median_rel = found.metrics["median_rel"]
                row.top1_agreement = found.metrics["top1_agreement"]
                row.max_abs_logit = found.metrics["max_abs"]
    finally:
        for worker in workers:
            worker.close()


class _Worker:
    """One row's model loaded in its own process, answering one JSON line per command."""

    def __init__(self, spec: dict[str, Any], tmp: Path):
        self._stderr = tempfile.TemporaryFile(mode="w+", dir=tmp)  # a pipe could fill and block
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "i2e_deploy.apps.benchmark"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        requests, answers = self._proc.stdin, self._proc.stdout
        assert requests is not None and answers is not None  # both opened as pipes above
        self._requests, self._answers = requests, answers
        self.error: str | None = None
        self.ask(spec)

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.error:
            return {"error": self.error}
        try:
            self._requests.write(json.dumps(message) + "\n")
            self._requests.flush()
            for line in self._answers:
                if line.startswith("{"):
                    answer = json.loads(line)
                    self.error = answer.get("error")
                    return answer
        except OSError:
            pass
        self._proc.wait()
        self._stderr.seek(0)
        tail = (self._stderr.read().strip().splitlines() or [f"exit code {self._proc.returncode}"])[
            -1
        ]
        self.error = f"worker failed: {tail}"
        return {"error": self.error}

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.close()


class _Session:
    """The worker's side: the loaded runner and what it measures (see the module doc)."""

    def __init__(self, spec: dict[str, Any]):
        import onnx  # noqa: F401  # imported before the baseline: libraries are not the model
        import onnxruntime  # noqa: F401
        import psutil

        try:
            import torch  # noqa: F401
        except ImportError:  # an install without PyTorch runs ONNX rows
            pass

        from ..runtime.runners import load_runner

        self.inputs = np.load(spec["inputs"])
        self.batch, self.iters = spec["batch"], spec["iters"]
        self.baseline = psutil.Process().memory_info().rss
        self.runner = load_runner(
            spec["model"], device=spec["device"], threads=spec["threads"], warmup=0
        )
        for _ in range(spec["warmup"]):
            self.runner.infer(self.inputs[:1])

    def latency(self, calls: int) -> list[float]:
        single, times = self.inputs[:1], []
        for _ in range(calls):
            start = time.perf_counter()
            self.runner.infer(single)
            times.append(time.perf_counter() - start)
        return times

    def finish(self, outputs_file: str) -> dict[str, Any]:
        batch = self.batch
        full = np.resize(self.inputs, (batch, *self.inputs.shape[1:]))  # repeats if too few
        self.runner.infer(full)
        runs = max(2, -(-self.iters // batch))
        start = time.perf_counter()
        for _ in range(runs):
            self.runner.infer(full)
        throughput = runs * batch / (time.perf_counter() - start)
        outputs = np.concatenate(
            [
                self.runner.infer(self.inputs[i : i + batch])
                for i in range(0, len(self.inputs), batch)
            ]
        )
        self.runner.close()
        np.save(outputs_file, outputs)
        peak = _peak_rss()
        return {
            "throughput_ips": float(throughput),
            "peak_rss_mb": peak / 2**20,
            "model_rss_mb": (peak - self.baseline) / 2**20,
        }


def _serve() -> None:
    """Worker loop: the first line loads the model, then ``latency`` / ``finish`` commands."""
    session: _Session | None = None
    for line in sys.stdin:
        message = json.loads(line)
        try:
            if session is None:
                session = _Session(message)
                answer: dict[str, Any] = {"ready": True}
            elif message["cmd"] == "latency":
                answer = {"latencies": session.latency(message["calls"])}
            else:
                answer = session.finish(message["outputs"])
        except I2EError as exc:
            answer = {"error": str(exc)}
        except Exception as exc:  # a backend failing must become a row's note, not a crash
            answer = {"error": _describe(exc)}
        print(json.dumps(answer), flush=True)
        if "error" in answer or message.get("cmd") == "finish":
            return


def _peak_rss() -> int:
    """Peak RSS in bytes of this process since its exec. Linux's ``ru_maxrss`` would include
    the parent's RSS at fork time, ``VmHWM`` does not."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # elsewhere (macOS: bytes) the best there is

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def environment() -> dict[str, Any]:
    import onnxruntime

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": onnxruntime.__version__,
        "i2e_deploy": __version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _cell(value: float | None, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(report: BenchmarkReport) -> str:
    """The report as a Markdown table (one row per backend x precision)."""
    batch = report.settings["batch"]
    head = [
        "backend",
        "precision",
        "device",
        "p50 ms (b=1)",
        "p99 ms (b=1)",
        f"img/s (b={batch})",
        "peak RSS MB (model)",
        "top-1 acc",
        "parity vs ref",
        "decisive changes",
        "agree vs ref",
        "max Δlogit",
        "note",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report.rows:
        ran = row.latency_p50_ms is not None
        memory = f"{row.peak_rss_mb:.0f} ({row.model_rss_mb:.0f})" if ran else ""
        cells = [
            row.backend,
            row.precision,
            row.device if ran else "",
            _cell(row.latency_p50_ms, ".1f"),
            _cell(row.latency_p99_ms, ".1f"),
            _cell(row.throughput_ips, ".1f"),
            memory,
            _cell(None if row.accuracy is None else 100 * row.accuracy, ".1f"),
            row.parity or "",
            _cell(row.decisive_mismatches, "d"),
            _cell(None if row.top1_agreement is None else 100 * row.top1_agreement, ".1f"),
            _cell(row.max_abs_logit, ".2g"),
            row.reason or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    _serve()
