"""Data for the conditional GAN, prepared as §4.1 of the paper does: MNIST images with
pixels in [0, 1] (the range of G's sigmoid output) and their class labels y.

The split is the GAN paper's (official code, mnist.yaml): train[0:50000] for training,
train[50000:60000] for validation (there, the Parzen window's sigma is chosen), and the
10,000 test images for the reported log-likelihood. The images stay MNIST's 28x28 (§4.1's
784-dimensional samples): nothing is resized.

support.read_split reads MNIST's files into a uint8 image tensor (N, 1, 28, 28) and an int64
label tensor (N,); support.Batches keeps both on the training device and feeds the batches
(x, y), x scaled there by `to_unit`; train.py turns y into §4.1's one-hot vector.
"""

import support
from support import DataError

DATASETS = ("mnist", "fashion-mnist")
SPLITS = ("train", "valid", "test")
VALID_SIZE = 10_000  # official GAN code, mnist.yaml: train[50000:60000] is the validation split


def load_labelled(name, root, split="train", valid_size=VALID_SIZE, download=True):
    """One split of `name`: uint8 images (N, 1, 28, 28) and labels (N,). 'train' is the training
    file but its last `valid_size` examples, 'valid' those (50,000 / 10,000), 'test' the test
    file."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    images, labels = support.read_split(name, root, train=split != "test", download=download)
    if split == "test":
        return images, labels
    if not 0 < valid_size < len(images):
        raise DataError(
            f"--valid-size {valid_size} must lie between 1 and the {len(images)} training images "
            f"minus one"
        )
    cut = len(images) - valid_size
    return (images[:cut], labels[:cut]) if split == "train" else (images[cut:], labels[cut:])


def to_unit(images):
    """§4.1: uint8 pixels / 255, in [0, 1], the range of G's sigmoid output."""
    return images.float().div_(255.0)


def batches(images, labels, batch_size, device, seed):
    """Endless minibatches (x in [0, 1], label y) on the device, a fresh permutation each epoch,
    resumable exactly (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_unit, labels=labels)


def evaluation_data(name, root, valid_size, device):
    """The validation split and the test set: images in [0, 1] and labels, on the device."""
    splits = [load_labelled(name, root, split, valid_size) for split in ("valid", "test")]
    return [(to_unit(x.to(device)), y.to(device)) for x, y in splits]
