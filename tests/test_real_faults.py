"""Faults made for real, not patched in: a full disk is a small tmpfs, read-only data is a read-only mount, Ctrl-C
is SIGINT sent to the process group of a running train.py, a killed run is SIGKILLed. Mounting needs root (or
CAP_SYS_ADMIN); where the machine does not allow it, the tests that mount are skipped and say why."""
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

from conftest import QUICK, ROOT, exits_2, load_checkpoint, load_folder, quick_run, run_main, tiny_mnist

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
    return subprocess.Popen([sys.executable, "train.py", *map(str, flags)], cwd=ROOT / "DCGAN", text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def one_error_line(err):
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line and "%|" not in line]  # no bars
    assert "Traceback" not in err and "Exception in thread" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("room, writer", [(64 * 1024, "checkpoints/last.pt"), (2 * PAGE, "")])
def test_a_real_full_disk_ends_in_one_line_and_keeps_the_last_checkpoint(room, writer, small_disk, tiny_mnist_root):
    """64 KB free: the checkpoint does not fit. Two pages free: the TensorBoard events fill them first."""
    disk, fill = small_disk
    run = disk / "run"
    quick = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root]
    assert train(*quick, "--max-steps", 2, "--out", run).wait() == 0
    last = (run / "checkpoints" / "last.pt").read_bytes()
    fill(room)
    every = 1 if writer else 10 ** 6
    process = train("--resume", run, "--max-steps", 400, "--log-every", 1, "--checkpoint-every", every,
                    "--sample-every", 10 ** 6)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 2
    assert one_error_line(err).endswith(f"cannot write {run / writer if writer else run}: the disk is full")
    assert (run / "checkpoints" / "last.pt").read_bytes() == last
    assert not list(run.rglob("*.tmp"))


def test_mnist_archives_on_a_read_only_mount_are_read_where_they_are(tmp_path):
    source = tmp_path / "source"
    tiny_mnist(source / "MNIST" / "raw", n_train=60, n_test=20)
    for file in (source / "MNIST" / "raw").iterdir():  # only the .gz archives, as they are downloaded
        Path(f"{file}.gz").write_bytes(gzip.compress(file.read_bytes()))
        file.unlink()
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    mount("--bind", source, readonly)
    try:
        mount("-o", "remount,bind,ro", readonly)
        with pytest.raises(OSError):
            (readonly / "probe").write_text("")
        process = train(*QUICK["DCGAN"], "--data-root", readonly, "--max-steps", 2, "--out", tmp_path / "run")
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0 and "Traceback" not in err, err
        images, labels = dcgan.support.read_mnist("mnist", readonly, train=False)  # --eval-real test reads this
        assert images.shape == (20, 28, 28) and len(labels) == 20
    finally:
        subprocess.run(["umount", "-l", str(readonly)])


def test_ctrl_c_during_a_decode_is_one_line_and_the_next_start_continues(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3000):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{i:04d}.png")
    cache = tmp_path / "cache"  # its own folder: watching it is quick, so the short decode is not missed
    flags = [*QUICK["DCGAN"][2:], "--dataset", "folder", "--data-root", images, "--cache-dir", cache, "--max-steps", 1]
    # a terminal's Ctrl-C: SIGINT to the whole process group, the decoding processes included
    # SIGINT at its default, as in a terminal (a shell starts its background jobs with SIGINT ignored)
    process = train(*flags, "--out", tmp_path / "first", start_new_session=True,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while process.poll() is None and not any(p.stat().st_size for p in cache.glob("*.partial")):
        time.sleep(0.01)  # until the first chunk is written: the decoding processes are running
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    line = one_error_line(err)
    assert "stopped by Ctrl-C after" in line and "the next start continues from there" in line
    assert "DataLoader worker" not in err
    done = int(line.split("after ")[1].split(" of")[0])
    assert 0 < done < 3000
    process = train(*flags, "--out", tmp_path / "second")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert f"{done}/3000" in err  # the progress bar starts where the first decode stopped
    assert dcgan.dataset.load_images("folder", images, 32, cache).shape == (3000, 3, 32, 32)


def test_a_run_holds_its_folder_until_it_ends_even_by_kill_9(tiny_mnist_root, tmp_path, capsys):
    quick = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root]
    run, dead = tmp_path / "run", tmp_path / "dead"
    process = train(*quick, "--max-steps", 10 ** 6, "--checkpoint-every", 1, "--out", run)
    while not (run / "checkpoints" / "last.pt").exists() and process.poll() is None:
        time.sleep(0.05)
    err = exits_2(capsys, dcgan.train, *quick, "--max-steps", 2, "--out", run)
    assert f"{run} is in use by a running train.py (process {process.pid})" in err
    assert f"(process {process.pid})" in exits_2(capsys, dcgan.train, "--resume", run)
    process.kill()  # SIGKILL: no handler runs, the operating system lets go of the lock
    process.wait()
    step = load_checkpoint(run)["step"]
    assert run_main(dcgan.train, "--resume", run, "--max-steps", step + 2) == 0
    assert load_checkpoint(run)["step"] == step + 2

    # killed before its first checkpoint: its grids are not a new run's frames, unless the user starts over
    process = train(*quick, "--max-steps", 10 ** 6, "--sample-every", 1, "--checkpoint-every", 10 ** 6, "--out", dead)
    while not list((dead / "samples").glob("*.png")) and process.poll() is None:
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert f"rm -r {dead}" in exits_2(capsys, dcgan.train, *quick, "--max-steps", 2, "--out", dead)
    subprocess.run(["rm", "-r", str(dead)], check=True)
    assert run_main(dcgan.train, *quick, "--max-steps", 2, "--out", dead) == 0


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    folders = [dcgan.support.new_run_folder(tmp_path / "runs") for _ in range(3)]
    assert len(set(folders)) == 3 and all(folder.is_dir() for folder in folders)


def test_a_tilde_after_an_equals_sign_is_the_home_folder(tiny_mnist_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").symlink_to(tiny_mnist_root)
    monkeypatch.chdir(tmp_path)
    assert run_main(dcgan.train, *QUICK["DCGAN"], "--data-root=~/data", "--max-steps", 1, "--out=~/run") == 0
    assert load_checkpoint(tmp_path / "run")["step"] == 1 and not (tmp_path / "~").exists()
    assert run_main(dcgan.model, "~/run", "--out=~/grid.png", "--device", "cpu") == 0
    assert (tmp_path / "grid.png").is_file()


def test_model_py_writes_many_images_a_chunk_at_a_time_and_refuses_a_huge_grid(tiny_mnist_root, tmp_path, capsys,
                                                                               monkeypatch):
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    err = exits_2(capsys, dcgan.model, run, "--num", 100_000, "--out", tmp_path / "huge.png", "--device", "cpu")
    assert "--num 100000" in err and "--single" in err and not (tmp_path / "huge.png").exists()
    monkeypatch.setattr(dcgan.support, "SAMPLE_CHUNK", 7)
    generated = []
    sample = dcgan.model.sample
    monkeypatch.setattr(dcgan.model, "sample", lambda G, z: generated.append(len(z)) or sample(G, z))
    assert run_main(dcgan.model, run, "--num", 30, "--single", "--out", tmp_path / "many", "--device", "cpu") == 0
    assert generated == [7, 7, 7, 7, 2]
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == [f"{i:05d}.png" for i in range(30)]
