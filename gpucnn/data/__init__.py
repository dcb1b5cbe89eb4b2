"""Datasets: MNIST / Fashion-MNIST / CIFAR-10 by name, or a folder of one's own images; verified,
normalised and batched.  :mod:`.folder` reads image folders, :mod:`.cifar` CIFAR-10's binary archive.

One module per job: :mod:`.idx` (the IDX format and checksums), :mod:`.specs`
(what each dataset's files are), :mod:`.lookup` (where they are looked up),
:mod:`.fetch` (downloading from the mirrors), :mod:`.load` (loading by name),
:mod:`.dataset` (the loaded :class:`Dataset` and normalising) and
:mod:`.batching` (the per-epoch order and its minibatches).

Reading
    :func:`read_idx` parses one IDX file (the format of MNIST and Fashion-MNIST),
    gzipped or raw -- told apart by the gzip magic bytes, never by the file
    name.  It checks the magic number, that the header's dimensions account for
    exactly the bytes in the file, and, for the files of a known dataset, their
    SHA-256.  Anything wrong raises :class:`DataError` naming the file and
    saying to delete it and download it again.

Finding the files (:func:`locate`):

* a directory you name -- the explicit ``data_dir`` argument (the CLI's
  ``--data-dir``), else the ``GPUCNN_DATA`` environment variable -- must hold
  the dataset, as ``<dir>/<name>/`` or ``<dir>`` itself; if it does not, that
  is an error naming the directory and the files expected (nothing else is
  used silently);
* otherwise the copy shipped inside the package, ``gpucnn/_data/<name>/``
  (MNIST only), then the per-user cache, ``$XDG_CACHE_HOME/gpucnn/<name>`` or
  ``~/.cache/gpucnn/<name>``.

A directory counts only when it holds all four files (each under its ``.gz``
name or its un-gzipped name).  When none does and ``download=True``,
:func:`download` fetches the files from the dataset's mirrors into the cache:
each mirror in turn, checksum verified, written to a temporary file in the
cache directory, fsynced and then ``os.replace``-d into place, so a failed or
corrupt download leaves nothing behind.

Checksums
    Each file has two kinds of pin.  ``sha256`` lists the digests of the file
    *as distributed* (the gzip file); ``idx_sha256`` is the digest of the
    decompressed IDX bytes, which does not depend on how the file was
    compressed.  A file is accepted when either matches, so re-compressed
    copies (a distribution's package, ``gzip -n``, the copy shipped in this
    repository) and un-gzipped ones are verified by their content, for MNIST
    and Fashion-MNIST alike.
"""
from . import batching, cifar, dataset, fetch, folder, idx, load, lookup, specs
from .batching import batch_indices, epoch_permutation, shard_bounds, steps_per_epoch
from .dataset import Dataset, channel_affine, normalize
from .load import load_arrays, load_dataset
from .fetch import DownloadError, download
from .idx import DataError, read_idx
from .lookup import ENV_VAR, DataDirError, cache_dir, locate
from .specs import DATASET_NAMES, DATASETS, DatasetSpec, FileSpec, canonical_name, get_spec

__all__ = [
    "DataError", "DataDirError", "DownloadError", "FileSpec", "DatasetSpec", "Dataset", "DATASETS", "DATASET_NAMES", "ENV_VAR",
    "canonical_name", "channel_affine",
    "get_spec", "read_idx", "locate", "cache_dir", "download", "load_dataset", "normalize", "load_arrays",
    "epoch_permutation", "steps_per_epoch", "batch_indices", "shard_bounds",
    "batching", "cifar", "dataset", "fetch", "folder", "idx", "load", "lookup", "specs",
]
