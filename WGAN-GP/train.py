"""WGAN-GP (Gulrajani et al. 2017, arXiv 1704.00028), trained as Algorithm 1 describes.

For every generator iteration:
    n_critic times (Alg. 1 lines 2-10), each on a fresh real minibatch x and fresh z:
        x~ = G(z);  x^ = eps x + (1 - eps) x~  with eps ~ U[0, 1] per sample
        the critic descends  D(x~) - D(x) + lambda (||grad_x^ D(x^)||_2 - 1)^2   (batch mean)
    once (lines 11-12): G descends  -D(G(z))                                      (batch mean)
each with Adam(lr 1e-4, beta1 0, beta2 0.9), lambda = 10, n_critic = 5, z ~ N(0, I)^128.

    python train.py                                   # CIFAR-10 at 32x32, the paper's settings
    python train.py --dataset mnist
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
"""
import argparse
import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.utils as vutils
from torch.nn.utils import parametrize
from torch.utils.tensorboard import SummaryWriter
from torch_fidelity import (KEY_METRIC_FID, KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, KEY_METRIC_KID_MEAN,
                            KEY_METRIC_KID_STD, GenerativeModelBase, calculate_metrics, register_noise_source)
from torch_fidelity import __version__ as torch_fidelity_version
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, NOISE_SOURCE_REGISTRY
from tqdm import tqdm

from dataset import CHANNELS, DATASETS, Batches, DataError, load_images
from model import (FOLDER, FORMAT, WIDTH, Z_DIM, CheckpointError, Critic, FlagParser, Generator,
                   checkpoint_path, fail, init_weights, read_checkpoint, sample, sample_z)

HERE = Path(__file__).resolve().parent
GRID = 64  # fixed-noise samples in each grid (8 x 8)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"data_root", "data_on", "cache_dir", "max_steps", "iters", "device", "compile", "channels_last",
             "sample_every", "log_every", "checkpoint_every", "eval_every", "inception_weights"}

def gradient_penalty(D, real, fake):
    """§4, Eq. 3's penalty E[(||grad_x^ D(x^)||_2 - 1)^2] at x^ = eps x + (1 - eps) x~ (Alg. 1 lines 4, 6, 7).

    One eps per sample, broadcast over its channels and pixels; the norm is taken over the whole
    flattened sample; the mean over the batch is line 9's (1/m) sum. Not multiplied by lambda.
    """
    # Alg. 1 line 4: a random number eps ~ U[0, 1] for each sample i (shape B, 1, 1, 1)
    eps = torch.rand(real.shape[0], *[1] * (real.dim() - 1), device=real.device, dtype=real.dtype)
    # Alg. 1 line 6: x^ <- eps x + (1 - eps) x~
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    # Alg. 1 line 7: grad_x^ D(x^); create_graph=True so that the penalty itself can be differentiated w.r.t. w.
    # D has no cross-sample coupling, so the gradient of sum_i D(x^_i) w.r.t. x^_i is grad D(x^_i).
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    # Alg. 1 line 7: (||grad||_2 - 1)^2, the L2 norm over all C*H*W entries of each sample (two-sided, §4)
    return (torch.linalg.vector_norm(grad.flatten(1), dim=1) - 1).pow(2).mean()


def critic_step(G, D, opt_D, x, z, lambda_gp):
    """Alg. 1 lines 4-9, one critic iteration. G is held fixed: its output carries no graph.

    Returns the critic loss, the Wasserstein estimate E[D(x)] - E[D(G(z))] and the penalty.
    """
    # Alg. 1 line 5: x~ <- G_theta(z)
    with torch.no_grad():
        fake = G(z)
    # Alg. 1 line 7's D_w(x) and D_w(x~), each averaged over the m samples
    real_score, fake_score = D(x).mean(), D(fake).mean()
    # Alg. 1 lines 4 (eps), 6 (x^) and 7 (the penalty term), in gradient_penalty
    gp = gradient_penalty(D, x, fake)
    # Alg. 1 line 7, averaged over the m samples as in line 9: L = D(x~) - D(x) + lambda (||grad D(x^)|| - 1)^2
    loss = fake_score - real_score + lambda_gp * gp
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    # Alg. 1 line 9: w <- Adam(grad_w (1/m) sum_i L(i), w, alpha, beta1, beta2)
    opt_D.step()
    return loss.detach(), (real_score - fake_score).detach(), gp.detach()


