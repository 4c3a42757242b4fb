"""Data for WGAN-GP, prepared as the official code does (gan_cifar.py): pixels scaled to
[-1, 1], the range of G's tanh, and nothing else. CIFAR-10 is used at its own 32x32; MNIST
and Fashion-MNIST are resized once from 28 to 32 px; CelebA and image folders are
centre-cropped and resized.

Fast path: a data set is decoded once into a uint8 tensor (N, C, H, W), and batches are
drawn by a fresh permutation each epoch and scaled on the training device, so the
training loop does no per-image work. MNIST, Fashion-MNIST and CIFAR-10 are decoded in
memory by torchvision. Image folders and CelebA are decoded once, in parallel, with
a progress bar, into a cache file on disk that is then memory-mapped. The set lives on
the device when it fits there, else in host memory or on disk, from where each batch is
copied to the device one batch ahead (`--data-on`).
"""
import bisect
import collections
import contextlib
import errno
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader
from torchvision.datasets.utils import check_integrity
from torchvision.transforms import v2
from tqdm import tqdm

try:
    import fcntl  # POSIX: two runs decoding the same set take turns
except ImportError:
    fcntl = None


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


# >>> copied: image-data >>>
DATASETS = ("cifar10", "mnist", "fashion-mnist", "celeba", "folder")  # per-folder
CHANNELS = {"cifar10": 3, "mnist": 1, "fashion-mnist": 1, "celeba": 3, "folder": 3, "lsun": 3}
# --dataset lsun is not offered in this folder  # per-folder
LSUN_CLASSES = ()  # per-folder
# The scene categories torchvision's LSUN reads; a set is CATEGORY_train or CATEGORY_val.
LSUN_SCENES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room", "kitchen",
               "living_room", "restaurant", "tower")

# What torchvision reads under --data-root, named in the error when it is missing.
EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/ (or cifar-10-python.tar.gz)",
    "celeba": "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt",
}
# Part of every cache's name: a new decoder (or a change to `square`) decodes again.
DECODER = f"square v1, Pillow {PIL.__version__}, torchvision {torchvision.__version__}"
DECODE_CHUNK = 256  # images decoded and written at a time: bounds the memory a decode holds
DECODE_WORKERS = 8  # at most this many decoding processes
SAVE_EVERY = 16  # chunks between progress records, from which an interrupted decode resumes
ROOMY = 0.5  # --data-on auto: the set fits where it takes at most half of the free memory


def load_images(name, root, image_size, download=True, cache_dir=None, strict=False, lsun_classes=LSUN_CLASSES):
    """The whole training set of `name` as a uint8 tensor (N, C, image_size, image_size).

    MNIST, Fashion-MNIST and CIFAR-10 are read into memory by torchvision and resized there.
    Image folders, CelebA and LSUN are decoded once into a cache file (see decode_once); the
    tensor returned maps that file, so the set is never held twice in memory.
    """
    root = Path(root)
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    if name in MNIST_CLASSES:
        return resize(read_mnist(name, root, download=download)[0].unsqueeze(1), image_size)
    if name == "cifar10":
        return resize(read_cifar10(root, download), image_size)
    if name == "folder":
        source = folder_source(root, image_size)
    elif name == "celeba":
        source = celeba_source(root, image_size, download)
    else:
        source = lsun_source(root, image_size, lsun_classes)
    return decode_once(source, image_size, cache_dir, strict)


def missing(name, root, error):
    return DataError(
        f"{name} is not readable under {root} ({reason(error)}); expected {EXPECTED_FILES[name]} there. "
        f"Download it on a machine with network access, or point --data-root at a folder that has it.")


def read_cifar10(root, download):
    """CIFAR-10's 50,000 training images (N, 3, 32, 32), read by torchvision."""
    try:
        with no_new_folders_on_failure(root):
            data = torchvision.datasets.CIFAR10(root, train=True, download=download).data
    except Exception as error:  # missing or corrupt files, or a failed download
        raise damaged_cifar10(root) or missing("cifar10", root, error) from None
    return torch.as_tensor(data).permute(0, 3, 1, 2).contiguous()


