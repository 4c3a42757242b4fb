"""Data for DCGAN, prepared as §4 of the paper does: "no pre-processing was applied
to training images besides scaling to the range of the tanh activation function
[-1, 1]".

The paper trained on LSUN bedrooms (§4.1), faces scraped from the web (§4.2) and
ImageNet-1k at 32x32 (§4.3). The default here is CIFAR-10, which torchvision downloads
by itself, resized to the 64x64 of Fig. 1; MNIST, Fashion-MNIST, CelebA, LSUN and any
image folder are one flag away. support.py decodes each set once into a uint8 tensor,
caches image files on disk, keeps the set where it fits and feeds the batches.
"""
import torch
import torchvision
from torchvision.transforms import v2

import support
from support import DataError  # noqa: F401  (train.py reports it)

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder", "lsun")
CHANNELS = support.CHANNELS
# §4.1: the LSUN bedrooms, about 3 million images
LSUN_CLASSES = ("bedroom_train",)
LABELLED = support.TEST_SPLITS  # §5.1: the sets with labels and a test split here, for train.py --evaluate-features


def prepare(image_size):
    """Image files (CelebA, LSUN, folders): a centre square crop resized to image_size, as uint8 RGB. The
    in-memory sets (MNIST 28 px, CIFAR-10 32 px) are resized once to image_size (support.resize)."""
    return v2.Compose([v2.PILToTensor(), v2.RGB(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


def to_tanh_range(images):
    """§4: uint8 pixels scaled to [-1, 1], the range of G's tanh."""
    return images.float().div_(127.5).sub_(1.0)


def load_images(name, root, image_size, cache_dir=None, lsun_classes=LSUN_CLASSES, download=True):
    """The training set of `name` as a uint8 tensor (N, C, image_size, image_size), decoded once."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return support.load_images(name, root, image_size, prepare(image_size), cache_dir, lsun_classes, download)


def batches(images, batch_size, device, seed, data_on="auto"):
    """Endless minibatches in [-1, 1], a fresh permutation each epoch, resumable exactly (support.Batches)."""
    return support.Batches(images, batch_size, device, seed, scale=to_tanh_range, data_on=data_on)


def labelled_split(name, root, image_size, train=True):
    """§5.1: the training (or test) split of a labelled set as uint8 images (N, C, image_size, image_size) and
    their labels (N,), prepared as load_images prepares the training set."""
    if name in support.MNIST_CLASSES:
        images, labels = support.read_mnist(name, root, train)
        return support.resize(images[:, None], image_size), labels
    try:
        with support.no_new_folders_on_failure(root):
            data = torchvision.datasets.CIFAR10(root, train=train, download=True)
    except Exception as error:  # missing or corrupt files, or a failed download
        raise support.missing("cifar10", root, error) from None
    images = torch.as_tensor(data.data).permute(0, 3, 1, 2).contiguous()
    return support.resize(images, image_size), torch.as_tensor(data.targets)
