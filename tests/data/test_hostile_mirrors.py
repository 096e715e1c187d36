"""Broken and hostile mirrors: a trickle is abandoned at the deadline, a flood is cut at the size cap, and a
reply that is not HTTP moves on to the next mirror; each failure ends in a DatasetError naming every URL."""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcfast.data import DatasetError
from pcfast.data.download import DEADLINE_ENV, SOURCES, download_dataset, download_file


class RawServer:
    """A loopback TCP server that reads one request per connection and answers with ``reply(conn, server)``.

    ``sent`` counts the bytes the replies managed to send; ``finished`` is set when a reply returns (it
    returns early once the client hangs up).
    """

    def __init__(self, reply: Callable[[socket.socket, RawServer], None]) -> None:
        self.reply = reply
        self.sent = 0
        self.finished = threading.Event()
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = [threading.Thread(target=self._serve, daemon=True)]
        self._threads[0].start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            request = b""
            try:
                while b"\r\n\r\n" not in request:
                    part = conn.recv(4096)
                    if not part:
                        return
                    request += part
                self.reply(conn, self)
            except OSError:
                pass  # the client hung up: that is what several tests wait for
            finally:
                self.finished.set()

    def send(self, conn: socket.socket, data: bytes) -> None:
        conn.sendall(data)
        self.sent += len(data)

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._listener.close()
        assert not any(thread.is_alive() for thread in self._threads), "server threads did not stop"


@pytest.fixture
def raw_server(no_proxy: None) -> Iterator[Callable[[Callable[[socket.socket, RawServer], None]], RawServer]]:
    servers: list[RawServer] = []

    def start(reply: Callable[[socket.socket, RawServer], None]) -> RawServer:
        servers.append(RawServer(reply))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _trickle(data: bytes, interval_s: float) -> Callable[[socket.socket, RawServer], None]:
    def reply(conn: socket.socket, server: RawServer) -> None:
        for index in range(len(data)):
            if server.stop.wait(interval_s):
                return
            server.send(conn, data[index : index + 1])

    return reply


HEADERS = b"HTTP/1.0 200 OK\r\nContent-Length: 40\r\n\r\n"
BODY = b"x" * 40
TRICKLE_INTERVAL_S = 0.25  # the whole reply takes 20 s at this pace
DEADLINE_S = 1.0


@pytest.mark.parametrize("phase", ["status-and-headers", "body"])
def test_trickling_server_is_abandoned_at_the_deadline(tmp_path: Path, raw_server, monkeypatch, phase: str) -> None:
    if phase == "body":
        def reply(conn: socket.socket, server: RawServer) -> None:
            server.send(conn, HEADERS)
            _trickle(BODY, TRICKLE_INTERVAL_S)(conn, server)
    else:
        reply = _trickle(HEADERS + BODY, TRICKLE_INTERVAL_S)
    server = raw_server(reply)
    monkeypatch.setenv(DEADLINE_ENV, str(DEADLINE_S))  # the documented way to set it for load_dataset too
    started = time.monotonic()
    with pytest.raises(DatasetError) as info:
        download_file([server.url + "/file"], tmp_path / "file", md5=hashlib.md5(BODY).hexdigest(), progress=False)
    elapsed = time.monotonic() - started
    assert f"abandoned after the {DEADLINE_S:g} s deadline" in str(info.value)
    assert server.url + "/file" in str(info.value)
    assert elapsed < DEADLINE_S + 1.5, f"took {elapsed:.1f} s for a {DEADLINE_S} s deadline"
    assert server.finished.wait(2), "the client must hang up, not leave the connection trickling"
    assert server.sent < len(HEADERS + BODY)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_deadline_argument_and_bad_values(tmp_path: Path, raw_server, monkeypatch) -> None:
    server = raw_server(_trickle(HEADERS + BODY, TRICKLE_INTERVAL_S))
    monkeypatch.setenv(DEADLINE_ENV, "600")
    started = time.monotonic()
    with pytest.raises(DatasetError, match="abandoned after the 0.5 s deadline"):
        download_file([server.url + "/f"], tmp_path / "f", progress=False, deadline_s=0.5)
    assert time.monotonic() - started < 2.0
    for bad in (0, -1.0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="deadline_s must be a positive finite number"):
            download_file([server.url + "/f"], tmp_path / "f", progress=False, deadline_s=bad)
    monkeypatch.setenv(DEADLINE_ENV, "soon")
    with pytest.raises(ValueError, match=f"{DEADLINE_ENV} must be a positive number of seconds, got 'soon'"):
        download_file([server.url + "/f"], tmp_path / "f", progress=False)


