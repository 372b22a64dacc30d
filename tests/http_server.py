"""A real HTTP server on 127.0.0.1 for tests: serves the files of a directory, with byte ranges,
and misbehaves on request (per path) so download code can be tested against real sockets.

Usage::

    with FileServer(directory) as server:
        server.behave("/a.nc", fail_times=2)          # HTTP 500 twice, then the file
        url = server.url("/a.nc")
        ...
        server.requests_for("/a.nc")                  # what the client sent, in order
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = ["Behaviour", "FileServer", "RecordedRequest", "free_port"]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Behaviour:
    """How the server answers one path (counters are consumed as requests arrive).

    Attributes:
        fail_times: answer this many requests with ``fail_status`` before serving the file.
        fail_status: the status of those failures (500 by default).
        drop_after: on the first ``drop_times`` requests, announce the full length, send this
            many bytes of the body, then close the connection.
        drop_times: how many requests are dropped (1 by default).
        status: always answer with this status (e.g. 404) and no file.
        truncate_to: serve only the first bytes of the file, with a matching Content-Length
            (a complete response of a damaged file).
        ignore_range: answer a Range request with the whole file (200).
        accept_ranges: announce ``Accept-Ranges: bytes`` and honour Range requests.
    """

    fail_times: int = 0
    fail_status: int = 500
    drop_after: int | None = None
    drop_times: int = 1
    status: int | None = None
    truncate_to: int | None = None
    ignore_range: bool = False
    accept_ranges: bool = True


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    """A TCP port on 127.0.0.1 with nothing listening on it (at the time of the call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet test output
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        owner = self.server.owner
        path = self.path.split("?", 1)[0]
        behaviour = owner.record(
            self.command, path, {k.lower(): v for k, v in self.headers.items()}
        )
        if behaviour.status is not None:
            self._reply(behaviour.status, f"status {behaviour.status}\n".encode())
            return
        if owner.take(behaviour, "fail_times"):
            self._reply(behaviour.fail_status, b"failing on purpose\n")
            return
        file = owner.directory / path.lstrip("/")
        if not file.is_file() or ".." in Path(path).parts:
            self._reply(404, b"not found\n")
            return
        data = file.read_bytes()
        if behaviour.truncate_to is not None:
            data = data[: behaviour.truncate_to]
        total = len(data)
        status, start, end = 200, 0, total
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{total}-{hash(data)}"'}
        if behaviour.accept_ranges:
            headers["Accept-Ranges"] = "bytes"
        wanted = self.headers.get("Range")
        if wanted and behaviour.accept_ranges and not behaviour.ignore_range:
            match = _RANGE.match(wanted.strip())
            if match:
                first = int(match.group(1))
                last = int(match.group(2)) if match.group(2) else total - 1
                if first >= total:
                    self._reply(416, b"", {"Content-Range": f"bytes */{total}"})
                    return
                status, start, end = 206, first, min(last, total - 1) + 1
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{total}"
        body = data[start:end]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if head:
            return
        if behaviour.drop_after is not None and owner.take(behaviour, "drop_times"):
            self.wfile.write(body[: behaviour.drop_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer


class FileServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) serving ``directory``.

    Use as a context manager; :meth:`behave` sets how a path misbehaves, :attr:`requests` lists
    every request received.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._behaviours: dict[str, Behaviour] = {}
        self._lock = threading.Lock()
        self.requests: list[RecordedRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> FileServer:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.owner = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not running"
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        """The http URL of ``path`` (e.g. ``"/sst.nc"``) on this server."""
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def behave(self, path: str, **settings) -> Behaviour:
        """Set the :class:`Behaviour` of ``path`` (fields as keyword arguments)."""
        behaviour = Behaviour(**settings)
        with self._lock:
            self._behaviours["/" + path.lstrip("/")] = behaviour
        return behaviour

    def requests_for(self, path: str) -> list[RecordedRequest]:
        """The requests received for ``path``, in order."""
        path = "/" + path.lstrip("/")
        with self._lock:
            return [r for r in self.requests if r.path == path]

    # called from the handler threads
    def record(self, method: str, path: str, headers: dict[str, str]) -> Behaviour:
        with self._lock:
            self.requests.append(RecordedRequest(method, path, headers))
            return self._behaviours.get(path, Behaviour())

    def take(self, behaviour: Behaviour, counter: str) -> bool:
        """Consume one unit of ``behaviour.<counter>``; False when it is used up."""
        with self._lock:
            left = getattr(behaviour, counter)
            if left <= 0:
                return False
            setattr(behaviour, counter, left - 1)
            return True
