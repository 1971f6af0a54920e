"""An acked protobuf client for tests/replication.rs, written against
proto/tallyd.proto with Google's Python protobuf library (not prost).

    python3 tests/replication_client.py PROTO_DIR HOST:PORT CLIENT_ID FIRST COUNT NAME VALUE

Sends COUNT batches, sequences FIRST.., each one counter event NAME of
VALUE, one at a time; a batch answered OVERLOADED, or whose connection
breaks, is sent again (same sequence) on a new connection until it is
answered OK or DUPLICATE. Prints "acked N duplicates D".
"""
import importlib
import os
import socket
import sys
import tempfile
import time

from grpc_tools import protoc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from python_client import read_exact, read_varint, varint  # noqa: E402


def main():
    proto_dir, addr, client, first, count, name, value = sys.argv[1:8]
    out = tempfile.mkdtemp()
    if protoc.main(["protoc", f"-I{proto_dir}", f"--python_out={out}", f"{proto_dir}/tallyd.proto"]) != 0:
        sys.exit("protoc failed")
    sys.path.insert(0, out)
    pb = importlib.import_module("tallyd_pb2")
    host, port = addr.rsplit(":", 1)
    acked = duplicates = 0
    sock = None
    for sequence in range(int(first), int(first) + int(count)):
        batch = pb.Batch(client_id=client, sequence=sequence)
        batch.events.append(pb.Event(name=name, counter=float(value)))
        body = batch.SerializeToString()
        deadline = time.time() + 60
        while True:
            try:
                if sock is None:
                    sock = socket.create_connection((host, int(port)), timeout=10)
                sock.sendall(varint(len(body)) + body)
                ack = pb.Ack.FromString(read_exact(sock, read_varint(sock)))
                status = pb.Ack.Status.Name(ack.status)
            except OSError as e:
                status = f"error {e}"
            except EOFError as e:
                status = f"closed {e}"
            if status in ("OK", "DUPLICATE"):
                acked += 1
                duplicates += status == "DUPLICATE"
                break
            if sock is not None:
                sock.close()
                sock = None
            if time.time() > deadline:
                sys.exit(f"sequence {sequence}: {status} for 60 s")
            time.sleep(0.2)
    print(f"acked {acked} duplicates {duplicates}")


if __name__ == "__main__":
    main()
