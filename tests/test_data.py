"""support.py's data path through DCGAN's dataset.py: LSUN, the decode cache, --data-on, and the data faults a user
can fix (bad images, read-only folders, corrupt MNIST, a full disk): a one-line error or a warning, nothing left."""
import gzip
import io
import json
import os
import re
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (QUICK, assert_same_networks, exits_2, failing_writes, load_checkpoint, load_folder, quick_run,
                      run_main, tiny_mnist, write_idx)

dcgan = load_folder("DCGAN")
support, data = dcgan.support, dcgan.dataset


def make_images(folder, count, seed=1):
    """COUNT small PNGs of different sizes and random content in FOLDER, as --dataset folder reads them."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (40 + i % 7, 48 + i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def expected(files, size):
    """What the decoder should make of FILES: each opened by PIL and prepared as dataset.py prepares it."""
    return torch.stack([data.prepare(size)(Image.open(file)) for file in files])


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".decoded-"))


@pytest.fixture
def small_mnist(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    tiny_mnist(raw, n_train=60, n_test=20)
    return tmp_path / "data", raw


# --- LSUN -------------------------------------------------------------------------------------------------------

def make_lsun(root, category="bedroom_train", count=36):
    """A tiny LSUN set as its download script leaves it: ROOT/lsun/CATEGORY_lmdb, keys of 40 hex digits,
    values JPEG bytes (quality 75) of images whose smaller side is 256 pixels. Returns the JPEGs in key order."""
    rng = np.random.default_rng(2)
    path = root / "lsun" / f"{category}_lmdb"
    path.mkdir(parents=True)
    images = {}
    for i in range(count):
        width = 256 + int(rng.integers(0, 100))
        pixels = rng.integers(0, 256, (256, width, 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG", quality=75)
        images[rng.bytes(20).hex().encode()] = encoded.getvalue()
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for key, value in images.items():
            txn.put(key, value)
    return [io.BytesIO(images[key]) for key in sorted(images)]


def test_lsun_is_read_through_torchvision_and_trains_leaving_no_key_list(tmp_path, monkeypatch, capsys):
    jpegs = make_lsun(tmp_path / "data")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # torchvision's LSUN writes its key list into the working folder
    images = data.load_images("lsun", tmp_path / "data", 32, lsun_classes=("bedroom_train",))
    assert images.shape == (36, 3, 32, 32)
    assert torch.equal(images, expected(jpegs, 32))
    assert list(workdir.iterdir()) == []
    assert len(cache_files(tmp_path / "data" / "lsun")) == 2  # the images and their description
    assert torch.equal(data.load_images("lsun", tmp_path / "data", 32), images)  # bedroom_train is the default
    capsys.readouterr()
    quick_run("DCGAN", tmp_path / "data", tmp_path / "run", "--dataset", "lsun", "--max-steps", 2)
    assert "DCGAN on lsun (36 images" in capsys.readouterr().out and list(workdir.iterdir()) == []


def test_lsun_faults_are_one_line_errors(tmp_path):
    make_lsun(tmp_path / "data")
    with pytest.raises(data.DataError, match="kitchen_train_lmdb.*download.py"):
        data.load_images("lsun", tmp_path / "data", 32, lsun_classes=("kitchen_train",))
    with pytest.raises(data.DataError, match="--lsun-classes: 'bedrooms' is not an LSUN scene set"):
        data.load_images("lsun", tmp_path / "data", 32, lsun_classes=("bedrooms",))
    database = tmp_path / "data" / "lsun" / "bedroom_train_lmdb" / "data.mdb"
    database.write_bytes(np.random.default_rng(0).bytes(database.stat().st_size))
    with pytest.raises(data.DataError, match="bedroom_train_lmdb is not a readable LMDB database"):
        data.load_images("lsun", tmp_path / "data", 32)
    assert cache_files(tmp_path / "data" / "lsun") == []


# --- where the decoded set is kept ------------------------------------------------------------------------------

def draws(batches, count):
    return [next(batches) for _ in range(count)]


@pytest.mark.parametrize("source", ["memory", "cache file"])
def test_every_place_gives_the_same_batches_and_resumes_exactly(source, tmp_path):
    if source == "memory":
        images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8)
    else:
        images = data.load_images("folder", make_images(tmp_path / "images", 23), 8)
        assert images.mapped_from.name.endswith(".u8")
    reference = draws(data.batches(images, 5, "cpu", 3, "device"), 12)  # 4 per epoch: 3 epochs
    assert not torch.equal(reference[0], reference[4])  # a new order each epoch
    epoch = torch.cat(reference[:4])  # 4 batches of 5 distinct images; the last 3 are dropped
    assert len({image.numpy().tobytes() for image in epoch}) == 20 and epoch.min() >= -1 and epoch.max() <= 1
    for place in ("device", "host", "disk", "auto"):
        batches = data.batches(images, 5, "cpu", 3, place)
        assert place in batches.placement or place == "auto"
        first = draws(batches, 6)
        state = batches.state_dict()
        rest = draws(batches, 6)
        assert all(torch.equal(a, b) for a, b in zip(first + rest, reference)), place
        for other in ("device", "disk"):  # a run may resume in another place
            resumed = data.batches(images, 5, "cpu", 3, other)
            draws(resumed, 2)  # a batch in flight when the state is loaded is dropped
            resumed.load_state_dict(state)
            assert all(torch.equal(a, b) for a, b in zip(draws(resumed, 6), rest)), (place, other)
    with pytest.raises(data.DataError, match="--batch-size 24 must be between 1 and the data set's 23 images"):
        data.batches(images, 24, "cpu", 3)


def test_auto_keeps_a_set_that_does_not_fit_in_memory_on_disk(tmp_path, monkeypatch):
    images = data.load_images("folder", make_images(tmp_path / "images", 12), 8)
    monkeypatch.setattr(support, "host_memory_available", lambda: images.numel())  # the set would take all of it
    batches = data.batches(images, 4, "cpu", 0, "auto")
    assert batches.place == "disk" and str(images.mapped_from) in batches.placement
    assert batches.images is images  # still mapped, not read into memory
    monkeypatch.setattr(support, "host_memory_available", lambda: 10 * images.numel())
    batches = data.batches(images, 4, "cpu", 0, "auto")
    assert batches.place == "device" and "fits" in batches.placement
    assert getattr(batches.images, "mapped_from", None) is None  # read into memory


def test_training_on_disk_equals_training_on_the_device(small_mnist, tmp_path, capsys):
    capsys.readouterr()
    quick_run("DCGAN", small_mnist[0], tmp_path / "device", "--batch-size", 4, "--max-steps", 3, "--data-on", "device")
    assert "data on cpu (--data-on device)" in capsys.readouterr().out
    quick_run("DCGAN", small_mnist[0], tmp_path / "disk", "--batch-size", 4, "--max-steps", 2, "--data-on", "disk")
    assert "data mapped from a temporary file, copied to cpu a batch ahead (--data-on disk)" in capsys.readouterr().out
    assert run_main(dcgan.train, "--resume", tmp_path / "disk", "--data-on", "host", "--max-steps", 3) == 0
    assert_same_networks(load_checkpoint(tmp_path / "device"), load_checkpoint(tmp_path / "disk"))


# --- the decode cache -------------------------------------------------------------------------------------------

def test_the_first_run_of_a_seed_equals_every_later_run(tmp_path):
    """The first run decodes, the second finds the cache: decoding draws nothing from the training's streams."""
    folder = make_images(tmp_path / "images", 40)
    flags = ["--dataset", "folder", "--seed", 0, "--max-steps", 3]
    quick_run("DCGAN", folder, tmp_path / "decoded", *flags)
    caches = list(folder.glob(".decoded-32px-*.u8"))
    assert len(caches) == 1 and caches[0].stat().st_size == 40 * 3 * 32 * 32
    written = caches[0].stat().st_mtime_ns
    quick_run("DCGAN", folder, tmp_path / "cached", *flags)
    assert caches[0].stat().st_mtime_ns == written  # decoded once
    assert_same_networks(load_checkpoint(tmp_path / "decoded"), load_checkpoint(tmp_path / "cached"))


