#!/usr/bin/env python3
"""A stand-in for a Pyroscope server's HTTP ingest endpoint (stdlib only), for the collector's
forwarding test: every POST is recorded as <dir>/req-<n>.json (method, path with query, headers)
and <dir>/req-<n>.body (the raw body). The first --fail-first requests are answered 503 (so the
sender's retry is exercised), the rest 200. Prints "listening <port>" once bound.

usage: ingest_receiver.py --dir DIR [--fail-first N]
"""
import argparse
import http.server
import json
import os
import sys
import threading

lock = threading.Lock()
count = 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--fail-first", type=int, default=0)
    args = ap.parse_args()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            global count
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with lock:
                count += 1
                n = count
            base = os.path.join(args.dir, "req-%d" % n)
            with open(base + ".body", "wb") as f:
                f.write(body)
            meta = {
                "method": self.command,
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "status": 503 if n <= args.fail_first else 200,
            }
            with open(base + ".json.tmp", "w") as f:
                json.dump(meta, f)
            os.rename(base + ".json.tmp", base + ".json")
            reply = b"try again\n" if meta["status"] == 503 else b"ok\n"
            self.send_response(meta["status"])
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print("listening %d" % srv.server_address[1], flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
