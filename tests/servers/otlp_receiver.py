#!/usr/bin/env python3
"""OTLP/gRPC receiver for infertap's end-to-end tests, independent of infertap's code.

It decodes with the official protobuf definitions (PyPI `opentelemetry-proto`, served with
`grpcio`) and appends one JSON line per export call to --out:
  {"signal": "traces"|"metrics", "unix_ns": <receive time>, "metadata": {key: value, ...},
   "request": <the request as google.protobuf.json_format.MessageToDict gives it>,
   "raw_hex": <the request re-serialized, hex>}
(`raw_hex` lets a test look for byte strings in everything received, whatever the field.)

Options: --port (0 picks a free one; written to --port-file once serving), --delay-ms (sleep
after logging an export, before answering it: a slow receiver), --status (answer every export with this gRPC
status code name instead of OK, e.g. UNAVAILABLE).

Installed by `cargo xtask setup` into ~/.cache/infertap/otlp-venv (INFERTAP_OTLP_VENV).
"""

import argparse
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


class Sink:
    def __init__(self, path, delay_ms, status):
        self.path, self.delay, self.status = path, delay_ms / 1000.0, status
        self.lock = threading.Lock()

    def record(self, signal, request, context):
        now = time.time_ns()
        line = {
            "signal": signal,
            "unix_ns": now,
            "metadata": {k: v for k, v in context.invocation_metadata()},
            "request": json_format.MessageToDict(request),
            "raw_hex": request.SerializeToString().hex(),
        }
        with self.lock, open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
        # Logged first, answered late: a test sees the export arrive while the sender waits.
        if self.delay:
            time.sleep(self.delay)
        if self.status is not None:
            context.abort(self.status, "scripted failure")


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        self.sink.record("traces", request, context)
        return trace_service_pb2.ExportTraceServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        self.sink.record("metrics", request, context)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--delay-ms", type=int, default=0)
    ap.add_argument("--status", default=None)
    a = ap.parse_args()
    status = getattr(grpc.StatusCode, a.status) if a.status else None
    sink = Sink(a.out, a.delay_ms, status)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(sink), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(sink), server)
    port = server.add_insecure_port("127.0.0.1:%d" % a.port)
    if port == 0:
        sys.exit("could not bind 127.0.0.1:%d" % a.port)
    server.start()
    tmp = a.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, a.port_file)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