@pytest.fixture
def small_chunks(monkeypatch):
    """Decode 4 images at a time, in this process, recording progress after every chunk."""
    monkeypatch.setattr(support, "DECODE_CHUNK", 4)
    monkeypatch.setattr(support, "DECODE_WORKERS", 0)
    monkeypatch.setattr(support, "SAVE_EVERY", 1)


def test_an_interrupted_decode_resumes_and_is_never_read_half_done(tmp_path, monkeypatch, small_chunks, capsys):
    folder = make_images(tmp_path / "images", 40)
    truth = data.load_images("folder", folder, 16, cache_dir=tmp_path / "fresh")
    cache = tmp_path / "cache"
    failing_writes(monkeypatch, support, ".partial", 3, KeyboardInterrupt())
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line, and exit code 130
        data.load_images("folder", folder, 16, cache_dir=cache)
    assert stopped.value.code == 130
    assert "stopped by Ctrl-C after 8 of 40 images; the next start continues" in capsys.readouterr().err
    names = cache_files(cache)
    assert not any(name.endswith((".u8", ".json")) and "progress" not in name for name in names), names
    progress = json.loads(next(cache.glob("*.progress.json")).read_text())
    assert progress["done"] == 8  # two chunks were written, and recorded, before the interruption
    written = failing_writes(monkeypatch, support, ".partial")
    assert torch.equal(data.load_images("folder", folder, 16, cache_dir=cache), truth)
    assert sum(written) == 32 * 3 * 16 * 16  # it went on from image 8
    assert not list(cache.glob("*.partial")) and not list(cache.glob("*.progress.json"))


