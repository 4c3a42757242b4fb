"""Data for the conditional GAN, prepared as §4.1 of the paper does: MNIST images with
pixels in [0, 1] (the range of G's sigmoid output) and their class labels y.

The split is the GAN paper's (official code, mnist.yaml): train[0:50000] for training,
train[50000:60000] for validation (there, the Parzen window's sigma is chosen), and the
10,000 test images for the reported log-likelihood.

support.py reads MNIST's files once into a uint8 image tensor (N, 1, H, W) and an int64
label tensor (N,), keeps both on the training device and feeds the batches (x, y), x scaled
there by `to_unit`; train.py turns y into §4.1's one-hot vector.
"""
import support
from support import DataError

DATASETS = ("mnist", "fashion-mnist")
VALID_SIZE = 10_000  # official GAN code, mnist.yaml: train[50000:60000] is the validation split


def load_labelled(name, root, image_size, train=True, download=True):
    """The training (or test) set of `name`: uint8 images (N, 1, image_size, image_size) and labels (N,)."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    images, labels = support.read_mnist(name, root, train=train, download=download)
    return support.resize(images.unsqueeze(1), image_size), labels


def split_validation(images, labels, valid_size=VALID_SIZE):
    """The first N - valid_size examples for training, the last valid_size for validation (50,000 / 10,000)."""
    if not 0 < valid_size < len(images):
        raise DataError(f"--valid-size {valid_size} must be between 1 and the {len(images)} training images minus one")
    cut = len(images) - valid_size
    return (images[:cut], labels[:cut]), (images[cut:], labels[cut:])


def to_unit(images):
    """§4.1: uint8 pixels / 255, in [0, 1], the range of G's sigmoid output."""
    return images.float().div_(255.0)


def batches(images, labels, batch_size, device, seed):
    """Endless minibatches (x in [0, 1], label y) on the device, a fresh permutation each epoch, resumable
    exactly (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_unit, labels=labels)
