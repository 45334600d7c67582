"""Data sets: MNIST and Fashion-MNIST, read from IDX files found on disk or downloaded.

`load` looks for a data set's four IDX files (gzip-compressed or raw) in a fixed list
of directories, and downloads them, SHA-256 verified, when none has them. Images stay
`uint8` in host memory; scaling them to floats is the training loop's job, on device.

Where `load` looks, in order (see `search_dirs`):

1. the `data_dir` argument, if given;
2. `$JOPT_DATA_DIR/<dirname>`, then `$JOPT_DATA_DIR` itself, if the variable is set;
3. `~/.cache/jopt/<dirname>`;
4. `/usr/share/datasets/<dirname>` (Debian's `dataset-fashion-mnist` installs there).

`<dirname>` is `mnist` or `fashion-mnist`. A directory counts only if it holds all four
files, so two data sets never get mixed. MNIST and Fashion-MNIST use the same file
names, so files are also identified by content: every file read is hashed, and one
whose SHA-256 (of the file, or of its decompressed content) is that of another known
data set's file is an error naming it. Files directly in `$JOPT_DATA_DIR` (no
`<dirname>` to say which data set they are) are used only when their SHA-256s identify
them as the requested data set; otherwise that directory is skipped. Downloads go to
`download_dir`: `data_dir` if given, else `$JOPT_DATA_DIR/<dirname>` if set, else
`~/.cache/jopt/<dirname>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import http.client
import logging
import math
import os
import tempfile
import types
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "SYSTEM_DATA_DIRS",
    "Dataset",
    "DatasetFileError",
    "DatasetNotFoundError",
    "DatasetSpec",
    "download_dir",
    "load",
    "read_idx",
    "search_dirs",
    "subset",
]

_logger = logging.getLogger(__name__)

# System-wide roots, searched last. A module attribute (read at call time) so that tests
# can point it somewhere empty.
SYSTEM_DATA_DIRS: tuple[str, ...] = ("/usr/share/datasets",)

_ENV_VAR = "JOPT_DATA_DIR"
_CHUNK = 1 << 20

# IDX element type codes (third byte of the magic number). Multi-byte types are
# big-endian on disk.
_IDX_DTYPES: Mapping[int, np.dtype] = types.MappingProxyType(
    {
        0x08: np.dtype(np.uint8),
        0x09: np.dtype(np.int8),
        0x0B: np.dtype(">i2"),
        0x0C: np.dtype(">i4"),
        0x0D: np.dtype(">f4"),
        0x0E: np.dtype(">f8"),
    }
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Where a data set lives and how to check it.

    Attributes:
      name: canonical name, e.g. `"mnist"`.
      dirname: directory name under each search root, e.g. `"fashion-mnist"`.
      mirrors: base URLs tried in order; a file's URL is `mirror + filename`.
      sha256: SHA-256 hex digest of each `.gz` file, keyed by file name.
      files: the `.gz` names of train images, train labels, test images, test labels.
        On disk the uncompressed file (the name without `.gz`) is accepted too.
      num_classes: number of label values.
      system_package: Debian package that installs the files, if any.
      pixel_mean, pixel_std: mean and standard deviation of the training images'
        pixels scaled to [0, 1], for input standardisation.
      raw_sha256: SHA-256 hex digest of each file's uncompressed content, keyed by the
        `.gz` file name (may be empty). With `sha256` it identifies files on disk
        whatever their compression.
    """

    name: str
    dirname: str
    mirrors: tuple[str, ...]
    sha256: Mapping[str, str]
    files: tuple[str, str, str, str] = (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    )
    num_classes: int = 10
    system_package: str | None = None
    pixel_mean: float = 0.5
    pixel_std: float = 0.5
    raw_sha256: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))


