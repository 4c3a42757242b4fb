"""Data for SN-DCGAN. The paper trains on CIFAR-10 and STL-10 at their own sizes (32x32 and
48x48, Table 3); its images go into D in the range of G's tanh, [-1, 1] (official code:
chainer-gan-lib common/dataset.py).

The default is CIFAR-10 at its own 32x32, which torchvision downloads by itself; MNIST,
Fashion-MNIST, CelebA and any image folder are one flag away (no LSUN: the paper does not train
on it). How images are brought to --image-size: MNIST, Fashion-MNIST (28 px) and CIFAR-10 are
read whole into memory (support.read_split) and resized here, once, by `resize` (bilinear with
antialiasing, rounded back to uint8; CIFAR-10 at 32 px is left as it is). CelebA and image
folders: each file is centre-cropped to a square and resized by `prepare` while
images.decode_once decodes the set once into a memory-mapped uint8 file.
"""

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
    """uint8 pixels scaled to [-1, 1], the range of G's tanh (Table 3's output layer)."""
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


def batches(images, batch_size, device, seed):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly
    (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_tanh_range)
