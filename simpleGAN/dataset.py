"""Data for the GAN of Goodfellow et al. (2014), prepared as its MNIST experiment did.

The official code (goodfeli/adversarial, mnist.yaml) trains on MNIST train[0:50000],
keeps train[50000:60000] as the validation split (where the Parzen bandwidth sigma is
chosen, §5) and scores the 10,000 test images. Pixels are the raw intensities divided
by 255, in [0, 1]: the range of G's sigmoid output. No other pre-processing: the images
stay MNIST's 28x28, nothing is resized.

support.read_split reads MNIST's files into a uint8 tensor (N, 1, 28, 28); support.Batches
keeps it on the training device and feeds the batches, scaled there by `to_unit_range`.
"""

import support
from support import DataError  # noqa: F401  (train.py reports it)

DATASETS = ("mnist", "fashion-mnist")
IMAGE_SIZE = 28  # §5: MNIST as stored
SPLITS = ("train", "valid", "test")
# official code, mnist.yaml: train = MNIST 'train' [0, 50000), valid = 'train' [50000, 60000):
# the last sixth of the training file is held out (smaller test copies are split the same way)
VALID_FRACTION = 1 / 6


def load_images(name, root, split="train", download=True):
    """One split of `name` as a uint8 tensor (N, 1, 28, 28): 'train', 'valid' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    images = support.read_split(name, root, train=split != "test", download=download)[0]
    if split != "test":
        cut = len(images) - round(len(images) * VALID_FRACTION)  # 50000 for MNIST's 60000
        images = images[:cut] if split == "train" else images[cut:]
    return images


def to_unit_range(images):
    """§5 / official code: uint8 pixels / 255, in [0, 1], the range of G's sigmoid."""
    return images.float().div_(255.0)


def pixel_means(images):
    """The mean of every pixel over a uint8 image tensor, in [0, 1]: the data's marginals."""
    return images.double().mean(0).div(255.0).float()


def batches(images, batch_size, device, seed):
    """Endless minibatches in [0, 1] on the device, a fresh permutation each epoch, resumable
    exactly (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_unit_range)


def evaluation_images(name, root, device):
    """The validation split (train[50000:60000]) and the test set, in [0, 1], on the device."""
    return [to_unit_range(load_images(name, root, split).to(device)) for split in ("valid", "test")]
