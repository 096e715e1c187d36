"""Optional download of the public datasets: where each file lives, its checksum, and a safe fetch.

This module owns the table :data:`SOURCES` (mirrors and checksums per dataset) and the transfer itself:
stream to a temporary file beside the destination, hash while writing, verify, then ``os.replace``
into place, so a destination path only ever holds a verified file. Nothing here runs unless a caller
passes ``download=True``; pcfast never touches the network on its own.

Checksums are the MD5 values published with each dataset (the ones torchvision and others verify).
MD5 guards against truncated or swapped files, not against a malicious mirror.

Mirrors: ``mirror=`` (or the environment variable ``PCFAST_DATA_MIRROR``) replaces the public hosts by
one base URL laid out as ``<mirror>/<dataset>/<file name>``, e.g. ``<mirror>/mnist/t10k-images-idx3-ubyte.gz``.
Any scheme :func:`urllib.request.urlopen` accepts works, ``file://`` included, which is the way to seed
machines without network access from a shared copy.

Resource bounds, so a broken or hostile mirror fails fast instead of filling the disk or hanging:

- Size cap: each file has a cap (its published size plus a margin, :attr:`Resource.max_bytes`); a
  transfer is cut as soon as it would pass the cap, and a larger announced ``Content-Length`` is refused
  before the body is read. Nothing past the cap is written.
- Deadline: each file transfer, connecting and headers included, is abandoned once ``deadline_s``
  seconds have passed (default :data:`DEFAULT_DEADLINE_S` = 900 s, or ``$PCFAST_DATA_DEADLINE``), however
  slowly the server trickles bytes; a socket that stays silent is dropped after at most
  :data:`STALL_TIMEOUT_S` = 60 s.
- Any transport failure (refused connection, timeout, a reply that is not HTTP, a truncated body, an
  oversized or late transfer) moves on to the next mirror; when all fail, :class:`DatasetError` lists
  what each one did.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tarfile
import tempfile
import threading
import time
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

__all__ = [
    "DEADLINE_ENV",
    "DEFAULT_DEADLINE_S",
    "DEFAULT_MAX_BYTES",
    "MIRROR_ENV",
    "SOURCES",
    "STALL_TIMEOUT_S",
    "Resource",
    "Source",
    "download_dataset",
    "download_file",
    "resource_urls",
]

MIRROR_ENV = "PCFAST_DATA_MIRROR"
DEADLINE_ENV = "PCFAST_DATA_DEADLINE"
DEFAULT_DEADLINE_S = 900.0
"""Seconds one file transfer may take in all (the 170 MB CIFAR-10 archive at about 200 kB/s)."""
STALL_TIMEOUT_S = 60.0
"""Seconds a socket may stay silent (connect, or between bytes) before the transfer is dropped."""
DEFAULT_MAX_BYTES = 256 << 20
"""Size cap of :func:`download_file` when the caller names none."""
_CHUNK = 1 << 20
_MAX_ARCHIVE_MEMBERS = 64  # the archives in SOURCES hold under 10 entries; stop scanning a tar after this


@dataclass(frozen=True)
class Resource:
    """One downloadable file. With no checksum a file is only validated by the format readers.

    ``max_bytes`` caps the transfer (the published size plus a margin): a mirror sending more is cut
    off there. ``member_max_bytes`` caps each extracted archive member the same way.
    """

    filename: str
    md5: str | None = None
    sha256: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    member_max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live.

    Attributes:
        mirrors: base URLs tried in order; a file's URL is ``base + filename``.
        resources: the files to fetch.
        members: for archives, the members to extract (relative paths inside the archive); empty
            means the downloaded files are used as they are.
    """

    mirrors: tuple[str, ...]
    resources: tuple[Resource, ...]
    members: tuple[str, ...] = ()


