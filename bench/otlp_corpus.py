"""Writes the load of bench/ingest.sh: REQUESTS OTLP export requests
(protobuf, with the opentelemetry-proto package the Python SDK brings) of
POINTS delta monotonic Sum points each over KEYS series into DIR/otlp-N.pb,
their times placeholders (TIME + N and START + N, fixed64 on the wire) that
the sender replaces with the time it sends them at; and the same samples as StatsD lines
(one counter line per point, the point's attributes as DogStatsD tags) into
DIR/statsd.txt.

    otlp_corpus.py DIR REQUESTS POINTS KEYS RUN

RUN is an attribute (and tag) of every point, so that each run's series are
new ones (an earlier run's points would otherwise make its own retries).
"""

import os
import sys

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.metrics.v1.metrics_pb2 import AGGREGATION_TEMPORALITY_DELTA

out, requests, points, keys = sys.argv[1], *map(int, sys.argv[2:5])
run = sys.argv[5]
# Placeholders of a request's time_unix_nano and start_time_unix_nano.
TIME, START = 0x1122334455000000, 0x0A0B0C0D0E000000
key = 0
with open(os.path.join(out, "statsd.txt"), "w") as statsd:
    for r in range(requests):
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        for k, v in (("service.name", "bench"), ("host.name", "bench-host")):
            a = rm.resource.attributes.add()
            a.key, a.value.string_value = k, v
        sm = rm.scope_metrics.add()
        sm.scope.name = "bench"
        # Points of one metric name per request, ten names in turn.
        m = sm.metrics.add()
        m.name = "otlp.bench.m%d" % (r % 10)
        m.sum.aggregation_temporality = AGGREGATION_TEMPORALITY_DELTA
        m.sum.is_monotonic = True
        for _ in range(points):
            series = key % keys
            key += 1
            p = m.sum.data_points.add()
            p.start_time_unix_nano = START + r
            p.time_unix_nano = TIME + r
            p.as_int = 1
            for k, v in (("route", "/r%d" % (series % 100)), ("k", str(series)), ("run", run)):
                a = p.attributes.add()
                a.key, a.value.string_value = k, v
            statsd.write(
                "%s:1|c|#k:%d,route:/r%d,run:%s,service.name:bench\n"
                % (m.name, series, series % 100, run)
            )
        with open(os.path.join(out, "otlp-%d.pb" % r), "wb") as f:
            f.write(req.SerializeToString())