def test_a_partial_truncated_or_stale_cache_is_decoded_again(tmp_path, small_chunks):
    folder = make_images(tmp_path / "images", 12)
    truth = data.load_images("folder", folder, 16).clone()  # in memory: the file it maps is cut short below
    stem = next(folder.glob(".decoded-*.u8")).with_suffix("")
    os.truncate(f"{stem}.u8", 5 * 3 * 16 * 16)  # a cache cut short
    assert torch.equal(data.load_images("folder", folder, 16), truth)
    Path(f"{stem}.json").unlink()  # a cache without its description is not whole
    Path(f"{stem}.partial").write_bytes(b"\0" * 100)  # and a partial one without progress is not resumed
    assert torch.equal(data.load_images("folder", folder, 16), truth)
    assert cache_files(folder) == [stem.name + ".json", stem.name + ".u8"]
    make_images(folder, 13)  # one more image: the files changed, so the cache is decoded anew
    assert len(data.load_images("folder", folder, 16)) == 13
    assert len(cache_files(folder)) == 2 and not (folder / (stem.name + ".u8")).exists()


def test_a_full_disk_while_caching_is_a_one_line_error_that_leaves_nothing(tmp_path, monkeypatch, small_chunks):
    folder = make_images(tmp_path / "images", 12)
    cache = tmp_path / "cache"
    failing_writes(monkeypatch, support, ".partial", 2)
    with pytest.raises(data.DataError) as error:
        data.load_images("folder", folder, 16, cache_dir=cache)
    message = str(error.value)
    assert "the disk is full" in message and str(cache) in message and ".partial" in message and "\n" not in message
    assert cache_files(cache) == [] and cache_files(folder) == []  # no half-written file, no progress record


# --- image files that do not decode, read-only folders ----------------------------------------------------------