def generator_step(G, D, opt_G, z):
    """Alg. 1 line 12: theta <- Adam(grad_theta (1/m) sum_i -D(G(z_i))). D is held fixed."""
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    # (1/m) sum_i -D_w(G_theta(z(i)))
    loss = -D(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = pick_device(args)
    seed_everything(args.seed)
    if args.evaluate:
        return evaluate_checkpoint(args, checkpoint, device)
    if args.eval_every:
        check_feature_extractor(args, device)
    try:
        images = training_images(args)
        batches = Batches(images, args.batch_size, device, args.seed, data_on=args.data_on)
    except DataError as error:
        fail(error)
    args.channels = CHANNELS[args.dataset]

    G = Generator(args.image_size, args.channels, args.z_dim, args.width).to(device)
    D = Critic(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    # Alg. 1: Adam(alpha, beta1, beta2) for both the critic's w and the generator's theta
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2))
    run = Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, batches,
              fixed_z=sample_z(GRID, args.z_dim, device), total=args.iters,
              title=f"WGAN-GP on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x"
                    f"{args.channels}, {args.n_critic} critic iterations per generator iteration, "
                    f"{batches.per_epoch} real batches per epoch; data {batches.placement})",
              grid=lambda z: vutils.make_grid(sample(G, z), nrow=8, normalize=True, value_range=(-1, 1)),
              metric=TrainingMetrics(G, args, device), eval_every=args.eval_every, higher_is_better=False)

    # Alg. 1 line 1: while theta has not converged (here: for a fixed number of generator iterations)
    while run.running():
        critic = []  # (loss, Wasserstein estimate, penalty) of each critic iteration, logged as their mean
        # Alg. 1 line 2: for t = 1, ..., n_critic. Lines 3-8 ("for i = 1, ..., m") are the batch axis of each tensor.
        for _ in range(args.n_critic):
            # Alg. 1 line 4: a fresh minibatch of real x ~ P_r and of z ~ p(z) for every critic iteration
            x = next(batches)
            critic.append(critic_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device), args.lambda_gp))
        # Alg. 1 line 11: sample a batch of latent variables {z(i)}, i = 1..m
        z = sample_z(args.batch_size, args.z_dim, device)
        # Alg. 1 line 12: the generator's Adam step on -D(G(z))
        loss_G = generator_step(G, D, opt_G, z)
        loss_D, w_estimate, gp = torch.stack([torch.stack(values) for values in critic]).mean(0)
        run.end_step({"wasserstein/estimate": w_estimate, "penalty/gp": gp, "loss/D": loss_D, "loss/G": loss_G})
    return run.finish()


def training_images(args):
    """The training set as a uint8 tensor (N, C, H, W), decoded once (see dataset.py)."""
    return load_images(args.dataset, args.data_root, args.image_size, cache_dir=args.cache_dir,
                       strict=args.strict_images)


