"""Tests for `jopt.data`: IDX parsing, the directory search, and verified downloads.

Every test runs with `$HOME`, `$JOPT_DATA_DIR` and the system data roots pointed into
`tmp_path`, so nothing reads or writes the real cache. Downloads go to a local HTTP
server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from jopt import data

_IDX_CODES = {
    np.dtype(np.uint8): 0x08,
    np.dtype(np.int8): 0x09,
    np.dtype(np.int16): 0x0B,
    np.dtype(np.int32): 0x0C,
    np.dtype(np.float32): 0x0D,
    np.dtype(np.float64): 0x0E,
}
_FILES = data.DATASETS["mnist"].files
_DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encodes `array` as an IDX file (big-endian header and elements)."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    header += b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def gz(payload: bytes) -> bytes:
    return gzip.compress(payload, mtime=0)  # mtime=0: the same bytes on every run.


def fake_arrays(label: int | None = None) -> list[np.ndarray]:
    """Small train/test splits; `label` fixes every label so tests can tell copies apart."""
    rng = np.random.default_rng(0)
    arrays = []
    for n in (12, 5):
        arrays.append(rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8))
        labels = np.arange(n) % 10 if label is None else np.full(n, label)
        arrays.append(labels.astype(np.uint8))
    return arrays


def fake_files(label: int | None = None) -> dict[str, bytes]:
    """The four `.gz` files of a small fake data set, keyed by file name."""
    return {name: gz(idx_bytes(a)) for name, a in zip(_FILES, fake_arrays(label), strict=True)}


def write_dataset(directory: Path, *, compress: bool = True, label: int | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in zip(_FILES, fake_arrays(label), strict=True):
        if compress:
            (directory / name).write_bytes(gz(idx_bytes(array)))
        else:
            (directory / name.removesuffix(".gz")).write_bytes(idx_bytes(array))
    return directory


def sha256s(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(body).hexdigest() for name, body in files.items()}


def fake_spec(mirrors: tuple[str, ...] = (), sha256: dict[str, str] | None = None):
    return dataclasses.replace(
        data.DATASETS["mnist"],
        name="fake",
        dirname="fake",
        mirrors=mirrors,
        sha256=sha256s(fake_files()) if sha256 is None else sha256,
    )


@dataclasses.dataclass
class Env:
    home: Path
    system: Path
    cache: Path  # ~/.cache/jopt


@pytest.fixture(autouse=True)
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    home = tmp_path / "home"
    system = tmp_path / "system"
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("JOPT_DATA_DIR", raising=False)
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (str(system),))
    return Env(home=home, system=system, cache=home / ".cache" / "jopt")


@dataclasses.dataclass
class Server:
    url: str
    routes: dict[str, bytes]  # path -> body; anything else is a 404
    requests: list[str]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[Server]:
    routes: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            body = routes.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # Keep test output clean.

    # A proxy configured in the environment must not see requests to the local server.
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    # A short poll interval: shutdown() waits up to one interval.
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
    )
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_port}", routes, requests)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def serve(server: Server, prefix: str, files: dict[str, bytes]) -> str:
    """Serves `files` under `/prefix/` and returns that mirror's base URL."""
    for name, body in files.items():
        server.routes[f"/{prefix}/{name}"] = body
    return f"{server.url}/{prefix}/"


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# --- read_idx ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("dtype", list(_IDX_CODES), ids=str)
def test_read_idx_round_trip(tmp_path: Path, dtype: np.dtype, compress: bool) -> None:
    expected = (np.arange(60).reshape(3, 4, 5) - 20).astype(dtype)
    payload = idx_bytes(expected)
    path = tmp_path / "x.idx"
    path.write_bytes(gz(payload) if compress else payload)

    got = data.read_idx(path)

    np.testing.assert_array_equal(got, expected)
    assert got.dtype == expected.dtype and got.dtype.isnative
    assert got.flags.writeable


