"""Clients of tallyd's TLS listeners built on Python's own ssl module, for
tests/security.rs.

    tls_client.py statsd HOST PORT CA LINE COUNT [CERT KEY]
        sends LINE COUNT times over one TLS stream (with a client
        certificate when given), then closes it as TLS says
        (close_notify); prints "sent COUNT", or "refused: WHY" (exit 3).
    tls_client.py https URL CA TOKEN [CERT KEY]
        GETs URL with Authorization: Bearer TOKEN (none when TOKEN is
        "-"); prints the HTTP status and the body's first line.
"""

import socket
import ssl
import sys
import urllib.error
import urllib.request


def context(ca, cert=None, key=None):
    ctx = ssl.create_default_context(cafile=ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def statsd(host, port, ca, line, count, cert=None, key=None):
    try:
        raw = socket.create_connection((host, int(port)), timeout=10)
        with context(ca, cert, key).wrap_socket(raw, server_hostname=host) as s:
            payload = (line + "\n").encode()
            for start in range(0, int(count), 100):
                s.sendall(payload * min(100, int(count) - start))
            # TLS 1.3 refuses a client certificate after the client's side
            # of the handshake: a refusal shows here, as an alert.
            s.settimeout(1)
            try:
                s.unwrap()
            except (socket.timeout, ssl.SSLError, OSError) as e:
                if isinstance(e, ssl.SSLError) and "ALERT" in str(e).upper():
                    raise
        print(f"sent {count}")
    except (ssl.SSLError, OSError) as e:
        print(f"refused: {e}")
        sys.exit(3)


def https(url, ca, token, cert=None, key=None):
    req = urllib.request.Request(url)
    if token != "-":
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=context(ca, cert, key), timeout=10) as r:
            print(r.status)
            print(r.read().decode().splitlines()[0])
    except urllib.error.HTTPError as e:
        print(e.code)
        print(e.read().decode().splitlines()[0])


if __name__ == "__main__":
    kind, args = sys.argv[1], sys.argv[2:]
    if kind == "statsd":
        statsd(*args)
    else:
        https(*args)