def build_parser():
    p = FlagParser(description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; official code: gan_cifar.py trains on CIFAR-10 (§5.3, Fig. 3)")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--data-on", default="auto", choices=("auto", "device", "host", "disk"),
                   help="where the decoded uint8 set is kept: auto = the device when it fits in half its free "
                        "memory, else host memory, else a memory-mapped file; the batches are the same")
    p.add_argument("--cache-dir", default=None,
                   help="where image folders, CelebA and LSUN are cached once decoded (default: beside the data, "
                        "or ~/.cache/gan-papers when that is read-only)")
    p.add_argument("--strict-images", action="store_true",
                   help="stop at an image file that does not decode (default: leave it out with a warning)")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64),
                   help="official code: gan_cifar.py, 32x32 (64 adds one stride-2 layer to G and D)")
    p.add_argument("--batch-size", type=int, default=64, help="Alg. 1: m; official code: BATCH_SIZE = 64")
    p.add_argument("--lr", type=float, default=1e-4, help="Alg. 1: Adam alpha = 0.0001")
    p.add_argument("--beta1", type=float, default=0.0,
                   help="Alg. 1, App. B and official gan_64x64.py, gan_cifar_resnet.py: 0; App. E, gan_cifar.py: 0.5")
    p.add_argument("--beta2", type=float, default=0.9, help="Alg. 1: beta2 = 0.9")
    p.add_argument("--lambda-gp", type=float, default=10.0, help="Alg. 1, §4: penalty coefficient lambda = 10")
    p.add_argument("--n-critic", type=int, default=5,
                   help="Alg. 1: n_critic = 5 critic iterations per generator iteration")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="official code: 128-dimensional z ~ N(0, I)")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="official code: DIM = 128 (G: 4*DIM -> 2*DIM -> DIM; D: DIM -> 2*DIM -> 4*DIM)")
    p.add_argument("--iters", type=int, default=200_000,
                   help="generator iterations; official code: gan_cifar.py ITERS = 200000 (Fig. 3's x axis)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator iterations in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    add_speed_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=1000, help="generator iterations between fixed-noise grids")
    p.add_argument("--log-every", type=int, default=100,
                   help="generator iterations between scalar logs (official code: every 100); each log is the "
                        "mean over the iterations since the last one")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="generator iterations between checkpoints")
    add_metric_flags(p)
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain; the flags every folder shares are checked by check_run_flags."""
    for name in ("batch_size", "n_critic", "z_dim", "width", "iters"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 <= args.lambda_gp < math.inf:
        parser.error(f"--lambda-gp must be a non-negative number, got {args.lambda_gp}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    check_metric_args(args)


# >>> copied: sample metrics >>>
# The papers' yardstick: Inception Score (Salimans et al. 2016), FID (Heusel et al. 2017) and KID (Binkowski et al.
# 2018), all computed by torch-fidelity. G's samples and the real images go to it as uint8 tensors, never as files.
# model.sample_z's prior, as torch-fidelity names its noise sources (uniform_-1_1 is registered below)
Z_PRIOR = "normal"  # per-folder: official code (gan_cifar.py), z ~ N(0, I)
ISC_SPLITS = 10  # Salimans et al. 2016 (official code, inception_score.py): the mean and std over 10 splits
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018 (torch-fidelity's defaults): 100 subsets of 1000
EVAL_BATCH = 64  # images per forward pass of G and of the feature extractor (torch-fidelity's default)
# Flags that may be given with --evaluate; everything else comes from the run's own configuration.
EVALUABLE = {"data_root", "device", "seed", "eval_samples", "eval_real", "feature_extractor", "inception_weights"}
# Data sets with a test split for --eval-real test (torchvision reads them as whole arrays).
TEST_SPLITS = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
               "cifar10": torchvision.datasets.CIFAR10}

if "uniform_-1_1" not in NOISE_SOURCE_REGISTRY:
    # z ~ U(-1, 1)^d, drawn from torch-fidelity's own seeded NumPy stream like its "normal" source
    register_noise_source("uniform_-1_1", lambda rng, shape: torch.from_numpy(rng.uniform(-1.0, 1.0, shape)).float())


def add_metric_flags(p):
    p.add_argument("--evaluate", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="print the Inception Score, FID and KID of a trained G (a run folder's checkpoints/best.pt "
                        "when it kept one, else its last.pt; or a checkpoint file), write metrics.json into its run "
                        "folder, and exit")
    p.add_argument("--eval-samples", type=int, default=50_000,
                   help="samples of G that --evaluate scores; 50,000 in 10 splits is the IS protocol of Salimans "
                        "et al. 2016 (official code) and of the official WGAN-GP code (gan_cifar_resnet.py)")
    p.add_argument("--eval-real", default="train", choices=("train", "test"),
                   help="the real images FID and KID compare against: the training set as train.py prepares it, "
                        "or the test split (mnist, fashion-mnist, cifar10) prepared the same way")
    p.add_argument("--eval-every", type=int, default=None,
                   help="during training, every N steps: IS, FID and KID on --eval-every-samples samples, logged "
                        "as metrics/is, metrics/fid, metrics/kid; the best FID's checkpoint is kept as "
                        "checkpoints/best.pt (default: off)")
    p.add_argument("--eval-every-samples", type=int, default=10_000,
                   help="samples of G for each --eval-every evaluation (fewer than --eval-samples: faster, "
                        "and FID is higher at fewer samples, so compare only numbers of the same sample count)")
    p.add_argument("--feature-extractor", default="inception-v3-compat",
                   help="torch-fidelity's feature extractor; inception-v3-compat is its port of the TensorFlow "
                        "Inception-v3 that the IS and FID reference code uses")
    p.add_argument("--inception-weights", default=None, metavar="FILE",
                   help="a local copy of the feature extractor's weights (default: torch-fidelity downloads "
                        f"{inception_weights_file()} into torch's hub checkpoints folder at first use)")


def check_metric_args(args):
    for name in ("eval_samples", "eval_every_samples"):
        if getattr(args, name) < ISC_SPLITS:
            fail(f"--{name.replace('_', '-')} must be at least {ISC_SPLITS} (the Inception Score is "
                 f"averaged over {ISC_SPLITS} splits), got {getattr(args, name)}")
    if args.eval_every is not None and args.eval_every < 1:
        fail(f"--eval-every must be at least 1, got {args.eval_every}")
    if args.eval_real == "test" and args.dataset not in TEST_SPLITS:
        fail(f"--eval-real test: {args.dataset} has no test split here (those with one: "
             f"{', '.join(TEST_SPLITS)}); use --eval-real train")
    if args.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        fail(f"--feature-extractor {args.feature_extractor!r} is not one of torch-fidelity's: "
             f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)}")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        fail(f"--inception-weights {args.inception_weights}: no such file")


def reason_of(error):
    """The first line of an exception's message, or its type's name."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def inception_weights_file():
    """The file name under which torch-fidelity's Inception-v3 weights are downloaded and looked for."""
    return Path(URL_INCEPTION_V3).name


def extractor_failure(args, error):
    """One line saying why the feature extractor could not be created, and what the user can do about it."""
    reason = reason_of(error)
    if args.inception_weights is not None:
        return f"--inception-weights {args.inception_weights}: not usable by {args.feature_extractor} ({reason})"
    if args.feature_extractor != "inception-v3-compat":
        return f"the feature extractor {args.feature_extractor} could not be created ({reason})"
    path = Path(torch.hub.get_dir()) / "checkpoints" / inception_weights_file()
    return (f"the Inception-v3 weights {path} are unreadable ({reason}); delete the file to download it again, or "
            f"pass --inception-weights FILE")