SOURCES: dict[str, Source] = {
    "mnist": Source(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        resources=(  # published sizes 9.9 MB, 29 kB, 1.6 MB, 4.5 kB
            Resource("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873", max_bytes=12 << 20),
            Resource("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432", max_bytes=64 << 10),
            Resource("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3", max_bytes=2 << 20),
            Resource("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c", max_bytes=64 << 10),
        ),
    ),
    "fashion_mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        resources=(  # published sizes 26 MB, 29 kB, 4.4 MB, 5.1 kB
            Resource("train-images-idx3-ubyte.gz", md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d", max_bytes=32 << 20),
            Resource("train-labels-idx1-ubyte.gz", md5="25c81989df183df01b3e8a0aad5dffbe", max_bytes=64 << 10),
            Resource("t10k-images-idx3-ubyte.gz", md5="bef4ecab320f06d8554ea6380940ec79", max_bytes=6 << 20),
            Resource("t10k-labels-idx1-ubyte.gz", md5="bb300cfdad3c16e7a12a480ee83cd310", max_bytes=64 << 10),
        ),
    ),
    "cifar10": Source(  # the binary version: plain records, nothing to unpickle
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        resources=(  # published size 162 MiB; each batch member is 30,730,000 bytes
            Resource("cifar-10-binary.tar.gz", md5="c32a1d4ab5d03f1284b67883e8d87530",
                     max_bytes=192 << 20, member_max_bytes=30_730_000),
        ),
        members=tuple(
            f"cifar-10-batches-bin/{name}"
            for name in ("data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin",
                         "data_batch_5.bin", "test_batch.bin", "batches.meta.txt")
        ),
    ),
}


def resource_urls(dataset: str, resource: Resource, mirror: str | None = None) -> list[str]:
    """URLs to try for one file: the mirror alone when one is set (argument, then env), else the public hosts."""
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    if mirror:
        return [f"{mirror.rstrip('/')}/{dataset}/{resource.filename}"]
    return [base + resource.filename for base in SOURCES[dataset].mirrors]


def _digests(resource: Resource) -> dict[str, str]:
    return {
        algorithm: expected.lower()
        for algorithm, expected in (("md5", resource.md5), ("sha256", resource.sha256))
        if expected
    }


def _file_digests(path: Path, algorithms: Sequence[str]) -> dict[str, str]:
    hashers = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(_CHUNK), b""):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}


def _deadline_from_env() -> float:
    """``$PCFAST_DATA_DEADLINE`` in seconds when set, else :data:`DEFAULT_DEADLINE_S`."""
    raw = os.environ.get(DEADLINE_ENV)
    if not raw:
        return DEFAULT_DEADLINE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"${DEADLINE_ENV} must be a positive number of seconds, got {raw!r}")
    return value