def bad_folder(tmp_path):
    folder = make_images(tmp_path / "images", 12)
    good = (folder / "000.png").read_bytes()
    (folder / "cut.png").write_bytes(good[:len(good) // 2])  # a truncated PNG
    (folder / "notes.png").write_text("not an image at all\n")  # a text file named .png
    return folder


def test_unreadable_images_are_named_and_left_out(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    for attempt in ("decoded", "cached"):  # the cache remembers what it left out
        images = data.load_images("folder", folder, 16)
        assert torch.equal(images, expected(sorted(folder.glob("0*.png")), 16))
        warning = capsys.readouterr().err
        assert "left out 2 of 14 image files" in warning and "cut.png" in warning and "notes.png" in warning
        assert "Traceback" not in warning


def test_unreadable_images_end_to_end(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    before = sorted(folder.iterdir())
    common = ["--dataset", "folder", "--data-root", folder, "--cache-dir", tmp_path / "cache", "--max-steps", 1]
    assert run_main(dcgan.train, *QUICK["DCGAN"], *common, "--data-on", "disk", "--out", tmp_path / "lenient") == 0
    out, err = capsys.readouterr()
    assert "left out 2 of 14" in err and "notes.png" in err and f"data mapped from {tmp_path / 'cache'}" in out
    assert len(cache_files(tmp_path / "cache")) == 2
    assert sorted(folder.iterdir()) == before  # --cache-dir: nothing written beside the images


def test_a_read_only_image_folder_is_cached_elsewhere(tmp_path, monkeypatch, capsys):
    folder = make_images(tmp_path / "images", 12)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    real_unwritable = support.unwritable
    # A read-only folder; as root, permission bits do not stop writes, so the check is told as well.
    monkeypatch.setattr(support, "unwritable", lambda path: f"{folder} is not writable" if path == folder
                        else real_unwritable(path))
    before = sorted(folder.iterdir())
    folder.chmod(0o555)
    try:
        images = data.load_images("folder", folder, 16)
    finally:
        folder.chmod(0o755)
    assert images.shape == (12, 3, 16, 16)
    assert sorted(folder.iterdir()) == before
    fallback = tmp_path / "user-cache" / "gan-papers"
    assert len(cache_files(fallback)) == 2
    assert f"{folder} is not writable" in capsys.readouterr().err and str(fallback) in str(images.mapped_from)


# --- MNIST files ------------------------------------------------------------------------------------------------

def test_damaged_mnist_files_are_named(small_mnist, tmp_path, capsys):
    root, raw = small_mnist
    images, labels = support.read_mnist("mnist", root)
    assert images.shape == (60, 28, 28) and torch.equal(labels, torch.arange(60) % 10)

    write_idx(raw / "train-labels-idx1-ubyte", np.arange(50) % 10)
    with pytest.raises(data.DataError, match="holds 60 images but .*train-labels-idx1-ubyte holds 50 labels"):
        support.read_mnist("mnist", root)
    image_file = raw / "train-images-idx3-ubyte"
    for damaged in (image_file.read_bytes()[:-100], b""):
        image_file.write_bytes(damaged)
        with pytest.raises(data.DataError, match="train-images-idx3-ubyte is not an MNIST image file in IDX format"):
            support.read_mnist("mnist", root)
    write_idx(image_file, np.zeros((60, 20, 20)))
    err = exits_2(capsys, dcgan.train, *QUICK["DCGAN"], "--data-root", root, "--out", tmp_path / "run")
    assert "train-images-idx3-ubyte holds 20x20 images" in err and "Error downloading" not in err
    image_file.unlink()
    (raw / "train-images-idx3-ubyte.gz").write_text("<html>not found</html>")
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz cannot be read") as error:
        support.read_mnist("mnist", root)
    assert "download" not in str(error.value).lower()


def test_archives_with_other_checksums_are_read_where_they_are(small_mnist):
    root, raw = small_mnist
    truth = support.read_mnist("mnist", root)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # packed again: other bytes, same data
        (raw / f"{stem}.gz").write_bytes(gzip.compress((raw / stem).read_bytes(), compresslevel=1))
        (raw / stem).unlink()
    before = sorted(raw.iterdir())
    assert all(torch.equal(a, b) for a, b in zip(support.read_mnist("mnist", root), truth))
    assert sorted(raw.iterdir()) == before  # unpacked into a scratch folder, not beside the archive


# --- nothing left behind by a failed start ----------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10", "celeba", "folder", "lsun"])
def test_a_mistyped_data_root_is_not_created(dataset, tmp_path, offline):
    root = tmp_path / "typo" / "data"
    with pytest.raises(data.DataError, match=re.escape(str(root))):
        data.load_images(dataset, root, 32)
    assert not (tmp_path / "typo").exists()


def test_a_failed_load_leaves_no_folders_in_the_data_root(tmp_path, offline, capsys):
    root = tmp_path / "data"
    root.mkdir()
    for dataset in ("mnist", "fashion-mnist", "cifar10", "celeba"):
        with pytest.raises(data.DataError, match=dataset):
            data.load_images(dataset, root, 32)
    assert list(root.iterdir()) == []
    err = exits_2(capsys, dcgan.train, *QUICK["DCGAN"], "--data-root", tmp_path / "typo", "--out", tmp_path / "run")
    assert "train-images-idx3-ubyte" in err and "--data-root" in err and str(tmp_path / "typo") in err
    assert sorted(tmp_path.iterdir()) == [root]
