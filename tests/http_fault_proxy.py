"""An HTTP proxy on loopback that loses responses, run as its own process:

    python http_fault_proxy.py LISTEN_PORT TARGET_PORT PUT_PATH_REGEX [DROPS [log]]

It forwards every request to the S3 server on TARGET_PORT (moto) and hands the answer back,
except for the first DROPS (default 1) ``PUT`` requests whose path matches the regex: those
reach the server, which applies them, and then the proxy closes the client's connection
without a byte of the answer. That is a lost response as a client sees it (a network cut, a
proxy timing out), after the store did the write. Each lost response is printed as
``dropped PUT <path> -> <status>``; ``ready`` is printed once it listens. With ``log``, every
request is printed as ``req METHOD PATH`` (the benchmarks count storage requests so).
"""

from __future__ import annotations

import http.client
import re
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
       "upgrade"}


def main(listen: int, target: int, pattern: str, drops: int, log: bool = False) -> None:
    budget = {"left": drops}
    lock = threading.Lock()
    rx = re.compile(pattern)
    out = threading.Lock()

    def say(line: str) -> None:
        # One write per line under a lock: print() from the handler threads writes the text
        # and its newline apart, and lines interleaved ("...07.jsonreq GET ...").
        with out:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                out = b""
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _forward(self) -> None:
            if log:
                say(f"req {self.command} {self.path}")
            body = self._body()
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            if body or self.command in ("PUT", "POST"):
                headers["Content-Length"] = str(len(body))
            conn = http.client.HTTPConnection("127.0.0.1", target, timeout=60)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            drop = False
            if self.command == "PUT" and rx.search(self.path.split("?", 1)[0]):
                with lock:
                    if budget["left"] > 0:
                        budget["left"] -= 1
                        drop = True
            if drop:
                say(f"dropped PUT {self.path} -> {resp.status}")
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            self.send_response_only(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in HOP and (k.lower() != "content-length" or
                                             self.command == "HEAD"):
                    self.send_header(k, v)
            if self.command != "HEAD":  # a HEAD answer keeps the object's own length
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    server = ThreadingHTTPServer(("127.0.0.1", listen), Handler)
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3],
         int(sys.argv[4]) if len(sys.argv) > 4 else 1, sys.argv[5:6] == ["log"])
