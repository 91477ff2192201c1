"""Everything a stream run takes besides its model, sources and outputs, as one object (as
Ultralytics carries one ``cfg``): the CLI fills it, ``run_stream`` and ``Stream`` read it, and
it is checked once, before any camera opens or any model is exported."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import I2EError
from .service import Rotation


@dataclass
class StreamOptions:
    # The runner (see i2e_deploy.targets.resolve_runner).
    backend: str = "auto"
    precision: str = "auto"
    device: str = "cpu"
    threads: int | None = None
    verify: bool = True
    verify_data: str | os.PathLike | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)  # arch, classes, ratio, ...
    # The sources (see i2e_deploy.runtime.sources.open_source).
    resolution: str | None = None
    fps: float | None = None
    loop: bool = False
    stride: int = 1
    window_ms: float = 100.0
    reconnects: int = 5  # -1: for ever
    timeout_s: float = 5.0  # cameras and streams: open timeout, and silence that means lost
    # The loop.
    max_frames: int | None = None
    queue_size: int = 1
    latest: bool | None = None  # latest-frame policy; None: for live sources
    topk: int = 3
    # What is counted and written.
    stats_json: str | os.PathLike | None = None
    activity: bool | None = None  # None: on with stats_json or show_activity, if spikes show
    show_activity: bool = False
    view_fps: float = 10.0  # the live page's pictures per second at most (http:// outputs)
    # Running as a service (see i2e_deploy.runtime.service): file outputs are closed as
    # segments at rotate_bytes and/or after rotate_every_s, the newest ``keep`` kept.
    rotate_bytes: int | None = None
    rotate_every_s: float | None = None
    keep: int | None = None  # None: every closed segment
    log_format: str = "text"  # or json: one object per event on stderr

    def replace(self, **changes: Any) -> StreamOptions:
        """A copy with ``changes``; an unknown name is a clear error, not a TypeError."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise I2EError(f"unknown stream option(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    @property
    def rotation(self) -> Rotation | None:
        if self.rotate_bytes is None and self.rotate_every_s is None:
            return None
        return Rotation(self.rotate_bytes, self.rotate_every_s, self.keep)

    def check(self) -> StreamOptions:
        """Refuse impossible values in one line each (before anything is opened)."""
        if self.reconnects < -1:
            raise I2EError(f"--reconnects must be >= 0, or -1 for ever, got {self.reconnects}")
        if not self.timeout_s > 0:
            raise I2EError(f"--timeout must be positive, got {self.timeout_s}")
        if self.max_frames is not None and self.max_frames < 1:
            raise I2EError(f"--max-frames must be >= 1, got {self.max_frames}")
        if self.topk < 1:
            raise I2EError(f"--topk must be >= 1, got {self.topk}")
        if self.queue_size < 1:
            raise I2EError(f"queue size must be >= 1, got {self.queue_size}")
        if self.stride < 1:
            raise I2EError(f"--stride must be >= 1, got {self.stride}")
        if self.fps is not None and not self.fps > 0:
            raise I2EError(f"--fps must be positive, got {self.fps}")
        if not self.view_fps > 0:
            raise I2EError(f"--view-fps must be positive, got {self.view_fps}")
        if not self.window_ms > 0:
            raise I2EError(f"--window-ms must be positive, got {self.window_ms}")
        if self.rotate_bytes is not None and self.rotate_bytes < 1:
            raise I2EError(f"--rotate must be a positive size, got {self.rotate_bytes} bytes")
        if self.rotate_every_s is not None and not self.rotate_every_s > 0:
            raise I2EError(f"--rotate-every must be positive, got {self.rotate_every_s} s")
        if self.keep is not None and self.keep < 0:
            raise I2EError(f"--keep must be >= 0, got {self.keep}")
        if self.keep is not None and self.rotation is None:
            raise I2EError("--keep counts rotated segments: give --rotate or --rotate-every")
        if self.log_format not in ("text", "json"):
            raise I2EError(f"--log-format must be text or json, got {self.log_format!r}")
        return self