FLOOD_BYTES = 96 << 20


def _flood(conn: socket.socket, server: RawServer) -> None:
    """A reply with no Content-Length (the body ends when the connection closes) of 96 MiB."""
    server.send(conn, b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
    block = b"\0" * (64 << 10)
    for _ in range(FLOOD_BYTES // len(block)):
        server.send(conn, block)


def test_oversized_download_is_cut_at_the_cap(tmp_path: Path, raw_server) -> None:
    server = raw_server(_flood)
    resource = next(r for r in SOURCES["mnist"].resources if r.filename == "t10k-labels-idx1-ubyte.gz")
    assert resource.max_bytes <= 64 << 10, "a 4.5 kB file has a cap near its size"
    with pytest.raises(DatasetError, match=f"more than the cap of {resource.max_bytes} bytes") as info:
        download_dataset("mnist", tmp_path, filenames=[resource.filename], mirror=server.url, progress=False)
    assert "cut at the cap" in str(info.value)
    assert server.finished.wait(5)
    # The client stopped reading at the cap: what the server got out is the cap plus socket buffers.
    assert server.sent < FLOOD_BYTES // 2, f"the server sent {server.sent} bytes"
    assert list(tmp_path.iterdir()) == [], "nothing of the oversized transfer is kept"


def test_announced_oversize_is_refused_before_the_body(tmp_path: Path, http_server) -> None:
    (http_server.root / "big.bin").write_bytes(b"\0" * (1 << 20))
    with pytest.raises(DatasetError, match=r"announces 1048576 bytes, more than the cap of 1000 bytes"):
        download_file([f"{http_server.url}/big.bin"], tmp_path / "big.bin", max_bytes=1000, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="max_bytes must be a positive int"):
        download_file([f"{http_server.url}/big.bin"], tmp_path / "big.bin", max_bytes=0, progress=False)


def _not_http(conn: socket.socket, server: RawServer) -> None:
    server.send(conn, b"SSH-2.0-OpenSSH_9.6\r\n\r\n")


def _cut_short(conn: socket.socket, server: RawServer) -> None:
    server.send(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 10)


@pytest.mark.parametrize("broken", [_not_http, _cut_short], ids=["not-http", "cut-short"])
def test_transport_error_moves_on_to_the_next_mirror(tmp_path: Path, raw_server, http_server, broken) -> None:
    bad = raw_server(broken)
    (http_server.root / "blob.bin").write_bytes(b"payload" * 100)
    digest = hashlib.sha256(b"payload" * 100).hexdigest()
    path = download_file([bad.url + "/blob.bin", f"{http_server.url}/blob.bin"], tmp_path / "blob.bin",
                         sha256=digest, progress=False)
    assert path.read_bytes() == b"payload" * 100
    assert http_server.requested == ["/blob.bin"]


def test_every_mirror_failing_lists_what_each_did(tmp_path: Path, raw_server, http_server) -> None:
    not_http, cut_short = raw_server(_not_http), raw_server(_cut_short)
    refused = socket.create_server(("127.0.0.1", 0))
    refused_url = f"http://127.0.0.1:{refused.getsockname()[1]}/x"
    refused.close()  # nothing listens there any more
    urls = [not_http.url + "/x", cut_short.url + "/x", refused_url, f"{http_server.url}/absent"]
    with pytest.raises(DatasetError, match="could not download x") as info:
        download_file(urls, tmp_path / "x", progress=False)
    lines = str(info.value).splitlines()
    assert len(lines) >= 1 + len(urls)
    for url, symptom in zip(urls, ["BadStatusLine", "connection closed after 10 of 1000 bytes", "refused", "404"]):
        line = next((line for line in lines if url in line), "")
        assert symptom.lower() in line.lower(), (url, symptom, str(info.value))
    assert list(tmp_path.iterdir()) == []
