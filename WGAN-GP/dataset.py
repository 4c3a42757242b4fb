"""Data for WGAN-GP, prepared as the official code does (gan_cifar.py): pixels scaled to
[-1, 1], the range of G's tanh, and nothing else.

The default is CIFAR-10 at its own 32x32, as gan_cifar.py trains (§5.3, Fig. 3); MNIST and
Fashion-MNIST are resized once from 28 to 32 px; CelebA and image folders are centre-cropped
and resized. --dataset lsun is not offered in this folder. support.py decodes each set once
into a uint8 tensor, caches image files on disk, keeps the set where it fits and feeds the
batches.
"""
import math

import torch
from torchvision.transforms import v2

import support
from support import DataError  # noqa: F401  (train.py reports it)

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder")
CHANNELS = support.CHANNELS


def prepare(image_size):
    """Image files (CelebA, folders): a centre square crop resized to image_size, as uint8 RGB. The in-memory
    sets (MNIST 28 px; CIFAR-10 stays 32 px) are resized once to image_size (support.resize)."""
    return v2.Compose([v2.PILToTensor(), v2.RGB(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def to_tanh_range(images):
    """Official code (gan_cifar.py): real_data = 2 * (x / 255 - 0.5), uint8 pixels in [-1, 1] like G's tanh."""
    return images.float().div_(127.5).sub_(1.0)


def load_images(name, root, image_size, cache_dir=None, download=True):
    """The training set of `name` as a uint8 tensor (N, C, image_size, image_size), decoded once."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return support.load_images(name, root, image_size, prepare(image_size), cache_dir, download=download)


def batches(images, batch_size, device, seed, data_on="auto", split=None):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly (support.Batches); with
    `split` (see subset), the checkpoint records it beside the batch position."""
    if split is None:
        return support.Batches(images, batch_size, device, seed, scale=to_tanh_range, data_on=data_on)
    return RecordedSplit(split, images, batch_size, device, seed, scale=to_tanh_range, data_on=data_on)


class RecordedSplit(support.Batches):
    """support.Batches whose state (saved in every checkpoint) also holds the subset and validation indices."""

    def __init__(self, split, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split = split

    def state_dict(self):
        return {**super().state_dict(), "split": self.split}


def subset(images, size, valid_size, seed, split=None):
    """§5.6: (a random `size`-image subset of the training set, up to valid_size held-out images of the rest in
    [-1, 1], the indices of both). The indices are the start of a permutation drawn from a generator of its own
    seeded by `seed` (the training's random streams are untouched), or `split` as a checkpoint recorded it."""
    if not 0 < size < len(images):
        raise DataError(f"--train-subset {size} must be between 1 and {len(images) - 1}: the training set has "
                        f"{len(images)} images and the rest are held out for validation")
    if split is None:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        split = {"subset": order[:size], "valid": order[size:size + valid_size]}
    return images[split["subset"]], to_tanh_range(images[split["valid"]]), split


# The 2-D toy sets of §3 and Figure 1 (official code: gan_toy.py), each scaled to about unit standard deviation.
TOY_SETS = ("8gaussians", "25gaussians", "swissroll")


def toy_modes(name):
    """(mode centres (k, 2), standard deviation of each mode) after scaling; None for the Swiss roll."""
    if name == "8gaussians":
        # gan_toy.py: scale 2 times the 8 unit vectors at multiples of 45 degrees, std 0.02, all divided by 1.414
        angles = torch.arange(8) * math.pi / 4
        return 2 * torch.stack([angles.cos(), angles.sin()], 1) / 1.414, 0.02 / 1.414
    if name == "25gaussians":
        # gan_toy.py: a 5 x 5 grid at 2 * (-2, ..., 2), std 0.05, all divided by 2.828
        grid = 2 * torch.arange(-2, 3.0)
        return torch.cartesian_prod(grid, grid) / 2.828, 0.05 / 2.828
    return None


def sample_toy(name, n, generator):
    """n points of a toy set, drawn fresh from `generator` (gan_toy.py draws a new batch every step)."""
    if name == "swissroll":
        # gan_toy.py: sklearn's make_swiss_roll(noise=0.25), coordinates (x, z), divided by 7.5:
        # t = 1.5 pi (1 + 2u), (x, z) = (t cos t, t sin t) plus N(0, 0.25^2) noise on each
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        roll = torch.stack([t * t.cos(), t * t.sin()], 1) + 0.25 * torch.randn(n, 2, generator=generator)
        return roll / 7.5
    centres, std = toy_modes(name)
    # a mode picked uniformly for each point (random.choice in gan_toy.py), plus its Gaussian noise
    picked = torch.randint(len(centres), (n,), generator=generator)
    return centres[picked] + std * torch.randn(n, 2, generator=generator)