def damaged_cifar10(root):
    """A DataError naming the first file of ROOT/cifar-10-batches-py that is missing or damaged, if any."""
    cifar = torchvision.datasets.CIFAR10
    folder = root / cifar.base_folder
    for file, md5 in (*cifar.train_list, *cifar.test_list):
        if folder.is_dir() and not check_integrity(str(folder / file), md5):
            state = "does not match torchvision's checksum" if (folder / file).is_file() else "is missing"
            return DataError(f"cifar10: {folder / file} {state}; replace {folder} with a fresh copy from "
                             f"cifar-10-python.tar.gz, or point --data-root at a folder that has one")
    return None


def resize(images, image_size, chunk=4096):
    """Resize once, in chunks to bound memory (28 -> 32 px for MNIST; CIFAR-10 stays 32 px)."""  # per-folder
    if images.shape[-1] == image_size:
        return images
    out = torch.empty((*images.shape[:2], image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = images[start:start + chunk].float()
        part = F.interpolate(part, size=(image_size, image_size), mode="bilinear", antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def square(image_size):
    """Centre square crop, then resize: the usual preparation of CelebA, LSUN and image folders."""
    return v2.Compose([v2.PILToTensor(), v2.RGB(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)])


# A set of image files to decode: what it is (for messages), the folder its cache goes to by
# default, a hash of what its cache depends on, and a function that builds its torch Dataset.
Source = collections.namedtuple("Source", "what home identity dataset")


class FlatFolder(torch.utils.data.Dataset):
    """A folder of images without class sub-folders (for example CelebA's img_align_celeba/). The names
    are one numpy array, not a list of Python strings, so decoding processes share them, not copy them."""

    def __init__(self, root, transform):
        self.root = Path(root)
        names = sorted(os.fsencode(entry.name) for entry in os.scandir(root)
                       if os.path.splitext(entry.name)[1].lower() in IMG_EXTENSIONS)
        self.names = np.array(names, dtype=bytes)
        self.transform = transform

    def __len__(self):
        return len(self.names)

    def __getitem__(self, index):
        return self.transform(pil_loader(self.name_of(index))), 0

    def name_of(self, index):
        return str(self.root / os.fsdecode(self.names[index]))


class ClassFolders(torchvision.datasets.ImageFolder):
    """torchvision's ImageFolder (images in class sub-folders), naming its files in messages."""

    def name_of(self, index):
        return self.samples[index][0]


class CelebAImages(torchvision.datasets.CelebA):
    """torchvision's CelebA, naming its files in messages."""

    def name_of(self, index):
        return os.path.join(self.root, self.base_folder, "img_align_celeba", self.filename[index])


class LsunScenes(torchvision.datasets.LSUN):
    """torchvision's LSUN. Each decoding process opens the databases afresh (an LMDB handle must not
    be used across a fork), and torchvision's key list goes to a scratch folder, not the user's."""

    def __init__(self, root, classes, transform):
        with scratch_working_directory():  # torchvision writes its key list "_cache_*" into the working folder
            super().__init__(root, classes=list(classes), transform=transform)
        self.opened_by = os.getpid()

    def __getitem__(self, index):
        if self.opened_by != os.getpid():
            import lmdb
            for db in self.dbs:
                db.env.close()  # this process's copy of the parent's handle
                db.env = lmdb.open(db.root, max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
            self.opened_by = os.getpid()
        return super().__getitem__(index)

    def name_of(self, index):
        category = bisect.bisect_right(self.indices, index)
        start = self.indices[category - 1] if category else 0
        key = self.dbs[category].keys[index - start].decode(errors="replace")
        return f"{self.dbs[category].root} entry {key}"


@contextlib.contextmanager
def scratch_working_directory():
    previous = os.getcwd()
    with tempfile.TemporaryDirectory() as scratch:
        os.chdir(scratch)
        try:
            yield
        finally:
            os.chdir(previous)


def files_digest(paths, base):
    """A hash of every file's name under `base`, size and modification time: what a cache depends on."""
    digest = hashlib.sha1()
    for path in paths:
        try:
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, base)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{os.path.relpath(path, base)}\tunreadable\n".encode())
    return digest.hexdigest()


def folder_source(root, image_size):
    """torchvision's ImageFolder when `root` has class sub-folders, else every image directly in `root`."""
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder; --dataset folder needs a folder of images")
    try:
        has_subfolders = any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
        images = (ClassFolders(root, transform=square(image_size), allow_empty=True)
                  if has_subfolders else FlatFolder(root, square(image_size)))
    except OSError as error:
        raise DataError(f"--data-root {root} cannot be read ({reason(error)})") from None
    if len(images) == 0:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in {root}")
    files = (images.name_of(i) for i in range(len(images)))
    return Source(f"the images in {root.absolute()}", root, files_digest(files, root), lambda: images)


def celeba_source(root, image_size, download):
    try:
        with no_new_folders_on_failure(root / "celeba"):
            celeba = CelebAImages(root, split="all", target_type=[], transform=square(image_size), download=download)
    except Exception as error:  # missing or corrupt files, or a failed download
        raise missing("celeba", root, error) from None
    files = (celeba.name_of(i) for i in range(len(celeba)))
    return Source(f"CelebA in {(root / 'celeba').absolute()}", root / "celeba",
                  files_digest(files, root / "celeba"), lambda: celeba)


def lsun_source(root, image_size, classes):
    """LSUN's sets `classes` under ROOT/lsun, as its download script leaves them: CLASS_lmdb/data.mdb."""
    folder = root / "lsun"
    for name in classes:
        category, _, split = name.rpartition("_")
        if category not in LSUN_SCENES or split not in ("train", "val"):
            raise DataError(f"--lsun-classes: {name!r} is not an LSUN scene set; give CATEGORY_train or "
                            f"CATEGORY_val with CATEGORY one of {', '.join(LSUN_SCENES)}")
    try:
        import lmdb
    except ImportError:
        raise DataError("--dataset lsun reads LMDB databases and needs the lmdb package: pip install lmdb") from None
    identity = []
    for name in classes:
        database = folder / f"{name}_lmdb"
        if not (database / "data.mdb").is_file():
            raise DataError(
                f"lsun: {database / 'data.mdb'} not found; get {name}_lmdb.zip with LSUN's download.py "
                f"(python3 download.py -c {name.rpartition('_')[0]} -o {folder}), unzip it there, or point "
                f"--data-root at the folder that holds lsun/")
        try:
            with lmdb.open(str(database), readonly=True, lock=False) as env:
                entries = env.stat()["entries"]
        except lmdb.Error as error:
            raise DataError(f"lsun: {database} is not a readable LMDB database ({reason(error)}); "
                            f"download and unzip {name}_lmdb.zip again") from None
        if entries == 0:
            raise DataError(f"lsun: {database} holds no images")
        stat = (database / "data.mdb").stat()
        identity.append(f"{name}\t{entries}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return Source(f"LSUN {' + '.join(classes)} in {folder.absolute()}", folder, digest(identity),
                  lambda: LsunScenes(str(folder.absolute()), classes, square(image_size)))


class Decodable(torch.utils.data.Dataset):
    """Each image of `dataset` as (uint8 tensor, None), or as (None, why) when its file does not decode."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index][0], None
        except PIL.UnidentifiedImageError:
            return None, f"{self.dataset.name_of(index)} (not an image file that Pillow reads)"
        except Exception as error:  # a truncated or corrupt image file: reported, not fatal
            return None, f"{self.dataset.name_of(index)} ({reason(error)})"


def stack_decoded(items):
    """A chunk of Decodable items: the images stacked (or None), the problems, and the number of items."""
    images = [image for image, _ in items if image is not None]
    return (torch.stack(images) if images else None), [why for _, why in items if why is not None], len(items)


def decode_once(source, image_size, cache_dir, strict):
    """The images of `source`, decoded to uint8 (N, 3, S, S) and mapped from a cache file.

    The cache's name holds a hash of all it depends on: the files' names, sizes and modification
    times, the size S and the decoder's version, so a stale cache is never read. A cache is
    whole when STEM.u8 and STEM.json agree; it is written as STEM.partial, chunk by chunk, and
    renamed at the end. An interrupted decode resumes from its last progress record; a
    partial, truncated or unreadable cache is decoded again. Files that do not decode are
    left out with a warning, or stop the decode with `strict`.
    """
    folder = cache_folder(source.home, cache_dir)
    prefix = f".decoded-{image_size}px-{digest([source.what])}-"
    stem = folder / (prefix + digest([source.identity, str(image_size), DECODER]))
    cached = open_cache(stem)
    if cached is None:
        with no_empty_new_folders_on_failure(folder), decoding_lock(stem):
            cached = open_cache(stem)  # another run may have finished it meanwhile
            if cached is None:
                decode_into(source, stem, image_size, strict)
                remove_stale(folder, prefix, stem)
                cached = open_cache(stem)
        if cached is None:
            raise DataError(f"the decoded images in {stem}.u8 cannot be read back; delete that file and run again")
    images, skipped = cached
    if skipped:
        listed = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        if strict:
            raise DataError(f"{len(skipped)} image files do not decode (--strict-images): {listed}")
        print(f"warning: left out {len(skipped)} of {len(images) + len(skipped)} image files that do not decode: "
              f"{listed}; --strict-images makes this an error", file=sys.stderr)
    return images


def digest(lines):
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def writable(folder):
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def cache_folder(home, cache_dir):
    """--cache-dir; else `home`, beside the data; else, when that is read-only, the user's cache folder."""
    if cache_dir is not None:
        return Path(cache_dir)
    if writable(home):
        return home
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan-papers"
    print(f"note: {home} is not writable, so the decoded images are cached in {fallback} "
          f"(--cache-dir chooses another folder)", file=sys.stderr)
    return fallback


def open_cache(stem):
    """The cached images, mapped from disk (not read), and the files left out; None unless the cache is whole."""
    data = Path(f"{stem}.u8")
    try:
        meta = json.loads(Path(f"{stem}.json").read_text())
        shape, skipped = [int(n) for n in meta["shape"]], [str(why) for why in meta["skipped"]]
        if len(shape) != 4 or shape[0] < 1 or data.stat().st_size != math.prod(shape):
            return None
        images = torch.from_file(str(data), shared=False, size=math.prod(shape), dtype=torch.uint8).view(shape)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):  # absent, partial or damaged
        return None
    images.mapped_from = data
    return images, skipped


@contextlib.contextmanager
def no_empty_new_folders_on_failure(folder):
    """Remove the folders on the way to `folder` that a failed decode created and left empty."""
    folder = Path(folder).absolute()
    new = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield
    except DataError:
        for path in new:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


@contextlib.contextmanager
def decoding_lock(stem):
    """One decode of a cache at a time: a second run waits for the first, then reads its cache."""
    lock = Path(f"{stem}.lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        file = open(lock, "a")
    except OSError as error:
        raise DataError(f"cannot write the decoded images to {lock.parent} ({reason(error)}); "
                        f"choose another folder with --cache-dir") from None
    with file:
        if fcntl is not None:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another run that is decoding into {stem}.partial", file=sys.stderr)
                fcntl.flock(file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)


def decode_into(source, stem, image_size, strict):
    """Decode every image of `source` into STEM.u8 and STEM.json, resuming STEM.partial (see decode_once)."""
    try:
        dataset = Decodable(source.dataset())
    except Exception as error:  # torchvision could not list the set (for example a damaged LMDB)
        raise DataError(f"cannot read {source.what} ({reason(error)})") from None
    total, row = len(dataset), 3 * image_size * image_size
    partial, progress_file = Path(f"{stem}.partial"), Path(f"{stem}.progress.json")
    progress = read_progress(progress_file, partial, total, row)
    try:
        if progress is None:
            progress = {"done": 0, "rows": 0, "skipped": []}
            with open(partial, "wb") as file:
                reserve(file, total * row)
        with open(partial, "r+b") as file:
            file.seek(progress["rows"] * row)
            remaining = torch.utils.data.Subset(dataset, range(progress["done"], total))
            workers = min(DECODE_WORKERS, os.cpu_count() or 1, math.ceil(len(remaining) / DECODE_CHUNK))
            loader = torch.utils.data.DataLoader(remaining, batch_size=DECODE_CHUNK, num_workers=workers,
                                                 collate_fn=stack_decoded)
            with tqdm(total=total, initial=progress["done"], unit="img", desc=f"decoding {total} images once") as bar:
                for chunk, (images, problems, count) in enumerate(loader, 1):
                    if problems and strict:
                        raise DataError(f"{problems[0]} does not decode; without --strict-images it would be "
                                        f"left out with a warning")
                    if images is not None:
                        write_rows(file, images)
                    progress["done"] += count
                    progress["rows"] += count - len(problems)
                    progress["skipped"] += problems
                    bar.update(count)
                    if chunk % SAVE_EVERY == 0:
                        save_progress(file, progress_file, progress)
            save_progress(file, progress_file, progress)
            if progress["rows"] == 0:
                discard(partial, progress_file)
                raise DataError(f"none of the {total} images of {source.what} decode; the first: "
                                f"{progress['skipped'][0]}")
            file.truncate(progress["rows"] * row)
        meta = {"source": source.what, "decoder": DECODER, "shape": [progress["rows"], 3, image_size, image_size],
                "skipped": progress["skipped"]}
        write_atomically(Path(f"{stem}.json"), json.dumps(meta, indent=1).encode())
        os.replace(partial, f"{stem}.u8")  # from here on the cache is whole
        progress_file.unlink()
    except OSError as error:  # a full disk or an unwritable folder: nothing half-written stays behind
        discard(partial, progress_file)
        raise DataError(f"cannot write the decoded images to {partial} ({reason(error)}); free space there, "
                        f"or choose another folder with --cache-dir") from None
    except RuntimeError as error:  # a decoding process died
        raise DataError(f"decoding {source.what} stopped ({reason(error)}); run again to resume") from None


def read_progress(progress_file, partial, total, row):
    """The progress of an interrupted decode into `partial`, or None when there is none to trust."""
    try:
        progress = json.loads(progress_file.read_text())
        done, rows, skipped = int(progress["done"]), int(progress["rows"]), list(progress["skipped"])
        whole_file = partial.stat().st_size == total * row
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (whole_file and 0 <= rows <= done <= total and done - rows == len(skipped)):
        return None
    return {"done": done, "rows": rows, "skipped": skipped}


def reserve(file, size):
    """Claim the cache's disk space up front, so that a full disk stops a decode at its start."""
    file.truncate(size)
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(file.fileno(), 0, size)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):  # some file systems cannot reserve space
                raise


def write_rows(file, images):
    file.write(images.contiguous().numpy().data)


def save_progress(file, progress_file, progress):
    """Record how far the decode got, once what it wrote is on disk."""
    file.flush()
    os.fsync(file.fileno())
    write_atomically(progress_file, json.dumps(progress).encode())


def write_atomically(path, data):
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def discard(*paths):
    for path in paths:
        Path(path).unlink(missing_ok=True)


def remove_stale(folder, prefix, stem):
    """Delete the caches of the same images at the same size that an earlier version of the files left."""
    for path in folder.glob(prefix + "*"):
        if not path.name.startswith(stem.name + "."):
            path.unlink(missing_ok=True)


def size_text(size):
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def host_memory_available():
    """Bytes of host memory available to a new allocation (Linux's MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def choose_place(size, data_on, device):
    """Where Batches keeps a set of `size` bytes, and why: --data-on, or for auto the device when the
    set takes at most half of its free memory, else host memory when it fits there, else disk."""
    if data_on != "auto":
        return data_on, f"--data-on {data_on}"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_memory_available()
    if free is None:
        return "device", f"auto: the {size_text(size)} set; the free memory on {device} is not known"
    if size <= ROOMY * free:
        return "device", f"auto: the {size_text(size)} set fits in half of the {size_text(free)} free on {device}"
    too_big = f"auto: the {size_text(size)} set needs more than half of the {size_text(free)} free on {device}"
    host = host_memory_available() if device.type == "cuda" else None
    if device.type == "cuda" and (host is None or size <= ROOMY * host):
        return "host", too_big + "; it fits in host memory"
    return "disk", too_big + (f" and of the {size_text(host)} of host memory" if host is not None else "")


def keep(images, place, device):
    """The uint8 set where Batches keeps it: on the device, in host memory, or mapped from a file."""
    mapped = getattr(images, "mapped_from", None) is not None
    try:
        if place == "device":
            kept = images.to(device)
            return kept.clone() if kept is images and mapped else kept
        if place == "host":
            return images.clone() if mapped else images
        return images if mapped else spill_to_disk(images)
    except (RuntimeError, OSError) as error:  # out of device or host memory, or of disk space
        raise DataError(f"--data-on {place}: the {size_text(images.numel())} data set does not fit there "
                        f"({reason(error)}); try --data-on auto or disk") from None


def spill_to_disk(images):
    """A set decoded in memory, moved to a temporary file and mapped from there (--data-on disk)."""
    with tempfile.NamedTemporaryFile(prefix="decoded-", suffix=".u8", delete=False) as file:
        try:
            for start in range(0, len(images), DECODE_CHUNK):
                write_rows(file, images[start:start + DECODE_CHUNK])
        except OSError:
            os.unlink(file.name)
            raise
    try:
        mapped = torch.from_file(file.name, shared=False, size=images.numel(), dtype=torch.uint8).view(images.shape)
    finally:
        os.unlink(file.name)  # the mapping keeps the data until the run ends
    mapped.mapped_from = "a temporary file"
    return mapped


class Batches:
    """Endless minibatches of a uint8 image tensor, scaled on `device` to [-1, 1].

    Each epoch visits the data in a new random order, drawn from a generator seeded by
    (seed, epoch), so a resumed run draws exactly the batches the uninterrupted run
    would have. The incomplete last batch of an epoch is dropped.

    `data_on` says where the uint8 set is kept (choose_place): on the device, where each batch
    is gathered; or in host memory or mapped from a file on disk, where each batch is gathered
    on the host in the same order and copied to the device one batch ahead (from pinned memory
    on a side stream, with CUDA). Every place gives the same batches. `placement` says which
    was chosen and why.
    """

    def __init__(self, images, batch_size, device, seed, data_on="device"):
        if not 0 < batch_size <= len(images):
            raise DataError(f"--batch-size {batch_size} must be between 1 and the data set's {len(images)} images")
        self.device = torch.device(device)
        self.place, why = choose_place(images.numel(), data_on, self.device)
        self.images = keep(images, self.place, self.device)
        where = {"device": f"on {self.device}", "host": "in host memory",
                 "disk": f"mapped from {getattr(self.images, 'mapped_from', None)}"}[self.place]
        ahead = "" if self.place == "device" else f", copied to {self.device} a batch ahead"
        self.placement = f"{where}{ahead} ({why})"
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(images) // batch_size
        self.epoch, self.index = 0, 0
        self.orders = {}
        self.fetcher, self.ahead = None, None

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        position = (self.epoch, self.index)
        self.index += 1
        batch = self.images[self.picked(*position)] if self.place == "device" else self.fetched(position)
        # official code (gan_cifar.py): real_data = 2 * (x / 255 - 0.5), in [-1, 1] like G's tanh  # per-folder
        return batch.float().div_(127.5).sub_(1.0)

    def picked(self, epoch, index):
        """The indices of batch `index` of `epoch`: a slice of that epoch's permutation."""
        if epoch not in self.orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.images), generator=generator).to(self.images.device)
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = order
        return self.orders[epoch][index * self.batch_size:(index + 1) * self.batch_size]

    def fetched(self, position):
        """Batch `position` from host memory or disk, on the device; the batch after it is set going."""
        if self.fetcher is None:
            self.fetcher = Fetcher(self.images, self.batch_size, self.device)
        if self.ahead is not None and self.ahead[0] == position:
            batch = self.fetcher.arrived(self.ahead[1])
        else:
            batch = self.fetcher.arrived(self.fetcher.start(self.picked(*position)))
        epoch, index = position
        following = (epoch, index + 1) if index + 1 < self.per_epoch else (epoch + 1, 0)
        self.ahead = following, self.fetcher.start(self.picked(*following))
        return batch

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        if self.ahead is not None:
            self.fetcher.arrived(self.ahead[1])  # let the batch on its way land before it is dropped
            self.ahead = None
        self.epoch, self.index = state["epoch"], state["index"]