# SHA-256 of the original `.gz` files, as pinned in TensorFlow Datasets'
# `url_checksums/mnist.txt` and `url_checksums/fashion_mnist.txt`, and by many other
# loaders for the same mirrors. Debian re-gzips Fashion-MNIST without the file name in
# the gzip header, so its `.gz` hashes differ, but its decompressed files have the
# SHA-256s published for the original uncompressed Fashion-MNIST files: the data are
# identical. Those uncompressed hashes (`raw_sha256`, computed from Debian's files)
# identify Fashion-MNIST on disk whatever its compression. MNIST's uncompressed hashes
# are the ones many MNIST loaders pin for the unpacked original files; they were
# checked against the copy that `.ci/fetch_mnist.py` installs (MD5s equal to the
# originals' too).
_MNIST = DatasetSpec(
    name="mnist",
    dirname="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    sha256=types.MappingProxyType(
        {
            "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        }
    ),
    raw_sha256=types.MappingProxyType(
        {
            "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        }
    ),
    # The widely used MNIST statistics (e.g. torchvision's MNIST example).
    pixel_mean=0.1307,
    pixel_std=0.3081,
)
_FASHION_MNIST = DatasetSpec(
    name="fashion_mnist",
    dirname="fashion-mnist",
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
    ),
    sha256=types.MappingProxyType(
        {
            "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
        }
    ),
    raw_sha256=types.MappingProxyType(
        {
            "train-images-idx3-ubyte.gz": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte.gz": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte.gz": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte.gz": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        }
    ),
    system_package="dataset-fashion-mnist",
    # Measured on the 60,000 training images: 0.28604, 0.35302.
    pixel_mean=0.2860,
    pixel_std=0.3530,
)

DATASETS: Mapping[str, DatasetSpec] = types.MappingProxyType(
    {"mnist": _MNIST, "fashion_mnist": _FASHION_MNIST}
)
"""The known data sets by canonical name. `load` also accepts `-` for `_`."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous; use identity.
class Dataset:
    """An image-classification data set held in host memory.

    Attributes:
      train_images: `uint8` array of shape `[num_train, height, width]`.
      train_labels: `int32` array of shape `[num_train]`, values in `[0, num_classes)`.
      test_images: `uint8` array of shape `[num_test, height, width]`.
      test_labels: `int32` array of shape `[num_test]`.
      name: canonical name of the data set, e.g. `"fashion_mnist"`.
      num_classes: number of classes.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    name: str
    num_classes: int = 10

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_images)}, "
            f"test={len(self.test_images)}, image_shape={self.train_images.shape[1:]}, "
            f"num_classes={self.num_classes})"
        )


class DatasetNotFoundError(FileNotFoundError):
    """A data set is neither on disk nor downloadable; the message says where we looked."""


class DatasetFileError(ValueError):
    """A data file found on disk is corrupt, or is another data set's; the message names it."""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an IDX file, gzip-compressed or raw.

    Compression is detected from the content (gzip magic bytes), not the file name.

    Args:
      path: the file to read.

    Returns:
      A writable array in native byte order, with the dtype and shape the header gives.

    Raises:
      DatasetFileError: (a `ValueError`) the file is not a complete, well-formed IDX
        file (bad gzip stream, wrong magic number, unknown type code, or a size that
        disagrees with the header).
      OSError: the file cannot be opened.
    """
    return _read_idx(Path(path))[0]


def _read_idx(path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    """`read_idx`, and the SHA-256s of the file and (if compressed) of its content."""
    raw = path.read_bytes()
    digests = [hashlib.sha256(raw).hexdigest()]
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise _corrupt(path, f"its gzip stream is broken ({e})") from e
        digests.append(hashlib.sha256(raw).hexdigest())

    if len(raw) < 4:
        raise _corrupt(path, f"it has only {len(raw)} bytes, fewer than an IDX header")
    zero0, zero1, type_code, ndim = raw[:4]
    if zero0 or zero1:
        raise _corrupt(path, f"its magic number {raw[:4].hex()} does not start with 0000")
    if type_code not in _IDX_DTYPES:
        raise _corrupt(path, f"its element type code 0x{type_code:02x} is unknown")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise _corrupt(path, f"its header for {ndim} dimensions is cut short")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = header_size + math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise _corrupt(
            path,
            f"its header promises {expected} bytes for shape {shape} but it has {len(raw)}",
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    # astype copies: the result is writable and no longer pins the decompressed buffer.
    return data.astype(dtype.newbyteorder("=")), tuple(digests)


def _corrupt(path: Path, reason: str) -> DatasetFileError:
    return DatasetFileError(
        f"{path} is not a valid IDX file: {reason}. It is probably truncated or corrupt; "
        "delete it so that it is downloaded again (or reinstall the package that "
        "provided it)."
    )


def search_dirs(
    name: str | DatasetSpec, data_dir: str | os.PathLike[str] | None = None
) -> list[Path]:
    """The directories `load` searches, in order, without duplicates.

    Environment variables and the home directory are read at call time.

    Args:
      name: a data set name (see `DATASETS`) or spec.
      data_dir: an explicit directory holding the data set's files, searched first.

    Returns:
      Candidate directories; they need not exist. `$JOPT_DATA_DIR` itself is among
      them, but `load` uses the files there only if their SHA-256s identify them as
      this data set's.

    Raises:
      ValueError: `name` is not a known data set.
    """
    spec = _spec(name)
    dirs: list[Path] = []
    if data_dir is not None:
        dirs.append(Path(data_dir).expanduser())
    env = os.environ.get(_ENV_VAR)
    if env:
        root = Path(env).expanduser()
        dirs += [root / spec.dirname, root]
    dirs.append(_cache_root() / spec.dirname)
    dirs += [Path(root) / spec.dirname for root in SYSTEM_DATA_DIRS]
    return list(dict.fromkeys(dirs))


def download_dir(name: str | DatasetSpec, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `load` puts downloaded files: `data_dir`, `$JOPT_DATA_DIR/<dirname>`, or the cache.

    Args:
      name: a data set name (see `DATASETS`) or spec.
      data_dir: an explicit directory; if given, downloads go there.

    Returns:
      The directory (it may not exist yet). It is always one of `search_dirs`, so a
      second `load` finds what the first one downloaded.

    Raises:
      ValueError: `name` is not a known data set.
    """
    spec = _spec(name)
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get(_ENV_VAR)
    if env:
        return Path(env).expanduser() / spec.dirname
    return _cache_root() / spec.dirname


