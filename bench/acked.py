#!/usr/bin/env python3
"""Acknowledged protobuf batches at a tallyd's proto TCP listener, as fast as
it acks them: CONNS connections, each keeping up to WINDOW batches on their
way (answers come in order), each batch EVENTS counter events over KEYS
names, for SECONDS. Prints one line of JSON: acked batches and events per
second, and the ack latency (a batch's send to its ack, ms) at p50 and p99.

    bench/acked.py HOST:PORT SECONDS CONNS WINDOW EVENTS KEYS [CLIENT_PREFIX]

The protobuf is hand-encoded (proto/tallyd.proto: Batch 1 client_id,
2 sequence, 3 events; Event 1 name, 3 counter), so no library is needed.
"""
import asyncio
import json
import struct
import sys
import time


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


def field(num, wire, payload):
    return varint(num << 3 | wire) + payload


def string(num, s):
    b = s.encode()
    return field(num, 2, varint(len(b)) + b)


def events(n, keys, offset):
    out = bytearray()
    for i in range(n):
        ev = string(1, f"acked.k{(offset + i) % keys}") + field(3, 1, struct.pack("<d", 1.0))
        out += field(3, 2, varint(len(ev)) + ev)
    return bytes(out)


def ack_status(body):
    """The Ack's status field (0: OK when absent)."""
    at, status = 0, 0
    while at < len(body):
        key, at = read_varint(body, at)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, at = read_varint(body, at)
            if num == 2:
                status = v
        elif wire == 2:
            n, at = read_varint(body, at)
            at += n
        else:
            raise ValueError(f"wire type {wire}")
    return status


def read_varint(b, at):
    shift = n = 0
    while True:
        c = b[at]
        at += 1
        n |= (c & 0x7F) << shift
        if not c & 0x80:
            return n, at
        shift += 7


async def read_frame(reader):
    shift = n = 0
    while True:
        c = (await reader.readexactly(1))[0]
        n |= (c & 0x7F) << shift
        if not c & 0x80:
            break
        shift += 7
    return await reader.readexactly(n)


async def connection(addr, client, deadline, window, body_events, stats):
    host, port = addr.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    sent = asyncio.Queue()
    slots = asyncio.Semaphore(window)
    head = string(1, client)

    async def send():
        seq = 1
        while time.monotonic() < deadline:
            await slots.acquire()
            batch = head + field(2, 0, varint(seq)) + body_events
            writer.write(varint(len(batch)) + batch)
            await sent.put(time.monotonic())
            seq += 1
            if seq % 16 == 0:
                await writer.drain()
        await writer.drain()
        await sent.put(None)

    async def receive():
        while True:
            t = await sent.get()
            if t is None:
                return
            status = ack_status(await read_frame(reader))
            now = time.monotonic()
            slots.release()
            if status in (0, 1):
                stats["acked"] += 1
                stats["lat"].append(now - t)
            else:
                stats["other"] += 1

    await asyncio.gather(send(), receive())
    writer.close()


async def main():
    addr, secs, conns, window, n, keys = sys.argv[1:7]
    prefix = sys.argv[7] if len(sys.argv) > 7 else "acked"
    secs, conns, window, n, keys = float(secs), int(conns), int(window), int(n), int(keys)
    stats = {"acked": 0, "other": 0, "lat": []}
    start = time.monotonic()
    deadline = start + secs
    bodies = [events(n, keys, i * n) for i in range(conns)]
    await asyncio.gather(*(connection(addr, f"{prefix}-{time.time_ns()}-{i}", deadline, window, bodies[i], stats) for i in range(conns)))
    took = time.monotonic() - start
    lat = sorted(stats["lat"])
    q = lambda p: round(1000 * lat[min(len(lat) - 1, int(p * len(lat)))], 3) if lat else None
    print(json.dumps({
        "batches_per_s": round(stats["acked"] / took, 1),
        "events_per_s": round(stats["acked"] * n / took, 1),
        "acked_events": stats["acked"] * n,
        "not_acked": stats["other"],
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
    }))


if __name__ == "__main__":
    asyncio.run(main())
