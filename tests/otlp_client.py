"""An application instrumented with the OpenTelemetry Python SDK, for
tests/otlp.rs: it records known values on every instrument kind and
exports them to tallyd with the SDK's own OTLP exporter (HTTP or gRPC),
then prints what it recorded as JSON, for the test to compare with
ClickHouse.

    otlp_client.py ENDPOINT http|grpc delta|cumulative SERVICE ROUNDS INTERVAL_MS

Over TLS (an https:// endpoint) the exporter trusts OTLP_CA_FILE, shows the
client certificate OTLP_CLIENT_CERT with OTLP_CLIENT_KEY when set, and
sends `Authorization: Bearer $OTLP_TOKEN` when set: the exporters' own
options for each.
"""

import json
import os
import sys
import time

from opentelemetry.metrics import Observation
from opentelemetry.sdk.metrics import (
    Counter,
    Histogram,
    MeterProvider,
    ObservableCounter,
    ObservableGauge,
    ObservableUpDownCounter,
    UpDownCounter,
)
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation, View
from opentelemetry.sdk.resources import Resource

endpoint, protocol, temporality, service = sys.argv[1:5]
rounds, interval_ms = int(sys.argv[5]), int(sys.argv[6])

t = (
    AggregationTemporality.DELTA
    if temporality == "delta"
    else AggregationTemporality.CUMULATIVE
)
preferred = {
    Counter: t,
    UpDownCounter: t,
    Histogram: t,
    ObservableCounter: t,
    ObservableUpDownCounter: t,
    ObservableGauge: AggregationTemporality.CUMULATIVE,
}
ca = os.environ.get("OTLP_CA_FILE")
cert = os.environ.get("OTLP_CLIENT_CERT")
key = os.environ.get("OTLP_CLIENT_KEY")
token = os.environ.get("OTLP_TOKEN")
headers = {"authorization": f"Bearer {token}"} if token else None
if protocol == "grpc":
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
        OTLPMetricExporter,
    )

    if ca:
        import grpc

        def read(path):
            with open(path, "rb") as f:
                return f.read()

        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(ca),
            private_key=read(key) if key else None,
            certificate_chain=read(cert) if cert else None,
        )
        exporter = OTLPMetricExporter(
            endpoint=endpoint,
            insecure=False,
            credentials=credentials,
            headers=headers,
            preferred_temporality=preferred,
            timeout=30,
        )
    else:
        exporter = OTLPMetricExporter(
            endpoint=endpoint,
            insecure=True,
            headers=headers,
            preferred_temporality=preferred,
            timeout=30,
        )
else:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter,
    )

    exporter = OTLPMetricExporter(
        endpoint=endpoint,
        certificate_file=ca,
        client_certificate_file=cert,
        client_key_file=key,
        headers=headers,
        preferred_temporality=preferred,
        timeout=30,
    )

reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
provider = MeterProvider(
    resource=Resource.create(
        {
            "service.name": service,
            "host.name": "otlp-test-host",
            "process.pid": 12345,
        }
    ),
    metric_readers=[reader],
    views=[
        # Instruments no view names keep their default aggregation.
        View(
            instrument_name="otlp.exp",
            aggregation=ExponentialBucketHistogramAggregation(max_size=160),
        ),
    ],
)
meter = provider.get_meter("tallyd-test", "1.0")
requests = meter.create_counter("otlp.requests")
inflight = meter.create_up_down_counter("otlp.inflight")
latency = meter.create_histogram("otlp.latency", unit="ms")
exp = meter.create_histogram("otlp.exp", unit="ms")
gauge_value = [0.0]
meter.create_observable_gauge(
    "otlp.temperature", callbacks=[lambda _: [Observation(gauge_value[0])]]
)

sent = {
    "requests": 0,
    "inflight": 0,
    "latency_count": 0,
    "latency_sum": 0.0,
    "latency_min": None,
    "latency_max": None,
    "exp_count": 0,
    "exp_sum": 0.0,
}
for r in range(rounds):
    for i in range(10):
        n = (r + i) % 4 + 1
        requests.add(n, {"route": "/a" if i % 2 else "/b"})
        sent["requests"] += n
        inflight.add(2)
        inflight.add(-1)
        sent["inflight"] += 1
        v = float((r * 10 + i) % 250 + 1)
        latency.record(v, {"route": "/a"})
        exp.record(v * 1.5)
        sent["latency_count"] += 1
        sent["exp_count"] += 1
        sent["latency_sum"] += v
        sent["exp_sum"] += v * 1.5
        lo, hi = sent["latency_min"], sent["latency_max"]
        sent["latency_min"] = v if lo is None else min(lo, v)
        sent["latency_max"] = v if hi is None else max(hi, v)
    gauge_value[0] = float(r + 1) * 0.5
    time.sleep(interval_ms / 1000.0 / 4)
sent["temperature"] = gauge_value[0]
ok = provider.force_flush(timeout_millis=60_000)
provider.shutdown()
sent["flushed"] = bool(ok)
print(json.dumps(sent))
