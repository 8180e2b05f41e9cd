"""A restore into another namespace reads through presigned URLs: before it starts, it waits for
the manifest's URL to answer as a restore in the same namespace waits for its bucket, and it does
not wait on a refusal (an expired URL says 403)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import urllib3

from nightjar.agent.patience import StillUnreachable, storage_probe, wait_for
from nightjar.storage.objects import ObjectMissing, StorageError
from nightjar.storage.snapshot import PresignedReader

KEY = "nightjar/app/backups/b1/manifest.json"


#: What S3 says with each status; a proxy in front of it says 502 without a body.
CODES = {
    503: "SlowDown",
    500: "InternalError",
    429: "SlowDown",
    403: "AccessDenied",
    400: "InvalidRequest",
    404: "NoSuchKey",
}


class Server:
    """Answers each GET with the next status of ``statuses`` (the last one repeats)."""

    def __init__(self) -> None:
        self.statuses: list[int] = [200]
        self.ranges: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.ranges.append(self.headers.get("Range", ""))
                status = outer.statuses.pop(0) if len(outer.statuses) > 1 else outer.statuses[0]
                code = CODES.get(status)
                body = (
                    b"{" if status < 300 else f"<Error><Code>{code}</Code></Error>".encode() if code else b""
                )
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bucket/{KEY}?X-Amz-Signature=s"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def reader(url: str) -> PresignedReader:
    r = PresignedReader({KEY: url})
    r.http = urllib3.PoolManager(retries=False)  # urllib3's own retries would only slow this down
    return r


def test_check_reads_one_byte_and_classifies_what_the_server_says(server: Server) -> None:
    r = reader(server.url)
    r.check(KEY)
    assert server.ranges == ["bytes=0-0"]
    for status, retryable in ((503, True), (500, True), (502, True), (429, True), (403, False), (400, False)):
        server.statuses = [status]
        with pytest.raises(StorageError) as e:
            r.check(KEY)
        assert e.value.retryable is retryable, status
        assert "X-Amz-Signature" not in str(e.value)  # the URL is a credential: never in a message
    server.statuses = [404]
    with pytest.raises(ObjectMissing):
        r.check(KEY)
    with pytest.raises(StorageError, match="access denied") as e:  # it was handed no URL for that key
        r.check("another/key")
    assert not e.value.retryable


def test_no_answer_at_all_is_retryable_and_never_shows_the_url() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = reader(f"http://127.0.0.1:{port}/bucket/{KEY}?X-Amz-Credential=c&X-Amz-Signature=secret")
    for call in (lambda: r.check(KEY), lambda: r.get_object(Bucket="", Key=KEY)):
        with pytest.raises(StorageError) as e:
            call()
        assert e.value.retryable
        assert "Connection refused" in str(e.value), e.value
        assert "secret" not in str(e.value) and "X-Amz" not in str(e.value) and "/bucket/" not in str(e.value)


def test_a_connection_lost_mid_body_is_a_retryable_storage_error() -> None:
    """The server promises 1 MB and hangs up after 10 bytes: the read that meets it raises a
    retryable StorageError (a restore that changed nothing then exits 75 for a new Pod)."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n0123456789")
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = reader(f"http://127.0.0.1:{port}/bucket/{KEY}?X-Amz-Signature=secret")
    body = r.get_object(Bucket="", Key=KEY)["Body"]

    def drain() -> None:
        while body.read(65536):
            pass

    with pytest.raises(StorageError) as e:
        drain()
    body.close()
    t.join(5)
    listener.close()
    assert e.value.retryable
    assert "the connection to the S3 endpoint failed" in str(e.value)
    assert "secret" not in str(e.value)


def test_the_wait_rides_out_an_outage_and_stops_at_a_refusal(server: Server) -> None:
    r = reader(server.url)
    logged: list[str] = []
    server.statuses = [503, 503, 200]
    probe = storage_probe(lambda: r.check(KEY))
    assert wait_for("storage", probe, 300, log=logged.append, sleep=lambda _: None) == 2
    assert logged[0].startswith("storage is not reachable (") and logged[0].endswith("retrying in 2s")
    assert logged[-1].startswith("storage answers again")
    server.statuses = [403]  # expired: the restore's next step reports it; waiting would not help
    assert wait_for("storage", probe, 300, log=logged.append, sleep=lambda _: None) == 0
    server.statuses = [503]
    clock = iter(range(0, 10_000, 10))
    with pytest.raises(StillUnreachable):
        wait_for(
            "storage", probe, 30, log=logged.append, sleep=lambda _: None, clock=lambda: float(next(clock))
        )
