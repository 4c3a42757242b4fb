"""Data for DCGAN, prepared as §4 of the paper does: "no pre-processing was applied to training
images besides scaling to the range of the tanh activation function [-1, 1]".

The paper trained on LSUN bedrooms (§4.1), faces scraped from the web (§4.2) and ImageNet-1k at
32x32 (§4.3). Here, each set reaches --image-size (64 px by default, Fig. 1) as follows:
    CIFAR-10 (the default, downloaded by torchvision), bilinear from 32 px to 64 px (`resize`)
    MNIST and Fashion-MNIST, bilinear from 28 px (`resize`)
    CelebA, LSUN and image folders: a centre square crop, resized as it is decoded (`prepare`)
support.py reads the sets and feeds the batches; images.py decodes image files once into a cache.
"""

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

import images
import support
from support import DataError

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder", "lsun")
CHANNELS = {"cifar10": 3, "mnist": 1, "fashion-mnist": 1, "celeba": 3, "folder": 3, "lsun": 3}
# §4.1: the LSUN bedrooms, about 3 million images
LSUN_CLASSES = ("bedroom_train",)
# read whole by torchvision, with labels and a test split (§5.1 classifies them)
LABELLED = ("mnist", "fashion-mnist", "cifar10")
RESIZE_CHUNK = 4096  # images resized at a time, so the float copy stays small


def prepare(image_size):
    """Image files (CelebA, LSUN, folders): a centre square crop at image_size, as uint8 RGB."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.RGB(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
        ]
    )


def resize(pixels, image_size):
    """uint8 (N, C, H, W) -> image_size, bilinear with antialiasing, rounded back to uint8; a no-op
    when the size already matches."""
    if pixels.shape[-2:] == (image_size, image_size):
        return pixels
    out = torch.empty((*pixels.shape[:2], image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(pixels), RESIZE_CHUNK):
        part = pixels[start : start + RESIZE_CHUNK].float()
        part = F.interpolate(part, (image_size, image_size), mode="bilinear", antialias=True)
        out[start : start + RESIZE_CHUNK] = part.round().clamp(0, 255).to(torch.uint8)
    return out


def to_tanh_range(pixels):
    """§4: uint8 pixels scaled to [-1, 1], the range of G's tanh."""
    return pixels.float().div_(127.5).sub_(1.0)


def read_labelled(name, root, image_size, split="train", download=True):
    """The `split` ("train" or "test") of MNIST, Fashion-MNIST or CIFAR-10: uint8 images resized
    to image_size, and their labels."""
    pixels, labels = support.read_split(name, root, train=split == "train", download=download)
    return resize(pixels, image_size), labels


def load_images(
    name,
    root,
    image_size,
    split="train",
    cache_dir=None,
    lsun_classes=LSUN_CLASSES,
    download=True,
):
    """The `split` ("train", or "test" for the LABELLED sets) of `name` as uint8 (N, C,
    image_size, image_size); image files are decoded once into a memory-mapped cache."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name in LABELLED:
        return read_labelled(name, root, image_size, split, download)[0]
    if split != "train":
        raise DataError(f"{name} has no test split (those with one: {', '.join(LABELLED)})")
    source = images.image_files(name, root, prepare(image_size), lsun_classes, download)
    return images.decode_once(*source, image_size, cache_dir)


def run_images(run, download=True):
    """images(root, split) for a run's configuration (a dict): its set, prepared as it trained."""

    def split_images(root, split):
        size, cache_dir, classes = run["image_size"], run["cache_dir"], run["lsun_classes"]
        return load_images(run["dataset"], root, size, split, cache_dir, classes, download)

    return split_images


def batches(training_set, batch_size, device, seed):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly."""
    return support.Batches(training_set, batch_size, device, seed, scale=to_tanh_range)