def load(
    name: str | DatasetSpec,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    timeout: float = 60.0,
) -> Dataset:
    """Loads a data set from disk, downloading it first if no search directory has it.

    Files found on disk are checked structurally (IDX header against file size, labels
    against images) and identified by hash: a file whose SHA-256 (of the file or of its
    decompressed content) is another known data set's file is an error, as MNIST and
    Fashion-MNIST share file names. Unrecognised hashes are accepted in `data_dir` and
    the `<dirname>` directories (Debian re-compresses its copy and users may have
    unpacked theirs), but not directly in `$JOPT_DATA_DIR`, which could hold any data
    set: files there are used only if their hashes are this data set's
    (`DatasetSpec.sha256` or `raw_sha256`). Downloaded files are verified against
    `DatasetSpec.sha256` before they are moved into place.

    Args:
      name: `"mnist"`, `"fashion_mnist"` (or `"fashion-mnist"`), or a `DatasetSpec`.
      data_dir: a directory holding the four files; searched first, and the download
        target if given.
      download: whether to download the files if they are not found.
      timeout: seconds before a stalled connection or read gives up.

    Returns:
      The data set, images `uint8` `[n, 28, 28]` and labels `int32` `[n]`.

    Raises:
      DatasetNotFoundError: the files are not on disk and could not be downloaded; the
        message lists every directory searched and every download error.
      DatasetFileError: (a `ValueError`) a file found is corrupt, or is another data
        set's file (the message names it, what it is, and the fix).
      ValueError: `name` is unknown.
    """
    spec = _spec(name)
    dirs = search_dirs(spec, data_dir)
    env = os.environ.get(_ENV_VAR)
    # Files directly in $JOPT_DATA_DIR could be any data set's: they must prove it.
    flat_root = Path(env).expanduser() if env else None
    if data_dir is not None and flat_root == Path(data_dir).expanduser():
        flat_root = None  # Named explicitly as this data set's directory.
    skipped: list[str] = []
    for directory in dirs:
        paths = _find_files(spec, directory)
        if paths is None:
            continue
        if directory == flat_root:
            arrays, unverified = _read_files(spec, paths, flat_root=flat_root)
            if unverified:
                note = (f"{directory}: skipped, as files directly in ${_ENV_VAR} are used only "
                        f"if their SHA-256s identify them as {spec.name}'s, and "
                        f"{'; '.join(f'{p.name} {what}' for p, what in unverified)}")
                _logger.warning("%s", note)
                skipped.append(note)
                continue
        else:
            arrays, _ = _read_files(spec, paths)
        _logger.debug("Loading %s from %s", spec.name, directory)
        return _make_dataset(spec, paths, arrays)

    errors: list[str] = []
    target = download_dir(spec, data_dir)
    if download:
        paths = _download_files(spec, target, timeout, errors)
        if paths is not None:
            return _make_dataset(spec, paths, _read_files(spec, paths)[0])
    raise DatasetNotFoundError(
        _not_found_message(spec, dirs, target, download, errors, skipped))


