"""The HTTP server behind --metrics-port: GET /metrics on threads of its own, bounded in
how many scrapes it serves at once and how long each may take.

Imported only when --metrics-port is given (pushpull/metrics.py, Exporter).
"""

import http.server
import os
import socket
import threading
import time

SCRAPERS_MAX = 8  # scrapes served at once; more connections are closed at once
SCRAPE_TIMEOUT = 5.0  # seconds a scraper's connection may stay silent before it is closed
SCRAPE_DEADLINE = 10.0  # seconds a whole scrape may take, request in and reply out


class ScrapeHandler(http.server.BaseHTTPRequestHandler):
    """GET /metrics; anything else 404. Silent: a scrape is no log line."""

    timeout = SCRAPE_TIMEOUT  # a client that sends nothing is closed after this
    server_version = "pushpull-metrics"

    def do_GET(self):  # noqa: N802 (http.server's name)
        """Serve the metrics, or 404."""
        if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
            self.send_error(404, "only /metrics here")
            return
        exporter = self.server.exporter
        try:
            body, final = exporter.render()
        except Exception:  # a scrape's edge: the run goes on, the scraper gets a 500
            if exporter.log is not None:
                exporter.log.exception("[METRICS] a scrape failed")
            self.send_error(500)
            return
        self.send_response(200)
        self.send_header("Content-Type", exporter.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)  # unbuffered: in the kernel's hands once it returns
        exporter.served(final)

    def log_message(self, format, *args):  # noqa: A002 (http.server's signature)
        """No access log."""


class ScrapeServer(http.server.HTTPServer):
    """An HTTP server with one daemon thread per scrape, at most SCRAPERS_MAX at once,
    each cut off SCRAPE_DEADLINE after it connected (a client that trickles its request)."""

    # SO_REUSEADDR lets a restart bind past TIME_WAIT on POSIX; on Windows it would let
    # a second process take the port.
    allow_reuse_address = os.name != "nt"
    request_queue_size = 64  # connections waiting for accept(): a burst is taken, then closed

    def __init__(self, bind, port, exporter):
        host = "0.0.0.0" if bind == "*" else bind
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.exporter = exporter
        self.slots = threading.BoundedSemaphore(SCRAPERS_MAX)
        self.deadlines = {}  # socket of a scrape being served -> when it is cut off
        super().__init__((host, port), ScrapeHandler)

    def process_request(self, request, client_address):
        """Serve the connection on a thread of its own, or close it when SCRAPERS_MAX are
        being served: many or slow clients never hold up the run, nor this loop."""
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        self.deadlines[request] = time.monotonic() + SCRAPE_DEADLINE
        threading.Thread(target=self.serve_one, args=(request, client_address),
                         name="metrics-scrape", daemon=True).start()

    def serve_one(self, request, client_address):
        """One connection, start to end (a thread's body)."""
        try:
            self.finish_request(request, client_address)
        except OSError:
            pass  # the client went away or stayed silent: nothing to tell
        finally:
            self.deadlines.pop(request, None)
            self.shutdown_request(request)
            self.slots.release()

    def service_actions(self):
        """Between two polls of serve_forever(): cut off the scrapes past their deadline
        (their thread's blocked read or write then fails, and it ends)."""
        now = time.monotonic()
        for request, deadline in self.deadlines.copy().items():
            if now >= deadline:
                try:
                    request.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed by its thread
