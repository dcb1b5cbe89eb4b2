"""CIFAR-10's binary archive: download from a local server (never the internet), verification,
safe extraction, parsing, per-channel normalisation and training on it (tiny fake archives)."""
from __future__ import annotations

import hashlib
import http.server
import io
import tarfile
import time

import numpy as np
import pytest
from helpers import isolate_data_env, local_http_server

import gpucnn as gc
import gpucnn.cli
from gpucnn.data import DataError, DownloadError, cifar


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    isolate_data_env(tmp_path, monkeypatch)


def fake_records(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return labels, pixels, np.concatenate([labels[:, None], pixels], axis=1).tobytes()


def fake_archive(n=4, extra=()) -> tuple[bytes, dict]:
    """A .tar.gz laid out like the real one (cifar-10-batches-bin/...), n records per batch."""
    buf, truth = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, body, **kw):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            for k, v in kw.items():
                setattr(info, k, v)
            tar.addfile(info, io.BytesIO(body))
        for i, name in enumerate(cifar.TRAIN_FILES + cifar.TEST_FILES):
            y, x, body = fake_records(n, i)
            truth[name] = (y, x)
            add(f"cifar-10-batches-bin/{name}", body)
        add("cifar-10-batches-bin/batches.meta.txt", "\n".join(cifar.CLASSES).encode())
        add("cifar-10-batches-bin/readme.html", b"<html></html>")
        for name, body, kw in extra:
            add(name, body, **kw)
    return buf.getvalue(), truth


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        route = self.server.routes.get(self.path)
        if route is None:
            self.send_error(404, "Not Found")
            return
        body, declared, delay = route
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        if delay:
            time.sleep(delay)
        try:
            self.wfile.write(body)
        except OSError:
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    with local_http_server(_Handler) as srv:
        yield srv


def test_digest_pinned_is_the_published_one():
    # TensorFlow Datasets' url_checksums/cifar10.txt, for this URL and 170052171 bytes
    assert cifar.URL == "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    assert cifar.ARCHIVE_SHA256 == "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"


def test_download_verify_extract_and_parse(server, tmp_path):
    body, truth = fake_archive()
    server.routes["/c.tgz"] = (body, len(body), 0)
    ds = cifar.load_cifar10(url=server.base + "/c.tgz", sha256=hashlib.sha256(body).hexdigest(), timeout=5)
    assert ds.train_images.shape == (20, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.in_shape == (3, 32, 32) and ds.classes[0] == "airplane" and ds.mean == cifar.MEAN
    y, x = truth["data_batch_2.bin"]
    np.testing.assert_array_equal(ds.train_labels[4:8], y)
    # record layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32
    np.testing.assert_array_equal(ds.train_images[4, 1, 0, :5], x[0, 1024:1029])
    np.testing.assert_array_equal(ds.train_images[5, 2, 31, 31], x[1, 3071])
    cache = tmp_path / "xdg-cache" / "gpucnn" / "cifar10"
    assert (cache / cifar.ARCHIVE).read_bytes() == body
    assert not (cache / "cifar-10-batches-bin" / "readme.html").exists()   # only the expected members
    # a second load reads the cache: no server needed
    server.routes.clear()
    again = cifar.load_cifar10(url=server.base + "/c.tgz", timeout=5)
    np.testing.assert_array_equal(again.test_labels, ds.test_labels)
    # per-channel normalisation
    xn = gc.data.normalize(ds.train_images[:2], ds)
    want = (ds.train_images[:2, 2].astype(np.float32) * np.float32(1 / (255 * cifar.STD[2]))
            - np.float32(cifar.MEAN[2] / cifar.STD[2]))
    np.testing.assert_array_equal(xn[:, 2], want)


@pytest.mark.parametrize("case", ["truncated", "wrong digest", "404"])
def test_bad_downloads_keep_nothing(server, tmp_path, case):
    body, _ = fake_archive()
    digest = hashlib.sha256(body).hexdigest()
    if case == "truncated":
        server.routes["/c.tgz"] = (body[: len(body) // 2], len(body), 0)
    elif case == "wrong digest":
        server.routes["/c.tgz"] = (body, len(body), 0)
        digest = "0" * 64
    url = server.base + "/c.tgz"
    with pytest.raises(DownloadError) as exc:
        cifar.load_cifar10(url=url, sha256=digest, timeout=5)
    msg = str(exc.value)
    assert url in msg
    assert {"truncated": "Content-Length", "wrong digest": "0" * 64, "404": "HTTP 404"}[case] in msg
    cache = tmp_path / "xdg-cache" / "gpucnn" / "cifar10"
    assert not cache.exists() or not any(cache.rglob("*.bin")) and not (cache / cifar.ARCHIVE).exists()


def test_slow_server_times_out(server):
    body, _ = fake_archive()
    server.routes["/c.tgz"] = (body, len(body), 3)
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match="timed out"):
        cifar.load_cifar10(url=server.base + "/c.tgz", sha256=hashlib.sha256(body).hexdigest(), timeout=0.5)
    assert time.perf_counter() - t0 < 2.5


@pytest.mark.parametrize("name, kw, why", [
    ("../evil.bin", {}, "unsafe path"),
    ("/etc/evil", {}, "unsafe path"),
    ("cifar-10-batches-bin/link", {"type": tarfile.SYMTYPE, "linkname": "/etc/passwd"}, "link"),
])
def test_unsafe_archives_are_refused_before_writing(tmp_path, name, kw, why):
    body, _ = fake_archive(extra=[(name, b"x" if not kw else b"", kw)])
    with pytest.raises(DataError, match=why):
        cifar.extract(body, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_oversize_member_and_bad_records(tmp_path, monkeypatch):
    body, _ = fake_archive()
    monkeypatch.setattr(cifar, "MAX_MEMBER_BYTES", 3 * cifar.RECORD)
    with pytest.raises(DataError, match="more than the"):
        cifar.extract(body, tmp_path / "a")
    monkeypatch.undo()
    d = cifar.extract(body, tmp_path / "b")
    (d / "test_batch.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DataError, match="3073-byte"):
        cifar.read_batches(d, cifar.TEST_FILES)
    (d / "test_batch.bin").write_bytes(bytes([12]) + b"\x00" * 3072)
    with pytest.raises(DataError, match="label 12"):
        cifar.read_batches(d, cifar.TEST_FILES)


def test_data_dir_must_hold_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin"):
        cifar.load_cifar10(tmp_path)
    body, _ = fake_archive()
    (tmp_path / cifar.ARCHIVE).write_bytes(body)        # an archive put there by hand is extracted
    assert cifar.load_cifar10(tmp_path).train_images.shape == (20, 3, 32, 32)


def test_train_cli_on_cifar10_with_crops_and_flips(tmp_path, capsys):
    body, _ = fake_archive()
    cifar.extract(body, tmp_path / "c")
    rc = gc.cli.main(["train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "c"), "--model", "lenet5",
                      "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run"), "--no-progress",
                      "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "20 training / 4 test images of 3x32x32, 10 classes" in out
    assert "random shifts of up to 4 pixels and left-right flips" in out
    meta = gc.checkpoint.read_metadata(tmp_path / "run")
    assert meta["data"]["in_shape"] == [3, 32, 32] and meta["data"]["classes"][9] == "truck"
    assert meta["data"]["mean"] == list(cifar.MEAN)
