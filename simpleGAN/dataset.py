"""Data for the GAN of Goodfellow et al. (2014), prepared as its MNIST experiment did.

The official code (goodfeli/adversarial, mnist.yaml) trains on MNIST train[0:50000],
keeps train[50000:60000] as the validation split (where the Parzen bandwidth sigma is
chosen, §5) and scores the 10,000 test images. Pixels are the raw intensities divided
by 255, in [0, 1]: the range of G's sigmoid output. No other pre-processing.

Fast path: a split is decoded once into a uint8 tensor (N, 1, 28, 28) that lives on
the training device. Batches are drawn by a fresh permutation each epoch and scaled on
the device, so the training loop does no per-image work.
"""
import contextlib
import gzip
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch
import torchvision

DATASETS = ("mnist", "fashion-mnist")
CHANNELS = 1
IMAGE_SIZE = 28
SPLITS = ("train", "valid", "test")
# official code, mnist.yaml: train = MNIST 'train' [0, 50000), valid = 'train' [50000, 60000):
# the last sixth of the training file is held out (smaller test copies are split the same way)
VALID_FRACTION = 1 / 6


# >>> copied: mnist-files >>>
class DataError(Exception):
    """A problem with the data that the user can fix: train.py prints it and exits with code 2."""


MNIST_CLASSES = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}


def read_mnist(name, root, train=True, download=True):
    """The training (or test) images (N, 28, 28) and labels (N,) of MNIST or Fashion-MNIST under `root`.

    torchvision's readers parse ROOT/MNIST/raw/*-ubyte (FashionMNIST/raw/ for Fashion-MNIST),
    plain or gzipped. A file that is there is used whenever it parses, whatever its checksum
    (some distributions repack the archives); files that are not there are downloaded when
    `download` is set. Every problem is a DataError naming the file.
    """
    folder = Path(root) / MNIST_CLASSES[name].__name__ / "raw"
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    absent = [folder / stem for stem in stems if not idx_file(folder, stem).is_file()]
    if absent:
        download_mnist(name, root, train, absent, download)
    unpack_beside(folder, name)
    image_file, label_file = (idx_file(folder, stem) for stem in stems)
    images = read_idx(image_file, torchvision.datasets.mnist.read_image_file, "image")
    labels = read_idx(label_file, torchvision.datasets.mnist.read_label_file, "label")
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, not MNIST's 28x28")
    if len(labels) != len(images):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels; "
                        f"one of the two files is damaged")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{label_file} holds labels above 9: it is not an MNIST label file")
    return images, labels.long()


def idx_file(folder, stem):
    """The IDX file `stem` in `folder`: the plain file when there is one, else the gzipped one."""
    plain = folder / stem
    return plain if plain.is_file() else folder / f"{stem}.gz"


def unpack_beside(folder, name):
    """Unpack the gzipped files next to themselves, as torchvision does after a download. A read-only
    folder or a damaged archive is left as it is: read_idx then unpacks to a temporary folder, or names it."""
    for archive, _ in MNIST_CLASSES[name].resources:
        packed, plain = folder / archive, folder / archive.removesuffix(".gz")
        if packed.is_file() and not plain.exists():
            temporary = plain.with_suffix(".tmp")
            try:
                with gzip.open(packed) as source, open(temporary, "wb") as target:
                    shutil.copyfileobj(source, target)
                os.replace(temporary, plain)
            except (OSError, EOFError, zlib.error):
                temporary.unlink(missing_ok=True)


def read_idx(path, reader, kind):
    """One IDX file parsed by torchvision's `reader`; a gzipped file is unpacked to a temporary folder first."""
    with tempfile.TemporaryDirectory() as scratch:
        source = path
        if path.suffix == ".gz":
            try:
                data = gzip.decompress(path.read_bytes())
            except (OSError, EOFError, zlib.error) as error:  # unreadable, not gzip, or cut short
                raise DataError(f"{path} is not a readable gzip file ({reason(error)}); replace it") from None
            source = Path(scratch) / path.stem
            source.write_bytes(data)
        try:
            return reader(str(source))
        except OSError as error:
            raise DataError(f"{path} cannot be read ({reason(error)})") from None
        except Exception as error:  # torchvision's parser stops with an assertion, a type or a shape error
            raise DataError(f"{path} is not an MNIST {kind} file in IDX format ({reason(error)}); "
                            f"replace it") from None


def download_mnist(name, root, train, absent, download):
    """torchvision's download of the files in `absent`; a failed one leaves no new folder behind."""
    wanted = " and ".join(f"{path}(.gz)" for path in absent)
    if not download:
        raise DataError(f"{name}: {wanted} not found; point --data-root at a folder that has it")
    try:
        with no_new_folders_on_failure(absent[0].parent):
            MNIST_CLASSES[name](root, train=train, download=True)
    except Exception as error:  # offline, blocked, or refused by the server
        raise DataError(f"{name}: {wanted} not found, and downloading it failed ({reason(error)}); download it "
                        f"on a machine with network access, or point --data-root at a folder that has it") from None


@contextlib.contextmanager
def no_new_folders_on_failure(folder):
    """Remove the folders on the way to `folder` that an attempt created, if it fails: a mistyped
    --data-root is not left behind as an empty tree."""
    folder = Path(folder).absolute()
    new = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield
    except BaseException:
        if new:
            shutil.rmtree(new[-1], ignore_errors=True)
        raise


def reason(error):
    """The line of an error's message that says what went wrong (its last), or the error's type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__
# <<< copied: mnist-files <<<


def load_images(name, root, split="train", download=True):
    """One split of `name` as a uint8 tensor (N, 1, 28, 28): 'train', 'valid' or 'test'."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    data = read_mnist(name, root, train=split != "test", download=download)[0]
    if split != "test":
        cut = len(data) - round(len(data) * VALID_FRACTION)  # 50000 for MNIST's 60000
        data = data[:cut] if split == "train" else data[cut:]
    return data.unsqueeze(1).contiguous()


def to_unit_range(images):
    """uint8 pixels -> [0, 1] floats, as the official code's MNIST (intensity / 255)."""
    return images.float().div_(255.0)


def pixel_means(images):
    """The mean of every pixel over a uint8 image tensor, in [0, 1]: the data's marginals."""
    return images.double().mean(0).div(255.0).float()


class Batches:
    """Endless minibatches of a uint8 image tensor kept on `device`, scaled there to [0, 1].

    Each epoch visits the data in a new random order, drawn from a generator seeded by
    (seed, epoch), so a resumed run draws exactly the batches the uninterrupted run
    would have. The incomplete last batch of an epoch is dropped.
    """

    def __init__(self, images, batch_size, device, seed):
        if not 0 < batch_size <= len(images):
            raise DataError(f"--batch-size {batch_size} must be between 1 and the data set's {len(images)} images")
        self.images = images.to(device)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(images) // batch_size
        self.epoch, self.index = 0, 0
        self.order, self.order_epoch = None, None

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.order_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self.order = torch.randperm(len(self.images), generator=generator).to(self.images.device)
            self.order_epoch = self.epoch
        picked = self.order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        # §5 / official code: pixels in [0, 1], the range of G's sigmoid
        return to_unit_range(self.images[picked])

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
