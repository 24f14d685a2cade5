"""A real HTTP server on 127.0.0.1 (http.server in a thread) serving a folder, with a request log and
ways to misbehave per path: answer 404 for the next N requests; send a full Content-Length and then only
the first bytes of the body before closing the connection (a transfer cut short); wait before answering;
send the body slowly (chunks with a pause between)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Optional


class ShardServer:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.log: list[tuple[str, int]] = []  # (path, status) of every GET, in order
        self.not_found: Counter = Counter()  # path -> how many more GETs answer 404
        self.cut_at: dict[str, int] = {}  # path -> bytes sent before the connection closes (every GET)
        self.delay_s = 0.0  # every GET waits this long before its answer
        self.chunk_delay_s = 0.0  # > 0: bodies go out in chunks of chunk_bytes with this pause between them
        self.chunk_bytes = 4096
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda request, address: None  # a client that gave up: not news
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> int:
        """GET requests for ``path`` (e.g. "/shard-000000.tar") so far, whatever their answer."""
        with self.lock:
            return sum(1 for p, _ in self.log if p == path)

    def _handler(self):
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(server.folder), **kw)

            def log_message(self, *args):  # quiet: the test reads server.log
                pass

            def do_GET(self):
                with server.lock:
                    missing = server.not_found[self.path] > 0
                    server.not_found[self.path] -= int(missing)
                    server.log.append((self.path, 404 if missing else 200))
                time.sleep(server.delay_s)
                if missing:
                    self.send_error(404)
                elif self.path in server.cut_at or server.chunk_delay_s:
                    self._send_body(server.cut_at.get(self.path))
                else:
                    super().do_GET()

            def _send_body(self, cut: Optional[int]):
                body = (server.folder / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                sent = body if cut is None else body[:cut]
                step = server.chunk_bytes
                for i in range(0, len(sent), step):
                    self.wfile.write(sent[i:i + step])
                    self.wfile.flush()
                    time.sleep(server.chunk_delay_s)
                self.close_connection = True

        return Handler


@contextmanager
def serving(folder: Path) -> Iterator[ShardServer]:
    server = ShardServer(folder)
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join()
