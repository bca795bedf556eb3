"""IDX files and the MNIST folder: a round trip, and a DataError for every kind of bad file."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from gpumlp.errors import DataError
from gpumlp.idx import MAX_BYTES, encode_idx, gunzip, parse_idx, read_idx
from gpumlp.mnist import FILES, load_mnist

IMAGES = np.arange(3 * 28 * 28, dtype=np.uint32).reshape(3, 28, 28).astype(np.uint8)
LABELS = np.array([7, 0, 9], dtype=np.uint8)


def data_error(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value)


def test_encode_then_parse_round_trips():
    for array in (IMAGES, LABELS, np.zeros((0,), np.uint8)):
        raw = encode_idx(array)
        assert raw[:4] == bytes([0, 0, 8, array.ndim])
        back = parse_idx(raw)
        assert back.dtype == np.uint8 and back.shape == array.shape
        np.testing.assert_array_equal(back, array)


def test_header_is_big_endian_counts():
    raw = encode_idx(IMAGES)
    assert struct.unpack(">I3I", raw[:16]) == (0x803, 3, 28, 28) and len(raw) == 16 + 3 * 784


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_raw_or_gzip(tmp_path, gz):
    raw = encode_idx(IMAGES)
    path = tmp_path / ("images.gz" if gz else "images")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    np.testing.assert_array_equal(read_idx(path), IMAGES)


@pytest.mark.parametrize("magic", [b"\x00\x00\x08\x04", b"\x00\x00\x0d\x03", b"\x01\x00\x08\x01",
                                   b"\x00\x00\x08\x00", b"PK\x03\x04"])
def test_bad_magic_number(magic):
    raw = magic + encode_idx(LABELS)[4:]
    assert "bad magic number" in data_error(parse_idx, raw, "f")


def test_too_short_for_a_header():
    assert "too short" in data_error(parse_idx, b"\x00\x00", "f")
    assert "header cut short" in data_error(parse_idx, encode_idx(IMAGES)[:10], "f")


def test_images_must_be_28_by_28():
    raw = encode_idx(np.zeros((2, 27, 28), np.uint8))
    assert "27x28, expected 28x28" in data_error(parse_idx, raw, "f")


def test_short_body():
    message = data_error(parse_idx, encode_idx(IMAGES)[:-1], "train-images")
    assert message.startswith("train-images: body is short") and "truncated" in message


def test_long_body():
    assert "body is too long" in data_error(parse_idx, encode_idx(LABELS) + b"\x00", "f")


def test_broken_gzip(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(encode_idx(LABELS))[:-12])  # cut inside the stream
    message = data_error(read_idx, path)
    assert "broken gzip" in message and str(path) in message


def test_gzip_holding_a_short_idx_body(tmp_path):
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(encode_idx(IMAGES)[:-100]))
    assert "body is short" in data_error(read_idx, path)


def test_gunzip_stops_at_its_limit_and_keeps_multi_member_files():
    raw = encode_idx(IMAGES)
    two_members = gzip.compress(raw[:1000]) + gzip.compress(raw[1000:])
    assert gunzip(two_members, "f", limit=len(raw)) == raw
    message = data_error(gunzip, two_members, "f", len(raw) - 1)
    assert message == f"f: expands to more than {len(raw) - 1:,} bytes, more than any MNIST file"


def test_a_file_larger_than_any_mnist_file_is_not_read(tmp_path):
    path = tmp_path / "huge"
    with open(path, "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: no disk used
    message = data_error(read_idx, path)
    assert message == f"{path}: {MAX_BYTES + 1:,} bytes, more than any MNIST file"


def test_unreadable_path(tmp_path):
    assert "cannot read" in data_error(read_idx, tmp_path / "missing")


# --- the MNIST folder -------------------------------------------------------------------------

def write_folder(folder, n_train=4, n_test=2, train_labels=None, gz_labels=False):
    """The four files; images as .gz and labels raw, or the other way round with gz_labels."""
    rng = np.random.default_rng(0)
    arrays = {
        FILES["train"][0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        FILES["train"][1]: train_labels if train_labels is not None else np.arange(n_train, dtype=np.uint8),
        FILES["test"][0]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        FILES["test"][1]: np.arange(n_test, dtype=np.uint8),
    }
    folder.mkdir(exist_ok=True)
    for i, (stem, array) in enumerate(arrays.items()):  # raw and .gz mixed in one folder
        if bool(i % 2) != gz_labels:
            name, raw = stem, encode_idx(array)
        else:
            name, raw = f"{stem}.gz", gzip.compress(encode_idx(array))
        (folder / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz_labels", [False, True], ids=["gz images", "gz labels"])
def test_load_mnist_reads_raw_and_gz_and_flattens(tmp_path, gz_labels):
    arrays = write_folder(tmp_path / "m", train_labels=np.array([3, 1, 4, 1], np.uint8),
                          gz_labels=gz_labels)      # not 0..n-1, as the test labels are
    assert {p.suffix == ".gz" for p in (tmp_path / "m").iterdir()} == {True, False}
    mnist = load_mnist(tmp_path / "m")
    assert mnist.train.images.shape == (4, 784) and mnist.test.images.shape == (2, 784)
    np.testing.assert_array_equal(mnist.train.images, arrays[FILES["train"][0]].reshape(4, 784))
    np.testing.assert_array_equal(mnist.test.labels, [0, 1])
    for split in ("train", "test"):                  # every file as written, row-major
        images, labels = getattr(mnist, split)
        n = len(arrays[FILES[split][1]])
        np.testing.assert_array_equal(images, arrays[FILES[split][0]].reshape(n, 784))
        np.testing.assert_array_equal(labels, arrays[FILES[split][1]])
        assert images.dtype == labels.dtype == np.uint8


def test_load_mnist_missing_file_and_folder(tmp_path):
    write_folder(tmp_path / "m")
    (tmp_path / "m" / FILES["test"][1]).unlink()
    assert f"missing {FILES['test'][1]}" in data_error(load_mnist, tmp_path / "m")
    assert "no such data folder" in data_error(load_mnist, tmp_path / "elsewhere")


def test_load_mnist_rejects_labels_above_9_and_count_mismatch(tmp_path):
    write_folder(tmp_path / "a", train_labels=np.array([1, 2, 10, 3], np.uint8))
    assert "expected digits 0..9" in data_error(load_mnist, tmp_path / "a")
    write_folder(tmp_path / "b", train_labels=np.array([1, 2, 3], np.uint8))
    assert "4 train images but 3 labels" in data_error(load_mnist, tmp_path / "b")


def test_real_mnist_files_have_the_canonical_shapes(mnist_dir):
    labels = read_idx(next(mnist_dir.glob(FILES["test"][1] + "*")))
    assert labels.shape == (10000,) and set(np.unique(labels)) == set(range(10))
