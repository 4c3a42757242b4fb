"""Data for LSGAN, prepared as the official code prepares LSUN (lsun.py, convert_lsun.py):
every image resized once to the network's size (112x112 for the scenes) and scaled to
[-1, 1], the range of G's tanh; the paper describes no other pre-processing. Image folders,
CelebA and LSUN are centre-cropped to squares before the resize (the official code squashes
the whole image to a square instead).

The paper trained on five LSUN scene sets (§4.1) and on handwritten Chinese characters
(HWDB1.0). The default here is CIFAR-10, which torchvision downloads by itself, at its
own 32x32; MNIST, Fashion-MNIST, CelebA, LSUN and any image folder are one flag away.
support.py decodes each set once into a uint8 tensor, caches image files on disk, keeps the
set where it fits and feeds the batches.
"""
import math

import torch
from torchvision.transforms import v2

import support
from support import DataError  # noqa: F401  (train.py reports it)

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder", "lsun")
CHANNELS = support.CHANNELS
# abstract: "five scene datasets", one model each; official code (convert_lsun.py): bedrooms
LSUN_CLASSES = ("bedroom_train",)


def prepare(image_size):
    """Image files (CelebA, LSUN, folders): a centre square crop resized to image_size, as uint8 RGB. The
    in-memory sets are resized once to image_size (support.resize): 28 -> 32 px for MNIST, 32 -> 112 for
    CIFAR-10."""
    return v2.Compose([v2.PILToTensor(), v2.RGB(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def to_tanh_range(images):
    """Official code (lsun.py): uint8 pixels scaled to [-1, 1], the range of G's tanh."""
    return images.float().div_(127.5).sub_(1.0)


def load_images(name, root, image_size, cache_dir=None, lsun_classes=LSUN_CLASSES, download=True):
    """The training set of `name` as a uint8 tensor (N, C, image_size, image_size), decoded once."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return support.load_images(name, root, image_size, prepare(image_size), cache_dir, lsun_classes, download)


def batches(images, batch_size, device, seed, data_on="auto"):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_tanh_range, data_on=data_on)


# §4's stability comparison on a Gaussian mixture: 8 two-dimensional Gaussians, their centres evenly spaced on a
# circle of radius 2, each with standard deviation 0.02 (the paper shows the layout; the numbers are this folder's)
MIXTURE_RADIUS, MIXTURE_STD = 2.0, 0.02


def mixture_centres(modes=8):
    """The centres (modes, 2): evenly spaced on the circle of radius MIXTURE_RADIUS."""
    angles = torch.arange(modes) * 2 * math.pi / modes
    return MIXTURE_RADIUS * torch.stack([angles.cos(), angles.sin()], 1)


def sample_mixture(n, generator):
    """n points of the mixture, drawn fresh from `generator`: a mode picked uniformly, plus its Gaussian noise."""
    centres = mixture_centres()
    return centres[torch.randint(len(centres), (n,), generator=generator)] + MIXTURE_STD * torch.randn(
        n, 2, generator=generator)
