"""A protobuf client written against proto/tallyd.proto with Google's Python
protobuf library (not prost), for tests/proto.rs.

    python3 tests/python_client.py PROTO_DIR HOST:PORT

Compiles the schema with grpcio-tools' bundled protoc, sends one batch twice
over TCP with varint length-delimited framing, and prints each ack.
"""
import importlib
import socket
import sys
import tempfile

from grpc_tools import protoc


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(sock):
    shift, n = 0, 0
    while True:
        b = sock.recv(1)
        if not b:
            raise EOFError("connection closed")
        n |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return n
        shift += 7


def read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("connection closed")
        data += chunk
    return data


def main():
    proto_dir, addr = sys.argv[1], sys.argv[2]
    out = tempfile.mkdtemp()
    if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"{proto_dir}/tallyd.proto"]) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    pb = importlib.import_module("tallyd_pb2")

    tags = [pb.Tag(key="region", value="eu"), pb.Tag(key="lang", value="python")]
    batch = pb.Batch(client_id="python-client", sequence=1)
    batch.events.append(pb.Event(name="py.requests", tags=tags, counter=40))
    batch.events.append(pb.Event(name="py.requests", tags=tags, counter=2))
    batch.events.append(pb.Event(name="py.latency", timer_ms=1.5, sample_rate=0.5))
    batch.events.append(pb.Event(name="py.latency", timer_ms=2.5, sample_rate=0.5))
    batch.events.append(pb.Event(name="", counter=1))  # invalid: no name
    body = batch.SerializeToString()

    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        for expected_sequence in (1, 2):
            sock.sendall(varint(len(body)) + body)
            ack = pb.Ack.FromString(read_exact(sock, read_varint(sock)))
            assert ack.sequence == 1, ack
            print(f"ack {expected_sequence} {pb.Ack.Status.Name(ack.status)} {ack.rejected_events}")


if __name__ == "__main__":
    main()