@contextlib.contextmanager
def rng_untouched(device):
    """Run the evaluation without moving any random stream of the training (an exact resume stays exact)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def download_inception_weights():
    """torch-fidelity's Inception-v3 weights into torch's hub folder, where it looks for them; exit 2 if offline."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    if (folder / inception_weights_file()).exists():
        return
    print(f"downloading the Inception-v3 weights {URL_INCEPTION_V3} into {folder} (once)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(folder / inception_weights_file()), progress=True)
    except Exception as error:  # no network, a refused connection, an unwritable folder
        reason = reason_of(error)
        fail(f"the Inception-v3 weights {inception_weights_file()} are not in {folder} and could not be "
             f"downloaded ({reason}); copy the file into that folder (from {URL_INCEPTION_V3}), or pass "
             f"--inception-weights FILE")


def check_feature_extractor(args, device):
    """Create the feature extractor once, downloading its weights at first use; exit 2 if that cannot be done."""
    if args.feature_extractor == "inception-v3-compat" and args.inception_weights is None:
        download_inception_weights()
    extractor = FEATURE_EXTRACTORS_REGISTRY[args.feature_extractor]
    with rng_untouched(device):
        try:
            extractor(args.feature_extractor, [extractor.get_default_feature_layer_for_metric("fid")],
                      feature_extractor_weights_path=args.inception_weights, verbose=False)
        except Exception as error:  # a missing, corrupt or mismatched weights file
            fail(extractor_failure(args, error))


def real_images(args):
    """The real set as a CPU uint8 tensor (N, C, H, W): the training set exactly as train.py trains on it, or
    the test split prepared the same way (the whole image resized once, antialiased, rounded to uint8)."""
    if args.eval_real == "train":
        return training_images(args)
    try:
        data = torch.as_tensor(TEST_SPLITS[args.dataset](args.data_root, train=False, download=True).data)
    except Exception as error:  # missing or corrupt files, or a failed download
        reason = reason_of(error)
        raise DataError(f"the {args.dataset} test split is not readable under {args.data_root} ({reason}); put it "
                        f"there, or use --eval-real train") from None
    images = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2).contiguous()
    if images.shape[-1] == args.image_size:
        return images
    resized = F.interpolate(images.float(), size=(args.image_size, args.image_size), mode="bilinear", antialias=True)
    return resized.round_().clamp_(0, 255).to(torch.uint8)


class RealImages(torch.utils.data.Dataset):
    """The real images as torch-fidelity takes them: uint8 (3, H, W), a single channel repeated three times."""

    def __init__(self, images):
        self.images = images
        self.progress = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image

    def __getitems__(self, indices):
        """A whole batch at once (the DataLoader's batched fetch), with a progress bar."""
        if self.progress is None:
            self.progress = tqdm(total=len(self), desc=f"embedding the {len(self)} real images (once)", unit="img",
                                 leave=False, dynamic_ncols=True)
        self.progress.update(len(indices))
        images = self.images[indices]
        return list(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)


class RealSet:
    """The real images FID and KID compare against, and the name and folder of torch-fidelity's cache of their
    features: keyed by data set, split, image size, image count and content, and the extractor's weights."""

    def __init__(self, args):
        try:
            images = torch.as_tensor(real_images(args))
        except DataError as error:
            fail(error)
        self.dataset = RealImages(images)
        self.description = (f"the {len(images)} {args.eval_real} images of {args.dataset} at "
                            f"{args.image_size}x{args.image_size}")
        content = hashlib.sha1()
        for start in range(0, len(images), 4096):
            content.update(images[start:start + 4096].contiguous().numpy())
        # torch-fidelity adds the extractor's name to the file names; its weights are identified here
        weights = (hashlib.sha256(Path(args.inception_weights).read_bytes()).hexdigest()[:8]
                   if args.inception_weights else "default")
        self.cache_name = (f"{args.dataset}-{args.eval_real}-{args.image_size}px-{len(images)}-"
                           f"{content.hexdigest()[:12]}-weights-{weights}")
        self.cache_root = writable_folder(Path(args.data_root) / ".fidelity-cache",
                                          Path(torch.hub.get_dir()).parent / "fidelity_cache")
        if self.cache_root is None:
            tqdm.write("neither the data root nor torch's folder is writable: the real set's features will be "
                       "computed at every evaluation")
        elif self.cache_root.parent != Path(args.data_root):
            tqdm.write(f"the data root {args.data_root} is not writable; the real set's features are cached in "
                       f"{self.cache_root}")

    def cached(self, extractor):
        return self.cache_root is not None and any(self.cache_root.glob(f"{self.cache_name}-{extractor}-*"))


def writable_folder(*candidates):
    """The first folder that can be created and written to, or None."""
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
            return folder
        except OSError:
            continue
    return None


