"""Data for the conditional GAN, prepared as §4.1 of the paper does: MNIST images with
pixels in [0, 1] (the range of G's sigmoid output) and their class labels as one-hot y.

The split is the GAN paper's (official code, mnist.yaml): train[0:50000] for training,
train[50000:60000] for validation (there, the Parzen window's sigma is chosen), and the
10,000 test images for the reported log-likelihood.

Fast path: a split is decoded once into a uint8 image tensor (N, 1, H, W) and an int64
label tensor (N,), both kept on the training device. Batches are drawn by a fresh
permutation each epoch and scaled on the device, so the training loop does no per-image work.
"""

import torch
import torch.nn.functional as F
import torchvision

from model import CLASSES, one_hot

DATASETS = ("mnist", "fashion-mnist")
VALID_SIZE = 10_000  # official GAN code, mnist.yaml: train[50000:60000] is the validation split

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


def load_labelled(name, root, image_size, train=True, download=True):
    """The training (or test) set of `name`: uint8 images (N, 1, image_size, image_size) and labels (N,)."""
    if name not in TORCHVISION_CLASSES:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        data = TORCHVISION_CLASSES[name](root, train=train, download=download)
    except Exception as error:  # missing or corrupt files, or a failed download
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        expected = EXPECTED_FILES[name].format(prefix="train" if train else "t10k")
        raise DataError(
            f"{name} is not readable under {root} ({reason}); expected {expected} there. "
            f"Download it on a machine with network access, or point --data-root at a folder that has it.") from None
    return resize(torch.as_tensor(data.data).unsqueeze(1), image_size), torch.as_tensor(data.targets).long()


def split_validation(images, labels, valid_size=VALID_SIZE):
    """The first N - valid_size examples for training, the last valid_size for validation (50,000 / 10,000)."""
    if not 0 < valid_size < len(images):
        raise DataError(f"--valid-size {valid_size} must be between 1 and the {len(images)} training images minus one")
    cut = len(images) - valid_size
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def resize(images, image_size, chunk=4096):
    """Resize a uint8 tensor once, in chunks to bound memory; MNIST's own 28x28 is left as it is."""
    if images.shape[-1] == image_size:
        return images
    out = torch.empty((*images.shape[:2], image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(image_size, image_size), mode="bilinear", antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def to_unit(images):
    """§4.1: pixels in [0, 1], the range of G's sigmoid output."""
    return images.float().div_(255.0)


class Batches:
    """Endless minibatches (x, y) of uint8 images and their labels kept on `device`.

    x is scaled there to [0, 1]; y is the one-hot label (§4.1). Each epoch visits the data
    in a new random order, drawn from a generator seeded by (seed, epoch), so a resumed run
    draws exactly the batches the uninterrupted run would have. The incomplete last batch
    of an epoch is dropped.
    """

    def __init__(self, images, labels, batch_size, device, seed):
        if not 0 < batch_size <= len(images):
            raise DataError(f"--batch-size {batch_size} must be between 1 and the data set's {len(images)} images")
        self.images = images.to(device)
        self.labels = labels.to(device)
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
        return to_unit(self.images[picked]), one_hot(self.labels[picked], CLASSES)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
