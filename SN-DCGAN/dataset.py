"""Data for SN-DCGAN. The paper trains on CIFAR-10 and STL-10 at their own sizes (32x32 and
48x48, Table 3); its images go into D in the range of G's tanh, [-1, 1] (official code:
chainer-gan-lib common/dataset.py). MNIST and Fashion-MNIST are resized once from 28 to
32 px; CelebA and image folders are centre-cropped and resized.

Fast path: a data set is decoded once into a uint8 tensor (N, C, H, W) that lives
on the training device. Batches are drawn by a fresh permutation each epoch and
scaled on the device, so the training loop does no per-image work. Image folders
(and CelebA) are decoded in parallel once, with a progress bar, and cached on disk.
"""
import hashlib
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader
from torchvision.transforms import v2
from tqdm import tqdm

DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder")
CHANNELS = {"cifar10": 3, "mnist": 1, "fashion-mnist": 1, "celeba": 3, "folder": 3}

# What torchvision reads under --data-root, named in the error when it is missing.
EXPECTED_FILES = {
    "mnist": "MNIST/raw/train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)",
    "fashion-mnist": "FashionMNIST/raw/train-images-idx3-ubyte(.gz) and train-labels-idx1-ubyte(.gz)",
    "cifar10": "cifar-10-batches-py/ (or cifar-10-python.tar.gz)",
    "celeba": "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt",
}
TORCHVISION_CLASSES = {
    "mnist": torchvision.datasets.MNIST,
    "fashion-mnist": torchvision.datasets.FashionMNIST,
    "cifar10": torchvision.datasets.CIFAR10,
}


class DataError(Exception):
    """A problem with the data that the user can fix: train.py prints it and exits with code 2."""


def load_images(name, root, image_size, download=True):
    """The whole training set of `name` as a uint8 tensor (N, C, image_size, image_size)."""
    root = Path(root)
    if name in TORCHVISION_CLASSES:
        return resize(decoded_tensor(name, root, download), image_size)
    if name == "celeba":
        try:
            celeba = torchvision.datasets.CelebA(
                root, split="all", target_type=[], transform=square(image_size), download=download)
        except Exception as error:  # missing or corrupt files, or a failed download
            raise missing(name, root, error) from None
        return decode_once(celeba, root / "celeba", image_size)
    if name == "folder":
        return decode_once(image_folder(root, image_size), root, image_size)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def missing(name, root, error):
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return DataError(
        f"{name} is not readable under {root} ({reason}); expected {EXPECTED_FILES[name]} there. "
        f"Download it on a machine with network access, or point --data-root at a folder that has it.")


def decoded_tensor(name, root, download):
    """torchvision reads MNIST, Fashion-MNIST and CIFAR-10 into memory as arrays: keep them as (N, C, H, W)."""
    try:
        data = TORCHVISION_CLASSES[name](root, train=True, download=download).data
    except Exception as error:  # missing or corrupt files, or a failed download
        raise missing(name, root, error) from None
    data = torch.as_tensor(data)
    return data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2).contiguous()


def resize(images, image_size, chunk=4096):
    """Resize a uint8 tensor once, in chunks to bound memory (28 -> 32 px for MNIST; CIFAR-10 stays 32 px)."""
    if images.shape[-1] == image_size:
        return images
    out = torch.empty((*images.shape[:2], image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(image_size, image_size), mode="bilinear", antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def square(image_size):
    """Centre square crop, then resize: the usual preparation of CelebA and image folders."""
    return v2.Compose([v2.PILToTensor(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


class FlatFolder(torch.utils.data.Dataset):
    """A folder of images without class sub-folders (for example CelebA's img_align_celeba/)."""

    def __init__(self, root, transform):
        self.files = sorted(p for p in Path(root).iterdir() if p.suffix.lower() in IMG_EXTENSIONS)
        self.transform = transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return self.transform(pil_loader(self.files[index])), 0


def image_folder(root, image_size):
    """torchvision's ImageFolder when `root` has class sub-folders, else every image directly in `root`."""
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder; --dataset folder needs a folder of images")
    has_subfolders = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    images = (torchvision.datasets.ImageFolder(root, transform=square(image_size), allow_empty=True)
              if has_subfolders else FlatFolder(root, square(image_size)))
    if len(images) == 0:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in {root}")
    return images


def images_only(samples):
    return torch.stack([image for image, _ in samples])


def decode_once(dataset, cache_dir, image_size):
    """Decode every image of `dataset` once, in parallel, and cache the uint8 tensor under the data root."""
    names = getattr(dataset, "samples", None) or getattr(dataset, "files", None) or dataset.filename
    key = hashlib.sha1("\n".join(str(n) for n in names).encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f".decoded-{image_size}px-{len(dataset)}-{key}.pt"
    if cache.exists():
        try:
            return torch.load(cache)
        except Exception:
            print(f"cache {cache} is unreadable; decoding again")
    loader = torch.utils.data.DataLoader(dataset, batch_size=256, num_workers=min(8, os.cpu_count() or 1),
                                         collate_fn=images_only)
    try:
        batches = list(tqdm(loader, desc=f"decoding {len(dataset)} images once", unit="batch"))
    except (OSError, RuntimeError) as error:  # an unreadable or truncated image file
        raise DataError(f"could not decode an image under {cache_dir}: {error}") from None
    images = torch.cat(batches)
    try:
        torch.save(images, cache.with_suffix(".tmp"))
        os.replace(cache.with_suffix(".tmp"), cache)
    except OSError as error:
        print(f"could not cache the decoded images at {cache} ({error}); they will be decoded again next time")
    return images


class Batches:
    """Endless minibatches of a uint8 image tensor kept on `device`, scaled there to [-1, 1].

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
        # scale pixels to [-1, 1], the range of G's tanh (Table 3's output layer)
        return self.images[picked].float().div_(127.5).sub_(1.0)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]