class Samples(GenerativeModelBase):
    """G as torch-fidelity samples it: z from model.sample_z's prior (torch-fidelity's seeded noise source
    Z_PRIOR), G in eval mode, the tanh output mapped back to uint8 pixels with three channels."""

    def __init__(self, G, z_dim, device, progress):
        super().__init__()
        self.draw = functools.partial(sample, G)  # not a submodule: torch-fidelity may move its model, never G
        self.dimension, self.device, self.progress = z_dim, device, progress

    @property
    def z_size(self):
        return self.dimension

    @property
    def z_type(self):
        return Z_PRIOR

    @property
    def num_classes(self):
        return 0

    def forward(self, z):
        images = self.draw(z.to(self.device)).float()
        self.progress.update(len(z))
        # [-1, 1] back to pixels: the inverse of the data's x / 127.5 - 1
        pixels = images.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
        return pixels.expand(-1, 3, -1, -1) if pixels.shape[1] == 1 else pixels


def sample_metrics(G, args, device, real, num_samples):
    """IS of num_samples samples of G; their FID and KID against the real set, whose features are cached."""
    if not real.cached(args.feature_extractor):
        tqdm.write(f"the features of {real.description} are computed once"
                   + (f" and cached in {real.cache_root}" if real.cache_root else ""))
    progress = tqdm(total=num_samples, desc=f"generating and embedding {num_samples} samples", unit="img",
                    leave=False, dynamic_ncols=True)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    kid_subset_size = min(KID_SUBSET_SIZE, num_samples, len(real.dataset))
    with rng_untouched(device), on_device:
        scores = calculate_metrics(
            input1=Samples(G, args.z_dim, device, progress), input1_model_num_samples=num_samples,
            input2=real.dataset, input2_cache_name=real.cache_name, cache=real.cache_root is not None,
            cache_root=str(real.cache_root), isc=True, fid=True, kid=True, isc_splits=ISC_SPLITS,
            kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size,
            feature_extractor=args.feature_extractor, feature_extractor_weights_path=args.inception_weights,
            batch_size=EVAL_BATCH, cuda=device.type == "cuda", rng_seed=args.seed, save_cpu_ram=True,
            verbose=False)
    progress.close()
    if real.dataset.progress is not None:
        real.dataset.progress.close()
        real.dataset.progress = None
    return {"inception_score": scores[KEY_METRIC_ISC_MEAN], "inception_score_std": scores[KEY_METRIC_ISC_STD],
            "fid": scores[KEY_METRIC_FID], "kid": scores[KEY_METRIC_KID_MEAN],
            "kid_std": scores[KEY_METRIC_KID_STD], "kid_subset_size": kid_subset_size}


def report_metrics(scores, num_samples, real):
    print(f"Inception Score: {scores['inception_score']:.3f} ± {scores['inception_score_std']:.3f} "
          f"({num_samples} samples, {ISC_SPLITS} splits)")
    print(f"FID: {scores['fid']:.3f} ({num_samples} samples against {real.description})")
    print(f"KID: {scores['kid']:.5f} ± {scores['kid_std']:.5f} ({KID_SUBSETS} subsets of {scores['kid_subset_size']})")


def evaluate_checkpoint(args, checkpoint, device):
    """--evaluate: IS, FID and KID of the checkpoint's G on --eval-samples samples; metrics.json in its run folder."""
    run = Path(args.out)
    if writable_folder(run) is None:
        fail(f"cannot write metrics.json into the run folder {run}")
    check_feature_extractor(args, device)
    G = Generator(args.image_size, args.channels, args.z_dim, args.width)
    try:
        G.load_state_dict(checkpoint["G"])
    except (KeyError, RuntimeError) as error:
        fail(f"--evaluate {args.evaluate}: G's weights do not fit {FOLDER}'s generator ({reason_of(error)})")
    real = RealSet(args)
    path = checkpoint_path(args.evaluate, "auto")
    print(f"{FOLDER}: {path} (step {checkpoint['step']}), {args.eval_samples} samples against {real.description}")
    scores = sample_metrics(G.to(device), args, device, real, args.eval_samples)
    report_metrics(scores, args.eval_samples, real)
    record = {"folder": FOLDER, "checkpoint": str(path.resolve()), "step": checkpoint["step"],
              "samples": args.eval_samples, "dataset": args.dataset, "image_size": args.image_size,
              "real_split": args.eval_real, "real_images": len(real.dataset), **scores,
              "isc_splits": ISC_SPLITS, "kid_subsets": KID_SUBSETS, "z_prior": Z_PRIOR, "seed": args.seed,
              "feature_extractor": args.feature_extractor,
              "feature_extractor_weights": args.inception_weights or (
                  inception_weights_file() if args.feature_extractor == "inception-v3-compat" else "default"),
              "torch_fidelity": torch_fidelity_version, "device": str(device)}
    with writing(run / "metrics.json"):
        temporary = run / "metrics.json.tmp"
        try:
            temporary.write_text(json.dumps(record, indent=2))
            os.replace(temporary, run / "metrics.json")
        finally:
            temporary.unlink(missing_ok=True)
    print(f"wrote {run / 'metrics.json'}")
    return 0


