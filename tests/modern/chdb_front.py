"""A small ClickHouse HTTP front over one persistent chdb session, so that
tallyd's tests run against the modern ClickHouse engine that PyPI's chdb
embeds (26.9 with chdb 4.4), next to Debian's clickhouse-server 18.16.

    python3 chdb_front.py PORT DATA_DIR

What it serves, as ClickHouse's HTTP interface does:
- GET /ping: "Ok.".
- GET or POST /?query=...: the query from the URL, followed by the body.
  An INSERT whose URL query ends in FORMAT <name> takes the body as its
  data, passed to the engine unchanged (chdb's streaming insert).
- URL parameters other than query, database, user and password are
  settings: applied with SET before the query and reset after it, except
  `readonly`, which is ignored: the one session could not leave read-only
  mode again (tallyd's explorer asks for it; 18.16 enforces it in the
  other lane).
- Errors: HTTP 500 with the engine's text, "Code: N. DB::Exception: ...".

What it cannot do: it makes one engine call at a time (a lock serialises
requests); it has no replicated tables or ZooKeeper, no compression, no
sessions or authentication (user and password are ignored), and no
progress headers.
"""

import http.server
import re
import sys
import threading
import urllib.parse

from chdb import session

# Parameters that are HTTP-interface knobs, not engine settings.
HTTP_ONLY = {
    "query",
    "database",
    "user",
    "password",
    "default_format",
    "query_id",
    "session_id",
    "session_timeout",
    "wait_end_of_query",
    "send_progress_in_http_headers",
    "http_headers_progress_interval_ms",
    "buffer_size",
    "compress",
    "decompress",
    "enable_http_compression",
}
INSERT = re.compile(r"^\s*(INSERT\s+INTO\s+.*?)\s+FORMAT\s+(\w+)\s*$", re.I | re.S)
FORMAT = re.compile(r"\bFORMAT\s+\w+\s*;?\s*$", re.I)

LOCK = threading.Lock()
SESSION = None


def literal(value):
    if re.fullmatch(r"-?\d+(\.\d+)?", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class Front(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def answer(self, code, payload):
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=UTF-8")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_GET(self):
        self.handle_query()

    def do_POST(self):
        self.handle_query()

    def handle_query(self):
        url = urllib.parse.urlsplit(self.path)
        if url.path == "/ping":
            self.answer(200, b"Ok.\n")
            return
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        body = self.body()
        query = params.get("query", "")
        settings = {
            k: v for k, v in params.items() if k not in HTTP_ONLY and k != "readonly"
        }
        with LOCK:
            try:
                for name, value in settings.items():
                    SESSION.query(f"SET {name} = {literal(value)}")
                try:
                    result = self.run(query, body, params.get("default_format"))
                finally:
                    for name in settings:
                        SESSION.query(f"SET {name} = DEFAULT")
            except Exception as e:  # the engine's error, as ClickHouse words it
                text = str(e)
                if not text.startswith("Code:"):
                    text = "Code: 1000. DB::Exception: " + text
                self.answer(500, (text + "\n").encode())
                return
        self.answer(200, result)

    def run(self, query, body, default_format):
        insert = INSERT.match(query)
        if insert:
            inserter = SESSION.send_insert(insert.group(1), insert.group(2))
            if body:
                inserter.append(body)
            inserter.finish()
            return b""
        sql = (query + ("\n" if query and body else "") + body.decode()).strip()
        if not sql:
            return b""
        if not FORMAT.search(sql) and re.match(r"^\s*(SELECT|SHOW|DESCRIBE|EXISTS|WITH)\b", sql, re.I):
            sql += " FORMAT " + (default_format or "TabSeparated")
        result = SESSION.query(sql, "TabSeparated")
        return result.bytes() if result is not None else b""


def main():
    global SESSION
    port, path = int(sys.argv[1]), sys.argv[2]
    SESSION = session.Session(path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Front)
    server.serve_forever()


if __name__ == "__main__":
    main()
