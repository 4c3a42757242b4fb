"""The data path: LSUN through torchvision's reader, the decode cache, where the decoded set is
kept (--data-on), and the data faults a user can fix (bad image files, read-only folders,
corrupt MNIST files, a full disk), each a one-line error or a warning, leaving nothing behind."""
import errno
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

from conftest import ROOT, assert_clean_error, load_checkpoint, load_folder, run_train, tiny_mnist, write_idx

dcgan = load_folder("DCGAN")
data = dcgan.dataset
CONV_FOLDERS = ("DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
ALL_FOLDERS = ("simpleGAN", "CGAN", *CONV_FOLDERS)
QUICK = ["--image-size", 32, "--width", 8, "--device", "cpu", "--batch-size", 4]


def copied_blocks(folder):
    """Each `# >>> copied: NAME >>>` block of FOLDER/dataset.py, without its `# per-folder` lines."""
    text = (ROOT / folder / "dataset.py").read_text()
    return {name: [line for line in body.splitlines() if not line.rstrip().endswith("# per-folder")]
            for name, body in re.findall(r"# >>> copied: (\S+) >>>\n(.*?)# <<< copied: \1 <<<", text, re.S)}


def make_images(folder, count, seed=1):
    """COUNT small PNGs of different sizes and random content in FOLDER."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (40 + i % 7, 48 + i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def expected(files, size):
    """What the decoder should make of FILES: each opened by PIL, centre-cropped and resized."""
    return torch.stack([data.square(size)(Image.open(file).convert("RGB")) for file in files])


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".decoded-"))


@pytest.fixture
def small_mnist(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
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


def test_lsun_is_read_through_torchvision_and_leaves_no_key_list(tmp_path, monkeypatch):
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


def test_lsun_trains_end_to_end(tmp_path):
    make_lsun(tmp_path / "data")
    result = run_train("DCGAN", "--dataset", "lsun", "--data-root", tmp_path / "data", "--max-steps", 2,
                       "--out", tmp_path / "run", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DCGAN on lsun (36 images" in result.stdout
    assert not list((ROOT / "DCGAN").glob("_cache_*"))


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
    reference = draws(data.Batches(images, 5, "cpu", seed=3, data_on="device"), 12)  # 4 per epoch: 3 epochs
    assert not torch.equal(reference[0], reference[4])  # a new order each epoch
    for place in ("device", "host", "disk", "auto"):
        batches = data.Batches(images, 5, "cpu", seed=3, data_on=place)
        assert place in batches.placement or place == "auto"
        first = draws(batches, 6)
        state = batches.state_dict()
        rest = draws(batches, 6)
        assert all(torch.equal(a, b) for a, b in zip(first + rest, reference)), place
        for other in ("device", "disk"):  # a run may resume in another place
            resumed = data.Batches(images, 5, "cpu", seed=3, data_on=other)
            draws(resumed, 2)  # a batch in flight when the state is loaded is dropped
            resumed.load_state_dict(state)
            assert all(torch.equal(a, b) for a, b in zip(draws(resumed, 6), rest)), (place, other)


def test_auto_keeps_a_set_that_does_not_fit_in_memory_on_disk(tmp_path, monkeypatch):
    images = data.load_images("folder", make_images(tmp_path / "images", 12), 8)
    monkeypatch.setattr(data, "host_memory_available", lambda: images.numel())  # the set would take all of it
    batches = data.Batches(images, 4, "cpu", seed=0, data_on="auto")
    assert batches.place == "disk" and str(images.mapped_from) in batches.placement
    assert batches.images is images  # still mapped, not read into memory
    monkeypatch.setattr(data, "host_memory_available", lambda: 10 * images.numel())
    batches = data.Batches(images, 4, "cpu", seed=0, data_on="auto")
    assert batches.place == "device" and "fits" in batches.placement
    assert getattr(batches.images, "mapped_from", None) is None  # read into memory


def test_training_on_disk_equals_training_on_the_device(small_mnist, tmp_path):
    common = ["--dataset", "mnist", "--data-root", small_mnist[0], "--max-steps", 3, *QUICK]
    device = run_train("DCGAN", *common, "--data-on", "device", "--out", tmp_path / "device")
    disk = run_train("DCGAN", *common, "--data-on", "disk", "--max-steps", 2, "--out", tmp_path / "disk")
    assert device.returncode == 0 and disk.returncode == 0, (device.stderr[-2000:], disk.stderr[-2000:])
    assert "data on cpu (--data-on device)" in device.stdout
    assert "data mapped from a temporary file, copied to cpu a batch ahead (--data-on disk)" in disk.stdout
    resumed = run_train("DCGAN", "--resume", tmp_path / "disk", "--data-on", "host", "--max-steps", 3)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for net in ("G", "D"):
        for name, value in load_checkpoint(tmp_path / "device")[net].items():
            assert torch.equal(value, load_checkpoint(tmp_path / "disk")[net][name]), (net, name)


# --- the decode cache -------------------------------------------------------------------------------------------

@pytest.fixture
def small_chunks(monkeypatch):
    """Decode 4 images at a time, in this process, recording progress after every chunk."""
    monkeypatch.setattr(data, "DECODE_CHUNK", 4)
    monkeypatch.setattr(data, "DECODE_WORKERS", 0)
    monkeypatch.setattr(data, "SAVE_EVERY", 1)


def writer_that_fails(monkeypatch, on_call, error):
    real, calls = data.write_rows, []

    def write_rows(file, images):
        calls.append(len(images))
        if len(calls) == on_call:
            raise error
        real(file, images)
    monkeypatch.setattr(data, "write_rows", write_rows)
    return calls


def test_an_interrupted_decode_resumes_and_is_never_read_half_done(tmp_path, monkeypatch, small_chunks):
    folder = make_images(tmp_path / "images", 40)
    truth = data.load_images("folder", folder, 16, cache_dir=tmp_path / "fresh")
    cache = tmp_path / "cache"
    writer_that_fails(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        data.load_images("folder", folder, 16, cache_dir=cache)
    names = cache_files(cache)
    assert not any(name.endswith((".u8", ".json")) and "progress" not in name for name in names), names
    progress = json.loads(next(cache.glob("*.progress.json")).read_text())
    assert progress["done"] == 8  # two chunks were written, and recorded, before the interruption
    rows = writer_that_fails(monkeypatch, 0, None)
    assert torch.equal(data.load_images("folder", folder, 16, cache_dir=cache), truth)
    assert sum(rows) == 32  # it went on from image 8
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
    cache = tmp_path / "cache" / "new"
    writer_that_fails(monkeypatch, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(data.DataError) as error:
        data.load_images("folder", folder, 16, cache_dir=cache)
    message = str(error.value)
    assert "No space left on device" in message and str(cache) in message and ".partial" in message
    assert "\n" not in message
    assert not cache.exists()  # neither the half-written file nor the folder made for it
    assert cache_files(folder) == []


# --- image files that do not decode, read-only folders ----------------------------------------------------------

def bad_folder(tmp_path):
    folder = make_images(tmp_path / "images", 12)
    good = (folder / "000.png").read_bytes()
    (folder / "cut.png").write_bytes(good[:len(good) // 2])  # a truncated PNG
    (folder / "notes.png").write_text("not an image at all\n")  # a text file named .png
    return folder


def test_unreadable_images_are_named_and_left_out_or_stop_with_strict(tmp_path, capsys):
    folder = bad_folder(tmp_path)
    with pytest.raises(data.DataError, match=r"cut\.png .*--strict-images"):
        data.load_images("folder", folder, 16, strict=True)
    images = data.load_images("folder", folder, 16)
    assert torch.equal(images, expected(sorted(folder.glob("0*.png")), 16))
    warning = capsys.readouterr().err
    assert "left out 2 of 14 image files" in warning and "cut.png" in warning and "notes.png" in warning
    assert "Traceback" not in warning
    with pytest.raises(data.DataError, match=r"2 image files do not decode .*cut\.png"):
        data.load_images("folder", folder, 16, strict=True)  # the cache remembers what it left out


def test_unreadable_images_end_to_end(tmp_path):
    folder = bad_folder(tmp_path)
    before = sorted(folder.iterdir())
    common = ["--dataset", "folder", "--data-root", folder, "--cache-dir", tmp_path / "cache", "--max-steps", 1, *QUICK]
    strict = run_train("DCGAN", *common, "--strict-images", "--out", tmp_path / "strict")
    assert_clean_error(strict, "cut.png", "--strict-images")
    assert len(strict.stderr.strip().splitlines()[-1]) < 400  # one line, not a worker's traceback
    lenient = run_train("DCGAN", *common, "--data-on", "disk", "--out", tmp_path / "lenient")
    assert lenient.returncode == 0, lenient.stderr[-2000:]
    assert "left out 2 of 14" in lenient.stderr and "notes.png" in lenient.stderr
    assert f"data mapped from {tmp_path / 'cache'}" in lenient.stdout
    assert len(cache_files(tmp_path / "cache")) == 2
    assert sorted(folder.iterdir()) == before  # --cache-dir: nothing written beside the images


def test_a_read_only_image_folder_is_cached_elsewhere(tmp_path, monkeypatch, capsys):
    folder = make_images(tmp_path / "images", 12)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    real_writable = data.writable
    # A read-only folder; as root, permission bits do not stop writes, so the check is told as well.
    monkeypatch.setattr(data, "writable", lambda path: path != folder and real_writable(path))
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

@pytest.mark.parametrize("folder", ["simpleGAN", "CGAN", "DCGAN"])
def test_damaged_mnist_files_are_named(folder, small_mnist):
    root, raw = small_mnist
    read = load_folder(folder).dataset.read_mnist
    DataError = load_folder(folder).dataset.DataError
    images, labels = read("mnist", root)
    assert images.shape == (60, 28, 28) and torch.equal(labels, torch.arange(60) % 10)

    write_idx(raw / "train-labels-idx1-ubyte", np.arange(50) % 10)
    with pytest.raises(DataError, match="holds 60 images but .*train-labels-idx1-ubyte holds 50 labels"):
        read("mnist", root)
    image_file = raw / "train-images-idx3-ubyte"
    image_file.write_bytes(image_file.read_bytes()[:-100])
    with pytest.raises(DataError, match="train-images-idx3-ubyte is not an MNIST image file in IDX format"):
        read("mnist", root)
    image_file.write_bytes(b"")
    with pytest.raises(DataError, match="train-images-idx3-ubyte is not an MNIST image file in IDX format"):
        read("mnist", root)
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte.gz").write_text("<html>not found</html>")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is not a readable gzip file") as error:
        read("mnist", root)
    assert "download" not in str(error.value).lower()


def test_archives_with_other_checksums_are_used_when_they_parse(small_mnist, monkeypatch):
    root, raw = small_mnist
    truth = data.read_mnist("mnist", root)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # packed again: other bytes, same data
        (raw / f"{stem}.gz").write_bytes(gzip.compress((raw / stem).read_bytes(), compresslevel=1))
        (raw / stem).unlink()
    with monkeypatch.context() as read_only:  # as in a read-only folder: read through a temporary copy
        read_only.setattr(data, "unpack_beside", lambda folder, name: None)
        assert all(torch.equal(a, b) for a, b in zip(data.read_mnist("mnist", root), truth))
        assert not (raw / "train-images-idx3-ubyte").exists()
    assert all(torch.equal(a, b) for a, b in zip(data.read_mnist("mnist", root), truth))
    assert (raw / "train-images-idx3-ubyte").is_file()  # unpacked beside the archive, as torchvision does


def test_corrupt_mnist_end_to_end(small_mnist, tmp_path):
    root, raw = small_mnist
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((60, 20, 20)))
    result = run_train("DCGAN", "--dataset", "mnist", "--data-root", root, "--max-steps", 1,
                       "--out", tmp_path / "run", *QUICK)
    assert_clean_error(result, "train-images-idx3-ubyte holds 20x20 images")
    assert "Error downloading" not in result.stderr


# --- nothing left behind by a failed start ----------------------------------------------------------------------

@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist", "cifar10", "celeba", "folder", "lsun"])
def test_a_mistyped_data_root_is_not_created(dataset, tmp_path):
    root = tmp_path / "typo" / "data"
    with pytest.raises(data.DataError, match=re.escape(str(root))):
        data.load_images(dataset, root, 32)
    assert not (tmp_path / "typo").exists()


def test_a_failed_load_leaves_no_folders_in_the_data_root(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for dataset in ("mnist", "fashion-mnist", "cifar10", "celeba"):
        with pytest.raises(data.DataError, match=dataset):
            data.load_images(dataset, root, 32)
    assert list(root.iterdir()) == []
    result = run_train("DCGAN", "--dataset", "mnist", "--data-root", tmp_path / "typo", "--out", tmp_path / "run",
                       *QUICK)
    assert_clean_error(result, "train-images-idx3-ubyte", "--data-root")
    assert not (tmp_path / "typo").exists()
