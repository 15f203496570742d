"""A real HTTP server on 127.0.0.1 serving a shard folder, with faults on demand and a request log
(the remote-data tests: tests/data/test_remote*.py)."""

from __future__ import annotations

import http.server
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FaultServer:
    """`url` serves `root`; `faults[name]` is one of "404", "cut" (half the body, then the
    connection closes), "stall" (headers and a little data, then silence for `stall_s`),
    "corrupt" (the whole body with one byte flipped: a download that fails its sha256), applied
    to the first `fault_times[name]` requests of that file (default: all of them). `requests`
    logs every requested path, in order."""

    root: Path
    url: str = ""
    faults: dict[str, str] = field(default_factory=dict)
    fault_times: dict[str, int] = field(default_factory=dict)
    requests: list[str] = field(default_factory=list)
    stall_s: float = 30.0
    _server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> FaultServer:
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                owner.requests.append(name)
                fault = owner.faults.get(name)
                if fault and name in owner.fault_times:
                    left = owner.fault_times[name]
                    if left <= 0:
                        fault = None
                    else:
                        owner.fault_times[name] = left - 1
                path = owner.root / name
                if fault == "404" or not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                if fault == "corrupt":
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0xFF
                    data = bytes(data)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if fault == "stall":
                    self.wfile.write(data[:1024])
                    self.wfile.flush()
                    time.sleep(owner.stall_s)
                    self.close_connection = True
                    return
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that hung up (the reader stops early, or gave up on a stall)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def refused_url() -> str:
    """An http:// prefix on which nothing listens (a port bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"
