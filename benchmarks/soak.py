"""Does a stream that runs for a long time stay flat? The real command, as a service would
run it: ``i2e-deploy stream default --source demo --loop --fps F`` into a ``.jsonl`` and a
``.webm`` with ``--rotate`` and ``--keep`` on and ``--log-format json``, sampled every
``--sample-s`` seconds (resident memory, open file descriptors, threads, CPU) for
``--minutes``, then stopped with SIGTERM as systemd or Docker would.

    python benchmarks/soak.py --minutes 60

Checks at the end: exit 0 within 10 s of SIGTERM, no temp file left, every line of every
kept segment parses, at most ``--keep`` segments per output. Prints a Markdown table; writes
JSON (default benchmarks/results/soak.json). The outputs and the event log are deleted at
the end unless SOAK_KEEP_OUTPUTS is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import psutil

from i2e_deploy.apps.stream import write_json_atomic
from i2e_deploy.device import cpu_name

REPO = Path(__file__).resolve().parents[1]


def sample(process: psutil.Process, began: float, folder: Path) -> dict:
    with process.oneshot():
        return {
            "minute": round((time.monotonic() - began) / 60, 2),
            "rss_mb": round(process.memory_info().rss / 2**20, 1),
            "fds": process.num_fds(),
            "threads": process.num_threads(),
            "cpu_pct": round(process.cpu_percent(), 1),  # since the previous sample
            "files": len(list(folder.iterdir())),
            "disk_mb": round(sum(p.stat().st_size for p in folder.iterdir()) / 2**20, 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--sample-s", type=float, default=60.0)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--rotate", default="1MB")
    parser.add_argument("--keep", type=int, default=4)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks/results/soak.json")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="soak."))
    preds, video, stats_path = folder / "preds.jsonl", folder / "view.webm", folder / "stats.json"
    command = [
        sys.executable,
        "-m",
        "i2e_deploy.cli",
        "stream",
        "default",
        "--source",
        "demo",
        "--loop",
        "--fps",
        str(args.fps),
        "--output",
        str(preds),
        "--output",
        str(video),
        "--rotate",
        args.rotate,
        "--keep",
        str(args.keep),
        "--json",
        str(stats_path),
        "--threads",
        "1",
        "--log-format",
        "json",
    ]
    events_path = folder.with_suffix(".events.jsonl")  # outside the sampled folder
    with open(events_path, "w") as events:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=events)
    process = psutil.Process(child.pid)
    while child.poll() is None and not (preds.exists() and preds.stat().st_size):
        time.sleep(1)  # the model loads (and is exported once) before frames flow
    began = time.monotonic()
    process.cpu_percent()
    samples = [sample(process, began, folder)]
    print(f"pid {child.pid}, outputs in {folder}, events in {events_path}", flush=True)
    while child.poll() is None and time.monotonic() - began < args.minutes * 60:
        time.sleep(min(args.sample_s, args.minutes * 60 - (time.monotonic() - began)))
        if child.poll() is None:
            samples.append(sample(process, began, folder))
            print(json.dumps(samples[-1]), flush=True)
    stop_began = time.monotonic()
    child.send_signal(signal.SIGTERM)
    try:
        code = child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    stop_s = time.monotonic() - stop_began

    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    segments = sorted(folder.glob("preds.*.jsonl"))
    lines = bad = 0
    for path in [*segments, preds]:
        for line in path.read_text().splitlines():
            lines += 1
            try:
                json.loads(line)
            except ValueError:
                bad += 1
    videos = sorted(folder.glob("view.*.webm"))
    playable = 0
    for path in [*videos, video]:
        capture = cv2.VideoCapture(str(path))
        playable += bool(capture.read()[0])
        capture.release()
    first, middle, last = samples[0], samples[len(samples) // 2], samples[-1]
    result = {
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "opencv": cv2.__version__,
        "command": " ".join(["i2e-deploy", *command[3:]]),
        "minutes": round(samples[-1]["minute"], 2),
        "samples": samples,
        "start_middle_end": {"start": first, "middle": middle, "end": last},
        "drift": {
            key: round(last[key] - first[key], 2) for key in ("rss_mb", "fds", "threads", "files")
        },
        "stop": {"signal": "SIGTERM", "exit_code": code, "seconds": round(stop_s, 2)},
        "stats": stats,
        "outputs": {
            "jsonl_segments_kept": len(segments),
            "lines_kept": lines,
            "lines_not_parsing": bad,
            "video_segments_kept": len(videos),
            "videos_playable": f"{playable}/{len(videos) + 1}",
            "temp_files_left": [p.name for p in folder.glob(".*")],
        },
    }
    write_json_atomic(args.json, result)

    print("\n| minute | RSS MB | FDs | threads | CPU % | files | disk MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for s in samples:
        print(
            f"| {s['minute']:.1f} | {s['rss_mb']} | {s['fds']} | {s['threads']} | "
            f"{s['cpu_pct']} | {s['files']} | {s['disk_mb']} |"
        )
    print(f"\nstop: exit {code} in {stop_s:.1f} s; drift {result['drift']}")
    print(f"outputs: {result['outputs']}")
    print(f"frames: {stats and stats['frames']}; wrote {args.json}")
    if os.environ.get("SOAK_KEEP_OUTPUTS") is None:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
        events_path.unlink()


if __name__ == "__main__":
    main()
