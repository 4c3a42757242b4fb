"""The data path through DCGAN's dataset.py, support.py and images.py: LSUN through torchvision,
image files decoded once into a memory-mapped .npy, batches and their resume, and the data faults a
user can fix (a bad image, a read-only folder, damaged MNIST files): one line, nothing left."""

import gzip
import io

import lmdb
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    QUICK,
    assert_same_networks,
    exits_2,
    load_checkpoint,
    load_folder,
    quick_run,
    tiny_mnist,
    write_idx,
)

dcgan = load_folder("DCGAN")
support, images, data = dcgan.support, dcgan.images, dcgan.dataset


def make_images(folder, count, seed=1):
    """COUNT small PNGs of different sizes in FOLDER/all, as --dataset folder (ImageFolder) reads
    them; returns the data root."""
    (folder / "all").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, (40 + i % 7, 48 + i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "all" / f"{i:03d}.png")
    return folder


def expected(files, size):
    """What the decoder should make of FILES: each opened by PIL and prepared as dataset.py does."""
    return torch.stack([data.prepare(size)(Image.open(file)) for file in files])


def decoded(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".decoded-"))


@pytest.fixture
def small_mnist(tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    tiny_mnist(raw, n_train=60, n_test=20)
    return tmp_path / "data", raw


def make_lsun(root, category="bedroom_train", count=36):
    """A tiny LSUN set as its download script leaves it: ROOT/lsun/CATEGORY_lmdb, keys of 40 hex
    digits, values JPEG bytes of images whose smaller side is 256 pixels. Returns the JPEGs in key
    order."""
    rng = np.random.default_rng(2)
    path = root / "lsun" / f"{category}_lmdb"
    path.mkdir(parents=True)
    jpegs = {}
    for i in range(count):
        pixels = rng.integers(0, 256, (256, 256 + int(rng.integers(0, 100)), 3), dtype=np.uint8)
        encoded = io.BytesIO()
        Image.fromarray(pixels).save(encoded, format="JPEG", quality=75)
        jpegs[rng.bytes(20).hex().encode()] = encoded.getvalue()
    with lmdb.open(str(path), map_size=1 << 26) as env, env.begin(write=True) as txn:
        for key, value in jpegs.items():
            txn.put(key, value)
    return [io.BytesIO(jpegs[key]) for key in sorted(jpegs)]


def test_lsun_is_read_through_torchvision_and_trains_leaving_no_key_list(
    tmp_path, monkeypatch, capsys
):
    jpegs = make_lsun(tmp_path / "data")
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # torchvision's LSUN writes its key list into the working folder
    lsun = data.load_images("lsun", tmp_path / "data", 32)  # bedroom_train is the default
    assert lsun.shape == (36, 3, 32, 32) and torch.equal(lsun, expected(jpegs, 32))
    assert list(workdir.iterdir()) == [] and len(decoded(tmp_path / "data" / "lsun")) == 1
    capsys.readouterr()
    quick_run("DCGAN", tmp_path / "data", tmp_path / "run", "--dataset", "lsun", "--max-steps", 2)
    assert "DCGAN on lsun (36 images" in capsys.readouterr().out and list(workdir.iterdir()) == []


def test_lsun_faults_are_one_line_errors(tmp_path):
    make_lsun(tmp_path / "data")
    with pytest.raises(data.DataError, match="kitchen_train_lmdb.*download.py"):
        data.load_images("lsun", tmp_path / "data", 32, lsun_classes=("kitchen_train",))
    with pytest.raises(data.DataError, match="'bedrooms' is not CATEGORY_train"):
        data.load_images("lsun", tmp_path / "data", 32, lsun_classes=("bedrooms",))
    database = tmp_path / "data" / "lsun" / "bedroom_train_lmdb" / "data.mdb"
    database.write_bytes(np.random.default_rng(0).bytes(database.stat().st_size))
    with pytest.raises(data.DataError, match="are not readable"):
        data.load_images("lsun", tmp_path / "data", 32)
    assert decoded(tmp_path / "data" / "lsun") == []


def draws(batches, count):
    return [next(batches) for _ in range(count)]


def test_a_memory_mapped_set_gives_the_batches_of_one_in_memory_and_resumes_exactly(tmp_path):
    root = make_images(tmp_path / "images", 23)
    mapped = data.load_images("folder", root, 8)
    assert isinstance(mapped, torch.Tensor) and mapped.shape == (23, 3, 8, 8)
    in_memory = mapped.clone()
    whole = draws(data.batches(mapped, 5, "cpu", seed=3), 10)  # 4 batches an epoch: 2.5 epochs
    assert all(
        torch.equal(a, b) for a, b in zip(whole, draws(data.batches(in_memory, 5, "cpu", 3), 10))
    )
    first = data.batches(mapped, 5, "cpu", seed=3)
    draws(first, 6)
    second = data.batches(mapped, 5, "cpu", seed=3)
    second.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(whole[6:], draws(second, 4)))
    # each epoch is a new permutation of every image but the incomplete last batch
    epoch = torch.cat(whole[:4]).flatten(1)
    assert len(torch.unique(epoch, dim=0)) == 20


