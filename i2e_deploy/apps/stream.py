"""``i2e-deploy stream`` and ``demo``: open a model, sources and sinks by name and run the
loop (:mod:`.loop`) over them, with statistics written as JSON."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

from ..errors import I2EError
from ..fileio import atomic_output
from ..runtime.classify import Classifier
from ..runtime.frames import Source
from ..runtime.loop import Stream, StreamStats
from ..runtime.options import StreamOptions
from ..runtime.runners import Runner
from ..runtime.service import EventLog, stop_signals
from ..runtime.sinks import check_outputs, open_sinks
from ..runtime.sources import open_source
from ..targets import resolve_runner


def run_stream(
    model: str | os.PathLike | Runner,
    sources: list[str],
    outputs: list[str],
    options: StreamOptions | None = None,
    *,
    log: Callable[[str], None] | None = None,
    events: EventLog | None = None,
    **changes,
) -> StreamStats:
    """Open everything by name (``model`` through :func:`i2e_deploy.targets.resolve_runner`,
    or an already loaded runner), run the stream, write ``options.stats_json``. ``changes``
    override single fields of ``options`` (``run_stream(m, ["0"], ["none"], threads=1)``).
    Bad options and open failures (missing file, dead URL, no camera) raise I2EError before
    anything runs; a failure mid-stream (camera lost, not back after ``reconnects``
    attempts) ends the stream and is reported in ``stats.error``.

    ``activity``: count each prediction's firing rate and SOPs from the backend's spikes
    (in ``stats_json`` and ``.jsonl`` outputs); by default on when ``stats_json`` is written
    or ``show_activity`` (the overlay's status line) asks for it, where the backend exposes
    spikes. It costs time per frame (``benchmarks/profile_default.py`` measures how much).

    SIGINT, SIGTERM and SIGHUP end the run as Ctrl-C does (outputs published, stats
    written; from the main thread). ``events`` reports the runner and the sources' state
    changes (``--log-format json``)."""
    opts = (options or StreamOptions()).replace(**changes).check()
    check_outputs(outputs or ["display"])
    # The source's reader thread preprocesses beside inference: ONNX Runtime's spinning
    # idle threads would take its core on a small machine.
    runner = (
        model
        if isinstance(model, Runner)
        else resolve_runner(
            model,
            backend=opts.backend,
            precision=opts.precision,
            device=opts.device,
            threads=opts.threads,
            verify=opts.verify,
            data=opts.verify_data,
            spinning=False,
            log=log,
            **opts.model_overrides,
        )
    )
    if events is None and opts.log_format == "json":
        events = EventLog("json")
    if events is not None:
        events.emit("runner", runner=runner.name)
    activity = opts.activity
    if activity is None:
        activity = (opts.stats_json is not None or opts.show_activity) and runner.exposes_spikes
    try:
        classifier = Classifier(runner, topk=opts.topk, activity=activity)
    except BaseException:
        runner.close()
        raise
    opened: list[Source] = []
    try:
        for uri in sources:
            opened.append(
                open_source(
                    uri,
                    card=classifier.card,
                    resolution=opts.resolution,
                    fps=opts.fps,
                    loop=opts.loop,
                    stride=opts.stride,
                    window_ms=opts.window_ms,
                    reconnect_attempts=opts.reconnects,
                )
            )
        sink = open_sinks(
            outputs or ["display"],
            fps=opened[0].fps if opened else 25.0,
            rotation=opts.rotation,
        )
    except BaseException:
        for source in opened:
            source.close()
        classifier.close()
        raise
    stream = Stream(classifier, opened, sink, opts)
    received: list[str] = []

    def stop(signal_name: str) -> None:
        # Only flags here: the handler may interrupt a holder of the stderr lock.
        received.append(signal_name)
        stream.stats.interrupted = True
        stream.request_stop()

    with stop_signals(stop):  # held until the stats are written: nothing is cut halfway
        try:
            with events.watch(opened) if events is not None else contextlib.nullcontext():
                stats = stream.run()
        finally:
            classifier.close()
        if events is not None and received:
            events.emit("signal", signal=received[0])
        if opts.stats_json:
            write_json_atomic(opts.stats_json, stats.to_dict())
    return stats


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    with atomic_output(path, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")


def run_demo(
    *,
    model: str = "default",
    output: list[str] | None = None,
    options: StreamOptions | None = None,
    log: Callable[[str], None] = print,
    **changes,
) -> tuple[StreamStats, list[str]]:
    """The zero-argument demo: the bundled model on the bundled 'demo' clip; a window when
    a screen and a GUI OpenCV are there, else demo.mp4 + demo.jsonl in the current folder.
    Returns the stats and the outputs used.

    ``backend='auto'``: the fastest verified runner here (:func:`~i2e_deploy.targets.choose_runner`;
    on a CPU, ONNX Runtime, INT8 for an INT8-exact checkpoint), PyTorch if the export fails."""
    from ..runtime.sinks import DisplaySink, screen_available
    from ..runtime.sources import DemoSource

    if output is None:
        output = ["demo.mp4", "demo.jsonl"]
        if screen_available():
            try:
                DisplaySink().close()
                output = ["display"]
            except I2EError:
                pass  # a screen but a headless OpenCV: fall back to files
    opts = (options or StreamOptions()).replace(**changes)
    if "display" in output:  # on screen, play at the clip's own speed
        opts = opts.replace(fps=DemoSource.nominal_fps)
    stats = run_stream(model, ["demo"], output, opts, log=log)
    return stats, output
