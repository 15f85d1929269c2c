"""A real HTTP server on 127.0.0.1 for the tests of the validator's HTTP to miners: a subclass says what a POST
answers (``respond``); the server counts the requests and the bytes it sent, and stops on ``stop()``."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class PostServer:
    """Serves each POST on its own thread: reads the body, then calls ``respond(handler, body)``."""

    def __init__(self):
        self.hits, self.sent = 0, 0
        self.finished = threading.Event()  # the handler wrote everything it meant to
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                server.hits += 1
                server.respond(self, self.rfile.read(int(self.headers.get("Content-Length", 0))))

            def log_message(self, *args):
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def respond(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        raise NotImplementedError

    def write(self, handler: BaseHTTPRequestHandler, data: bytes) -> bool:
        """Send ``data`` raw; False once the client has gone."""
        try:
            handler.wfile.write(data)
        except OSError:
            return False
        self.sent += len(data)
        return True

    def stop(self) -> None:
        self.stopping.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