class Fetcher:
    """Gathers batches of a host (or memory-mapped) uint8 tensor in a background thread, into two
    buffers taken in turn, and copies each to the device: from pinned memory on a side stream
    with CUDA, so that the copy overlaps the training step."""

    def __init__(self, images, batch_size, device):
        self.images, self.device = images, device
        cuda = device.type == "cuda"
        shape = (batch_size, *images.shape[1:])
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=cuda) for _ in range(2)]
        self.copies = [None, None]  # CUDA events: the last copy out of each buffer has finished
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.turn = 0
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches")

    def start(self, picked):
        self.turn = 1 - self.turn
        return self.thread.submit(self.gather, picked, self.turn)

    def gather(self, picked, slot):
        buffer = self.buffers[slot]
        if self.copies[slot] is not None:
            self.copies[slot].synchronize()
        torch.index_select(self.images, 0, picked, out=buffer)
        if self.stream is None:
            return buffer, None
        with torch.cuda.stream(self.stream):
            batch = buffer.to(self.device, non_blocking=True)
            self.copies[slot] = torch.cuda.Event()
            self.copies[slot].record()
        return batch, self.copies[slot]

    def arrived(self, future):
        batch, copied = future.result()
        if copied is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copied)  # the training step waits for the copy on the device, not on the host
            batch.record_stream(stream)
        return batch
# <<< copied: image-data <<<
