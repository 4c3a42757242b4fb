"""What the five convolutional folders share beyond support.py, the same file in each of them:
image files (folders, CelebA, LSUN) decoded once into a memory-mapped .npy file, and the Inception
Score, FID and KID of a generator. The MLP folders (simpleGAN, CGAN) read MNIST only and measure
with a Parzen window, so they do not carry it.
"""

import contextlib
import hashlib
import os
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from tqdm import tqdm

from support import (
    DATA_ROOT,
    CheckpointError,
    DataError,
    checkpoint_path,
    fail,
    merge_metrics,
    missing,
    read_checkpoint,
    reason,
    record,
    require_at_least,
    rng_untouched,
    unwritable,
)

# ---- image files (folders, CelebA, LSUN), decoded once into a .npy file ----

LSUN_SCENES = (
    "bedroom",
    "bridge",
    "church_outdoor",
    "classroom",
    "conference_room",
    "dining_room",
    "kitchen",
    "living_room",
    "restaurant",
    "tower",
)
DECODE_CHUNK = 256  # images decoded and written at a time
CACHE_DIR = (
    "where image folders, CelebA and LSUN are kept once decoded (default: beside the data, or "
    "~/.cache/gan-papers when that is read-only)"
)


def add_image_data_flags(p):
    p.add_argument("--data-root", default=str(DATA_ROOT), help="where data sets live (../data)")
    p.add_argument("--cache-dir", help=CACHE_DIR)


def image_files(name, root, prepare, lsun_classes=(), download=True):
    """An image-file set as a torchvision Dataset of (prepare(PIL image), _), with what it is and
    what its decoded copy depends on: (description, home folder, identity, dataset)."""
    root = Path(root)
    if name == "folder":
        try:
            dataset = torchvision.datasets.ImageFolder(root, prepare)
        except (OSError, FileNotFoundError) as error:  # no folder, or no sub-folder with images
            raise DataError(
                f"--data-root {root}: {reason(error)} (ImageFolder wants ROOT/CLASS/*.png)"
            ) from None
        files = [file for file, _ in dataset.samples]
        return f"the images in {root.absolute()}", root, files_digest(files), dataset
    if name == "celeba":
        try:
            dataset = torchvision.datasets.CelebA(root, "all", [], prepare, download=download)
        except Exception as error:  # missing or corrupt files, or a failed download
            raise missing("celeba", root, error) from None
        files = [Path(dataset.root) / "celeba" / "img_align_celeba" / f for f in dataset.filename]
        return (
            f"CelebA in {(root / 'celeba').absolute()}",
            root / "celeba",
            files_digest(files),
            dataset,
        )
    folder = root / "lsun"
    databases = [folder / f"{set_name}_lmdb" / "data.mdb" for set_name in lsun_classes]
    for set_name, database in zip(lsun_classes, databases):
        category, _, split = set_name.rpartition("_")
        if category not in LSUN_SCENES or split not in ("train", "val"):
            raise DataError(
                f"--lsun-classes: {set_name!r} is not CATEGORY_train or CATEGORY_val "
                f"with CATEGORY one of {', '.join(LSUN_SCENES)}"
            )
        if not database.is_file():
            raise DataError(
                f"lsun: {database} not found; get it with LSUN's download.py "
                f"(-c {category} -o {folder}) and unzip it there"
            )
    try:
        dataset = LsunScenes(str(folder.absolute()), lsun_classes, prepare)
    except Exception as error:  # lmdb.Error: a damaged or truncated database
        raise DataError(
            f"lsun: the databases in {folder} are not readable ({reason(error)})"
        ) from None
    what = f"LSUN {' + '.join(lsun_classes)} in {folder.absolute()}"
    return what, folder, files_digest(databases), dataset


class LsunScenes(torchvision.datasets.LSUN):
    """torchvision's LSUN; each decoding process opens the databases afresh (an LMDB handle must
    not cross a fork), and its key list goes to a scratch folder, not the working folder."""

    def __init__(self, root, classes, transform):
        previous = os.getcwd()
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                super().__init__(root, classes=list(classes), transform=transform)
            finally:
                os.chdir(previous)
        self.opened_by = os.getpid()

    def __getitem__(self, index):
        if self.opened_by != os.getpid():
            import lmdb

            for db in self.dbs:
                db.env.close()  # this process's copy of the parent's handle
                db.env = lmdb.open(db.root, readonly=True, lock=False, readahead=False)
            self.opened_by = os.getpid()
        return super().__getitem__(index)


