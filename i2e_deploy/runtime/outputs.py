"""Outputs named by URI: ``open_sink(uri) -> Sink`` (the classes are in :mod:`.sinks` and,
for ``http://`` live pages, :mod:`.live`), ``open_sinks`` for several at once, and
``check_outputs`` to refuse a bad one before any model loads or camera opens."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from ..errors import I2EError
from ..fileio import temp_beside
from .live import LiveSink
from .service import Rotation
from .sinks import VIDEO_CODECS, DisplaySink, JsonlSink, MultiSink, NullSink, Sink, VideoSink


def _unknown_output(text: str) -> I2EError:
    return I2EError(
        f"unknown output {text!r}: use display, none, http://HOST:PORT, a .jsonl file or "
        f"a video file ({', '.join(VIDEO_CODECS)})"
    )


def open_sink(
    uri: str, *, fps: float = 25.0, rotation: Rotation | None = None, view_fps: float = 10.0
) -> Sink:
    """``display``, ``none``, ``*.jsonl``, a video file (``fps`` = the source's), or
    ``http://HOST:PORT``, the live page (:mod:`.live`; ``view_fps`` pictures a second);
    ``rotation`` applies to the files."""
    text = str(uri).strip()
    if text.startswith("http://"):
        return LiveSink(text, view_fps=view_fps)
    if text == "none":
        return NullSink()
    if text == "display":
        return DisplaySink()
    suffix = Path(text).suffix.lower()
    if suffix == ".jsonl":
        return JsonlSink(text, rotation)
    if suffix in VIDEO_CODECS:
        return VideoSink(text, fps=fps, rotation=rotation)
    raise _unknown_output(text)


def check_outputs(uris: list[str]) -> None:
    """Refuse an unknown or unwritable file output in one line, before any model is loaded
    or camera opened (the files themselves are created on first write)."""
    for uri in uris:
        text = str(uri).strip()
        if text in ("display", "none") or "://" in text:
            continue
        path = Path(text)
        if path.suffix.lower() != ".jsonl" and path.suffix.lower() not in VIDEO_CODECS:
            raise _unknown_output(text)
        if path.is_dir():
            raise I2EError(f"cannot write {path}: it is a folder")
        temp_beside(path, ".probe").unlink()  # the folder can be made and written to


def open_sinks(
    uris: list[str],
    *,
    fps: float = 25.0,
    rotation: Rotation | None = None,
    opened: Mapping[str, Sink] | None = None,
) -> Sink:
    """One sink for one URI, a MultiSink for several; ``opened``: sinks already opened by URI
    (live pages bind their port before anything else)."""
    opened = opened or {}
    sinks = [  # files are created on first write
        opened[uri] if uri in opened else open_sink(uri, fps=fps, rotation=rotation) for uri in uris
    ]
    return sinks[0] if len(sinks) == 1 else MultiSink(sinks)
