"""Faults made for real, not patched in: a full disk is a small tmpfs, read-only data is a read-only
mount, Ctrl-C is SIGINT sent to a running script, a killed run is SIGKILLed. Mounting needs root
(or CAP_SYS_ADMIN); where the machine does not allow it, the tests that mount are skipped."""

import gzip
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import (
    QUICK,
    ROOT,
    exits_2,
    load_checkpoint,
    load_folder,
    quick_run,
    run_main,
    tiny_mnist,
)

dcgan = load_folder("DCGAN")
PAGE = 4096  # tmpfs hands out space in pages


def mount(*args):
    result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"this machine does not allow mounting ({result.stderr.strip()})")


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs; fill(room) then leaves only `room` bytes free."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=4m", "tmpfs", disk)

    def fill(room):
        (disk / "spare").write_bytes(b"\0" * room)
        with open(disk / "filler", "wb", buffering=0) as filler:
            try:
                while True:
                    filler.write(b"\0" * PAGE)
            except OSError:
                pass
        (disk / "spare").unlink()

    yield disk, fill
    subprocess.run(["umount", "-l", str(disk)])


def train(*flags, **popen):
    """python train.py in DCGAN/, as a user starts it."""
    return subprocess.Popen(
        [sys.executable, "train.py", *map(str, flags)],
        cwd=ROOT / "DCGAN",
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **popen,
    )


def one_error_line(err):
    lines = [
        line for line in err.split("\n") if line.strip() and "\r" not in line and "%|" not in line
    ]  # no bars
    assert "Traceback" not in err and "Exception in thread" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "room, writer", [(64 * 1024, "checkpoints/last.pt"), (2 * PAGE, "events.out.tfevents")]
)
def test_a_real_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(
    room, writer, small_disk, tiny_mnist_root
):
    """64 KB free: the checkpoint does not fit. Two pages: the events fill them first."""
    disk, fill = small_disk
    run = disk / "run"
    quick = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root]
    assert train(*quick, "--max-steps", 2, "--out", run).wait() == 0
    last = (run / "checkpoints" / "last.pt").read_bytes()
    fill(room)
    every = 1 if writer.endswith(".pt") else 10**6
    process = train(
        "--resume",
        run,
        "--max-steps",
        400,
        "--log-every",
        1,
        "--checkpoint-every",
        every,
        "--sample-every",
        10**6,
    )
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2
    line = one_error_line(err)
    assert line.endswith(": the disk is full") and f"cannot write {run / writer}" in line, line
    assert (run / "checkpoints" / "last.pt").read_bytes() == last
    assert not list(run.rglob("*.tmp"))


def test_mnist_archives_on_a_read_only_mount_are_read_where_they_are(tmp_path):
    source = tmp_path / "source"
    tiny_mnist(source / "MNIST" / "raw", n_train=60, n_test=20)
    for file in (
        source / "MNIST" / "raw"
    ).iterdir():  # only the .gz archives, as they are downloaded
        Path(f"{file}.gz").write_bytes(gzip.compress(file.read_bytes()))
        file.unlink()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mount("--bind", source, readonly)
    try:
        mount("-o", "remount,bind,ro", readonly)
        with pytest.raises(OSError):
            (readonly / "probe").write_text("")
        process = train(
            *QUICK["DCGAN"], "--data-root", readonly, "--max-steps", 2, "--out", tmp_path / "run"
        )
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0 and "Traceback" not in err, err
        images, labels = dcgan.support.read_split("mnist", readonly, train=False)  # the test split
        assert images.shape == (20, 1, 28, 28) and len(labels) == 20
    finally:
        subprocess.run(["umount", "-l", str(readonly)])


