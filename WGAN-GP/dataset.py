"""Data for WGAN-GP, prepared as the official code does (gan_cifar.py): pixels scaled to
[-1, 1], the range of G's tanh, and nothing else.

Size: the paper trains on CIFAR-10 at its own 32x32 (§5.3, Fig. 3; gan_cifar.py), the default
here. How images are brought to --image-size: MNIST, Fashion-MNIST (28 px) and CIFAR-10 are
read whole into memory (support.read_split) and resized here, once, by `resize` (bilinear with
antialiasing, rounded back to uint8; CIFAR-10 at 32 px is left as it is). CelebA and image
folders: each file is centre-cropped to a square and resized by `prepare` while
images.decode_once decodes the set once into a memory-mapped uint8 file. --dataset lsun is
not offered in this folder.
"""

import math

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import images
import support
from support import DataError

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder")
CHANNELS = {"cifar10": 3, "mnist": 1, "fashion-mnist": 1, "celeba": 3, "folder": 3}
# read whole into memory by torchvision; the sets with a test split
IN_MEMORY = ("mnist", "fashion-mnist", "cifar10")
RESIZE_CHUNK = 4096  # images resized at a time, so memory stays flat


def resize(images, image_size):
    """uint8 (N, C, H, W) -> image_size, bilinear with antialiasing, rounded back to uint8;
    RESIZE_CHUNK images at a time; the images themselves when the size already matches."""
    if images.shape[-2:] == (image_size, image_size):
        return images
    out = torch.empty((*images.shape[:2], image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(images), RESIZE_CHUNK):
        part = images[start : start + RESIZE_CHUNK].float()
        part = F.interpolate(part, (image_size, image_size), mode="bilinear", antialias=True)
        out[start : start + RESIZE_CHUNK] = part.round().clamp(0, 255).to(torch.uint8)
    return out


def prepare(image_size):
    """Image files (CelebA, folders): a centre square crop resized to image_size, as uint8 RGB."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RGB(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def to_tanh_range(images):
    """Official code (gan_cifar.py): real_data = 2 * (x / 255 - 0.5), uint8 pixels in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def load_images(name, root, image_size, split="train", cache_dir=None, download=True):
    """The "train" (or "test") split of `name` as uint8 (N, C, image_size, image_size)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name in IN_MEMORY:
        stored, _ = support.read_split(name, root, train=split == "train", download=download)
        return resize(stored, image_size)
    if split != "train":
        raise DataError(f"{name} has no test split (those with one: {', '.join(IN_MEMORY)})")
    source = images.image_files(name, root, prepare(image_size), download=download)
    return images.decode_once(*source, image_size, cache_dir)


def run_images(run, download=True):
    """images(root, split) for a run's configuration (a dict): its set prepared as it trained."""

    def read(root, split):
        size, cache_dir = run["image_size"], run["cache_dir"]
        return load_images(run["dataset"], root, size, split, cache_dir, download)

    return read


def batches(images, batch_size, device, seed, split=None):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly
    (support.Batches); with `split` (see subset), the checkpoint records it too."""
    if split is None:
        return support.Batches(images, batch_size, device, seed, scale=to_tanh_range)
    return RecordedSplit(split, images, batch_size, device, seed, scale=to_tanh_range)


class RecordedSplit(support.Batches):
    """support.Batches whose state (in every checkpoint) also holds the subset and validation
    indices, as tensors."""

    def __init__(self, split, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.split = split

    def state_dict(self):
        return {**super().state_dict(), "split": self.split}


def subset(images, size, valid_size, seed, split=None):
    """§5.6: (a random `size`-image subset of the training set, up to valid_size held-out images
    of the rest in [-1, 1], the indices of both). The indices are the start of a permutation
    drawn from a generator of its own seeded by `seed` (the training's random streams are
    untouched), or `split` as a checkpoint recorded it."""
    if not 0 < size < len(images):
        raise DataError(
            f"--train-subset {size} must be between 1 and {len(images) - 1}: the training set "
            f"has {len(images)} images and the rest are held out for validation"
        )
    if split is None:
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        split = {"subset": order[:size], "valid": order[size : size + valid_size]}
    return images[split["subset"]], to_tanh_range(images[split["valid"]]), split


# The 2-D toy sets of §3 and Figure 1 (official code: gan_toy.py), each scaled to about unit
# standard deviation.
TOY_SETS = ("8gaussians", "25gaussians", "swissroll")


def toy_modes(name):
    """(mode centres (k, 2), standard deviation of each mode) after scaling; None for the roll."""
    if name == "8gaussians":
        # gan_toy.py: 2 times the 8 unit vectors at multiples of 45 degrees, std 0.02, all / 1.414
        angles = torch.arange(8) * math.pi / 4
        return 2 * torch.stack([angles.cos(), angles.sin()], 1) / 1.414, 0.02 / 1.414
    if name == "25gaussians":
        # gan_toy.py: a 5 x 5 grid at 2 * (-2, ..., 2), std 0.05, all divided by 2.828
        grid = 2 * torch.arange(-2, 3.0)
        return torch.cartesian_prod(grid, grid) / 2.828, 0.05 / 2.828
    return None


def sample_toy(name, n, generator):
    """n points of a toy set, drawn fresh from `generator` (gan_toy.py draws a new batch every
    step)."""
    if name == "swissroll":
        # gan_toy.py: sklearn's make_swiss_roll(noise=0.25), coordinates (x, z), / 7.5:
        # t = 1.5 pi (1 + 2u), (x, z) = (t cos t, t sin t) plus N(0, 0.25^2) noise on each
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
        noise = 0.25 * torch.randn(n, 2, generator=generator)
        roll = torch.stack([t * t.cos(), t * t.sin()], 1) + noise
        return roll / 7.5
    centres, std = toy_modes(name)
    # a mode picked uniformly for each point (random.choice in gan_toy.py), plus its noise
    picked = torch.randint(len(centres), (n,), generator=generator)
    return centres[picked] + std * torch.randn(n, 2, generator=generator)
