"""Data for LSGAN, prepared as the official code prepares LSUN (lsun.py, convert_lsun.py):
every image resized once to the network's size and scaled to [-1, 1], the range of G's tanh;
the paper describes no other pre-processing.

Size: the paper trained its scene network at 112x112 on five LSUN scene sets (§4.1) and also
trained on handwritten Chinese characters (HWDB1.0). The default here is CIFAR-10, which
torchvision downloads by itself, at its own 32x32; MNIST, Fashion-MNIST, CelebA, LSUN and any
image folder are one flag away. How images are brought to --image-size: MNIST, Fashion-MNIST
(28 px) and CIFAR-10 (32 px) are read whole into memory (support.read_split) and resized here,
once, by `resize` (bilinear with antialiasing, rounded back to uint8). Image folders, CelebA and
LSUN: each file is centre-cropped to a square and resized by `prepare` (the official code
squashes the whole image to a square instead) while images.decode_once decodes the set once
into a memory-mapped uint8 file.
"""

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import images
import support
from support import DataError

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder", "lsun")
CHANNELS = {"cifar10": 3, "mnist": 1, "fashion-mnist": 1, "celeba": 3, "folder": 3, "lsun": 3}
# read whole into memory by torchvision; the sets with a test split
IN_MEMORY = ("mnist", "fashion-mnist", "cifar10")
RESIZE_CHUNK = 4096  # images resized at a time, so memory stays flat
# abstract: "five scene datasets", one model each; official code (convert_lsun.py): bedrooms
LSUN_CLASSES = ("bedroom_train",)


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
    """Image files (CelebA, LSUN, folders): a centre square crop resized to image_size, as
    uint8 RGB."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RGB(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def to_tanh_range(images):
    """Official code (lsun.py): uint8 pixels scaled to [-1, 1], the range of G's tanh."""
    return images.float().div_(127.5).sub_(1.0)


def load_images(
    name, root, image_size, split="train", cache_dir=None, lsun_classes=LSUN_CLASSES, download=True
):
    """The "train" (or "test") split of `name` as uint8 (N, C, image_size, image_size)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name in IN_MEMORY:
        stored, _ = support.read_split(name, root, train=split == "train", download=download)
        return resize(stored, image_size)
    if split != "train":
        raise DataError(f"{name} has no test split (those with one: {', '.join(IN_MEMORY)})")
    source = images.image_files(name, root, prepare(image_size), lsun_classes, download)
    return images.decode_once(*source, image_size, cache_dir)


def run_images(run, download=True):
    """images(root, split) for a run's configuration (a dict): its set prepared as it trained."""

    def read(root, split):
        size, cache_dir, classes = run["image_size"], run["cache_dir"], run["lsun_classes"]
        return load_images(run["dataset"], root, size, split, cache_dir, classes, download)

    return read


def batches(images, batch_size, device, seed):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly
    (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_tanh_range)
