"""Tests for gpucnn.data: IDX parsing, checksums, lookup order, downloads, batching.

Downloads are exercised only against a local HTTP server on 127.0.0.1.
"""
from __future__ import annotations

import gzip
import http.server
import re
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import isolate_data_env, local_http_server
pytest.importorskip("hypothesis", reason="property-based tests need hypothesis (pip install -e '.[dev]')")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gpucnn import data  # noqa: E402
from gpucnn.data import DataError, DownloadError  # noqa: E402
from helpers import peak_bytes  # noqa: E402

SHIPPED = data.lookup.PACKAGE_DATA / "mnist"
MNIST = data.DATASETS["mnist"]
ROLES = ("train_images", "train_labels", "test_images", "test_labels")


# --------------------------------------------------------------------------- #
# helpers / fixtures
# --------------------------------------------------------------------------- #
@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No GPUCNN_DATA, a private cache dir, and no proxies for 127.0.0.1."""
    isolate_data_env(tmp_path, monkeypatch)


@pytest.fixture
def no_shipped(tmp_path, monkeypatch):
    """Pretend the package ships no data."""
    empty = tmp_path / "no-shipped-data"
    empty.mkdir()
    monkeypatch.setattr(data.lookup, "PACKAGE_DATA", empty)
    return empty


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """Serialise ``arr`` as an IDX file (big-endian)."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
    return header + np.ascontiguousarray(arr, dtype=dtype).tobytes()


def assert_says_redownload(exc_info, path):
    msg = str(exc_info.value)
    assert str(path) in msg
    assert "delete" in msg.lower() and "re-download" in msg.lower()


def fill_dir(d: Path, files: dict[str, bytes] | None = None) -> Path:
    """Put the four MNIST files in ``d``: copies of the shipped ones unless overridden."""
    d.mkdir(parents=True, exist_ok=True)
    files = files or {}
    for f in MNIST.files.values():
        if f.name in files:
            (d / f.name).write_bytes(files[f.name])
        else:
            shutil.copyfile(SHIPPED / f.name, d / f.name)
    return d


def placeholder_dir(d: Path) -> Path:
    """Four empty files with the right names: enough for locate(), which checks existence."""
    d.mkdir(parents=True, exist_ok=True)
    for f in MNIST.files.values():
        (d / f.name).touch()
    return d


# --------------------------------------------------------------------------- #
# the shipped MNIST
# --------------------------------------------------------------------------- #
def test_shipped_files_are_the_known_files():
    for f in MNIST.files.values():
        raw = (SHIPPED / f.name).read_bytes()
        assert data.idx.sha256(raw) in f.sha256
        assert data.idx.sha256(gzip.decompress(raw)) == f.idx_sha256


def test_load_shipped_mnist():
    t0 = time.perf_counter()
    ds = data.load_dataset("mnist", download=False)
    elapsed = time.perf_counter() - t0
    assert ds.source == SHIPPED
    assert ds.name == "mnist"
    assert ds.classes == [str(i) for i in range(10)]
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.train_labels.shape == (60000,) and ds.train_labels.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == np.uint8
    assert ds.test_labels.shape == (10000,) and ds.test_labels.dtype == np.uint8
    for y in (ds.train_labels, ds.test_labels):
        assert y.min() == 0 and y.max() == 9
        assert set(np.unique(y)) == set(range(10))
    assert ds.train_labels[0] == 5
    assert ds.test_labels[0] == 7
    assert ds.train_images.max() == 255 and ds.train_images.min() == 0
    # The issue asks for < 1 s; allow slack for a loaded CI machine.
    assert elapsed < 3.0, elapsed


# --------------------------------------------------------------------------- #
# IDX parsing
# --------------------------------------------------------------------------- #
def test_read_idx_gz_and_raw_detected_by_magic_not_name(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(arr)
    (tmp_path / "raw.gz").write_bytes(raw)            # raw bytes, misleading name
    (tmp_path / "packed.bin").write_bytes(gzip.compress(raw))  # gzip, no .gz
    for name in ("raw.gz", "packed.bin"):
        out = data.read_idx(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
        np.testing.assert_array_equal(out, arr)
        assert out.flags.writeable


@pytest.mark.parametrize("code,dtype", [(0x09, np.int8), (0x0B, np.int16), (0x0C, np.int32),
                                        (0x0D, np.float32), (0x0E, np.float64)])
def test_read_idx_other_types_native_order(tmp_path, code, dtype):
    arr = (np.arange(12).reshape(3, 4) - 5).astype(dtype)
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(arr, code))
    out = data.read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_read_idx_raw_mnist_matches_gz(tmp_path):
    f = MNIST.files["test_labels"]
    p = tmp_path / f.raw_name
    p.write_bytes(gzip.decompress((SHIPPED / f.name).read_bytes()))
    raw = data.read_idx(p, expected=f)  # verified through the decompressed digest
    np.testing.assert_array_equal(raw, data.read_idx(SHIPPED / f.name, expected=f))


_GOOD = idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))


