"""``i2e-deploy stream`` and ``demo``: open a model, sources and sinks by name and run the
loop (:mod:`.loop`) over them, with statistics written as JSON."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable

from ..artifacts import read_card
from ..assets import resolve_model
from ..card import ModelCard
from ..errors import I2EError
from ..fileio import atomic_output
from ..runtime.classify import Classifier
from ..runtime.frames import Source
from ..runtime.live import LiveSink
from ..runtime.loop import Stream
from ..runtime.options import StreamOptions
from ..runtime.outputs import check_outputs, open_sinks
from ..runtime.runners import Runner
from ..runtime.service import EventLog, stop_signals
from ..runtime.sources import needs_card, open_source
from ..runtime.stats import StreamStats
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
    Bad options and open failures (missing file, dead URL, no camera, a port in use) raise
    I2EError before anything runs, a source's before a runner is chosen; a source lost
    mid-stream (not back after ``reconnects`` attempts) ends alone, the others go on, and
    the loss is reported in ``stats.error``.

    ``activity``: count each prediction's firing rate and SOPs from the backend's spikes
    (in ``stats_json`` and ``.jsonl`` outputs); by default on when ``stats_json`` is written
    or ``show_activity`` (the overlay's status line) asks for it, where the backend exposes
    spikes. It costs time per frame (``benchmarks/profile_default.py`` measures how much).

    SIGINT, SIGTERM and SIGHUP end the run as Ctrl-C does (outputs published, stats
    written; from the main thread). ``events`` reports the runner and the sources' state
    changes (``--log-format json``)."""
    opts = (options or StreamOptions()).replace(**changes).check()
    check_outputs(outputs or ["display"])
    if events is None and opts.log_format == "json":
        events = EventLog("json")
    # Live pages bind their port first: a port in use is refused before a model loads or a
    # camera opens.
    servers = open_live_outputs(outputs, opts.view_fps, log)
    try:
        return _run(model, sources, outputs, opts, servers, log, events)
    except BaseException:
        for server in servers.values():
            server.close()  # closing twice is harmless: the stream may have closed it
        raise


def open_live_outputs(outputs: list[str], view_fps: float, log) -> dict[str, LiveSink]:
    """The ``http://`` outputs, opened (bound) by URI, each announced in one line."""
    servers: dict[str, LiveSink] = {}
    try:
        for uri in outputs:
            if uri.strip().startswith("http://") and uri not in servers:
                servers[uri] = sink = LiveSink(uri, view_fps=view_fps)
                if log is not None:
                    log(sink.banner())
    except BaseException:
        for sink in servers.values():
            sink.close()
        raise
    return servers


def _run(
    model: str | os.PathLike | Runner,
    sources: list[str],
    outputs: list[str],
    opts: StreamOptions,
    servers: dict[str, LiveSink],
    log: Callable[[str], None] | None,
    events: EventLog | None,
) -> StreamStats:
    # Sources open before the runner, so that a dead camera is reported before a runner is
    # chosen or anything exported; event sources need the card, read from the file without a
    # runner (for a checkpoint that costs about a second, so only when one needs it).
    card = None
    if isinstance(model, Runner):
        card = model.card
    elif any(needs_card(uri) for uri in sources):
        card = _card(model, opts)
    opened: list[Source] = []
    classifier: Classifier | None = None
    try:
        for uri in sources:
            opened.append(
                open_source(
                    uri,
                    card=card,
                    resolution=opts.resolution,
                    fps=opts.fps,
                    loop=opts.loop,
                    stride=opts.stride,
                    window_ms=opts.window_ms,
                    reconnect_attempts=opts.reconnects,
                    timeout_s=opts.timeout_s,
                )
            )
        classifier = _classifier(model, opts, log)
        if events is not None:
            events.emit("runner", runner=classifier.name)
        sink = open_sinks(
            outputs or ["display"],
            fps=opened[0].fps if opened else 25.0,
            rotation=opts.rotation,
            opened=servers,
        )
    except BaseException:
        for source in opened:
            source.close()
        if classifier is not None:
            classifier.close()
        raise
    stream = Stream(classifier, opened, sink, opts, log=log)
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


def _card(model: str | os.PathLike, opts: StreamOptions) -> ModelCard:
    path = resolve_model(str(model))
    if not path.is_file():
        raise I2EError(f"model file not found: {path}")
    return read_card(path, **opts.model_overrides)


def _classifier(
    model: str | os.PathLike | Runner, opts: StreamOptions, log: Callable[[str], None] | None
) -> Classifier:
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
    activity = opts.activity
    if activity is None:
        activity = (opts.stats_json is not None or opts.show_activity) and runner.exposes_spikes
    try:
        return Classifier(runner, topk=opts.topk, activity=activity)
    except BaseException:
        runner.close()
        raise


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
    a screen and a GUI OpenCV are there, else demo.mp4 + demo.jsonl in the current folder
    (also beside live pages, ``http://`` outputs, when there is no screen). Returns the stats
    and the outputs used.

    ``backend='auto'``: the fastest verified runner here (:func:`~i2e_deploy.targets.choose_runner`;
    on a CPU, ONNX Runtime, INT8 for an INT8-exact checkpoint), PyTorch if the export fails.
    The first ``log`` line names the model's classes and what the demo's photos show."""
    from ..artifacts import read_card
    from ..assets import resolve_model
    from ..runtime.sinks import DisplaySink, screen_available
    from ..runtime.sources import DemoSource, demo_intro

    card = read_card(resolve_model(model))
    log(demo_intro(card.class_names, card.num_classes))

    if output is None:
        output = ["demo.mp4", "demo.jsonl"]
        if screen_available():
            try:
                DisplaySink().close()
                output = ["display"]
            except I2EError:
                pass  # a screen but a headless OpenCV: fall back to files
    live = [o for o in output if o.strip().startswith("http://")]
    if live and len(live) == len(output) and not screen_available():
        # Watched from elsewhere: the headless demo still leaves its files here.
        output = [*output, "demo.mp4", "demo.jsonl"]
    opts = (options or StreamOptions()).replace(**changes)
    if "display" in output or live:
        # Watched (on screen or the live page): play at the clip's own speed.
        opts = opts.replace(fps=DemoSource.nominal_fps)
    stats = run_stream(model, ["demo"], output, opts, log=log)
    return stats, output
