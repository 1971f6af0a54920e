"""Sends DogStatsD metrics with Datadog's Python client over a Unix datagram
socket: 100 increments of py.hits, a gauge, and 4 distribution values.
Buffered (several metrics per datagram, as Datadog recommends) and
blocking: a non-blocking sender drops what does not fit the receiver's
queue of net.unix.max_dgram_qlen datagrams (10 by default on Linux).

Usage: python3 client.py SOCKET_PATH
"""
import sys

from datadog.dogstatsd.base import DogStatsd

client = DogStatsd(
    socket_path=sys.argv[1],
    constant_tags=["lang:python"],
    disable_buffering=False,
    socket_timeout=10,
)
for _ in range(100):
    client.increment("py.hits")
client.gauge("py.queue", 7)
for v in (0.5, 1.5, 2.5, 3.5):
    client.distribution("py.latency", v)
client.flush()
client.close_socket()
