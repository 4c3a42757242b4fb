"""The shared test harness.

Every paper folder is imported by file path: folder names such as WGAN-GP are not
Python identifiers, and every folder has its own model.py, dataset.py and train.py.
Smoke runs start `python train.py` in the folder, as a user would, on the real
MNIST under ../shared/data when it exists, else on a tiny MNIST made here.
"""
import errno
import functools
import importlib.util
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "MNIST" / "raw"
FOLDER_MODULES = ("support", "model", "dataset", "train")
FOLDERS = ("simpleGAN", "CGAN", "DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
CONVOLUTIONAL = FOLDERS[2:]
# The flags that make a folder's run tiny: small networks on MNIST, on the CPU, 2 critic iterations per generator
# step, and WGAN's official warm-up (100 critic iterations per generator step at first) off.
QUICK = {
    "simpleGAN": ["--g-width", 32, "--d-width", 16, "--batch-size", 10, "--device", "cpu"],
    "CGAN": ["--valid-size", 100, "--select-every", 0, "--batch-size", 20, "--device", "cpu"],
    "DCGAN": ["--dataset", "mnist", "--image-size", 32, "--width", 8, "--batch-size", 8, "--device", "cpu"],
    "WGAN": ["--dataset", "mnist", "--image-size", 32, "--width", 8, "--batch-size", 8, "--n-critic", 2,
             "--no-critic-warmup", "--device", "cpu"],
    "WGAN-GP": ["--dataset", "mnist", "--width", 4, "--batch-size", 8, "--n-critic", 2, "--device", "cpu"],
    "LSGAN": ["--dataset", "mnist", "--image-size", 32, "--width", 8, "--batch-size", 8, "--device", "cpu"],
    "SN-DCGAN": ["--dataset", "mnist", "--width", 8, "--batch-size", 8, "--device", "cpu"],
}

# The D (critic) step function of each train.py.
D_STEP = {"simpleGAN": "discriminator_step", "CGAN": "discriminator_step", "DCGAN": "discriminator_step",
          "WGAN": "critic_step", "WGAN-GP": "critic_step", "LSGAN": "discriminator_step",
          "SN-DCGAN": "discriminator_step"}


@functools.cache
def load_folder(name):
    """A folder's model, dataset and train modules, wired to one another as its own scripts see them."""
    directory = ROOT / name
    saved = {part: sys.modules.pop(part) for part in FOLDER_MODULES if part in sys.modules}
    sys.path.insert(0, str(directory))
    modules = {}
    try:
        for part in FOLDER_MODULES:
            spec = importlib.util.spec_from_file_location(part, directory / f"{part}.py")
            modules[part] = sys.modules[part] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[part])
    finally:
        sys.path.remove(str(directory))
        for part in FOLDER_MODULES:
            sys.modules.pop(part, None)
        sys.modules.update(saved)
    return SimpleNamespace(**modules)


def run_train(folder, *args, timeout=600):
    """`python train.py ARGS` inside FOLDER, as a user runs it."""
    return subprocess.run([sys.executable, "train.py", *map(str, args)], cwd=ROOT / folder,
                          capture_output=True, text=True, timeout=timeout)