class _Watchdog:
    """Shuts down the sockets of one transfer when its deadline passes, waking any read blocked on them.

    A socket timeout alone bounds each silent wait, not a server that trickles one byte at a time; the
    watchdog bounds the whole transfer, status line and headers included.
    """

    def __init__(self, deadline_s: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(deadline_s, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:  # the plain-socket method: for TLS sockets it cuts the connection under the TLS layer too
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    """urllib's default opener, except that every HTTP(S) connection registers its socket with ``watchdog``."""

    class Watched:
        """Registers the connection's socket with ``watchdog`` once it is connected."""

        def connect(self) -> None:
            super().connect()
            watchdog.watch(self.sock)

    class WatchedHTTPConnection(Watched, http.client.HTTPConnection):
        pass

    class WatchedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
            return self.do_open(WatchedHTTPConnection, req)

    handlers: list[type[urllib.request.BaseHandler]] = [WatchedHTTPHandler]
    if hasattr(http.client, "HTTPSConnection") and hasattr(urllib.request, "HTTPSHandler"):

        class WatchedHTTPSConnection(Watched, http.client.HTTPSConnection):
            pass

        class WatchedHTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(WatchedHTTPSConnection, req, context=self._context)

        handlers.append(WatchedHTTPSHandler)
    return urllib.request.build_opener(*handlers)


def _fetch_once(url: str, partial: Path, algorithms: Sequence[str], progress: bool, label: str, *,
                max_bytes: int, deadline_s: float) -> dict[str, str]:
    """Stream ``url`` into ``partial`` within ``max_bytes`` and ``deadline_s``; return the written bytes' digests."""
    from tqdm.auto import tqdm

    hashers = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    written = 0
    started = time.monotonic()
    with _Watchdog(deadline_s) as watchdog:
        try:
            timeout = min(STALL_TIMEOUT_S, deadline_s)
            with _opener(watchdog).open(url, timeout=timeout) as response, partial.open("wb") as out:
                length = response.headers.get("Content-Length")
                total = int(length) if length and length.isdigit() else None
                if total is not None and total > max_bytes:
                    raise DatasetError(f"{url}: server announces {total} bytes, more than the cap of {max_bytes} "
                                       f"bytes for {label}; not downloaded")
                # read1 returns whatever has arrived, so the deadline is checked between bytes, not per MiB.
                read = getattr(response, "read1", response.read)
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                          disable=not progress, leave=False) as bar:
                    while chunk := read(_CHUNK):
                        if written + len(chunk) > max_bytes:
                            raise DatasetError(f"{url}: sent more than the cap of {max_bytes} bytes for {label}; "
                                               f"cut at the cap after {written} bytes, which are deleted")
                        out.write(chunk)
                        for hasher in hashers.values():
                            hasher.update(chunk)
                        written += len(chunk)
                        bar.update(len(chunk))
                        if watchdog.expired or time.monotonic() - started > deadline_s:
                            break
                if watchdog.expired or time.monotonic() - started > deadline_s:
                    raise TimeoutError("deadline passed")
                if total is not None and written != total:
                    raise DatasetError(f"{url}: connection closed after {written} of {total} bytes")
        except (OSError, http.client.HTTPException, DatasetError) as exc:
            if watchdog.expired or time.monotonic() - started > deadline_s:
                raise DatasetError(
                    f"{url}: abandoned after the {deadline_s:g} s deadline ({written} bytes received; "
                    f"deadline_s= or ${DEADLINE_ENV} sets it)"
                ) from exc
            raise
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}


