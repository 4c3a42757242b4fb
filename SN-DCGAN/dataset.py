"""Data for SN-DCGAN. The paper trains on CIFAR-10 and STL-10 at their own sizes (32x32 and
48x48, Table 3); its images go into D in the range of G's tanh, [-1, 1] (official code:
chainer-gan-lib common/dataset.py). MNIST and Fashion-MNIST are resized once from 28 to
32 px; CelebA and image folders are centre-cropped and resized.

The default is CIFAR-10, which torchvision downloads by itself; MNIST, Fashion-MNIST, CelebA
and any image folder are one flag away (no LSUN: the paper does not train on it). support.py
decodes each set once into a uint8 tensor, caches image files on disk, keeps the set where it
fits and feeds the batches.
"""
from torchvision.transforms import v2

import support
from support import DataError  # noqa: F401  (train.py reports it)

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder")
CHANNELS = support.CHANNELS


def prepare(image_size):
    """Image files (CelebA, folders): a centre square crop resized to image_size, as uint8 RGB. The in-memory
    sets are resized once to image_size (support.resize): 28 -> 32 px for MNIST; CIFAR-10 stays 32 px."""
    return v2.Compose([v2.PILToTensor(), v2.RGB(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def to_tanh_range(images):
    """uint8 pixels scaled to [-1, 1], the range of G's tanh (Table 3's output layer)."""
    return images.float().div_(127.5).sub_(1.0)


def load_images(name, root, image_size, cache_dir=None, download=True):
    """The training set of `name` as a uint8 tensor (N, C, image_size, image_size), decoded once."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return support.load_images(name, root, image_size, prepare(image_size), cache_dir, (), download)


def batches(images, batch_size, device, seed, data_on="auto"):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_tanh_range, data_on=data_on)