def run_main(module, *args):
    """`module.main(ARGS)` in this process (a folder's train.py or model.py): its exit code. The SIGINT and SIGTERM
    handlers that train.main installs are replaced by the ones before it afterwards."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return module.main([str(arg) for arg in args]) or 0
    except SystemExit as stopped:
        return stopped.code
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def exits_2(capsys, module, *args):
    """`module.main(ARGS)` in this process ends with exit code 2 and one line on stderr (besides progress bars,
    which redraw themselves with carriage returns), no traceback; returns that line."""
    capsys.readouterr()
    code, err = run_main(module, *args), capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(lines) == 1 and "error: " in lines[0], err
    return lines[0]


def sigterm_then_resume(folder, run, *args, at_step=2, more=1):
    """Start `train.py ARGS --sample-every 1 --out RUN`, send SIGTERM once the grid of step AT_STEP is written,
    and check that it exits with 128 + SIGTERM leaving a checkpoint that --resume continues by MORE steps.
    Returns the step the signal stopped it at: AT_STEP, or a later one when the signal came late."""
    process = subprocess.Popen([sys.executable, "train.py", *map(str, args), "--sample-every", "1", "--out", str(run)],
                               cwd=ROOT / folder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "samples" / f"step_{at_step:07d}.png").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate(timeout=60)[1][-2000:]
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = load_checkpoint(run)["step"]
    assert step >= at_step
    result = run_train(folder, "--resume", run, "--max-steps", step + more)
    assert result.returncode == 0 and load_checkpoint(run)["step"] == step + more, result.stderr[-2000:]
    return step


def main_with_poisoned_loss(train, step_function, poisoned_call, *args):
    """Run `train.main(ARGS)` in-process with the loss returned by `train.STEP_FUNCTION` (alone, or first of the
    values it returns) made Inf on its POISONED_CALL-th call; returns the exit code. (A diverging learning rate
    would fail at a step that depends on the data.)"""
    real_step, calls = getattr(train, step_function), []

    def poisoned_step(*step_args):
        calls.append(1)
        result = real_step(*step_args)
        if len(calls) != poisoned_call:
            return result
        return (result[0] * float("inf"), *result[1:]) if isinstance(result, tuple) else result * float("inf")

    setattr(train, step_function, poisoned_step)
    try:
        return run_main(train, *args)
    finally:
        setattr(train, step_function, real_step)


def scalar_tags(run_dir):
    """TensorBoard scalar tags of a run folder, each with its list of (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def load_checkpoint(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=False)


def assert_same_networks(a, b):
    """Two checkpoints hold exactly the same G and D: every weight and buffer equal, bit for bit."""
    for net in ("G", "D"):
        assert a[net].keys() == b[net].keys(), net
        for name, value in a[net].items():
            assert torch.equal(value, b[net][name]), (net, name)


def write_idx(path, array):
    """An IDX file as torchvision's MNIST reads it (unsigned bytes, big-endian sizes)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_mnist(raw, n_train=600, n_test=200):
    """Digit-like images: class k is a bright stroke whose angle depends on k, plus a little noise."""
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28))
        t = np.linspace(-9, 9, 40)
        for i, k in enumerate(labels):
            angle = np.pi * k / 10
            rows = np.clip(np.round(14 + t * np.sin(angle)).astype(int), 0, 27)
            cols = np.clip(np.round(14 + t * np.cos(angle)).astype(int), 0, 27)
            images[i, rows, cols] = 255
        images = np.clip(images + rng.normal(0, 10, images.shape), 0, 255)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.fixture(scope="session")
def mnist_root(tmp_path_factory):
    """A data root holding MNIST: a copy of the real one when it is present, else a tiny one made here."""
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    if SHARED_MNIST.is_dir():
        shutil.copytree(SHARED_MNIST, raw)
        for path in raw.iterdir():
            path.chmod(0o644)
    else:
        tiny_mnist(raw)
    return root


@pytest.fixture(scope="session")
def tiny_mnist_root(tmp_path_factory):
    """A data root with a tiny MNIST (600 training and 200 test images), always: quick to embed or to damage."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_mnist(root / "MNIST" / "raw")
    return root


@pytest.fixture
def offline(monkeypatch):
    """No network: every download is refused at once by a proxy on a closed local port."""
    for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # an opener built earlier would not see the proxy


def failing_writes(monkeypatch, module, suffix, fail_at=None, error=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))):
    """The writes of MODULE (a folder's support) into files whose names end with SUFFIX: their sizes in bytes, and
    the FAIL_AT-th writes a little, then raises ERROR (a full disk unless told)."""
    written = []

    class CountedWrites(io.FileIO):
        def write(self, chunk):
            written.append(memoryview(chunk).nbytes)
            if len(written) == fail_at:
                super().write(b"partial")
                raise error
            return super().write(chunk)

    def counted_open(path, mode="r", *args, **kwargs):
        return CountedWrites(path, mode.replace("b", "")) if str(path).endswith(suffix) else \
            open(path, mode, *args, **kwargs)
    monkeypatch.setattr(module, "open", counted_open, raising=False)
    return written
