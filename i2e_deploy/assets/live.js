// The live page's shared worker: one event stream from the device for all open tabs of the
// page (a browser opens at most six connections to a host; each tab keeps its picture's),
// restarted when it falls silent.
"use strict";
const ports = new Set();
const SILENT_MS = 3000;  // the server speaks twice a second: silence this long is a dead link
let source = null, heardAt = 0;

function post(message) {
  for (const port of ports) port.postMessage(message);
}

function connect() {
  source = new EventSource("events");
  heardAt = Date.now();
  source.onopen = () => post({ type: "open" });
  source.onmessage = (e) => {
    heardAt = Date.now();
    post({ type: "stats", data: e.data });
  };
  source.onerror = () => {
    post({ type: "error" });
    if (source.readyState === EventSource.CLOSED) {  // given up (not a retry): start anew
      source.close();
      setTimeout(connect, 2000);
    }
  };
}

// A connection that hangs (a network dropped it silently) never errors by itself.
setInterval(() => {
  if (source !== null && source.readyState === EventSource.OPEN && Date.now() - heardAt > SILENT_MS) {
    source.close();
    post({ type: "error" });
    connect();
  }
}, 1000);

if (typeof SharedWorkerGlobalScope === "undefined") {
  // A dedicated worker (no shared workers in this browser): one tab's own event stream.
  ports.add(self);
  connect();
}

onconnect = (e) => {
  const port = e.ports[0];
  ports.add(port);
  port.onmessage = (m) => { if (m.data === "bye") ports.delete(port); };
  port.start();
  if (source === null) connect();
  else if (source.readyState === EventSource.OPEN) port.postMessage({ type: "open" });
};
