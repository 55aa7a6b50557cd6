"""A loopback HTTP file server (stdlib only): the tests' remote caches, and ``kcache bench fit``'s.

Serves the files under one directory on 127.0.0.1 (a free port) from a daemon thread:

- GET and HEAD, always with Content-Length; ``Accept-Ranges: bytes``.
- One byte range per request (``bytes=a-b``, ``bytes=a-``, ``bytes=-n``): 206 with Content-Range,
  416 with ``Content-Range: bytes */size`` when it cannot be satisfied. A Range header that is not
  a single byte range is ignored (200, whole file), as RFC 9110 allows.
- 404 for anything that is not a regular file under the directory (directories included: no
  listings, like most static hosting).

Test hooks (plain attributes on the server; paths are relative to the served directory, '/'-separated,
no leading slash):

- ``server.log``: every request as ``(method, path, range header or None)``, in arrival order.
- ``server.fail_once[path] = offset``: the first GET of ``path`` whose body would reach past byte
  ``offset`` of the file sends correct headers, then the body up to that file offset, then drops the
  connection. For a GET of the whole file that is "close after ``offset`` bytes of body"; for a
  client that reads in ranges it is the one request that crosses the offset, so the fault sits at a
  fixed place in the file whatever the client's block size.
- ``server.ignore_ranges = True``: behave like a server without range support (always 200).
"""

from __future__ import annotations

import contextlib
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """``(start, stop)`` (stop exclusive) for a single byte range, ``"unsatisfiable"``, or None to ignore it."""
    m = _RANGE.match(header.strip())
    if not m or m.group(1) == m.group(2) == "":
        return None
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix range: the last n bytes
        n = int(last)
        return (max(size - n, 0), size) if n > 0 and size > 0 else "unsatisfiable"
    start = int(first)
    stop = size if last == "" else min(int(last) + 1, size)
    if last != "" and int(last) < start:
        return None  # syntactically invalid: ignored, per RFC 9110
    return (start, stop) if start < size else "unsatisfiable"


class FileServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: str | Path):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root).resolve()
        self.log: list[tuple[str, str, str | None]] = []
        self.fail_once: dict[str, int] = {}
        self.ignore_ranges = False
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    def file(self, rel: str) -> Path | None:
        """The regular file served at ``rel``, or None (missing, a directory, or outside the root)."""
        p = (self.root / rel).resolve()
        return p if p.is_relative_to(self.root) and p.is_file() else None

    def handle_error(self, request, client_address):
        # Clients hang up on kept-alive connections whenever they like (and after our own faults):
        # not worth a traceback. Anything else is still reported.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    def record(self, method: str, rel: str, rng: str | None) -> None:
        with self._lock:
            self.log.append((method, rel, rng))

    def take_fault(self, rel: str, start: int, stop: int) -> int | None:
        """File offset at which to drop this response, consuming the fault; None when it does not apply."""
        with self._lock:
            offset = self.fail_once.get(rel)
            if offset is None or not (start <= offset < stop):
                return None
            del self.fail_once[rel]
            return offset


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections alive like real servers do, so a dropped connection is a real fault.
    protocol_version = "HTTP/1.1"
    # Headers and body go out as two writes; with Nagle on, each small response waits ~40 ms for an ACK.
    disable_nagle_algorithm = True
    server: FileServer

    def log_message(self, format, *args):  # quiet: the server keeps its own log
        pass

    def do_HEAD(self):
        self._serve(send_body=False)

    def do_GET(self):
        self._serve(send_body=True)

    def _serve(self, send_body: bool) -> None:
        rel = unquote(urlsplit(self.path).path).lstrip("/")
        rng = self.headers.get("Range")
        self.server.record(self.command, rel, rng)
        path = self.server.file(rel)
        if path is None:
            return self._status_only(404)
        size = path.stat().st_size
        parsed = None if rng is None or self.server.ignore_ranges else parse_range(rng, size)
        if parsed == "unsatisfiable":
            return self._status_only(416, {"Content-Range": f"bytes */{size}"})
        start, stop = parsed or (0, size)
        self.send_response(206 if parsed else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(stop - start))
        if parsed:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{size}")
        self.end_headers()
        if not send_body:
            return
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(stop - start)
        cut = self.server.take_fault(rel, start, stop)
        if cut is None:
            self.wfile.write(body)
            return
        # Fault: promise the whole range in Content-Length, send part of it, then hang up.
        self.wfile.write(body[: cut - start])
        self.wfile.flush()
        self.close_connection = True

    def _status_only(self, code: int, headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


@contextlib.contextmanager
def serve(directory: str | Path):
    """Serve ``directory`` for the duration of the block: yields ``(base_url, server)``."""
    server = FileServer(directory)
    thread = threading.Thread(target=server.serve_forever, name="test-httpserver", daemon=True)
    thread.start()
    try:
        yield server.url, server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