def files_digest(paths):
    """A hash of every file's name, size and modification time: what a decoded copy depends on."""
    lines = []
    for path in paths:
        try:
            stat = os.stat(path)
            lines.append(f"{os.path.basename(path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
        except OSError:
            lines.append(f"{os.path.basename(path)}\tunreadable")
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


def decode_once(what, home, identity, dataset, image_size, cache_dir=None):
    """The images of `dataset` (`what`) as a uint8 tensor (N, 3, S, S) mapped from a .npy file,
    decoded into it once. Its name hashes what it depends on (the files, the size, the
    preparation, torchvision's version), so a stale copy is never read."""
    folder = Path(cache_dir) if cache_dir else Path(home)
    if not cache_dir and unwritable(home):
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan-papers"
    recipe = f"{what} {identity} {image_size} {dataset.transform} {torchvision.__version__}"
    path = folder / f".decoded-{image_size}px-{hashlib.sha1(recipe.encode()).hexdigest()[:12]}.npy"
    if not path.is_file():
        decode(what, dataset, path, (len(dataset), 3, image_size, image_size))
    try:
        return torch.from_numpy(np.load(path, mmap_mode="c"))  # copy-on-write: never written back
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read back ({reason(error)}); delete it") from None


def decode(what, dataset, path, shape):
    """Every image, a chunk at a time, into PATH.partial, renamed to PATH only when whole: Ctrl-C,
    a kill or a full disk never leaves a copy that looks whole, and the next start decodes anew."""
    partial = path.with_suffix(".partial")
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=DECODE_CHUNK,
        num_workers=min(8, os.cpu_count() or 1),
        collate_fn=stack_decoded,
        worker_init_fn=ignore_ctrl_c,
        generator=torch.Generator(),  # the workers' seeds leave the training's stream alone
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb") as file:
            header = {"descr": "|u1", "fortran_order": False, "shape": shape}
            np.lib.format.write_array_header_1_0(file, header)
            for images in tqdm(loader, desc=f"decoding {what} once", unit="chunk"):
                file.write(images.data)
        os.replace(partial, path)
    except KeyboardInterrupt:
        partial.unlink(missing_ok=True)
        fail(f"decoding {what} stopped by Ctrl-C; the next start decodes it again", code=130)
    except Exception as error:
        partial.unlink(missing_ok=True)
        if (
            isinstance(error, OSError) and error.errno is not None
        ):  # a full disk, a read-only folder
            where = "free space there, or choose another folder with --cache-dir"
            raise DataError(f"cannot write {partial} ({reason(error)}); {where}") from None
        # an image file that does not decode, named in the message (PIL's errors carry no errno)
        raise DataError(f"decoding {what} failed: {reason(error)}; replace that file") from None


def stack_decoded(items):
    """A chunk's images as one numpy array: it travels through the worker's pipe, which a Ctrl-C
    cannot leave half-handed-over (a tensor would travel as a shared file descriptor)."""
    return np.ascontiguousarray(np.stack([image.numpy() for image, _ in items]))


def ignore_ctrl_c(worker_id):
    """A decoding process leaves Ctrl-C to the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ---- IS, FID and KID through torch-fidelity ----
# Inception Score (Salimans et al. 2016), FID (Heusel et al. 2017) and KID (Binkowski et al.
# 2018), computed by torch-fidelity; samples and real images go to it as uint8 tensors.
ISC_SPLITS = 10  # Salimans et al. 2016, official inception_score.py: mean and std over 10 splits
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018 (torch-fidelity's defaults)
METRIC_EVALUABLE = {"eval_samples", "eval_real", "feature_extractor"}
TEST_SPLITS = ("mnist", "fashion-mnist", "cifar10")  # the data sets with a test split here
EVALUATE = (
    "print the Inception Score, FID and KID of a trained G (a run folder's best.pt and last.pt, "
    "or a checkpoint file), write them into the run folder's metrics.json, and exit"
)
EVAL_SAMPLES = (
    "samples that --evaluate scores; 50,000 in 10 splits is the IS protocol of Salimans et al. "
    "2016 (official code) and of the official WGAN-GP code"
)
EVAL_REAL = (
    "the real images of FID and KID: the training set as train.py prepares it, or the test "
    "split (mnist, fashion-mnist, cifar10) prepared the same way"
)
EVAL_EVERY = (
    "during training, every N steps: IS, FID and KID of --eval-every-samples samples, logged as "
    "metrics/...; the lowest FID's checkpoint is kept as checkpoints/best.pt"
)


def add_metric_flags(p):
    p.add_argument("--evaluate", metavar="RUN_OR_CHECKPOINT", help=EVALUATE)
    p.add_argument("--eval-samples", type=int, default=50_000, help=EVAL_SAMPLES)
    p.add_argument("--eval-real", default="train", choices=("train", "test"), help=EVAL_REAL)
    p.add_argument("--eval-every", type=int, help=EVAL_EVERY)
    p.add_argument("--eval-every-samples", type=int, default=10_000, help="see --eval-every")
    extractor = "torch-fidelity's feature extractor (default: its port of TF's Inception-v3)"
    p.add_argument("--feature-extractor", default="inception-v3-compat", help=extractor)


def check_metric_args(parser, args):
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as extractors

    require_at_least(parser, args, ISC_SPLITS, "eval_samples", "eval_every_samples")
    require_at_least(parser, args, 1, "eval_every")
    if args.eval_real == "test" and args.dataset not in TEST_SPLITS:
        parser.error(f"--eval-real test: {args.dataset} has no test split; use --eval-real train")
    if args.feature_extractor not in extractors:
        given = f"--feature-extractor {args.feature_extractor!r}"
        parser.error(f"{given} is not one of torch-fidelity's: {', '.join(extractors)}")


def check_feature_extractor(args, device):
    """Make the feature extractor once (torch-fidelity downloads its weights at first use), or
    exit in one line that says where the weights go."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY as extractors

    extractor = extractors[args.feature_extractor]
    layer = extractor.get_default_feature_layer_for_metric("fid")
    try:
        with rng_untouched(device), contextlib.redirect_stderr(sys.stdout):
            extractor(args.feature_extractor, [layer], verbose=False)
    except Exception as error:  # offline at first use, or a damaged weights file
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        fail(
            f"{args.feature_extractor} has no weights in {folder} ({reason(error)}); for "
            f"Inception-v3, copy {Path(url).name} there from {url}"
        )


class RealSet(torch.utils.data.Dataset):
    """The real images of FID and KID, uint8 (3, H, W) as torch-fidelity takes them; their
    features are cached under a name keyed by set, split, size, count and content."""

    def __init__(self, args, images):
        try:
            self.images = images(Path(args.data_root), args.eval_real)
        except DataError as error:
            fail(error)
        size, content = self.images.shape[-1], hashlib.sha1()
        for start in range(0, len(self), 4096):
            content.update(self.images[start : start + 4096].contiguous().numpy())
        self.description = f"the {len(self)} {args.eval_real} images of {args.dataset} at {size}px"
        key = f"{args.dataset}-{args.eval_real}-{size}px-{len(self)}-{content.hexdigest()[:12]}"
        self.cache_name = key

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].expand(3, -1, -1)


