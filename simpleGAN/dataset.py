"""Data for the GAN of Goodfellow et al. (2014), prepared as its MNIST experiment did.

The official code (goodfeli/adversarial, mnist.yaml) trains on MNIST train[0:50000],
keeps train[50000:60000] as the validation split (where the Parzen bandwidth sigma is
chosen, §5) and scores the 10,000 test images. Pixels are the raw intensities divided
by 255, in [0, 1]: the range of G's sigmoid output. No other pre-processing.

Fast path: a split is decoded once into a uint8 tensor (N, 1, 28, 28) that lives on
the training device. Batches are drawn by a fresh permutation each epoch and scaled on
the device, so the training loop does no per-image work.
"""
from pathlib import Path

import torch
import torchvision

DATASETS = ("mnist", "fashion-mnist")
CHANNELS = 1
IMAGE_SIZE = 28
SPLITS = ("train", "valid", "test")
# official code, mnist.yaml: train = MNIST 'train' [0, 50000), valid = 'train' [50000, 60000):
# the last sixth of the training file is held out (smaller test copies are split the same way)
VALID_FRACTION = 1 / 6

# What torchvision reads under --data-root, named in the error when it is missing.
EXPECTED_FILES = {
    "mnist": "MNIST/raw/{prefix}-images-idx3-ubyte(.gz) and {prefix}-labels-idx1-ubyte(.gz)",
    "fashion-mnist": "FashionMNIST/raw/{prefix}-images-idx3-ubyte(.gz) and {prefix}-labels-idx1-ubyte(.gz)",
}
TORCHVISION_CLASSES = {
    "mnist": torchvision.datasets.MNIST,
    "fashion-mnist": torchvision.datasets.FashionMNIST,
}


class DataError(Exception):
    """A problem with the data that the user can fix: train.py prints it and exits with code 2."""


def load_images(name, root, split="train", download=True):
    """One split of `name` as a uint8 tensor (N, 1, 28, 28): 'train', 'valid' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in TORCHVISION_CLASSES:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    train = split != "test"
    root = Path(root)
    try:
        data = torch.as_tensor(TORCHVISION_CLASSES[name](root, train=train, download=download).data)
    except Exception as error:  # missing or corrupt files, or a failed download
        raise missing(name, root, train, error) from None
    if train:
        cut = len(data) - round(len(data) * VALID_FRACTION)  # 50000 for MNIST's 60000
        data = data[:cut] if split == "train" else data[cut:]
    return data.unsqueeze(1).contiguous()


def missing(name, root, train, error):
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    expected = EXPECTED_FILES[name].format(prefix="train" if train else "t10k")
    return DataError(
        f"{name} is not readable under {root} ({reason}); expected {expected} there. "
        f"Download it on a machine with network access, or point --data-root at a folder that has it.")


def to_unit_range(images):
    """uint8 pixels -> [0, 1] floats, as the official code's MNIST (intensity / 255)."""
    return images.float().div_(255.0)


def pixel_means(images):
    """The mean of every pixel over a uint8 image tensor, in [0, 1]: the data's marginals."""
    return images.double().mean(0).div(255.0).float()


class Batches:
    """Endless minibatches of a uint8 image tensor kept on `device`, scaled there to [0, 1].

    Each epoch visits the data in a new random order, drawn from a generator seeded by
    (seed, epoch), so a resumed run draws exactly the batches the uninterrupted run
    would have. The incomplete last batch of an epoch is dropped.
    """

    def __init__(self, images, batch_size, device, seed):
        if not 0 < batch_size <= len(images):
            raise DataError(f"--batch-size {batch_size} must be between 1 and the data set's {len(images)} images")
        self.images = images.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(images) // batch_size
        self.epoch, self.index = 0, 0
        self.order, self.order_epoch = None, None

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self.order = torch.randperm(len(self.images), generator=generator).to(self.images.device)
            self.order_epoch = self.epoch
        picked = self.order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        # §5 / official code: pixels in [0, 1], the range of G's sigmoid
        return to_unit_range(self.images[picked])

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