def test_the_run_that_decodes_equals_the_next_run_of_the_seed(tmp_path):
    """The first run decodes, the second maps the .npy: decoding draws nothing from the training's
    random streams, and both train on the same bytes."""
    root = make_images(tmp_path / "images", 40)
    flags = ["--dataset", "folder", "--seed", 0, "--max-steps", 3]
    quick_run("DCGAN", root, tmp_path / "decoded", *flags)
    copies = list(root.glob(".decoded-32px-*.npy"))
    assert len(copies) == 1 and np.load(copies[0]).shape == (40, 3, 32, 32)
    written = copies[0].stat().st_mtime_ns
    quick_run("DCGAN", root, tmp_path / "mapped", *flags)
    assert copies[0].stat().st_mtime_ns == written  # decoded once
    assert_same_networks(
        load_checkpoint(tmp_path / "decoded"), load_checkpoint(tmp_path / "mapped")
    )


def test_a_changed_file_is_decoded_anew_and_a_partial_copy_is_never_read(tmp_path):
    root = make_images(tmp_path / "images", 12)
    first = data.load_images("folder", root, 16)
    assert torch.equal(first, expected(sorted((root / "all").glob("*.png")), 16))
    Image.new("RGB", (40, 40), (255, 0, 0)).save(root / "all" / "003.png")
    second = data.load_images("folder", root, 16)
    assert len(decoded(root)) == 2 and second[3].float().mean() != first[3].float().mean()
    # a kill during a decode leaves only PATH.partial, which no start reads: the next one decodes
    for copy in root.glob(".decoded-*.npy"):
        copy.rename(copy.with_suffix(".partial"))
    assert torch.equal(data.load_images("folder", root, 16), second)


def test_an_image_that_does_not_decode_is_named_in_one_line(tmp_path, capsys):
    root = make_images(tmp_path / "images", 12)
    (root / "all" / "notes.png").write_text("not an image at all\n")
    run = tmp_path / "run"
    flags = [*QUICK["DCGAN"], "--dataset", "folder", "--data-root", root, "--out", run]
    err = exits_2(capsys, dcgan.train, *flags)
    assert "notes.png" in err and "decoding" in err
    assert decoded(root) == [] and not list(root.glob("*.partial")) and not run.exists()


def test_a_read_only_image_folder_is_decoded_into_the_users_cache(tmp_path, monkeypatch):
    root = make_images(tmp_path / "images", 12)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    real_unwritable = support.unwritable
    # as root, permission bits do not stop writes, so the check is told as well
    monkeypatch.setattr(
        images, "unwritable", lambda path: "read-only" if path == root else real_unwritable(path)
    )
    before = sorted(root.rglob("*"))
    root.chmod(0o555)
    try:
        assert data.load_images("folder", root, 16).shape == (12, 3, 16, 16)
    finally:
        root.chmod(0o755)
    assert sorted(root.rglob("*")) == before
    assert len(decoded(tmp_path / "user-cache" / "gan-papers")) == 1


def test_damaged_mnist_files_are_named(small_mnist, tmp_path, capsys):
    root, raw = small_mnist
    pixels, labels = support.read_split("mnist", root)
    assert pixels.shape == (60, 1, 28, 28) and torch.equal(labels, torch.arange(60) % 10)
    write_idx(raw / "train-labels-idx1-ubyte", np.arange(50) % 10)
    with pytest.raises(support.DataError, match="are not MNIST images and labels"):
        support.read_split("mnist", root)
    image_file = raw / "train-images-idx3-ubyte"
    for damaged in (image_file.read_bytes()[:-100], b""):
        image_file.write_bytes(damaged)
        with pytest.raises(
            support.DataError, match="train-images-idx3-ubyte is not a readable IDX"
        ):
            support.read_split("mnist", root)
    image_file.unlink()
    (raw / "train-images-idx3-ubyte.gz").write_text("<html>not found</html>")
    err = exits_2(
        capsys, dcgan.train, *QUICK["DCGAN"], "--data-root", root, "--out", tmp_path / "r"
    )
    assert "train-images-idx3-ubyte.gz is not a readable IDX" in err and "download" not in err


def test_archives_with_other_checksums_are_read_where_they_are(small_mnist):
    root, raw = small_mnist
    truth = support.read_split("mnist", root)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):  # other bytes, same data
        (raw / f"{stem}.gz").write_bytes(gzip.compress((raw / stem).read_bytes(), compresslevel=1))
        (raw / stem).unlink()
    before = sorted(raw.iterdir())
    assert all(torch.equal(a, b) for a, b in zip(support.read_split("mnist", root), truth))
    assert sorted(raw.iterdir()) == before  # unpacked into a scratch folder, not beside the archive