@pytest.mark.parametrize(
    "content,fragment",
    [
        (b"\x01\x00\x08\x02" + _GOOD[4:], "magic"),                 # wrong magic
        (b"\x00\x00\x07\x02" + _GOOD[4:], "unsupported"),           # unknown dtype code
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00", "too short"),
        (_GOOD[:10], "truncated"),                                   # header cut
        (_GOOD[:-1], "truncated"),                                   # body cut
        (_GOOD + b"\x00", "oversize"),                               # trailing bytes
        (gzip.compress(_GOOD)[:-6], "gzip"),                         # gzip stream cut
        (gzip.compress(_GOOD[:-1]), "truncated"),                    # valid gzip, short IDX
        (gzip.compress(_GOOD + b"xx"), "oversize"),                  # valid gzip, long IDX
    ],
    ids=["magic", "dtype", "ndim0", "short", "header-cut", "body-cut", "oversize",
         "gz-cut", "gz-short", "gz-long"],
)
def test_read_idx_rejects_bad_files(tmp_path, content, fragment):
    p = tmp_path / "bad-idx1-ubyte.gz"
    p.write_bytes(content)
    with pytest.raises(DataError) as exc_info:
        data.read_idx(p)
    assert fragment in str(exc_info.value)
    assert_says_redownload(exc_info, p)
    assert isinstance(exc_info.value, ValueError)


_BOMB_BYTES = 64 * 1024 * 1024   # what a bomb below inflates to: harmless even if the checks regress


