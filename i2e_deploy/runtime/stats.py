"""What a stream measures, in fixed memory however long it runs: FPS, latency
percentiles, per-stage times, per-source state and counters, activity. Read by the loop
that fills it, the sinks that report it live and the ``--json`` stats."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .frames import Source

STAGES = ("capture", "preprocess", "infer", "overlay", "sink")


class Ring:
    """The last ``capacity`` samples (for percentiles) plus whole-run count and sum, in
    fixed memory however long the stream runs."""

    def __init__(self, capacity: int = 8192):
        self.values = np.zeros(capacity)
        self.count = 0
        self.total = 0.0

    def add(self, value: float) -> None:
        self.values[self.count % len(self.values)] = value
        self.count += 1
        self.total += value

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        n = min(self.count, len(self.values))
        return float(np.percentile(self.values[:n], q)) if n else 0.0


@dataclass
class SourceStats:
    """One source's part of the stats: its state, read live from the source, and the stale
    frames dropped for it."""

    source: Source
    dropped: int = 0

    def to_dict(self, now: float | None = None) -> dict:
        source = self.source
        return {
            "uri": source.uri,
            **source.state.to_dict(now),
            "reconnects": source.reconnects,
            "dropped": self.dropped,
            "unreadable": source.unreadable,
        }


@dataclass
class StreamStats:
    """What a run did so far (a live view reads it while the stream runs). ``latency`` is
    capture to result: from a frame's capture until every sink has it."""

    sources: list[str]
    backend: str
    frames: int = 0
    seconds: float = 0.0
    dropped: int = 0
    unreadable: int = 0
    reconnects: int = 0
    interrupted: bool = False
    error: str | None = None
    latency: Ring = field(default_factory=Ring)
    stages: dict[str, Ring] = field(default_factory=lambda: {s: Ring() for s in STAGES})
    firing_rate: Ring | None = None  # per prediction, when the classifier counts activity
    sops: Ring | None = None
    per_source: list[SourceStats] = field(default_factory=list)

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        infer_s = self.stages["infer"].total / 1e3
        now = time.time()
        return {
            "sources": self.sources,
            "backend": self.backend,
            "frames": self.frames,
            "seconds": round(self.seconds, 4),
            "fps": round(self.fps, 3),
            "latency_ms": {
                "p50": round(self.latency.percentile(50), 3),
                "p90": round(self.latency.percentile(90), 3),
                "p99": round(self.latency.percentile(99), 3),
                "mean": round(self.latency.mean, 3),
            },
            "stages_ms": {name: round(ring.mean, 3) for name, ring in self.stages.items()},
            # Share of wall time not spent inside the network: the pipeline's own cost.
            "pipeline_overhead_pct": round(100 * (1 - infer_s / self.seconds), 2)
            if self.seconds > 0
            else 0.0,
            "dropped": self.dropped,
            "unreadable": self.unreadable,
            "reconnects": self.reconnects,
            "interrupted": self.interrupted,
            "error": self.error,
            "per_source": [entry.to_dict(now) for entry in self.per_source],
            **(
                {
                    "activity": {
                        "firing_rate": self.firing_rate.mean,
                        "sops_per_prediction": self.sops.mean,
                    }
                }
                if self.firing_rate is not None and self.sops is not None
                else {}
            ),
        }

    def summary(self) -> str:
        d = self.to_dict()
        lat, st = d["latency_ms"], d["stages_ms"]
        end = "interrupted" if self.interrupted else ("stopped by error" if self.error else "done")
        return (
            f"{end}: {self.frames} frames in {self.seconds:.1f} s = {self.fps:.1f} FPS "
            f"({self.backend}) | latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms | "
            f"per frame: capture {st['capture']:.1f}, preprocess {st['preprocess']:.1f}, "
            f"infer {st['infer']:.1f}, overlay {st['overlay']:.1f}, sink {st['sink']:.1f} ms "
            f"| dropped {self.dropped}, unreadable {self.unreadable}"
            + (f", reconnects {self.reconnects}" if self.reconnects else "")
            + "".join(
                f" | source {i} {entry.source.state.status}"
                for i, entry in enumerate(self.per_source)
                if entry.source.state.status in ("lost", "reconnecting")
            )
            + (
                f" | LIF rate {self.firing_rate.mean:.4f}, {self.sops.mean / 1e6:.1f} M SOPs "
                "per prediction"
                if self.firing_rate is not None and self.sops is not None and self.firing_rate.count
                else ""
            )
        )