def uniform(rng, shape):
    """z ~ U(-1, 1)^d, the prior of DCGAN and LSGAN, as a torch-fidelity noise source."""
    return torch.from_numpy(rng.uniform(-1.0, 1.0, shape)).float()


def fidelity():
    """torch-fidelity, imported at first use, with U(-1, 1) registered beside its "normal"."""
    import torch_fidelity

    if "uniform_-1_1" not in torch_fidelity.registry.NOISE_SOURCE_REGISTRY:
        torch_fidelity.register_noise_source("uniform_-1_1", uniform)
    return torch_fidelity


def sample_metrics(draw, args, device, z_prior, real, num_samples):
    """IS of num_samples samples of G (z from torch-fidelity's seeded source `z_prior`, draw(z) in
    [-1, 1]), their FID and KID against `real`."""
    tf = fidelity()
    bar = tqdm(total=num_samples, desc="sampling and embedding", unit="img", leave=False)

    class Samples(tf.GenerativeModelBase):
        z_size, z_type, num_classes = args.z_dim, z_prior, 0

        def forward(self, z):
            bar.update(len(z))
            # [-1, 1] back to pixels: the inverse of the data's x / 127.5 - 1
            pixels = draw(z.to(device)).float().add(1).mul(127.5).round().clamp(0, 255)
            return pixels.to(torch.uint8).expand(-1, 3, -1, -1)

    kid_subset_size = min(KID_SUBSET_SIZE, num_samples, len(real))
    with rng_untouched(device):
        scores = tf.calculate_metrics(
            input1=Samples(),
            input1_model_num_samples=num_samples,
            input2=real,
            input2_cache_name=real.cache_name,
            isc=True,
            fid=True,
            kid=True,
            isc_splits=ISC_SPLITS,
            kid_subsets=KID_SUBSETS,
            kid_subset_size=kid_subset_size,
            rng_seed=args.seed,
            feature_extractor=args.feature_extractor,
            cuda=device.type == "cuda",
            save_cpu_ram=True,
            verbose=False,
        )
    bar.close()
    keys = {
        "inception_score": tf.KEY_METRIC_ISC_MEAN,
        "inception_score_std": tf.KEY_METRIC_ISC_STD,
        "fid": tf.KEY_METRIC_FID,
        "kid": tf.KEY_METRIC_KID_MEAN,
        "kid_std": tf.KEY_METRIC_KID_STD,
    }
    return {**{name: scores[key] for name, key in keys.items()}, "kid_subset_size": kid_subset_size}


