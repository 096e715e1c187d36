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
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import DatasetError

__all__ = ["MIRROR_ENV", "SOURCES", "Resource", "Source", "download_dataset", "download_file", "resource_urls"]

MIRROR_ENV = "PCFAST_DATA_MIRROR"
_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Resource:
    """One downloadable file. With no checksum a file is only validated by the format readers."""

    filename: str
    md5: str | None = None
    sha256: str | None = None


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
        resources=(
            Resource("train-images-idx3-ubyte.gz", md5="f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            Resource("train-labels-idx1-ubyte.gz", md5="d53e105ee54ea40749a09fcbcd1e9432"),
            Resource("t10k-images-idx3-ubyte.gz", md5="9fb629c4189551a2d022fa330f9573f3"),
            Resource("t10k-labels-idx1-ubyte.gz", md5="ec29112dd5afa0611ce80d1b7f02629c"),
        ),
    ),
    "fashion_mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        resources=(
            Resource("train-images-idx3-ubyte.gz", md5="8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            Resource("train-labels-idx1-ubyte.gz", md5="25c81989df183df01b3e8a0aad5dffbe"),
            Resource("t10k-images-idx3-ubyte.gz", md5="bef4ecab320f06d8554ea6380940ec79"),
            Resource("t10k-labels-idx1-ubyte.gz", md5="bb300cfdad3c16e7a12a480ee83cd310"),
        ),
    ),
    "cifar10": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        resources=(Resource("cifar-10-python.tar.gz", md5="c58f30108f718f92721af3b95e74349a"),),
        members=tuple(
            f"cifar-10-batches-py/{name}"
            for name in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                         "test_batch", "batches.meta")
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


def _fetch_once(url: str, partial: Path, algorithms: Sequence[str], progress: bool, label: str) -> dict[str, str]:
    """Stream ``url`` into ``partial`` and return the digests of what was written."""
    from tqdm.auto import tqdm

    hashers = {algorithm: hashlib.new(algorithm) for algorithm in algorithms}
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response, partial.open("wb") as out:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                  disable=not progress, leave=False) as bar:
            for chunk in iter(lambda: response.read(_CHUNK), b""):
                out.write(chunk)
                for hasher in hashers.values():
                    hasher.update(chunk)
                bar.update(len(chunk))
        if total is not None and out.tell() != total:
            raise DatasetError(f"{url}: connection closed after {out.tell()} of {total} bytes")
    return {algorithm: hasher.hexdigest() for algorithm, hasher in hashers.items()}


def download_file(
    urls: Sequence[str],
    destination: str | os.PathLike[str],
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download the first reachable URL to ``destination``, verified, atomically.

    Each URL is tried in order until one transfers; a transfer that completes but fails a checksum
    stops the search and raises (a wrong file is a signal, not a network hiccup). The temporary file
    lives beside ``destination`` and is deleted on every failure.

    Raises:
        DatasetError: checksum mismatch (expected and actual digests in the message), or no URL
            could be fetched (each URL with its error).
    """
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
                actual = _fetch_once(url, partial, list(expected), progress, destination.name)
            except (OSError, urllib.error.URLError, DatasetError) as exc:  # HTTPError is a URLError
                failures.append(f"{url}: {exc}")
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


def _extract_members(archive: Path, directory: Path, members: Sequence[str]) -> None:
    """Copy the named members out of a tar archive, each written atomically; nothing else is extracted."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in members:
                try:
                    source = tar.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise DatasetError(f"{archive}: archive lacks the regular file {member!r}")
                target = directory / member
                target.parent.mkdir(parents=True, exist_ok=True)
                handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
                try:
                    with os.fdopen(handle, "wb") as out, source:
                        shutil.copyfileobj(source, out, _CHUNK)
                    os.replace(name, target)
                finally:
                    Path(name).unlink(missing_ok=True)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DatasetError(f"{archive}: corrupt archive ({exc})") from exc


def download_dataset(
    name: str,
    directory: str | os.PathLike[str],
    *,
    filenames: Sequence[str] | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> None:
    """Fetch a dataset's files into ``directory`` (and extract archive members, if it has any).

    Files already present that match their checksum are kept. ``filenames`` restricts the fetch to
    those resources (the loaders pass only what is missing).
    """
    if name not in SOURCES:
        raise ValueError(f"no download source for {name!r}; downloadable: {', '.join(sorted(SOURCES))}")
    source = SOURCES[name]
    directory = Path(directory)
    wanted = source.resources if filenames is None else tuple(r for r in source.resources if r.filename in filenames)
    for resource in wanted:
        path = directory / resource.filename
        if not _is_verified(path, resource):
            download_file(resource_urls(name, resource, mirror), path,
                          md5=resource.md5, sha256=resource.sha256, progress=progress)
        if source.members:
            _extract_members(path, directory, source.members)