def subset(dataset: Dataset, *, train: int | None = None, test: int | None = None) -> Dataset:
    """The first `train` training and `test` test examples, for quick runs.

    Args:
      dataset: the full data set.
      train: number of training examples to keep; `None` keeps all.
      test: number of test examples to keep; `None` keeps all.

    Returns:
      A `Dataset` whose arrays are views into `dataset`'s.

    Raises:
      ValueError: a count is negative or larger than the split.
    """

    def take(n: int | None, total: int, split: str) -> slice:
        if n is None:
            return slice(None)
        if not 0 <= n <= total:
            raise ValueError(f"Asked for {n} {split} examples; choose 0 to {total}.")
        return slice(n)

    tr = take(train, len(dataset.train_images), "training")
    te = take(test, len(dataset.test_images), "test")
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[tr],
        train_labels=dataset.train_labels[tr],
        test_images=dataset.test_images[te],
        test_labels=dataset.test_labels[te],
    )


def _spec(name: str | DatasetSpec) -> DatasetSpec:
    if isinstance(name, DatasetSpec):
        return name
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown data set {name!r}; choose one of {sorted(DATASETS)}.")
    return DATASETS[key]


def _cache_root() -> Path:
    # Path.home() reads $HOME at call time, which is what lets tests redirect it.
    return Path.home() / ".cache" / "jopt"


def _local_copy(directory: Path, gz_name: str) -> Path | None:
    # Prefer the raw file when both exist: same content, no decompression.
    for candidate in (directory / gz_name.removesuffix(".gz"), directory / gz_name):
        if candidate.is_file():
            return candidate
    return None


def _find_files(spec: DatasetSpec, directory: Path) -> list[Path] | None:
    paths = []
    for filename in spec.files:
        path = _local_copy(directory, filename)
        if path is None:
            return None
        paths.append(path)
    return paths


def _read_files(
    spec: DatasetSpec, paths: Sequence[Path], *, flat_root: Path | None = None
) -> tuple[list[np.ndarray], list[Path]]:
    """The arrays of `spec`'s files at `paths`, and ``(path, why)`` for those not
    verified as `spec`'s by their hashes.

    Raises DatasetFileError for a corrupt file, or one that is another known file -
    except under `flat_root` (files directly in $JOPT_DATA_DIR, which may hold any
    data set): there another data set's file is only unverified, so that the
    directory is skipped and the search goes on.
    """
    arrays, unverified = [], []
    for path, filename in zip(paths, spec.files, strict=True):
        array, digests = _read_idx(path)
        if _digests_of(spec, filename) & set(digests):
            pass  # Verified: it is this data set's file.
        elif (known := _identify(digests)) is not None:
            if flat_root is None:
                raise DatasetFileError(_mismatch_message(spec, filename, path, *known))
            unverified.append((path, f"is {known[0].name}'s {known[1]}"))
        else:
            unverified.append((path, "matches no known hash"))
        arrays.append(array)
    return arrays, unverified


def _digests_of(spec: DatasetSpec, filename: str) -> set[str]:
    """The known SHA-256s of `spec`'s file `filename`: of the `.gz` and of its content."""
    return {d.lower() for d in (spec.sha256.get(filename), spec.raw_sha256.get(filename)) if d}


def _identify(digests: Sequence[str]) -> tuple[DatasetSpec, str] | None:
    """The known data set and file name with one of these SHA-256s, if any."""
    for spec in DATASETS.values():
        for filename in spec.files:
            if _digests_of(spec, filename) & set(digests):
                return spec, filename
    return None


def _mismatch_message(
    spec: DatasetSpec, filename: str, path: Path, other: DatasetSpec, other_file: str,
) -> str:
    what = f"{other.name}'s {other_file}"
    if other.name == spec.name:
        return (f"{path} is {what} (identified by its SHA-256), not its {filename}: the "
                f"files are mixed up. Give each file its own name in {path.parent}.")
    message = (f"{path} is {what} (identified by its SHA-256), not {spec.name}'s "
               f"{filename}: the two data sets use the same file names. ")
    return message + (
        f"{path.parent} is searched for {spec.name}: move {other.name}'s files out of it "
        f"(to a directory named {other.dirname}/) and put {spec.name}'s there, or delete "
        f"them so that {spec.name} is downloaded again.")


