"""What a stream needs to run for weeks under systemd, Docker or Kubernetes: stop signals
that end it as Ctrl-C does, output rotation (size and/or age, N closed segments kept, as
Python's RotatingFileHandler / TimedRotatingFileHandler and logrotate do), and a log of
events as one JSON object per line for journald or a log shipper."""

from __future__ import annotations

import datetime
import glob
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import I2EError

if TYPE_CHECKING:
    from .frames import Source

STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")  # SIGHUP: the terminal went away
# Held by whatever writes to stderr from several threads, or silences it for a moment.
STDERR_LOCK = threading.Lock()

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}
_DURATION_UNITS = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_size(text: str, flag: str = "--rotate") -> int:
    """``100MB`` -> 100_000_000 (KB/MB/GB decimal, KiB/MiB/GiB binary, plain bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise I2EError(f"{flag} takes a size such as 100MB, 512KiB or 1GB, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_duration(text: str, flag: str = "--rotate-every") -> float:
    """``1h`` -> 3600.0 (s, m/min, h, d; a plain number is seconds)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = (match.group(2).lower() or "s") if match else None
    if match is None or unit not in _DURATION_UNITS:
        raise I2EError(f"{flag} takes a duration such as 30s, 10m, 1h or 1d, got {text!r}")
    return float(match.group(1)) * _DURATION_UNITS[unit]


@dataclass(frozen=True)
class Rotation:
    """When an output file is closed as a segment and a new one begun: at ``max_bytes``
    and/or after ``every_s`` seconds; ``keep`` closed segments are kept (None: all)."""

    max_bytes: int | None = None
    every_s: float | None = None
    keep: int | None = None

    def due(self, size: int, adding: int, opened_at: float) -> bool:
        """Whether a segment of ``size`` bytes, begun at monotonic ``opened_at``, is to be
        closed before ``adding`` more bytes: an empty segment takes any one write whole."""
        if size == 0:
            return False
        if self.max_bytes is not None and size + adding > self.max_bytes:
            return True
        return self.every_s is not None and time.monotonic() - opened_at >= self.every_s

    @staticmethod
    def segment_path(path: Path) -> Path:
        """``preds.jsonl`` closed now -> ``preds.20261207T054300.123.jsonl`` (UTC): names
        sort by time and never collide with ``out.1.mp4`` (source 1's file)."""
        now = datetime.datetime.now(datetime.timezone.utc)
        while True:
            stamp = now.strftime("%Y%m%dT%H%M%S.") + f"{now.microsecond // 1000:03d}"
            candidate = path.with_name(f"{path.stem}.{stamp}{path.suffix}")
            if not candidate.exists():
                return candidate
            now += datetime.timedelta(milliseconds=1)  # two segments closed in one ms

    @staticmethod
    def segments(path: Path) -> list[Path]:
        """The closed segments of ``path``, oldest first."""
        pattern = f"{glob.escape(path.stem)}.{'[0-9]' * 8}T{'[0-9]' * 6}.[0-9][0-9][0-9]"
        return sorted(path.parent.glob(pattern + glob.escape(path.suffix)))

    def prune(self, path: Path) -> None:
        if self.keep is None:
            return
        segments = self.segments(path)
        for old in segments[: max(0, len(segments) - self.keep)]:
            old.unlink(missing_ok=True)


@contextmanager
def _signals_to(handler, names: tuple[str, ...]) -> Iterator[None]:
    """``handler`` for the signals ``names`` during the block, the previous ones restored
    after. Outside the main thread, signals are not ours: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in names:
        if hasattr(signal, name):  # no SIGHUP on Windows
            previous[name] = signal.signal(getattr(signal, name), handler)
    try:
        yield
    finally:
        for name, old in previous.items():
            signal.signal(getattr(signal, name), old)


@contextmanager
def stop_signals(stop: Callable[[str], None]) -> Iterator[None]:
    """Route SIGINT, SIGTERM and SIGHUP to ``stop(name)`` (once; later ones are ignored
    while the run winds down, so a second Ctrl-C cannot tear half-published outputs)
    and restore the previous handlers after."""
    stopping = threading.Event()

    def handle(signum, _frame) -> None:
        if not stopping.is_set():
            stopping.set()
            stop(signal.Signals(signum).name)

    with _signals_to(handle, STOP_SIGNALS):
        yield


def _raise_interrupt(signum, _frame) -> None:
    raise KeyboardInterrupt


@contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """Around a command: SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so a
    stop while the model exports or sources open ends it cleanly instead of killing it
    with half-written files (the stream loop takes the signals over while it runs)."""
    with _signals_to(_raise_interrupt, STOP_SIGNALS[1:]):
        yield


class EventLog:
    """Events of a run (start, runner, source states, reconnects, warnings, errors, end). In
    ``json`` format each is one JSON object on one line of stderr; in ``text`` format only
    free-form messages are printed, through ``say``, as before."""

    def __init__(self, log_format: str = "text", say: Callable[[str], None] | None = None):
        self.json = log_format == "json"
        self.say = say

    def emit(self, event: str, message: str | None = None, **fields: Any) -> None:
        if not self.json:
            if message is not None and self.say is not None:
                self.say(message)
            return
        record: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
        }
        if message is not None:
            record["message"] = message
        record.update(fields)
        line = json.dumps(record, default=str) + "\n"
        with STDERR_LOCK:  # whole lines from several threads
            sys.stderr.write(line)
            sys.stderr.flush()

    def log(self, message: str) -> None:
        """A ``log=`` callable for the library's progress messages."""
        self.emit("log", message)

    def handler(self) -> logging.Handler:
        """The library's warnings as ``warning`` events."""
        events = self

        class _Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                events.emit("warning", record.getMessage())

        return _Handler(logging.WARNING)

    @contextmanager
    def watch(self, sources: list[Source], every_s: float = 0.25) -> Iterator[None]:
        """While the body runs, report each source's status changes and reconnects (the
        sources change them on their own threads)."""
        if not self.json:
            yield
            return
        done = threading.Event()

        def poll() -> None:
            seen = [(s.state.status, s.reconnects) for s in sources]
            while not done.wait(every_s):
                for index, source in enumerate(sources):
                    status, reconnects = source.state.status, source.reconnects
                    if status != seen[index][0]:
                        self.emit("source", source=index, uri=source.uri, **source.state.to_dict())
                    if reconnects != seen[index][1]:
                        self.emit("reconnect", source=index, uri=source.uri, reconnects=reconnects)
                    seen[index] = (status, reconnects)

        thread = threading.Thread(target=poll, name="event-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
