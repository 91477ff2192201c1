"""A DV network event stream for the tests: ``dv.io.NetworkWriter`` on 127.0.0.1:PORT
sending event batches FIRST..LAST-1 of an AEDAT4 recording, as DV software's TCP output does.

    python dv_sender.py RECORDING PORT FIRST LAST [LINGER_S]

It binds the port as soon as it is free (a sender that replaces a lost one), prints
``listening``, waits for a client that stays connected (the stream source first checks the
server with a short connection of its own), sends the batches at once (a burst: faster than
any model classifies them), prints ``sent BATCHES EVENTS``, stays connected LINGER_S
seconds (default 1.5: the reader drops what it has not read when the connection goes), then
ends abruptly, as a sender that crashes or loses the network does.
"""

from __future__ import annotations

import os
import sys
import time

import dv_processing as dv

SETTLE_S = 0.5  # a client connected this long is the reader, not the source's server check


def main(recording: str, port: int, first: int, last: int, linger_s: float) -> None:
    source = dv.io.MonoCameraRecording(recording)
    stream = dv.io.Stream.EventStream(
        0, "events", source.getCameraName(), source.getEventResolution()
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            writer = dv.io.NetworkWriter("127.0.0.1", port, stream)
            break
        except RuntimeError:  # the port is still held by the sender this one replaces
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    print("listening", flush=True)
    connected_since = None
    deadline = time.monotonic() + 60
    while connected_since is None or time.monotonic() - connected_since < SETTLE_S:
        if time.monotonic() > deadline:  # nobody came: do not outlive the test
            os._exit(1)
        if writer.getClientCount() < 1:
            connected_since = None
        elif connected_since is None:
            connected_since = time.monotonic()
        time.sleep(0.005)
    batches = events = 0
    for index in range(last):
        batch = source.getNextEventBatch()
        if batch is None:
            break
        if index >= first:
            writer.writeEvents(batch)
            batches += 1
            events += len(batch)
    while writer.getQueuedPacketCount():
        time.sleep(0.005)
    print(f"sent {batches} {events}", flush=True)
    time.sleep(linger_s)
    # Abrupt end, and the only one that works: NetworkWriter's destructor deadlocks on the
    # GIL while a client is connected.
    os._exit(0)


if __name__ == "__main__":
    main(
        sys.argv[1],
        int(sys.argv[2]),
        int(sys.argv[3]),
        int(sys.argv[4]),
        float(sys.argv[5]) if len(sys.argv) > 5 else 1.5,
    )