def test_ctrl_c_during_a_decode_is_one_line_and_leaves_nothing_that_looks_whole(tmp_path):
    images = tmp_path / "images" / "all"  # ImageFolder: ROOT/CLASS/*.png
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3000):
        pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i:04d}.png")
    cache = (
        tmp_path / "cache"
    )  # its own folder: watching it is quick, so the short decode is not missed
    data = ["--dataset", "folder", "--data-root", images.parent, "--cache-dir", cache]
    flags = [*QUICK["DCGAN"][2:], *data, "--max-steps", 1]
    # a terminal's Ctrl-C: SIGINT to the whole process group, the decoding processes included, with
    # SIGINT at its default (a shell starts its background jobs with SIGINT ignored)
    process = train(
        *flags,
        "--out",
        tmp_path / "first",
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    while process.poll() is None and not any(p.stat().st_size for p in cache.glob("*.partial")):
        time.sleep(0.01)  # until the first chunk is written: the decoding processes are running
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    line = one_error_line(err)
    assert "stopped by Ctrl-C" in line and "the next start decodes it again" in line
    assert "DataLoader worker" not in err and list(cache.iterdir()) == []
    process = train(*flags, "--out", tmp_path / "second")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert [p.suffix for p in cache.iterdir()] == [".npy"]


def test_support_imports_and_locks_without_fcntl(tmp_path):
    """Windows has no fcntl: support.py imports without it, and the run folder is still locked."""
    script = (
        "import sys; sys.modules['fcntl'] = None\n"
        "import support\n"
        f"lock = support.hold(support.Path({str(tmp_path / 'run')!r}))\n"
        "print(type(lock).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT / "DCGAN", capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("FileLock") and (tmp_path / "run").is_dir()


def test_a_run_holds_its_folder_until_it_ends_even_by_kill_9(tiny_mnist_root, tmp_path, capsys):
    quick = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root]
    run, dead = tmp_path / "run", tmp_path / "dead"
    process = train(*quick, "--max-steps", 10**6, "--checkpoint-every", 1, "--out", run)
    while not (run / "checkpoints" / "last.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    err = exits_2(capsys, dcgan.train, *quick, "--max-steps", 2, "--out", run)
    assert f"{run} is in use by another running train.py" in err
    assert "in use" in exits_2(capsys, dcgan.train, "--resume", run)
    process.kill()  # SIGKILL: no handler runs, the operating system lets go of the lock
    process.wait()
    step = load_checkpoint(run)["step"]
    assert run_main(dcgan.train, "--resume", run, "--max-steps", step + 2) == 0
    assert load_checkpoint(run)["step"] == step + 2

    # killed before its first checkpoint: its grids are not a new run's, unless the user starts over
    process = train(
        *quick,
        "--max-steps",
        10**6,
        "--sample-every",
        1,
        "--checkpoint-every",
        10**6,
        "--out",
        dead,
    )
    while not list((dead / "samples").glob("*.png")) and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert "delete the folder" in exits_2(
        capsys, dcgan.train, *quick, "--max-steps", 2, "--out", dead
    )
    subprocess.run(["rm", "-r", str(dead)], check=True)
    assert run_main(dcgan.train, *quick, "--max-steps", 2, "--out", dead) == 0


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """The default run folder's name holds the process number beside the date and time."""
    script = "import support; print(support.new_run_folder(support.Path('runs')).name)"
    other = subprocess.run([sys.executable, "-c", script], cwd=ROOT / "DCGAN", capture_output=True)
    ours = dcgan.support.new_run_folder(tmp_path).name
    assert other.stdout.decode().strip() != ours and ours.endswith(f"-{os.getpid()}")


def test_model_py_writes_many_images_a_chunk_at_a_time(tiny_mnist_root, tmp_path, monkeypatch):
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    monkeypatch.setattr(dcgan.support, "CHUNK", 7)
    generated = []
    sample = dcgan.model.sample
    monkeypatch.setattr(
        dcgan.model, "sample", lambda G, z: generated.append(len(z)) or sample(G, z)
    )
    out = tmp_path / "many"
    assert run_main(dcgan.model, run, "--num", 30, "--single", "--out", out, "--device", "cpu") == 0
    assert generated == [7, 7, 7, 7, 2]
    assert sorted(p.name for p in out.iterdir()) == [f"{i:05d}.png" for i in range(30)]


def test_ctrl_c_in_model_py_is_one_line_saying_how_many_images_were_written(
    tiny_mnist_root, tmp_path
):
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    out = tmp_path / "many"
    process = subprocess.Popen(
        [sys.executable, "model.py", run, "--num", "200000", "--single", "--out", out],
        cwd=ROOT / "DCGAN",
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    while process.poll() is None and not (out.is_dir() and len(list(out.iterdir())) > 3):
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    line = one_error_line(err)
    written = int(line.split("after writing ")[1].split(" of")[0])
    assert "of 200000 images" in line and written == len(list(out.iterdir())), line


def test_a_full_disk_while_decoding_is_one_line_and_leaves_nothing(small_disk, tmp_path, capsys):
    disk, _ = small_disk  # 4 MB: 600 images at 64 px take 7.4 MB
    images = tmp_path / "images" / "all"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(600):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    quick = QUICK["DCGAN"][4:]  # without --dataset mnist --image-size 32
    data = ["--dataset", "folder", "--data-root", images.parent, "--cache-dir", disk]
    err = exits_2(capsys, dcgan.train, *quick, *data, "--image-size", 64, "--out", tmp_path / "run")
    assert "the disk is full" in err and "--cache-dir" in err
    assert list(disk.iterdir()) == []


def test_two_model_py_runs_on_one_out_cannot_both_succeed(tiny_mnist_root, tmp_path):
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    command = [sys.executable, "model.py", run, "--num", "400", "--out", tmp_path / "grid.png"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    runs = [subprocess.Popen(command, cwd=ROOT / "DCGAN", **pipes) for _ in range(2)]
    results = [(process.wait(timeout=300), process.stderr.read()) for process in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "grid.png" in one_error_line(refused)
