"""The shared test harness.

Every paper folder is imported by file path: folder names such as WGAN-GP are not
Python identifiers, and every folder has its own model.py, dataset.py and train.py.
Smoke runs start `python train.py` in the folder, as a user would, on the real
MNIST under ../shared/data when it exists, else on a tiny MNIST made here.
"""
import functools
import importlib.util
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "MNIST" / "raw"
FOLDER_MODULES = ("support", "model", "dataset", "train")


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


def assert_clean_error(result, *words):
    """Exit code 2 and a short message naming the problem, never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr
    assert "error:" in result.stderr, result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def sigterm_then_resume(folder, run, *args):
    """Start `train.py ARGS --out RUN`, send SIGTERM once it has said that it started (its first line, printed
    after the signal handlers are in place, however slow the machine), and check that it exits with
    128 + SIGTERM leaving a checkpoint that --resume continues by one step."""
    process = subprocess.Popen([sys.executable, "train.py", *map(str, args), "--out", str(run)], cwd=ROOT / folder,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if "run folder" in line:
            break
    assert process.poll() is None, process.stderr.read()[-2000:]
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = load_checkpoint(run)["step"]
    result = run_train(folder, "--resume", run, "--max-steps", step + 1)
    assert result.returncode == 0 and load_checkpoint(run)["step"] == step + 1, result.stderr[-2000:]


def main_with_poisoned_loss(train, step_function, poisoned_call, *args):
    """Run `train.main(ARGS)` in-process with the loss returned by `train.STEP_FUNCTION` made Inf on its
    POISONED_CALL-th call; returns the exit code. (A diverging learning rate would fail at a step that depends
    on the data.) The signal handlers that main installs are restored afterwards."""
    real_step, calls = getattr(train, step_function), []

    def poisoned_step(*step_args):
        calls.append(1)
        loss = real_step(*step_args)
        return loss * float("inf") if len(calls) == poisoned_call else loss

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    setattr(train, step_function, poisoned_step)
    try:
        with pytest.raises(SystemExit) as stopped:
            train.main([str(arg) for arg in args])
    finally:
        setattr(train, step_function, real_step)
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return stopped.value.code


def scalar_tags(run_dir):
    """TensorBoard scalar tags of a run folder, each with its list of (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def load_checkpoint(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def write_idx(path, array):
    """An IDX file as torchvision's MNIST reads it (unsigned bytes, big-endian sizes)."""
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def tiny_mnist(raw, n_train=600, n_test=200):
    """Digit-like images: class k is a bright stroke whose angle depends on k, plus a little noise."""
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
        raw.mkdir(parents=True)
        tiny_mnist(raw)
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """A flat folder of 40 small colour images of different sizes, as --dataset folder reads it."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(40):
        height, width = 40 + i % 7, 48 + i % 5
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(root / f"{i:03d}.png")
    return root