class TrainingMetrics:
    """--eval-every: IS, FID and KID of --eval-every-samples samples of G, logged as metrics/...; the run keeps
    the checkpoint of the lowest FID as checkpoints/best.pt."""

    def __init__(self, G, args, device):
        self.G, self.args, self.device, self.real = G, args, device, None

    def __call__(self):
        if self.real is None:
            self.real = RealSet(self.args)
        scores = sample_metrics(self.G, self.args, self.device, self.real, self.args.eval_every_samples)
        tqdm.write(f"FID {scores['fid']:.3f}, IS {scores['inception_score']:.3f}, KID {scores['kid']:.5f} "
                   f"({self.args.eval_every_samples} samples)")
        scalars = {"metrics/fid": scores["fid"], "metrics/is": scores["inception_score"], "metrics/kid": scores["kid"]}
        return scalars, scores["fid"]


# <<< copied: sample metrics <<<


# >>> copied: speed >>>
# The networks that --compile compiles. torch.compile cannot differentiate a gradient a second time
# (double backward), so a network whose input gradient enters the loss (a gradient penalty) stays eager.
COMPILED = ("G",)  # per-folder


def add_speed_flags(p):
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32: float32 throughout, as the papers' official code trained. bf16: each network's "
                        "forward runs under bfloat16 autocast and returns float32; losses, parameters and optimiser "
                        "state stay float32. Part of the run's configuration: --resume keeps it")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the convolutions' weights, and so their activations, in channels-last memory layout "
                        "(off: PyTorch's default layout); the arithmetic and the checkpoint are the same, the speed "
                        "depends on the hardware (see the top-level README). --resume may turn it on or off")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help=f"torch.compile {' and '.join(COMPILED)} in place (off: eager PyTorch, as the papers' code "
                        "ran); the checkpoint does not change. --resume may turn it on or off; the resumed run then "
                        "matches an uninterrupted one only up to rounding")


def speed_up(networks, precision, compile, device, channels_last=False):
    """--precision, --channels-last and --compile, applied in place to {name: network}. Parameters, buffers
    and state_dict keys do not change, so checkpoints are the same with and without them."""
    for name, net in networks.items():
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if precision == "bf16":
            net.forward = bf16_forward(net, device.type)
        if compile and name in COMPILED:
            # One graph per input shape (dynamic=False): the sample grid's batch leaves the training graph static.
            net.compile(dynamic=False)
    if compile:
        print(f"--compile: {' and '.join(n for n in networks if n in COMPILED)} compile during the first steps")


def bf16_forward(net, device_type):
    """net.forward under bfloat16 autocast, with its output returned as float32.

    Autocast runs convolutions and matrix products on bfloat16 copies of the float32 weights, so
    the float32 parameters remain the master weights and every loss is computed in float32.
    Parametrized weights (spectral norm's W / sigma(W)) are computed first, outside autocast: the
    power iteration and sigma stay float32, and cached() keeps them to one computation, so one
    power iteration, per forward.
    """
    forward = net.forward
    parametrized = [(module, name) for module in net.modules() if parametrize.is_parametrized(module)
                    for name in module.parametrizations]

    def forward_in_bf16(*inputs):
        with parametrize.cached():
            for module, name in parametrized:
                getattr(module, name)
            with torch.autocast(device_type, torch.bfloat16):
                output = forward(*inputs)
        return output.float()

    return forward_in_bf16
# <<< copied: speed <<<


# >>> copied: run management >>>
# Everything below runs the paper's loop: the flags of --resume and --evaluate, the run folder, checkpoints,
# logs, signals and the NaN guard. It is the same in the seven train.py files apart from lines marked
# per-folder, and tests/test_copies.py keeps it so.


def parse_args(argv):
    """The run's configuration and, with --resume or --evaluate, the checkpoint it continues or scores."""
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume and args.evaluate:
        parser.error("give --resume or --evaluate, not both")
    if args.resume or args.evaluate:
        flag, allowed = ("--resume", RESUMABLE) if args.resume else ("--evaluate", EVALUABLE)
        path = checkpoint_path(args.resume or args.evaluate, "last" if args.resume else "auto")
        try:
            checkpoint = read_checkpoint(path)
        except CheckpointError as error:
            parser.error(f"{flag}: {error}")
        # the run keeps its own configuration: only the flags in `allowed` may differ from it
        given = explicit_flags(parser, argv)
        changed = sorted(f"--{name.replace('_', '-')}" for name, value in given.items()
                         if name not in allowed | {"resume", "evaluate"} and value != checkpoint["args"].get(name))
        if changed:
            parser.error(f"{flag} uses the run's own configuration; {', '.join(changed)} cannot change (allowed: "
                         f"{', '.join('--' + name.replace('_', '-') for name in sorted(allowed))})")
        args = argparse.Namespace(**{**vars(args), **checkpoint["args"], **given, "resume": args.resume,
                                     "evaluate": args.evaluate, "out": str(run_folder(path))})
    check_run_flags(parser, args)
    check_args(parser, args)
    return args, checkpoint


def explicit_flags(parser, argv):
    """The flags given on the command line, by destination name: argparse fills in a default only for a name
    that the namespace does not hold yet, so parsing into a namespace of placeholders leaves defaults out."""
    unset = object()
    names = vars(parser.parse_args(argv))
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name: value for name, value in vars(given).items() if value is not unset}