def evaluate_checkpoint(args, checkpoint, G, draw, device, folder, z_prior, images):
    """--evaluate: IS, FID and KID of G for a run folder's best.pt and last.pt when it kept both
    (else the one it has, or the file given), into the run folder's metrics.json, one record per
    checkpoint ("best", "last"), each number beside how it was measured."""
    check_feature_extractor(args, device)
    real = RealSet(args, images)
    records = {}
    for name, (path, checkpoint) in run_checkpoints(args.evaluate, checkpoint, folder).items():
        print(f"{folder}: {name} = {path} (step {checkpoint['step']}), {args.eval_samples} samples")
        G.to(device).load_state_dict(checkpoint["G"])
        scores = sample_metrics(draw, args, device, z_prior, real, args.eval_samples)
        print(
            f"{name}: Inception Score {scores['inception_score']:.3f} ± "
            f"{scores['inception_score_std']:.3f}; FID {scores['fid']:.3f}; KID "
            f"{scores['kid']:.5f} ± {scores['kid_std']:.5f} against {real.description}"
        )
        protocol = {
            "samples": args.eval_samples,
            "real_split": args.eval_real,
            "real_images": len(real),
            "isc_splits": ISC_SPLITS,
            "kid_subsets": KID_SUBSETS,
            "z_prior": z_prior,
            "feature_extractor": args.feature_extractor,
        }
        records[name] = {**record(folder, path, checkpoint, args, device), **scores, **protocol}
    merge_metrics(args.out, records)
    return 0


def run_checkpoints(given, checkpoint, folder):
    """{"best" or "last": (path, checkpoint)}: the checkpoint --evaluate read, and last.pt beside
    it when that holds another step."""
    path = checkpoint_path(given, "auto")
    found, last = {path.stem: (path, checkpoint)}, checkpoint_path(given, "last")
    if last != path and last.is_file():
        try:
            later = read_checkpoint(last, folder)
        except CheckpointError as error:
            fail(f"--evaluate: {error}")
        if later["step"] != checkpoint["step"]:
            found["last"] = (last, later)
    return found


class TrainingMetrics:
    """--eval-every: IS, FID and KID of --eval-every-samples samples, logged as metrics/...; the
    run keeps the checkpoint of the lowest FID as checkpoints/best.pt."""

    def __init__(self, draw, args, device, z_prior, images):
        self.draw, self.args, self.device, self.z_prior = draw, args, device, z_prior
        self.images, self.real = images, None

    def __call__(self):
        self.real = self.real or RealSet(self.args, self.images)
        n = self.args.eval_every_samples
        scores = sample_metrics(self.draw, self.args, self.device, self.z_prior, self.real, n)
        fid, inception, kid = scores["fid"], scores["inception_score"], scores["kid"]
        tqdm.write(f"FID {fid:.3f}, IS {inception:.3f}, KID {kid:.5f} ({n} samples)")
        return {"metrics/fid": fid, "metrics/is": inception, "metrics/kid": kid}, fid
