"""What does watching the live page cost the stream? The loop runs the bundled model over the
demo clip (looped, as fast as it goes) into ``--output http://127.0.0.1:PORT`` three ways, in
interleaved rounds so that the shared machine's load falls on all alike:

- ``no viewer``: nobody watches (nothing is drawn or encoded for the page);
- ``viewer reads``: one client reads the MJPEG stream as fast as it comes;
- ``viewer never reads``: one client asks for the stream and never reads a byte.

    python benchmarks/live_view.py [--rounds 3] [--frames 150] [--backend auto]

The reading client runs in this process, on the same CPUs (a real viewer's browser would
not). The goal: at most 10 % fewer frames per second with a viewer. Prints a Markdown
table; writes JSON (default benchmarks/results/live_view.json).
"""

from __future__ import annotations

import argparse
import http.client
import platform
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import psutil

from i2e_deploy.apps.stream import write_json_atomic
from i2e_deploy.device import cpu_name
from i2e_deploy.runtime.classify import Classifier
from i2e_deploy.runtime.live import LiveSink
from i2e_deploy.runtime.loop import Stream
from i2e_deploy.runtime.sources import open_source
from i2e_deploy.targets import resolve_runner

REPO = Path(__file__).resolve().parents[1]
MODES = ("no viewer", "viewer reads", "viewer never reads")


def reader(url: str, done: threading.Event) -> None:
    """Reads the picture stream until the run closes it."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    connection.request("GET", "/stream.mjpg")
    response = connection.getresponse()
    try:
        while response.read1(1 << 16):
            pass
    except OSError:
        pass  # closed by the end of the run
    done.set()


def stalled(url: str) -> socket.socket:
    parts = urlsplit(url)
    viewer = socket.create_connection((parts.hostname, parts.port))
    viewer.sendall(b"GET /stream.mjpg HTTP/1.1\r\nHost: bench\r\n\r\n")
    return viewer


def run(classifier: Classifier, mode: str, frames: int, view_fps: float) -> dict:
    sink = LiveSink("http://127.0.0.1:0", view_fps=view_fps)
    stream = Stream(classifier, [open_source("demo", loop=True)], sink, max_frames=frames)
    done = threading.Event()
    held = None
    if mode == "viewer reads":
        threading.Thread(target=reader, args=(sink.url, done), daemon=True).start()
    elif mode == "viewer never reads":
        held = stalled(sink.url)
    stats = stream.run()
    if held is not None:
        held.close()
    return {"fps": stats.fps, "encodes": sink.encodes, "frames": stats.frames}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--view-fps", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/live_view.json")
    args = parser.parse_args()

    runner = resolve_runner(
        args.model, backend=args.backend, threads=args.threads, spinning=False, log=print
    )
    classifier = Classifier(runner)
    process = psutil.Process()
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    rss = []
    try:
        run(classifier, "no viewer", 20, args.view_fps)  # warm-up: first calls are slow
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                runs[mode].append(run(classifier, mode, args.frames, args.view_fps))
                rss.append(process.memory_info().rss / 2**20)
    finally:
        classifier.close()

    base = float(np.median([r["fps"] for r in runs["no viewer"]]))
    rows = []
    for mode in MODES:
        fps = float(np.median([r["fps"] for r in runs[mode]]))
        rows.append(
            {
                "mode": mode,
                "fps_median": round(fps, 2),
                "fps_runs": [round(r["fps"], 2) for r in runs[mode]],
                "cost_pct": round(100 * (1 - fps / base), 1),
                "encodes_per_run": [r["encodes"] for r in runs[mode]],
            }
        )
    result = {
        "cpu": cpu_name(),
        "cpus": psutil.cpu_count(),
        "python": platform.python_version(),
        "model": args.model,
        "backend": classifier.name,
        "threads": args.threads,
        "frames_per_run": args.frames,
        "rounds": args.rounds,
        "view_fps": args.view_fps,
        "rss_mib_after_each_run": [round(m, 1) for m in rss],
        "modes": rows,
        "note": "the reading client runs on the same CPUs as the stream",
    }
    write_json_atomic(args.json, result)
    print(
        f"\n{result['cpu']}, {result['cpus']} CPUs (shared), {classifier.name}, "
        f"{args.threads} thread(s); {args.rounds} interleaved rounds of {args.frames} frames, "
        f"--view-fps {args.view_fps:g}\n"
    )
    print("| viewer | FPS (median) | runs | cost | JPEG encodes per run |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['mode']} | {row['fps_median']:.1f} | "
            f"{', '.join(f'{f:.1f}' for f in row['fps_runs'])} | {row['cost_pct']:+.1f} % | "
            f"{', '.join(map(str, row['encodes_per_run']))} |"
        )
    print(f"\nRSS after each run: {', '.join(f'{m:.0f}' for m in rss)} MiB; wrote {args.json}")


if __name__ == "__main__":
    main()
