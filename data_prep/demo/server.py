"""A local image web server that fails the way the web does, for the demo corpus and the tests.

Serves in-memory images on 127.0.0.1 at an ephemeral port. Each path is either healthy or
carries one injected fault, so a downloader run can be checked fault by fault:

    with FaultyImageServer(routes) as server:
        url = server.url_for("/img/00001.png")
        ...
    server.requests_total  # how many requests arrived (0 on an incremental re-run)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The faults a real crawl meets. The value is what the fault looks like on the wire.
HEALTHY = "healthy"
NOT_FOUND = "http_404"
SERVER_ERROR = "http_500"
SLOW = "slow"  # answers only after the client's timeout
TRUNCATED = "truncated"  # promises the whole file in Content-Length, then drops the connection
HTML_AS_IMAGE = "html_as_image"  # an error page labelled image/png (soft 404)
OPTED_OUT = "noai"  # a fine image whose X-Robots-Tag forbids AI use
FAULTS = (NOT_FOUND, SERVER_ERROR, SLOW, TRUNCATED, HTML_AS_IMAGE, OPTED_OUT)

_HTML_PAGE = (
    b"<!DOCTYPE html><html><head><title>Page moved</title></head>"
    b"<body><h1>This image is no longer available</h1></body></html>"
)


@dataclass(frozen=True)
class Route:
    body: bytes
    content_type: str
    fault: str = HEALTHY
    # For OPTED_OUT: the X-Robots-Tag value; a "bot: noai" form addresses one user-agent token.
    robots_tag: str = "noai, noimageai"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - silences the per-request access log
        pass

    def do_GET(self):  # noqa: N802 - name fixed by http.server
        self.server.count_request(self.path)
        route = self.server.routes.get(self.path)
        if route is None or route.fault == NOT_FOUND:
            self.send_error(404, "Not Found")
            return
        if route.fault == SERVER_ERROR:
            self.send_error(500, "Internal Server Error")
            return
        if route.fault == SLOW:
            # An Event rather than sleep() so that stopping the server releases these threads at once.
            if self.server.stopping.wait(self.server.slow_seconds):
                return
        try:
            self._send(route)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the slow fault): that is the point

    def _send(self, route: Route):
        body = _HTML_PAGE if route.fault == HTML_AS_IMAGE else route.body
        self.send_response(200)
        self.send_header("Content-Type", route.content_type)
        self.send_header("Content-Length", str(len(body)))
        if route.fault == OPTED_OUT:
            self.send_header("X-Robots-Tag", route.robots_tag)
        self.end_headers()
        if route.fault == TRUNCATED:
            body = body[: len(body) // 2]
        self.wfile.write(body)
        self.wfile.flush()


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads, joined on close: a clean shutdown, no thread outlives the server.
    daemon_threads = False
    block_on_close = True
    # A downloader opens processes x threads connections at once; the default backlog of 5 drops
    # SYNs, and the 1 s / 3 s SYN retransmits then look like timeouts of healthy URLs.
    request_queue_size = 256

    def __init__(self, routes: dict[str, Route], slow_seconds: float):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes = routes
        self.slow_seconds = slow_seconds
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self.requests_by_path: dict[str, int] = {}

    def count_request(self, path: str):
        with self._lock:
            self.requests_by_path[path] = self.requests_by_path.get(path, 0) + 1


class FaultyImageServer:
    """Threaded HTTP server on 127.0.0.1 (ephemeral port) serving `routes` with their faults."""

    def __init__(self, routes: dict[str, Route], slow_seconds: float = 4.0):
        unknown = {r.fault for r in routes.values()} - {HEALTHY, *FAULTS}
        if unknown:
            raise ValueError(f"unknown fault(s) {sorted(unknown)}; use one of {[HEALTHY, *FAULTS]}")
        self._routes = dict(routes)
        self._slow_seconds = slow_seconds
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> FaultyImageServer:
        self._server = _Server(self._routes, self._slow_seconds)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name="faulty-image-server"
        )
        self._thread.start()
        return self

    def stop(self):
        if self._server is None:
            return
        self._server.stopping.set()
        self._server.shutdown()
        self._server.server_close()  # joins the handler threads
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            raise RuntimeError("the demo image server did not stop within 10 s")

    def __enter__(self) -> FaultyImageServer:
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("start the server before asking for its URL")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_route(self, path: str, route: Route) -> None:
        """Change what a path serves while running (e.g. a fault that heals before a re-run)."""
        self._routes[path] = route  # the running server reads this same dict

    def url_for(self, path: str) -> str:
        return self.base_url + path

    @property
    def requests_by_path(self) -> dict[str, int]:
        return dict(self._server.requests_by_path) if self._server else {}

    @property
    def requests_total(self) -> int:
        return sum(self.requests_by_path.values())