def check_run_flags(parser, args):
    """The flags every folder shares; the paper's own are checked by check_args."""
    for name in ("sample_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2^32), got {args.seed}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but no CUDA GPU is visible; use --device cpu")
    if args.out is not None and not args.evaluate:
        problem = unwritable(Path(args.out))
        if problem:
            parser.error(f"--out {args.out}: {problem}")


def unwritable(folder):
    """Why `folder` cannot become a run folder, or None; nothing is created to find out."""
    if folder.exists() and not folder.is_dir():
        return "exists and is not a folder"
    parent = next(p for p in [folder, *folder.parents] if p.exists())
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


def run_folder(checkpoint):
    """The run folder of a checkpoint: RUN for RUN/checkpoints/last.pt, else the checkpoint's own folder."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def pick_device(args):
    """--device auto: CUDA when a GPU is visible, else the CPU."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


@contextlib.contextmanager
def writing(path):
    """A failed write (a full disk, a folder made read-only) ends the run with one line naming the file."""
    try:
        yield
    except OSError as error:
        reason = "the disk is full" if error.errno == errno.ENOSPC else error.strerror or str(error)
        fail(f"cannot write {path}: {reason}")


def save_checkpoint(path, state):
    """Atomic: written to a temporary file, then renamed over `path`, so a kill at any moment leaves the
    previous checkpoint whole; a failed write removes its temporary file."""
    temporary = path.with_suffix(".tmp")
    with writing(path):
        try:
            with open(temporary, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class StopRequest:
    """Ctrl-C or SIGTERM: finish the current step, write the checkpoint, stop. A second Ctrl-C quits at once."""

    def __init__(self):
        self.signal = None
        signal.signal(signal.SIGINT, self.handle)
        signal.signal(signal.SIGTERM, self.handle)

    def handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum


class Run:
    """One training run: its folder, step counter, scalars, fixed-noise grids, checkpoints (every
    --checkpoint-every steps, at the end, and on Ctrl-C or SIGTERM), the best checkpoint by `metric`, and the
    stop on NaN or Inf. A checkpoint holds every network, optimiser, RNG state and the batch position, so a
    resumed run continues exactly."""

    def __init__(self, args, checkpoint, nets, optimizers, batches, fixed_z, total, title, grid,
                 metric=None, eval_every=0, higher_is_better=True):
        if args.max_steps is not None:
            total = args.max_steps if total is None else min(total, args.max_steps)
        self.args, self.nets, self.optimizers, self.batches, self.fixed_z = args, nets, optimizers, batches, fixed_z
        self.total, self.grid, self.metric, self.eval_every = total, grid, metric, eval_every
        self.higher_is_better = higher_is_better
        self.out = Path(args.out or HERE / "runs" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        self.step, self.best = 0, None
        if checkpoint is not None:
            self.restore(checkpoint)
            if total is not None and self.step >= total:
                fail(f"{self.out} is at step {self.step}, which already reaches the length asked for ({total} steps); "
                     f"to go on, give a larger --max-steps or a longer training length")
        elif (self.out / "checkpoints" / "last.pt").exists():
            fail(f"{self.out} already holds a run; continue it with --resume {self.out}, or choose another --out")
        for folder in (self.out / "samples", self.out / "checkpoints"):
            with writing(folder):
                folder.mkdir(parents=True, exist_ok=True)
        for stray in (self.out / "checkpoints").glob("*.tmp"):  # left by a run killed while saving
            stray.unlink()
        if checkpoint is not None:
            self.restore_best_file(checkpoint)
        with writing(self.out / "args.json"):
            (self.out / "args.json").write_text(json.dumps(vars(args), indent=2))
        # events after the checkpoint's step came from a run that went past it, and are dropped
        with writing(self.out):
            self.writer = SummaryWriter(self.out, purge_step=self.step + 1 if checkpoint is not None else None)
        speed_up(nets, args.precision, args.compile, fixed_z.device, args.channels_last)
        self.stop = StopRequest()
        # the first step whose scalars were not finite, kept on the device: no host sync per step
        self.device = fixed_z.device
        self.first_bad_step = torch.tensor(-1, device=self.device)
        self.sums, self.summed = None, 0
        self.started = time.perf_counter()
        print(f"{title} on {self.device}: steps {self.step} -> {total or 'until stopped'}; "
              f"run folder {self.out}", flush=True)
        # the progress bar goes to stdout: stderr is left to warnings and to a one-line error
        self.progress = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                             file=sys.stdout)

    def running(self):
        if (self.total is None or self.step < self.total) and self.stop.signal is None:
            return True
        self.progress.close()
        return False

    def due(self, every):
        return self.step % every == 0 or self.step == self.total

    def end_step(self, scalars, also_log=None):
        """After the step's updates: count it, and log (each scalar's mean since the last log, and also_log()'s
        values, computed only then), draw, evaluate and save when their intervals come. The scalars stay on the
        device until they are logged."""
        self.step += 1
        self.progress.update()
        values = torch.stack([torch.as_tensor(value, device=self.device).detach().float()
                              for value in scalars.values()])
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~values.isfinite().all(), self.step,
                                          self.first_bad_step)
        self.sums = values if self.sums is None else self.sums + values
        self.summed += 1
        if self.due(self.args.log_every):
            self.check_finite()
            self.log({**dict(zip(scalars, (self.sums / self.summed).tolist())), **(also_log() if also_log else {})})
            self.sums, self.summed = None, 0
        if self.due(self.args.sample_every):
            grid = self.grid(self.fixed_z)
            path = self.out / "samples" / f"step_{self.step:07d}.png"
            with writing(path):
                vutils.save_image(grid, path)
                self.writer.add_image("samples", grid, self.step)
        if self.eval_every and self.step % self.eval_every == 0:
            self.evaluate()
        if self.step % self.args.checkpoint_every == 0:
            self.check_finite()
            self.save("last.pt")

    def log(self, scalars):
        with writing(self.out):
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, self.step)
        self.progress.set_postfix({name.split("/")[-1]: f"{value:.4g}" for name, value in list(scalars.items())[:2]})

    def evaluate(self):
        """The metric now; a new best is saved as best.pt, with last.pt at the same step (see restore_best_file)."""
        self.check_finite()
        scalars, score = self.metric()
        self.log(scalars)
        higher, best = self.higher_is_better, self.best
        if math.isfinite(score) and (best is None or (score > best["score"] if higher else score < best["score"])):
            self.best = {"score": score, "step": self.step}
            self.save("last.pt")
            self.save("best.pt")

    def check_finite(self):
        """Stop, keeping the last good checkpoint, if a scalar, a weight or a buffer has become NaN or Inf."""
        bad_step = self.first_bad_step.item()
        tensors = [t for net in self.nets.values() for t in [*net.parameters(), *net.buffers()]
                   if t.is_floating_point()]
        if bad_step < 0 and not torch.stack([t.isfinite().all() for t in tensors]).all():
            bad_step = self.step
        if bad_step >= 0:
            self.writer.close()
            last = self.out / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
            fail(f"a loss or weight became NaN or Inf at step {bad_step}; stopped there, and {kept}", code=1)

    def state(self):
        return {"folder": FOLDER, "format": FORMAT, "step": self.step, "best": self.best, "fixed_z": self.fixed_z,
                **{name: net.state_dict() for name, net in self.nets.items()},
                **{name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
                "batches": self.batches.state_dict(), "rng": rng_states(), "args": vars(self.args)}

    def save(self, name):
        save_checkpoint(self.out / "checkpoints" / name, self.state())

    def restore(self, checkpoint):
        try:
            for name, net in self.nets.items():
                net.load_state_dict(checkpoint[name])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(checkpoint[name])
            self.batches.load_state_dict(checkpoint["batches"])
            self.fixed_z = checkpoint["fixed_z"].to(self.fixed_z.device)
            self.step, self.best = checkpoint["step"], checkpoint["best"]
            set_rng_states(checkpoint["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:  # a checkpoint of other networks
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            fail(f"--resume {self.args.resume}: the checkpoint does not fit {FOLDER}'s networks ({reason})")

    def restore_best_file(self, checkpoint):
        """A kill between writing last.pt and best.pt at a new best leaves an older best.pt: rewrite it."""
        path = self.out / "checkpoints" / "best.pt"
        if self.best is not None and self.best["step"] == self.step:
            try:
                stale = read_checkpoint(path)["step"] != self.step
            except CheckpointError:
                stale = True
            if stale:
                save_checkpoint(path, checkpoint)

    @property
    def stopped_by(self):
        """The signal (SIGINT, SIGTERM) that stopped the run, or None."""
        return self.stop.signal

    def finish(self):
        """The last checkpoint and the progress animation; returns the exit code (128 + signal if stopped)."""
        self.progress.close()
        self.check_finite()
        self.save("last.pt")
        with writing(self.out / "progress.gif"):
            write_gif(self.out / "samples", self.out / "progress.gif")
        with writing(self.out):
            self.writer.close()
        if self.stop.signal is not None:
            print(f"stopped by {signal.Signals(self.stop.signal).name} at step {self.step}; continue with: "
                  f"python train.py --resume {self.out}")
            return 128 + self.stop.signal
        print(f"done: step {self.step} of {self.total} in {(time.perf_counter() - self.started) / 60:.1f} min; "
              f"samples and checkpoint in {self.out}")
        return 0


def write_gif(samples_dir, path, max_frames=100):
    """The fixed-noise grids as an animation, at most `max_frames` of them, evenly spaced."""
    frames = sorted(samples_dir.glob("step_*.png"))
    if frames:
        picked = [frames[round(i)] for i in np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))]
        imageio.imwrite(path, [imageio.imread(f) for f in picked], duration=250, loop=0)
# <<< copied: run management <<<


if __name__ == "__main__":
    sys.exit(main())
