"""One raw OTLP/gRPC Export call with grpcio, for tests/otlp.rs: prints the
status code's name, the RetryInfo delay in seconds (empty without one),
and the message.

    otlp_grpc_probe.py HOST:PORT < HEX_OF_THE_REQUEST_MESSAGE
"""

import sys

import grpc
from google.rpc import error_details_pb2, status_pb2

target, message = sys.argv[1], bytes.fromhex(sys.stdin.read().strip())
channel = grpc.insecure_channel(target)
export = channel.unary_unary(
    "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
)
try:
    response = export(message, timeout=30)
    print("OK", "", len(response))
except grpc.RpcError as e:
    retry = ""
    details = dict(e.trailing_metadata() or ()).get("grpc-status-details-bin")
    if details:
        for d in status_pb2.Status.FromString(details).details:
            info = error_details_pb2.RetryInfo()
            if d.Unpack(info):
                retry = str(info.retry_delay.seconds)
    print(e.code().name, retry, e.details())