def _make_dataset(
    spec: DatasetSpec, paths: Sequence[Path], arrays: Sequence[np.ndarray]
) -> Dataset:
    train_images, train_labels, test_images, test_labels = arrays
    _check_split(paths[0], paths[1], train_images, train_labels, spec.num_classes)
    _check_split(paths[2], paths[3], test_images, test_labels, spec.num_classes)
    return Dataset(
        train_images=train_images,
        train_labels=train_labels.astype(np.int32),
        test_images=test_images,
        test_labels=test_labels.astype(np.int32),
        name=spec.name,
        num_classes=spec.num_classes,
    )


def _check_split(
    images_path: Path, labels_path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int
) -> None:
    # A well-formed IDX file can still be the wrong file (say, labels in place of
    # images); catch that here rather than as a shape error deep in training.
    fix = "Check that the files are the data set's original IDX files."
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DatasetFileError(
            f"{images_path} holds {images.dtype} data of shape {images.shape}, not uint8 "
            f"images [n, height, width]. {fix}"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetFileError(
            f"{labels_path} holds {labels.dtype} data of shape {labels.shape}, not integer "
            f"labels [n]. {fix}"
        )
    if len(images) != len(labels):
        raise DatasetFileError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} "
            f"labels. {fix}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetFileError(f"{labels_path} has labels outside [0, {num_classes}). {fix}")


def _download_files(
    spec: DatasetSpec, target: Path, timeout: float, errors: list[str]
) -> list[Path] | None:
    """Fetches the files `target` lacks; appends to `errors` and returns None on failure."""
    paths = []
    for filename in spec.files:
        existing = _local_copy(target, filename)
        if existing is not None:  # Left by an earlier, partly failed load.
            paths.append(existing)
            continue
        dest = target / filename
        if _download_from_mirrors(spec, filename, dest, timeout, errors):
            paths.append(dest)
        else:
            return None
    return paths


def _download_from_mirrors(
    spec: DatasetSpec, filename: str, dest: Path, timeout: float, errors: list[str]
) -> bool:
    expected = spec.sha256.get(filename)
    if expected is None:
        # Never store unverified bytes: a spec without a checksum cannot download.
        errors.append(f"{filename}: no SHA-256 is known for it, so it is not downloaded")
        return False
    for mirror in spec.mirrors:
        url = mirror.rstrip("/") + "/" + filename
        # URLError, HTTPError and timeouts are OSErrors; a bad URL or checksum is a
        # ValueError; a broken chunked response is an HTTPException.
        try:
            _download(url, dest, expected.lower(), timeout)
        except (OSError, ValueError, http.client.HTTPException) as e:
            errors.append(f"{url}: {e}")
            _logger.warning("Download of %s failed: %s", url, e)
        else:
            return True
    return False


def _download(url: str, dest: Path, sha256: str, timeout: float) -> None:
    """Downloads `url` to `dest` atomically; `dest` appears only if the SHA-256 matches."""
    _logger.info("Downloading %s", url)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # A unique temporary name in the same directory: concurrent loads don't collide and
    # os.replace is atomic, so a reader never sees a partial file under `dest`'s name.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        request = urllib.request.Request(url, headers={"User-Agent": "jopt-data"})
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(request, timeout=timeout)
            except urllib.error.HTTPError as e:
                e.close()  # HTTPError holds the response; close it or the socket leaks.
                raise
            with response:
                while chunk := response.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != sha256:
            raise ValueError(f"SHA-256 mismatch: expected {sha256}, got {actual}")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _not_found_message(
    spec: DatasetSpec, dirs: Sequence[Path], target: Path, download: bool,
    errors: Sequence[str], skipped: Sequence[str] = (),
) -> str:
    files = ", ".join(spec.files)
    lines = [
        f"Could not find data set {spec.name!r}: no directory holds all of {files} "
        "(gzip-compressed or not).",
        "Searched:",
        *(f"  {d}" for d in dirs),
        *(f"  ({note})" for note in skipped),
    ]
    if not download:
        lines.append("Download was not attempted (download=False).")
    elif errors:
        lines += [f"Download into {target} failed:", *(f"  {e}" for e in errors)]
    lines += [
        "To fix it, do one of:",
        f"  - put the files in one of the directories above, e.g. in ${_ENV_VAR}/{spec.dirname}/ "
        f"(files directly in ${_ENV_VAR} are used only if their SHA-256s identify them as "
        f"{spec.name}'s), or pass data_dir=;",
    ]
    if spec.system_package:
        lines.append(f"  - install them system-wide: apt-get install {spec.system_package};")
    if download:
        lines.append("  - check the network connection (or proxy settings) and try again.")
    else:
        lines.append("  - allow a download: load(..., download=True).")
    return "\n".join(lines)
