"""The one exception type of :mod:`pcfast.data`.

It owns :class:`DatasetError`, raised for anything wrong with dataset files on disk or in transit
(missing, truncated, corrupt, failed checksum). Wrong arguments stay ``ValueError``/``TypeError``.
"""

from __future__ import annotations

__all__ = ["DatasetError"]


class DatasetError(RuntimeError):
    """A dataset file is missing, malformed, or failed verification; the message names the file."""