def test_read_idx_one_dimensional_and_empty(tmp_path: Path) -> None:
    for shape in [(7,), (0, 28, 28)]:
        expected = np.ones(shape, np.uint8)
        (tmp_path / "x").write_bytes(idx_bytes(expected))
        np.testing.assert_array_equal(data.read_idx(tmp_path / "x"), expected)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path: Path) -> None:
    expected = np.arange(10, dtype=np.uint8)
    (tmp_path / "looks-raw").write_bytes(gz(idx_bytes(expected)))
    (tmp_path / "looks.gz").write_bytes(idx_bytes(expected))
    np.testing.assert_array_equal(data.read_idx(tmp_path / "looks-raw"), expected)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "looks.gz"), expected)


_GOOD = idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4))


@pytest.mark.parametrize(
    "content, reason",
    [
        (_GOOD[:-1], r"promises 40 bytes for shape \(2, 3, 4\) but it has 39"),
        (_GOOD + b"\0", "promises 40 bytes .* but it has 41"),
        (b"\x01\x02" + _GOOD[2:], "magic number"),
        (_GOOD[:2] + b"\x07" + _GOOD[3:], "type code 0x07"),
        (b"", "fewer than an IDX header"),
        (_GOOD[:10], "cut short"),
        (gz(_GOOD)[:20], "gzip stream is broken"),
        (b"\x1f\x8b" + b"not really gzip" * 4, "gzip stream is broken"),
        (gz(_GOOD[:-1]), "but it has 39"),
    ],
    ids=[
        "truncated",
        "trailing-bytes",
        "magic",
        "type-code",
        "empty",
        "short-header",
        "truncated-gzip",
        "bad-gzip",
        "gzip-of-truncated",
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as excinfo:
        data.read_idx(path)
    message = str(excinfo.value)
    assert message.startswith(f"{path} is not a valid IDX file")
    assert "delete it so that it is downloaded again" in message


# --- finding files on disk ----------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_load_from_data_dir(tmp_path: Path, compress: bool) -> None:
    directory = write_dataset(tmp_path / "d", compress=compress)

    ds = data.load("mnist", data_dir=directory, download=False)

    train_images, train_labels, test_images, test_labels = fake_arrays()
    np.testing.assert_array_equal(ds.train_images, train_images)
    np.testing.assert_array_equal(ds.train_labels, train_labels)
    np.testing.assert_array_equal(ds.test_images, test_images)
    np.testing.assert_array_equal(ds.test_labels, test_labels)
    assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert (ds.name, ds.num_classes) == ("mnist", 10)
    assert repr(ds) == (
        "Dataset(name='mnist', train=12, test=5, image_shape=(28, 28), num_classes=10)"
    )


def test_search_dirs_order(tmp_path: Path, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.search_dirs("fashion_mnist") == [
        env.cache / "fashion-mnist",
        env.system / "fashion-mnist",
    ]
    monkeypatch.setenv("JOPT_DATA_DIR", str(tmp_path / "env"))
    assert data.search_dirs("fashion-mnist", tmp_path / "explicit") == [
        tmp_path / "explicit",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "env",
        env.cache / "fashion-mnist",
        env.system / "fashion-mnist",
    ]
    assert data.download_dir("mnist") == tmp_path / "env" / "mnist"
    assert data.download_dir("mnist", tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("JOPT_DATA_DIR")
    assert data.download_dir("mnist") == env.cache / "mnist"


def test_load_takes_the_first_directory_in_search_order(
    tmp_path: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = fake_spec()  # Pins the SHA-256s of the files with label=None.
    write_dataset(env.system / "fake", label=4)
    assert set(data.load(spec, download=False).train_labels) == {4}
    write_dataset(env.cache / "fake", label=3)
    assert set(data.load(spec, download=False).train_labels) == {3}
    monkeypatch.setenv("JOPT_DATA_DIR", str(tmp_path / "env"))
    # Flat layout, the files directly in it: used as their hashes are the spec's.
    write_dataset(tmp_path / "env")
    assert set(data.load(spec, download=False).train_labels) == set(range(10))
    write_dataset(tmp_path / "env" / "fake", label=1)
    assert set(data.load(spec, download=False).train_labels) == {1}
    explicit = write_dataset(tmp_path / "explicit", label=0)
    assert set(data.load(spec, data_dir=explicit, download=False).train_labels) == {0}


def test_flat_jopt_data_dir_is_used_only_for_files_identified_by_hash(
    tmp_path: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files directly in $JOPT_DATA_DIR could be any data set's: unknown hashes are
    # skipped (with the reason in the error), while a named directory takes them.
    monkeypatch.setenv("JOPT_DATA_DIR", str(tmp_path / "env"))
    write_dataset(tmp_path / "env", label=2)
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load("mnist", download=False)
    message = str(excinfo.value)
    assert (f"  ({tmp_path / 'env'}: skipped, as files directly in $JOPT_DATA_DIR are used "
            "only if their SHA-256s identify them as mnist's, and train-images-idx3-ubyte.gz "
            "matches no known hash; train-labels-idx1-ubyte.gz matches no known hash; "
            "t10k-images-idx3-ubyte.gz matches no known hash; t10k-labels-idx1-ubyte.gz "
            "matches no known hash)\n") in message
    assert f"e.g. in $JOPT_DATA_DIR/mnist/" in message
    write_dataset(env.cache / "mnist", label=3)
    assert set(data.load("mnist", download=False).train_labels) == {3}


@pytest.mark.skipif(not _DEBIAN_FASHION.is_dir(), reason=f"{_DEBIAN_FASHION} is missing")
def test_fashion_mnist_is_never_taken_for_mnist(
    tmp_path: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Both data sets use the same file names. Debian re-gzips Fashion-MNIST, so these
    # are recognised by the SHA-256s of their decompressed content.
    # Files directly in $JOPT_DATA_DIR: skipped (the search goes on), with the reason.
    monkeypatch.setenv("JOPT_DATA_DIR", str(_DEBIAN_FASHION))
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load("mnist", download=False)
    assert (f"  ({_DEBIAN_FASHION}: skipped, as files directly in $JOPT_DATA_DIR are used "
            "only if their SHA-256s identify them as mnist's, and train-images-idx3-ubyte.gz "
            "is fashion_mnist's train-images-idx3-ubyte.gz; ") in str(excinfo.value)
    # ... to a later directory that has MNIST's files.
    write_dataset(env.cache / "mnist", label=4)
    assert set(data.load("mnist", download=False).train_labels) == {4}
    shutil.rmtree(env.cache / "mnist")
    # The same files are Fashion-MNIST's own: verified, so the flat layout is used.
    assert data.load("fashion_mnist", download=False).name == "fashion_mnist"

    # In a directory named for MNIST (a symlink here) they are an error too.
    monkeypatch.delenv("JOPT_DATA_DIR")
    env.cache.mkdir(parents=True, exist_ok=True)
    (env.cache / "mnist").symlink_to(_DEBIAN_FASHION)
    with pytest.raises(data.DatasetFileError, match=(
            r"mnist/train-images-idx3-ubyte.gz is fashion_mnist's train-images-idx3-ubyte.gz "
            r".* is searched for mnist: move fashion_mnist's files out of it")):
        data.load("mnist", download=False)


def test_directory_missing_a_file_is_skipped(env: Env) -> None:
    write_dataset(env.cache / "mnist", label=3)
    (env.cache / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    write_dataset(env.system / "mnist", label=4)
    assert set(data.load("mnist", download=False).train_labels) == {4}


def test_corrupt_local_file_is_reported_not_replaced(env: Env) -> None:
    directory = write_dataset(env.cache / "mnist")
    path = directory / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="delete it so that it is downloaded again"):
        data.load("mnist")  # download=True, but nothing may be fetched over a found file.


def test_labels_that_do_not_match_images_are_rejected(tmp_path: Path) -> None:
    directory = write_dataset(tmp_path / "d")
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(np.zeros(4, np.uint8))))
    with pytest.raises(ValueError, match=r"has 5 images but .* has 4 labels"):
        data.load("mnist", data_dir=directory, download=False)

    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(np.full(5, 10, np.uint8))))
    with pytest.raises(ValueError, match=r"labels outside \[0, 10\)"):
        data.load("mnist", data_dir=directory, download=False)

    # Images and labels swapped.
    (directory / "t10k-labels-idx1-ubyte.gz").write_bytes(gz(idx_bytes(np.zeros(5, np.uint8))))
    (directory / "t10k-images-idx3-ubyte.gz").write_bytes(gz(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(ValueError, match=r"not uint8 images \[n, height, width\]"):
        data.load("mnist", data_dir=directory, download=False)


def test_not_found_offline_lists_every_place_searched(
    tmp_path: Path, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JOPT_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load("fashion-mnist", data_dir=tmp_path / "explicit", download=False)
    assert isinstance(excinfo.value, FileNotFoundError)
    message = str(excinfo.value)
    for directory in [
        tmp_path / "explicit",
        tmp_path / "env" / "fashion-mnist",
        tmp_path / "env",
        env.cache / "fashion-mnist",
        env.system / "fashion-mnist",
    ]:
        assert f"  {directory}\n" in message
    assert "download=False" in message
    assert "JOPT_DATA_DIR" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "load(..., download=True)" in message


def test_unknown_name() -> None:
    with pytest.raises(ValueError, match=r"Unknown data set 'cifar10'; choose one of"):
        data.load("cifar10")


# --- downloads ------------------------------------------------------------------------


def test_download_verifies_caches_and_is_reused(server: Server, env: Env) -> None:
    files = fake_files()
    spec = fake_spec(mirrors=(serve(server, "good", files),))

    ds = data.load(spec)

    assert len(server.requests) == 4
    target = env.cache / "fake"
    assert leftovers(target) == sorted(_FILES)  # No temporary files left behind.
    for name, body in files.items():
        assert (target / name).read_bytes() == body
    np.testing.assert_array_equal(ds.train_images, fake_arrays()[0])

    again = data.load(spec)

    assert len(server.requests) == 4  # Found in the cache: no network.
    np.testing.assert_array_equal(again.train_images, ds.train_images)


def test_download_goes_to_jopt_data_dir_or_data_dir(
    tmp_path: Path, server: Server, env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = fake_spec(mirrors=(serve(server, "good", fake_files()),))
    monkeypatch.setenv("JOPT_DATA_DIR", str(tmp_path / "env"))
    data.load(spec)
    assert leftovers(tmp_path / "env" / "fake") == sorted(_FILES)

    monkeypatch.delenv("JOPT_DATA_DIR")  # Else the copy just downloaded is found there.
    data.load(spec, data_dir=tmp_path / "explicit")
    assert leftovers(tmp_path / "explicit") == sorted(_FILES)
    assert not env.cache.exists()


def test_first_mirror_missing_falls_back_to_second(server: Server, env: Env) -> None:
    good = serve(server, "good", fake_files())
    spec = fake_spec(mirrors=(f"{server.url}/missing/", good))

    data.load(spec)

    assert sorted(server.requests) == sorted(
        [f"/missing/{n}" for n in _FILES] + [f"/good/{n}" for n in _FILES]
    )
    assert leftovers(env.cache / "fake") == sorted(_FILES)


def test_wrong_checksum_is_rejected_and_nothing_is_kept(server: Server, env: Env) -> None:
    files = fake_files()
    bad = dict(files, **{_FILES[0]: gz(b"tampered")})
    spec = fake_spec(mirrors=(serve(server, "bad", bad),))

    with pytest.raises(data.DatasetNotFoundError, match="SHA-256 mismatch") as excinfo:
        data.load(spec)

    assert f"{server.url}/bad/{_FILES[0]}: SHA-256 mismatch" in str(excinfo.value)
    assert leftovers(env.cache / "fake") == []


def test_wrong_checksum_on_one_mirror_falls_back_to_the_next(server: Server, env: Env) -> None:
    files = fake_files()
    bad = dict(files, **{_FILES[1]: gz(b"tampered")})
    spec = fake_spec(mirrors=(serve(server, "bad", bad), serve(server, "good", files)))

    data.load(spec)

    assert f"/good/{_FILES[1]}" in server.requests
    for name, body in files.items():
        assert (env.cache / "fake" / name).read_bytes() == body


def test_partial_cache_downloads_only_what_is_missing(server: Server, env: Env) -> None:
    files = fake_files()
    target = env.cache / "fake"
    target.mkdir(parents=True)
    (target / _FILES[0]).write_bytes(files[_FILES[0]])
    spec = fake_spec(mirrors=(serve(server, "good", files),))

    data.load(spec)

    assert sorted(server.requests) == sorted(f"/good/{n}" for n in _FILES[1:])


def test_unreachable_mirror_error_lists_places_and_download_errors(env: Env) -> None:
    with socket.socket() as sock:  # Reserve a port, then free it: nothing listens there.
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = fake_spec(mirrors=(f"http://127.0.0.1:{port}/",))

    with pytest.raises(data.DatasetNotFoundError) as excinfo:
        data.load(spec, timeout=5.0)

    message = str(excinfo.value)
    assert f"  {env.cache / 'fake'}\n" in message
    assert f"Download into {env.cache / 'fake'} failed:" in message
    assert f"http://127.0.0.1:{port}/{_FILES[0]}: " in message
    assert "check the network connection" in message
    assert leftovers(env.cache / "fake") == []


def test_no_checksum_means_no_download(server: Server) -> None:
    spec = fake_spec(mirrors=(serve(server, "good", fake_files()),), sha256={})
    with pytest.raises(data.DatasetNotFoundError, match="no SHA-256 is known"):
        data.load(spec)
    assert server.requests == []


def test_builtin_specs_pin_every_file() -> None:
    assert set(data.DATASETS) == {"mnist", "fashion_mnist"}
    for spec in data.DATASETS.values():
        assert set(spec.sha256) == set(spec.files)
        for digest in spec.sha256.values():
            assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")
        assert spec.mirrors and all(m.endswith("/") for m in spec.mirrors)


# --- helpers ------------------------------------------------------------------------


def test_subset(tmp_path: Path) -> None:
    ds = data.load("mnist", data_dir=write_dataset(tmp_path / "d"), download=False)
    small = data.subset(ds, train=3, test=2)
    assert small.train_images.shape == (3, 28, 28) and small.train_labels.shape == (3,)
    assert small.test_images.shape == (2, 28, 28) and small.test_labels.shape == (2,)
    np.testing.assert_array_equal(small.train_labels, ds.train_labels[:3])
    assert data.subset(ds, test=0).train_images.shape == ds.train_images.shape
    with pytest.raises(ValueError, match="Asked for 13 training examples; choose 0 to 12"):
        data.subset(ds, train=13)


# --- real data ------------------------------------------------------------------------


@pytest.mark.skipif(
    not _DEBIAN_FASHION.is_dir(),
    reason=f"{_DEBIAN_FASHION} is missing (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debian(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (str(_DEBIAN_FASHION.parent),))

    ds = data.load("fashion_mnist", download=False)

    assert ds.name == "fashion_mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == np.uint8
    assert ds.train_labels.shape == (60000,) and ds.train_labels.dtype == np.int32
    assert ds.test_labels.shape == (10000,) and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), [1000] * 10)
    assert 0 < ds.train_images.mean() < 255  # Real pixels, not a blank array.
