// The live page's shared worker: one event stream from the device for all open tabs of the
// page (a browser opens at most six connections to a host; each tab keeps its picture's).
"use strict";
const ports = new Set();
let source = null;

function post(message) {
  for (const port of ports) port.postMessage(message);
}

function connect() {
  source = new EventSource("events");
  source.onopen = () => post({ type: "open" });
  source.onmessage = (e) => post({ type: "stats", data: e.data });
  source.onerror = () => {
    post({ type: "error" });
    if (source.readyState === EventSource.CLOSED) {  // given up (not a retry): start anew
      source.close();
      setTimeout(connect, 2000);
    }
  };
}

onconnect = (e) => {
  const port = e.ports[0];
  ports.add(port);
  port.onmessage = (m) => { if (m.data === "bye") ports.delete(port); };
  port.start();
  if (source === null) connect();
  else if (source.readyState === EventSource.OPEN) port.postMessage({ type: "open" });
};
