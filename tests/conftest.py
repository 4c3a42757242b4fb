"""The shared test harness. Every folder is imported by file path (WGAN-GP is not a Python
identifier, and every folder has its own model.py, dataset.py and train.py); runs use the real MNIST
under ../shared/data when it is there, else a tiny MNIST made here."""

import errno
import functools
import importlib.util
import io
import math
import os
import re
import shlex
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
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "MNIST" / "raw"
FOLDER_MODULES = ("support", "images", "model", "dataset", "train")
FOLDERS = ("simpleGAN", "CGAN", "DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
CONVOLUTIONAL = FOLDERS[2:]
# The flags that make a folder's run tiny: small networks on MNIST, on the CPU, 2 critic iterations
# per generator step, and WGAN's official warm-up (100 critic iterations per generator step at
# first) off.
QUICK = {
    folder: flags.split()
    for folder, flags in {
        "simpleGAN": "--g-width 32 --d-width 16 --batch-size 10 --device cpu",
        "CGAN": "--valid-size 100 --select-every 0 --batch-size 20 --device cpu",
        "DCGAN": "--dataset mnist --image-size 32 --width 8 --batch-size 8 --device cpu",
        "WGAN": "--dataset mnist --image-size 32 --width 8 --batch-size 8 --n-critic 2 "
        "--no-critic-warmup --device cpu",
        "WGAN-GP": "--dataset mnist --width 4 --batch-size 8 --n-critic 2 --device cpu",
        "LSGAN": "--dataset mnist --image-size 32 --width 8 --batch-size 8 --device cpu",
        "SN-DCGAN": "--dataset mnist --width 8 --batch-size 8 --device cpu",
    }.items()
}

# The D (critic) step function of each train.py.
D_STEP = {
    folder: "critic_step" if folder.startswith("WGAN") else "discriminator_step"
    for folder in FOLDERS
}


@functools.cache
def load_folder(name):
    """A folder's modules (FOLDER_MODULES), wired to one another as its own scripts see them."""
    directory = ROOT / name
    saved = {part: sys.modules.pop(part) for part in FOLDER_MODULES if part in sys.modules}
    sys.path.insert(0, str(directory))
    modules = {}
    try:
        for part in FOLDER_MODULES:
            if not (directory / f"{part}.py").exists():  # images.py: the convolutional folders only
                continue
            spec = importlib.util.spec_from_file_location(part, directory / f"{part}.py")
            modules[part] = sys.modules[part] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(modules[part])
    finally:
        sys.path.remove(str(directory))
        for part in FOLDER_MODULES:
            sys.modules.pop(part, None)
        sys.modules.update(saved)
    return SimpleNamespace(**modules)


def load_toy(name):
    """A folder's toy.py, importing that folder's own support, model, dataset and train."""
    folder = load_folder(name)
    parts = {part: getattr(folder, part) for part in FOLDER_MODULES if hasattr(folder, part)}
    saved = {part: sys.modules.get(part) for part in parts}
    sys.modules.update(parts)
    try:
        spec = importlib.util.spec_from_file_location(f"toy_{name}", ROOT / name / "toy.py")
        toy = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(toy)
    finally:
        for part, module in saved.items():
            sys.modules.pop(part) if module is None else sys.modules.__setitem__(part, module)
    return toy, folder


def run_train(folder, *args, timeout=600):
    """`python train.py ARGS` inside FOLDER, as a user runs it."""
    return subprocess.run(
        [sys.executable, "train.py", *map(str, args)],
        cwd=ROOT / folder,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def two_logged_steps(folder, data_root, run, *flags):
    """`python train.py`, as a user runs it, tiny (QUICK), for 2 logged steps: its last checkpoint
    and its scalar tags."""
    result = run_train(
        folder,
        *QUICK[folder],
        "--data-root",
        data_root,
        *flags,
        "--max-steps",
        2,
        "--log-every",
        1,
        "--out",
        run,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return load_checkpoint(run), scalar_tags(run)


def run_main(module, *args):
    """`module.main(ARGS)` in this process: its exit code; the SIGINT and SIGTERM handlers are
    restored after it."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        return module.main([str(arg) for arg in args]) or 0
    except SystemExit as stopped:
        return stopped.code
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)


def quick_run(folder, data_root, run, *flags):
    """A tiny run (QUICK) of FOLDER's train.main on DATA_ROOT into RUN, in this process: RUN."""
    assert (
        run_main(
            load_folder(folder).train,
            *QUICK[folder],
            "--data-root",
            data_root,
            "--out",
            run,
            *flags,
        )
        == 0
    )
    return run


def exits_2(capsys, module, *args):
    """`module.main(ARGS)` ends with exit code 2 and one line on stderr (progress bars aside):
    returns that line."""
    capsys.readouterr()
    code, err = run_main(module, *args), capsys.readouterr().err
    lines = [line for line in err.split("\n") if line.strip() and "\r" not in line]
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(lines) == 1 and "error: " in lines[0], err
    return lines[0]


def sigterm_then_resume(folder, run, *args, at_step=2, more=1):
    """`python train.py ARGS --out RUN`, sent SIGTERM by another process once step AT_STEP's grid
    is written, exits with 128 + SIGTERM and a checkpoint; the command it prints continues the run
    by MORE steps (given --max-steps; run as train.main in this process, which saves a second
    start of Python). Returns the step it stopped at (AT_STEP or, when the signal came late, a
    later one)."""
    log = run.parent / f"{run.name}.stdout"
    with open(log, "w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "train.py", *map(str, args), "--sample-every", "1", "--out", str(run)],
            cwd=ROOT / folder,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 300
        while not (run / "samples" / f"step_{at_step:07d}.png").exists():
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(process.communicate(timeout=60)[1][-2000:])
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    step = load_checkpoint(run)["step"]
    assert step >= at_step
    said = re.search(r"stopped by SIGTERM at step (\d+); continue with: (.+)", log.read_text())
    assert said and int(said[1]) == step, log.read_text()[-2000:]
    python, *command = shlex.split(said[2])
    assert python == "python" and command[0] == "train.py", said[2]
    train = load_folder(folder).train
    assert run_main(train, *command[1:], "--max-steps", step + more) == 0
    assert load_checkpoint(run)["step"] == step + more
    return step


def main_with_poisoned_loss(monkeypatch, train, step_function, poisoned_call, *args):
    """`train.main(ARGS)`'s exit code, with the loss of `train.STEP_FUNCTION` made Inf on its
    POISONED_CALL-th call (a diverging learning rate would fail at a step that depends on the
    data)."""
    real_step, calls = getattr(train, step_function), []

    def poisoned_step(*step_args):
        calls.append(1)
        result = real_step(*step_args)
        if len(calls) != poisoned_call:
            return result
        return (
            (result[0] * float("inf"), *result[1:])
            if isinstance(result, tuple)
            else result * float("inf")
        )

    monkeypatch.setattr(train, step_function, poisoned_step)
    return run_main(train, *args)


def scalar_tags(run_dir):
    """TensorBoard scalar tags of a run folder, each with its list of (step, value)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def load_checkpoint(run_dir, name="last.pt"):
    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=True)


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
    """Digit-like images: class k is a bright stroke at an angle set by k, plus a little noise."""
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
    """A data root holding MNIST: a copy of the real one when it is present, else a tiny one."""
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
    """A data root with a tiny MNIST (600 training and 200 test images), always: quick to load,
    to embed or to damage."""
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
    # an opener built earlier would not see the proxy
    monkeypatch.setattr(urllib.request, "_opener", None)


def failing_writes(
    monkeypatch,
    module,
    suffix,
    fail_at=None,
    error=OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
):
    """The sizes of MODULE's writes into files named *SUFFIX; the FAIL_AT-th writes a little,
    then raises ERROR."""
    written = []

    class CountedWrites(io.FileIO):
        def write(self, chunk):
            written.append(memoryview(chunk).nbytes)
            if len(written) == fail_at:
                super().write(b"partial")
                raise error
            return super().write(chunk)

    def counted_open(path, mode="r", *args, **kwargs):
        return (
            CountedWrites(path, mode.replace("b", ""))
            if str(path).endswith(suffix)
            else open(path, mode, *args, **kwargs)
        )

    monkeypatch.setattr(module, "open", counted_open, raising=False)
    return written


# --- stand-in networks, whose every answer and gradient is known ---------------------------------


class LinearD(nn.Module):
    """D(x) = w . x: its gradient w.r.t. w is x, its input gradient w everywhere. It keeps its
    inputs in `inputs`."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return (x * self.w).flatten(1).sum(1)


class ConstantG(nn.Module):
    """G(z) = the same learnable image for every z."""

    def __init__(self, image):
        super().__init__()
        self.image = nn.Parameter(image.clone())

    def forward(self, z):
        return self.image.expand(len(z), *self.image.shape)


def linear_pair(m=4, shape=(1, 2, 2)):
    """ConstantG(image), LinearD(w), a real batch x of M images, w and the image, from seed 0."""
    torch.manual_seed(0)
    w, image, x = torch.randn(shape), torch.randn(shape), torch.randn(m, *shape)
    return ConstantG(image), LinearD(w), x, w, image


def frozen_d_update(d_step, G, D, x, *options):
    """D_STEP on the real batch x at learning rate 0 (nothing moves); G is held fixed: the fakes
    carry no graph."""
    result = d_step(
        G, D, torch.optim.SGD(D.parameters(), lr=0.0), x, torch.zeros(len(x), 1), *options
    )
    assert G.image.grad is None
    return result


def frozen_g_update(g_step, G, D, m, *options):
    """G_STEP on m noise samples at learning rate 0; D is held fixed, and trainable again after."""
    D.w.grad = None
    result = g_step(G, D, torch.optim.SGD(G.parameters(), lr=0.0), torch.zeros(m, 1), *options)
    assert D.w.grad is None and D.w.requires_grad
    return result


class PixelSumD(nn.Module):
    """D(x) = sum of x's pixels + a learnable offset (0), + y . (0, 10, 20, ...) with labels y: a
    logit chosen through the image. It keeps its outputs in `outputs`, with their gradients once a
    backward pass reaches them."""

    def __init__(self):
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(()))
        self.outputs = []

    def forward(self, x, y=None):
        logits = (
            x.flatten(1).sum(1)
            + (0 if y is None else y @ (10.0 * torch.arange(10.0)))
            + self.offset
        )
        if logits.requires_grad:
            logits.retain_grad()
        self.outputs.append(logits)
        return logits


class FixedG(nn.Module):
    """G(z) = the learnable `images`, whatever z; with labels y, G(z|y) = the image of y's class."""

    def __init__(self, images):
        super().__init__()
        self.images = nn.Parameter(images.clone())

    def forward(self, z, y=None):
        return self.images[: len(z)] if y is None else self.images[y.argmax(1)]


def pixel_images(*values):
    """28x28 images whose first pixel is each of VALUES, every other pixel 0: PixelSumD's logits."""
    x = torch.zeros(len(values), 1, 28, 28)
    x[:, 0, 0, 0] = torch.tensor(values)
    return x


def sigmoid(value):
    return 1 / (1 + math.exp(-value))


def bce(logits, target):
    """Binary cross entropy of sigmoid(l) against target 0 or 1, written out and averaged: -log D
    or -log(1 - D)."""
    return sum(
        -math.log(sigmoid(v)) if target == 1 else -math.log(1 - sigmoid(v)) for v in logits
    ) / len(logits)


def value_and_grads(loss, outputs, *options):
    """LOSS(*OUTPUTS, *OPTIONS) at known outputs (lists, as float64): its value and its gradient
    w.r.t. each list."""
    leaves = [torch.tensor(values, dtype=torch.float64, requires_grad=True) for values in outputs]
    value = loss(*leaves, *options)
    value.backward()
    return value.item(), *(leaf.grad.tolist() for leaf in leaves)


def small_networks(folder, channels=1, size=32, width=8):
    """A convolutional folder's G and D (or critic), seeded and initialised as its train.py does."""
    model = load_folder(folder).model
    torch.manual_seed(0)
    G = model.Generator(size, channels, width=width)
    D = (getattr(model, "Critic", None) or model.Discriminator)(size, channels, width=width)
    if folder != "SN-DCGAN":  # SN-DCGAN's networks initialise themselves
        G.apply(model.init_weights)
        D.apply(model.init_weights)
    return G, D


def assert_image_shapes(G, D, z, channels, size):
    """G(z) is a batch of tanh images of the size asked for, and D scores each with one number."""
    images = G(z)
    assert images.shape == (len(z), channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (len(z),)


def conv_sizes(G, D, z):
    """(module, input size, output size) of G's transposed convolutions, and of G's and D's
    convolutions, on D(G(z))."""
    seen = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
            m.register_forward_hook(
                lambda module, inp, out: seen.append((module, inp[0].shape[-1], out.shape[-1]))
            )
    D(G(z))
    return (
        [entry for entry in seen if isinstance(entry[0], nn.ConvTranspose2d)],
        [entry for entry in seen if isinstance(entry[0], nn.Conv2d)],
    )