def gzip_bomb(header: bytes, total: int = _BOMB_BYTES) -> bytes:
    """``header`` and then zeros up to ``total`` bytes, gzipped (about 1000:1)."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts, zeros = [co.compress(header)], bytes(1 << 20)
    for start in range(len(header), total, len(zeros)):
        parts.append(co.compress(zeros[: min(len(zeros), total - start)]))
    parts.append(co.flush())
    return b"".join(parts)


def idx_header(shape, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, len(shape)]) + np.asarray(shape, ">u4").tobytes()


@pytest.mark.parametrize("header,expected,fragment", [
    (idx_header((10000,)), MNIST.files["test_labels"], "oversize"),      # declared right, goes on
    (idx_header((2 ** 24,)), MNIST.files["test_labels"], "differs from the expected (10000,)"),
    (idx_header((2 ** 20, 2 ** 10)), None, "limit"),                      # declares 1 GiB
    (idx_header((1000,)), None, "oversize"),
], ids=["trailing", "wrong-shape", "over-limit", "no-spec-trailing"])
def test_gzip_bomb_is_refused_before_it_is_inflated(tmp_path, header, expected, fragment):
    """A small .gz that inflates to 64 MiB: refused having inflated at most what the header declares."""
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(gzip_bomb(header))
    with pytest.raises(DataError, match=re.escape(fragment)) as exc_info:
        data.read_idx(p, expected=expected)
    assert_says_redownload(exc_info, p)
    assert peak_bytes(lambda: data.read_idx(p, expected=expected)) < 2 * 1024 * 1024


def test_gzip_bomb_download_is_refused_before_it_is_inflated(server, tmp_path):
    url = serve(server, "bomb", {MNIST.files["train_images"].name: gzip_bomb(idx_header((2 ** 20, 28, 28)))})
    get = lambda: data.download("mnist", tmp_path / "dest", mirrors=[url], timeout=10)  # noqa: E731
    with pytest.raises(DownloadError, match=re.escape("differs from the expected (60000, 28, 28)")):
        get()
    assert peak_bytes(get) < 4 * 1024 * 1024


def test_idx_size_limit_can_be_lowered(tmp_path, monkeypatch):
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(np.zeros((4, 4), np.uint8)))
    monkeypatch.setattr(data.idx, "MAX_IDX_BYTES", 16)
    with pytest.raises(DataError, match="28 bytes with header.*16-byte limit"):
        data.read_idx(p)


def _flipped_labels(f) -> bytes:
    """The shipped labels file with one label byte changed, re-gzipped: parses, wrong SHA."""
    payload = bytearray(gzip.decompress((SHIPPED / f.name).read_bytes()))
    payload[8] = (payload[8] + 1) % 10
    return gzip.compress(bytes(payload), mtime=0)


def test_checksum_mismatch_of_known_file(tmp_path):
    f = MNIST.files["test_labels"]
    p = tmp_path / f.name
    p.write_bytes(_flipped_labels(f))
    assert data.read_idx(p).shape == (10000,)  # structurally fine
    with pytest.raises(DataError) as exc_info:
        data.read_idx(p, expected=f, dataset="mnist")
    assert "SHA-256" in str(exc_info.value)
    assert_says_redownload(exc_info, p)


def test_load_dataset_rejects_corrupt_file(tmp_path):
    f = MNIST.files["train_labels"]
    d = fill_dir(tmp_path / "dd" / "mnist", {f.name: _flipped_labels(f)})
    with pytest.raises(DataError) as exc_info:
        data.load_dataset("mnist", data_dir=tmp_path / "dd", download=False)
    assert_says_redownload(exc_info, d / f.name)


def test_load_dataset_accepts_ungzipped_copy(tmp_path):
    d = fill_dir(tmp_path / "d")
    f = MNIST.files["train_labels"]
    (d / f.raw_name).write_bytes(gzip.decompress((d / f.name).read_bytes()))
    (d / f.name).unlink()
    ds = data.load_dataset("mnist", data_dir=d, download=False)
    assert ds.source == d and ds.train_labels[0] == 5


def test_wrong_dataset_is_named(tmp_path):
    """MNIST files where Fashion-MNIST is expected fail their checksum and say what they are."""
    fill_dir(tmp_path / "root" / "fashion-mnist")
    with pytest.raises(DataError) as exc_info:
        data.load_dataset("fashion-mnist", data_dir=tmp_path / "root", download=False)
    assert "it is mnist's" in str(exc_info.value)


# --------------------------------------------------------------------------- #
# lookup order
# --------------------------------------------------------------------------- #
def test_lookup_order(tmp_path, monkeypatch):
    explicit = placeholder_dir(tmp_path / "explicit")
    env_root = tmp_path / "env"
    env = placeholder_dir(env_root / "mnist")
    shipped_root = tmp_path / "shipped"
    shipped = placeholder_dir(shipped_root / "mnist")
    cache = placeholder_dir(data.cache_dir("mnist"))
    assert cache == tmp_path / "xdg-cache" / "gpucnn" / "mnist"
    monkeypatch.setattr(data.lookup, "PACKAGE_DATA", shipped_root)
    monkeypatch.setenv("GPUCNN_DATA", str(env_root))

    assert data.locate("mnist", data_dir=explicit) == explicit
    assert data.locate("mnist") == env
    monkeypatch.delenv("GPUCNN_DATA")
    assert data.locate("mnist") == shipped
    shutil.rmtree(shipped)
    assert data.locate("mnist") == cache
    shutil.rmtree(cache)
    assert data.locate("mnist") is None


def test_lookup_prefers_name_subdir(tmp_path, monkeypatch, no_shipped):
    root = placeholder_dir(tmp_path / "root")
    sub = placeholder_dir(root / "mnist")
    assert data.locate("mnist", data_dir=root) == sub
    shutil.rmtree(sub)
    assert data.locate("mnist", data_dir=root) == root
    env = placeholder_dir(tmp_path / "envdir")
    monkeypatch.setenv("GPUCNN_DATA", str(env))
    assert data.locate("mnist") == env                      # the environment variable, without --data-dir
    assert data.locate("mnist", data_dir=root) == root      # --data-dir wins over it


@pytest.mark.parametrize("how", ["data_dir", "env"])
@pytest.mark.parametrize("state", ["empty", "missing", "incomplete", "folder"])
def test_a_named_directory_without_the_dataset_is_an_error(tmp_path, monkeypatch, how, state):
    """--data-dir / GPUCNN_DATA pointing at the wrong place no longer falls back to the shipped copy;
    a directory standing where an IDX file belongs is named as such ("does not hold" listed it)."""
    d = tmp_path / "where"
    folder = d / MNIST.files["test_labels"].name
    if state == "empty":
        d.mkdir()
    elif state in ("incomplete", "folder"):
        placeholder_dir(d)
        folder.unlink()
        if state == "folder":
            folder.mkdir()
    kwargs = {}
    if how == "data_dir":
        kwargs["data_dir"] = d
    else:
        monkeypatch.setenv("GPUCNN_DATA", str(d))
    with pytest.raises(data.DataDirError) as info:
        data.load_dataset("mnist", **kwargs)
    msg = str(info.value)
    assert str(d) in msg and ("--data-dir" if how == "data_dir" else "$GPUCNN_DATA") in msg
    for f in MNIST.files.values():
        assert f.name in msg                               # the files expected are listed
    assert {"empty": "does not hold it", "missing": "does not exist", "incomplete": "found only",
            "folder": f"{folder} is a directory, not a file"}[state] in msg
    if state == "folder":
        assert "does not hold" not in msg and f"'{folder.name}'" not in msg   # not listed as found
    assert isinstance(info.value, FileNotFoundError)


def test_env_root_holding_another_dataset_is_an_error_for_this_one(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUCNN_DATA", str(tmp_path / "only-mnist"))
    placeholder_dir(tmp_path / "only-mnist" / "mnist")
    with pytest.raises(data.DataDirError, match="fashion-mnist's four files"):
        data.locate("fashion-mnist")


def test_recompressed_copy_is_verified_by_its_content(tmp_path):
    """A gzip -n / other-level copy has other .gz digests but the same IDX bytes: accepted."""
    d = fill_dir(tmp_path / "d")
    for f in MNIST.files.values():
        payload = gzip.decompress((d / f.name).read_bytes())
        again = gzip.compress(payload, compresslevel=1, mtime=0)
        assert data.idx.sha256(again) not in f.sha256
        (d / f.name).write_bytes(again)
    ds = data.load_dataset("mnist", data_dir=d, download=False)
    assert ds.train_images.shape == (60000, 28, 28) and ds.source == d


def test_every_known_file_has_a_decompressed_digest():
    """So re-compressed and un-gzipped copies of MNIST and Fashion-MNIST can be verified."""
    for spec in data.DATASETS.values():
        for f in spec.files.values():
            assert f.idx_sha256 and len(f.idx_sha256) == 64, (spec.name, f.name)


def test_ungzipped_file_verified_by_a_decompressed_digest(tmp_path):
    payload = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    spec = data.FileSpec("t.gz", (3, 4), ("0" * 64,), data.idx.sha256(payload))
    (tmp_path / "t").write_bytes(payload)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "t", expected=spec), np.arange(12).reshape(3, 4))
    (tmp_path / "t").write_bytes(payload[:-1] + b"\x00")
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        data.read_idx(tmp_path / "t", expected=spec)


def test_shipped_beats_cache_and_load_reports_source(tmp_path):
    fill_dir(data.cache_dir("mnist"))
    assert data.locate("mnist") == SHIPPED
    d = fill_dir(tmp_path / "mine")
    assert data.load_dataset("mnist", data_dir=d, download=False).source == d


def test_not_found_without_download(no_shipped):
    with pytest.raises(FileNotFoundError) as exc_info:
        data.load_dataset("mnist", download=False)
    msg = str(exc_info.value)
    assert "download=True" in msg and str(data.cache_dir("mnist")) in msg


# --------------------------------------------------------------------------- #
# downloads from a local server
# --------------------------------------------------------------------------- #
class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.routes[path] = (body, declared_length)``; 404 otherwise."""

    timeout = 10

    def do_GET(self):  # noqa: N802 (http.server API)
        route = self.server.routes.get(self.path)
        self.server.requests.append(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, declared = route
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        try:
            self.wfile.write(body)
            self.wfile.flush()
        except OSError:
            pass
        self.close_connection = True

    def log_message(self, *args):  # keep test output quiet
        pass


@pytest.fixture
def server():
    with local_http_server(_Handler) as srv:
        yield srv


def serve(srv, prefix, files: dict[str, bytes], short_by: int = 0):
    for name, body in files.items():
        srv.routes[f"/{prefix}/{name}"] = (body[: len(body) - short_by] if short_by else body, len(body))
    return f"{srv.base}/{prefix}/"


def shipped_bytes() -> dict[str, bytes]:
    return {f.name: (SHIPPED / f.name).read_bytes() for f in MNIST.files.values()}


@pytest.fixture(scope="module")
def corrupt_bytes() -> dict[str, bytes]:
    """Every file with one payload byte changed, re-gzipped: valid IDX, wrong SHA-256."""
    out = {}
    for f in MNIST.files.values():
        payload = bytearray(gzip.decompress((SHIPPED / f.name).read_bytes()))
        payload[-1] ^= 0x01
        out[f.name] = gzip.compress(bytes(payload), compresslevel=1, mtime=0)
    return out


def test_download_good(server, no_shipped):
    url = serve(server, "good", shipped_bytes())
    ds = data.load_dataset("mnist", download=True, mirrors=[url], timeout=10)
    cache = data.cache_dir("mnist")
    assert ds.source == cache
    assert sorted(p.name for p in cache.iterdir()) == sorted(f.name for f in MNIST.files.values())
    assert ds.train_labels[0] == 5 and ds.test_labels[0] == 7
    # Now it is found in the cache without downloading again.
    n = len(server.requests)
    assert data.load_dataset("mnist", download=True, mirrors=[url]).source == cache
    assert len(server.requests) == n


def test_download_falls_back_to_second_mirror(server, tmp_path):
    first = f"{server.base}/missing/"           # nothing there: 404
    second = serve(server, "good", shipped_bytes())
    dest = data.download("mnist", tmp_path / "dest", mirrors=[first, second], timeout=10)
    assert dest == tmp_path / "dest"
    for f in MNIST.files.values():
        assert data.idx.sha256((dest / f.name).read_bytes()) in f.sha256
        assert f"/missing/{f.name}" in server.requests
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def _assert_failed_cleanly(exc_info, dest: Path, urls):
    msg = str(exc_info.value)
    for u in urls:
        assert u in msg
    assert not dest.exists() or list(dest.iterdir()) == []


def test_download_corrupt_leaves_nothing(server, no_shipped, corrupt_bytes):
    url = serve(server, "bad", corrupt_bytes)
    with pytest.raises(DownloadError) as exc_info:
        data.load_dataset("mnist", download=True, mirrors=[url], timeout=10)
    assert "SHA-256" in str(exc_info.value)
    _assert_failed_cleanly(exc_info, data.cache_dir("mnist"), [url])


def test_download_short_body_leaves_nothing(server, no_shipped):
    """The server promises Content-Length bytes and sends fewer."""
    url = serve(server, "short", shipped_bytes(), short_by=1000)
    with pytest.raises(DownloadError) as exc_info:
        data.load_dataset("mnist", download=True, mirrors=[url], timeout=10)
    _assert_failed_cleanly(exc_info, data.cache_dir("mnist"), [url])


def test_download_truncated_file_leaves_nothing(server, tmp_path):
    """A complete HTTP response whose content is a truncated file; then a 404 mirror."""
    files = {k: v[: len(v) // 2] for k, v in shipped_bytes().items()}
    url = serve(server, "trunc", files)
    missing = f"{server.base}/nothing/"
    dest = tmp_path / "dest"
    with pytest.raises(DownloadError) as exc_info:
        data.download("mnist", dest, mirrors=[url, missing], timeout=10)
    assert "404" in str(exc_info.value)
    _assert_failed_cleanly(exc_info, dest, [url, missing])


def test_download_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="known datasets: fashion-mnist, mnist"):
        data.download("cifar", tmp_path)
    with pytest.raises(ValueError, match="mirrors"):
        data.download("mnist", tmp_path, mirrors=[])
    with pytest.raises(TypeError, match="single string"):
        data.download("mnist", tmp_path, mirrors="http://127.0.0.1:9/")
    with pytest.raises(ValueError, match="timeout"):
        data.download("mnist", tmp_path, timeout=0)


# --------------------------------------------------------------------------- #
# specs, Dataset, normalize
# --------------------------------------------------------------------------- #
def test_specs():
    assert set(data.DATASETS) == {"mnist", "fashion-mnist"}
    for spec in data.DATASETS.values():
        assert set(spec.files) == set(ROLES)
        assert len(spec.classes) == 10 and spec.mirrors
        for f in spec.files.values():
            assert f.sha256 and all(len(h) == 64 and int(h, 16) >= 0 for h in f.sha256)
        assert set(spec.sha256) == {f.name for f in spec.files.values()}
    assert (MNIST.mean, MNIST.std) == (0.1307, 0.3081)
    fashion = data.DATASETS["fashion-mnist"]
    assert (fashion.mean, fashion.std) == (0.2860, 0.3530)
    assert fashion.classes[0] == "T-shirt/top" and fashion.classes[9] == "Ankle boot"
    assert data.DATASETS["mnist"].mirrors[0].startswith("https://ossci-datasets.s3.amazonaws.com/")


def test_unknown_dataset_lists_known():
    with pytest.raises(ValueError) as exc_info:
        data.load_dataset("imagenet")
    assert "'imagenet'" in str(exc_info.value)
    for name in ("mnist", "fashion-mnist", "cifar10", "folder"):
        assert name in str(exc_info.value)
    with pytest.raises(ValueError):
        data.locate("nope")
    assert data.locate("MNIST") == data.locate("mnist")  # names are case-insensitive


def test_dataset_validates_counts():
    x = np.zeros((3, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.Dataset("mnist", list("0123456789"), x, np.zeros(2, np.uint8), x, np.zeros(3, np.uint8))


def test_normalize():
    imgs = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    out = data.normalize(imgs)
    assert out.shape == (1, 1, 2, 2) and out.dtype == np.float32
    expected = (imgs[:, None].astype(np.float64) / 255 - 0.1307) / 0.3081
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(data.normalize(imgs[:, None]), out)  # (N,1,H,W) accepted
    fash = data.normalize(imgs, "fashion-mnist")
    np.testing.assert_allclose(fash, (imgs[:, None] / 255 - 0.2860) / 0.3530, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data.normalize(imgs.astype(np.int64)), out)
    with pytest.raises(TypeError, match="float64"):
        data.normalize(imgs / 255.0)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        data.normalize(imgs[0])
    with pytest.raises(ValueError, match="0..255"):
        data.normalize(np.full((1, 2, 2), 300))


def test_normalize_shipped_is_standardized():
    ds = data.load_dataset("mnist", download=False)
    x = data.normalize(ds.train_images[:20000], ds)
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05


# --------------------------------------------------------------------------- #
# batching: the per-epoch order and its (sharded) minibatches
# --------------------------------------------------------------------------- #
@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), batch_size=st.integers(1, 70), seed=st.integers(0, 2**32 - 1),
       world=st.integers(1, 4))
def test_batches_cover_each_index_once(n, batch_size, seed, world):
    order = data.epoch_permutation(seed, 3, n)
    assert order.dtype == np.int64
    steps = data.steps_per_epoch(n, batch_size)
    assert steps == -(-n // batch_size)
    batches = [data.batch_indices(order, s, batch_size) for s in range(steps)]
    assert all(len(b) == batch_size for b in batches[:-1])
    if batches:
        assert 1 <= len(batches[-1]) <= batch_size
    flat = np.concatenate(batches) if batches else np.array([], np.int64)
    np.testing.assert_array_equal(np.sort(flat), np.arange(n))
    # every rank's shard of a global batch, in rank order, is that batch
    for s in range(steps):
        shards = [data.batch_indices(order, s, batch_size, rank, world) for rank in range(world)]
        np.testing.assert_array_equal(np.concatenate(shards), batches[s])
        sizes = [len(x) for x in shards]
        assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        # batch_start: where each shard lies in the order (what keys its augmentation)
        for rank, shard in enumerate(shards):
            start = data.batching.batch_start(n, s, batch_size, rank, world)
            np.testing.assert_array_equal(order[start:start + len(shard)], shard)


def test_epoch_order_depends_only_on_seed_and_epoch():
    e1 = data.epoch_permutation(7, 0, 1000)
    np.testing.assert_array_equal(e1, data.epoch_permutation(7, 0, 1000))   # same seed, epoch -> same order
    np.testing.assert_array_equal(e1, np.random.default_rng([7, 0]).permutation(1000))  # the documented scheme
    assert not np.array_equal(e1, data.epoch_permutation(7, 1, 1000))      # a new order each epoch
    assert not np.array_equal(e1, data.epoch_permutation(8, 0, 1000))


def test_batching_argument_errors():
    with pytest.raises(ValueError, match="batch_size must be a positive int, got batch_size=0"):
        data.steps_per_epoch(10, 0)
    with pytest.raises(ValueError, match="batch_size=2.5"):
        data.steps_per_epoch(10, 2.5)
    with pytest.raises(ValueError, match="n must be a non-negative int, got n=-1"):
        data.epoch_permutation(0, 0, -1)
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        data.epoch_permutation(-1, 0, 10)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got rank=2"):
        data.shard_bounds(10, 2, 2)