def download_file(
    urls: Sequence[str],
    destination: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    max_bytes: int = DEFAULT_MAX_BYTES,
    deadline_s: float | None = None,
) -> Path:
    """Download the first reachable URL to ``destination``, verified, atomically, within bounds.

    Each URL is tried in order until one transfers; any transport failure (HTTP error, refused or
    dropped connection, timeout, a reply that is not HTTP, a truncated body, a transfer over
    ``max_bytes`` or past ``deadline_s``) moves on to the next. A transfer that completes but fails a
    checksum stops the search and raises (a wrong file is a signal, not a network hiccup). The
    temporary file lives beside ``destination`` and is deleted on every failure.

    Args:
        max_bytes: size cap in bytes; the transfer is cut as soon as it would exceed it.
        deadline_s: seconds one URL's transfer may take in all, connecting and headers included;
            default ``$PCFAST_DATA_DEADLINE``, else :data:`DEFAULT_DEADLINE_S` (900 s).

    Raises:
        DatasetError: checksum mismatch (expected and actual digests in the message), or no URL
            could be fetched (each URL with what went wrong).
        ValueError: a non-positive ``max_bytes`` or ``deadline_s``.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    deadline_s = _deadline_from_env() if deadline_s is None else deadline_s
    if isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float)) or not 0 < deadline_s < float("inf"):
        raise ValueError(f"deadline_s must be a positive finite number of seconds, got {deadline_s!r}")
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    expected = _digests(Resource(destination.name, md5=md5, sha256=sha256))
    failures: list[str] = []
    for url in urls:
        handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".part", dir=destination.parent)
        os.close(handle)
        partial = Path(name)
        try:
            try:
                actual = _fetch_once(url, partial, list(expected), progress, destination.name,
                                     max_bytes=max_bytes, deadline_s=float(deadline_s))
            except DatasetError as exc:
                failures.append(str(exc))
                continue
            except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError/HTTPError are OSErrors
                failures.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            for algorithm, digest in expected.items():
                if actual[algorithm] != digest:
                    raise DatasetError(
                        f"checksum mismatch for {url}: expected {algorithm} {digest}, "
                        f"got {actual[algorithm]}; nothing was written to {destination}"
                    )
            os.replace(partial, destination)
            return destination
        finally:
            partial.unlink(missing_ok=True)
    tried = "\n  ".join(failures) or "(no URLs given)"
    raise DatasetError(
        f"could not download {destination.name}; tried:\n  {tried}\n"
        f"Copy the file to {destination} by hand, or point mirror= / ${MIRROR_ENV} at a reachable copy."
    )


def _is_verified(path: Path, resource: Resource) -> bool:
    """Present and, when checksums are known, matching them."""
    if not path.is_file():
        return False
    expected = _digests(resource)
    return _file_digests(path, list(expected)) == expected if expected else True


def _extract_members(archive: Path, directory: Path, members: Sequence[str], max_bytes: int) -> None:
    """Copy the named members out of a tar archive, each written atomically; nothing else is extracted.

    The archive is scanned in order (at most ``_MAX_ARCHIVE_MEMBERS`` entries), and a member larger
    than ``max_bytes`` is refused before it is decompressed.
    """
    wanted = set(members)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for index, info in enumerate(tar):
                if not wanted:
                    break
                if index >= _MAX_ARCHIVE_MEMBERS:
                    break
                if info.name not in wanted or not info.isfile():
                    continue
                if info.size > max_bytes:
                    raise DatasetError(f"{archive}: member {info.name!r} declares {info.size} bytes, more than "
                                       f"the cap of {max_bytes}")
                wanted.discard(info.name)
                source = tar.extractfile(info)
                assert source is not None  # a regular file
                target = directory / info.name
                target.parent.mkdir(parents=True, exist_ok=True)
                handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
                try:
                    with os.fdopen(handle, "wb") as out, source:
                        while chunk := source.read(min(_CHUNK, max_bytes + 1 - out.tell())):
                            out.write(chunk)
                            if out.tell() > max_bytes:
                                raise DatasetError(f"{archive}: member {info.name!r} is longer than {max_bytes} bytes")
                    os.replace(name, target)
                finally:
                    Path(name).unlink(missing_ok=True)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DatasetError(f"{archive}: corrupt archive ({exc})") from exc
    if wanted:
        raise DatasetError(f"{archive}: archive lacks the regular file(s) {', '.join(map(repr, sorted(wanted)))}")


def download_dataset(
    name: str,
    directory: str | os.PathLike[str],
    *,
    filenames: Sequence[str] | None = None,
    mirror: str | None = None,
    progress: bool = True,
    deadline_s: float | None = None,
) -> None:
    """Fetch a dataset's files into ``directory`` (and extract archive members, if it has any).

    Files already present that match their checksum are kept. ``filenames`` restricts the fetch to
    those resources (the loaders pass only what is missing). Each file is capped at its
    :attr:`Resource.max_bytes` and given ``deadline_s`` seconds (see :func:`download_file`).
    """
    if name not in SOURCES:
        raise ValueError(f"no download source for {name!r}; downloadable: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    directory = Path(directory)
    wanted = source.resources if filenames is None else tuple(r for r in source.resources if r.filename in filenames)
    for resource in wanted:
        path = directory / resource.filename
        if not _is_verified(path, resource):
            download_file(resource_urls(name, resource, mirror), path, md5=resource.md5, sha256=resource.sha256,
                          progress=progress, max_bytes=resource.max_bytes, deadline_s=deadline_s)
        if source.members:
            _extract_members(path, directory, source.members, resource.member_max_bytes)
