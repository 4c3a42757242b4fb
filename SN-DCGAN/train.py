"""SN-DCGAN (Miyato, Kataoka, Koyama & Yoshida 2018, arXiv 1802.05957), trained as §4 describes.

The standard CNN of Table 3 with spectral normalisation on every layer of D (Alg. 1).
For every generator update:
    n_dis times, each on a fresh real minibatch x and fresh z ~ N(0, I)^128:
        D descends  -[log D(x) + log(1 - D(G(z)))]            (Eq. 15; or the hinge loss, Eq. 16)
        each training forward of D runs one power iteration per layer (Eq. 20-21) and
        uses W / sigma(W) (Eq. 22)
    once: G descends  -log D(G(z))                             (§4's alternate cost; or -D(G(z)), Eq. 17)
each with Adam(alpha, beta1, beta2) and n_dis from Table 1's setting (default B).

    python train.py                                   # CIFAR-10 at 32x32, setting B, the standard loss
    python train.py --loss hinge                      # Table 2's "SN-GANs, Eq.(17)" row
    python train.py --dataset mnist --setting C
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
"""
import argparse
import contextlib
import copy
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
from model import WIDTH, Z_DIM, Discriminator, Generator, checkpoint_path, normalized_sigmas, sample, sample_z

HERE = Path(__file__).resolve().parent
GRID = 64  # fixed-noise samples in each grid (8 x 8)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "max_steps", "iters", "device", "sample_every", "log_every", "checkpoint_every",
             "compile", "eval_every", "inception_weights"}
# Table 1: the six optimiser settings, (alpha, beta1, beta2, n_dis). A follows Gulrajani et al. (2017),
# B Warde-Farley & Bengio (2017), C Radford et al. (2016); D, E, F are the aggressive ones.
SETTINGS = {
    "A": (1e-4, 0.5, 0.9, 5),
    "B": (1e-4, 0.5, 0.999, 1),
    "C": (2e-4, 0.5, 0.999, 1),
    "D": (1e-3, 0.5, 0.9, 5),
    "E": (1e-3, 0.5, 0.999, 5),
    "F": (1e-3, 0.9, 0.999, 5),
}
# §4.1: Table 2 shows each method "with optimal settings"; footnote 4: "the optimal setting of
# SN-GANs (setting B, n_dis = 1) is computationally light".
DEFAULT_SETTING = "B"
SETTING_FLAGS = ("lr", "beta1", "beta2", "n_dis")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; §4.1 and Table 2: CIFAR-10 (torchvision downloads it)")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--image-size", type=int, default=32,
                   help="M, a multiple of 8; Table 3: M = 32 for CIFAR-10 (48 for STL-10). G starts and D ends "
                        "at M/8 x M/8")
    p.add_argument("--batch-size", type=int, default=64,
                   help="the paper gives none; official code: chainer-gan-lib train.py --batchsize 64")
    p.add_argument("--setting", default=DEFAULT_SETTING, choices=sorted(SETTINGS),
                   help="Table 1's (alpha, beta1, beta2, n_dis): " +
                        ", ".join(f"{k} {v}" for k, v in SETTINGS.items()) +
                        ". Default B: §4.1 reports Table 2 'with optimal settings', and footnote 4 names "
                        "'the optimal setting of SN-GANs (setting B, n_dis = 1)' (in its STL-10 discussion); App. C.1's Fig. 9 "
                        "and the official code's SN-DCGAN command use C")
    p.add_argument("--lr", type=float, default=None, help="Adam alpha; None: the --setting's value (Table 1)")
    p.add_argument("--beta1", type=float, default=None, help="Adam beta1; None: the --setting's value (Table 1)")
    p.add_argument("--beta2", type=float, default=None, help="Adam beta2; None: the --setting's value (Table 1)")
    p.add_argument("--n-dis", type=int, default=None,
                   help="n_dis, D updates per G update; None: the --setting's value (Table 1)")
    p.add_argument("--loss", default="standard", choices=("standard", "hinge"),
                   help="standard: Eq. 15 for D and -log D(G(z)) for G (§4; Table 2's 'SN-GANs' row); "
                        "hinge: Eq. 16-17 (Table 2's 'SN-GANs, Eq.(17)' row)")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="§4: d_z = 128, z ~ N(0, I)")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="channels of D's first and G's last hidden layer; Table 3: 64 (512 at M/8)")
    p.add_argument("--iters", type=int, default=100_000,
                   help="generator updates; §4.1: 'The number of updates for GAN generator were 100K'")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator updates in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    add_speed_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=500, help="generator updates between fixed-noise grids")
    p.add_argument("--log-every", type=int, default=50, help="generator updates between scalar logs")
    p.add_argument("--checkpoint-every", type=int, default=500, help="generator updates between checkpoints")
    add_metric_flags(p)
    return p


def parse_args(argv):
    """The run's configuration, and the checkpoint to continue from (None for a new run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.evaluate:
        return evaluation_args(parser, argv, args)
    checkpoint = None
    if args.resume:
        path = checkpoint_path(args.resume)
        if not path.is_file():
            parser.error(f"--resume {args.resume}: no checkpoint at {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            parser.error(f"--resume {args.resume}: {path} is not a readable checkpoint ({error})")
        # The run continues with its own configuration; only RESUMABLE flags may be given.
        quiet = copy.deepcopy(parser)
        for action in quiet._actions:
            action.default = argparse.SUPPRESS
        given = vars(quiet.parse_args(argv))
        changed = sorted(k for k, v in given.items() if k not in RESUMABLE and v != checkpoint["args"].get(k))
        if changed:
            parser.error(f"--resume continues a run with its own configuration; {', '.join(changed)} cannot "
                         f"change (allowed: {', '.join(sorted(RESUMABLE - {'resume'}))})")
        args = argparse.Namespace(**{**vars(args), **checkpoint["args"], **given, "out": str(path.parent.parent)})
    # Table 1: the setting fills in every optimiser flag that was not given
    for name, value in zip(SETTING_FLAGS, SETTINGS[args.setting]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    check_args(parser, args)
    return args, checkpoint


def check_args(parser, args):
    for name in ("batch_size", "n_dis", "z_dim", "width", "iters", "sample_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.image_size < 8 or args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 (Table 3: G starts and D ends at M/8), "
                     f"got {args.image_size}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; use --device cpu")
    check_metric_args(args)


def fail(message, code=2):
    """A one-line error, no traceback, for a problem the user can fix."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


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


def save_checkpoint(path, state):
    """Atomic: a reader (or a kill -9) never sees a half-written last.pt."""
    temporary = path.with_suffix(".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def write_gif(samples_dir, path, max_frames=100):
    frames = sorted(samples_dir.glob("step_*.png"))
    if frames:
        picked = [frames[round(i)] for i in np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))]
        imageio.imwrite(path, [imageio.imread(f) for f in picked], duration=250, loop=0)


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


# >>> copied: speed >>>
# The networks that --compile compiles. torch.compile cannot differentiate a gradient a second time
# (double backward), so a network whose input gradient enters the loss (a gradient penalty) stays eager.
COMPILED = ("G", "D")  # per-folder


def add_speed_flags(p):
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32: float32 throughout, as the papers' official code trained. bf16: each network's "
                        "forward runs under bfloat16 autocast and returns float32; losses, parameters and optimiser "
                        "state stay float32. Part of the run's configuration: --resume keeps it")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help=f"torch.compile {' and '.join(COMPILED)} in place (off: eager PyTorch, as the papers' code "
                        "ran); the checkpoint does not change. --resume may turn it on or off; the resumed run then "
                        "matches an uninterrupted one only up to rounding")


def speed_up(networks, precision, compile, device):
    """--precision and --compile, applied in place to {name: network}. Parameters, buffers and
    state_dict keys do not change, so checkpoints are the same with and without them."""
    for name, net in networks.items():
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


def discriminator_loss(real_logits, fake_logits, kind):
    """D's loss to minimise, on the logits f(x) and f(G(z)).

    standard (Eq. 15, D maximises E[log D(x)] + E[log(1 - D(G(z)))] with D = sigmoid(f)):
        softplus(-f(x)) + softplus(f(G(z))), which BCEWithLogits computes stably.
    hinge (Eq. 16, D maximises E[min(0, -1 + f(x))] + E[min(0, -1 - f(G(z)))]):
        E[relu(1 - f(x))] + E[relu(1 + f(G(z)))].
    """
    if kind == "hinge":
        return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))


def generator_loss(fake_logits, kind):
    """G's loss to minimise: §4's alternate cost -E[log D(G(z))] (standard), or Eq. 17's -E[f(G(z))] (hinge)."""
    if kind == "hinge":
        return -fake_logits.mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_step(G, D, opt_D, x, z, kind):
    """One update of D (Alg. 1). G is held fixed: its output carries no graph.

    Real and fake images go through D in one forward, so each layer runs exactly one power
    iteration (Eq. 20-21) for this update and both halves of the loss see the same W / sigma(W)
    (Eq. 22). D has no batch norm, so putting them in one batch changes nothing else.
    """
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(torch.cat((x, fake))).split((len(x), len(fake)))
    loss = discriminator_loss(real_logits, fake_logits, kind)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    # Alg. 1 step 3 (Eq. 23): update W with the gradient taken through W / sigma(W), here with Adam (§4.1)
    opt_D.step()
    return loss.detach(), real_logits.detach().mean(), fake_logits.detach().mean()


def generator_step(G, D, opt_G, z, kind):
    """One update of G on a fresh z. D is held fixed (its forward still refines u, as every training forward does)."""
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    loss = generator_loss(D(G(z)), kind)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


# >>> copied: sample metrics >>>
# The papers' yardstick: Inception Score (Salimans et al. 2016), FID (Heusel et al. 2017) and KID (Binkowski et al.
# 2018), all computed by torch-fidelity. G's samples and the real images go to it as uint8 tensors, never as files.
FOLDER = "SN-DCGAN"  # per-folder
# model.sample_z's prior, as torch-fidelity names its noise sources (uniform_-1_1 is registered below)
Z_PRIOR = "normal"  # per-folder: §4, z ~ N(0, I)
ISC_SPLITS = 10  # Salimans et al. 2016 (official code, inception_score.py): the mean and std over 10 splits
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018 (torch-fidelity's defaults): 100 subsets of 1000
EVAL_BATCH = 64  # images per forward pass of G and of the feature extractor (torch-fidelity's default)
# Flags that may be given with --evaluate; everything else comes from the run's own configuration.
EVALUABLE = {"evaluate", "data_root", "device", "seed", "eval_samples", "eval_real", "feature_extractor",
             "inception_weights"}
# Data sets with a test split for --eval-real test (torchvision reads them as whole arrays).
TEST_SPLITS = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST,
               "cifar10": torchvision.datasets.CIFAR10}

if "uniform_-1_1" not in NOISE_SOURCE_REGISTRY:
    # z ~ U(-1, 1)^d, drawn from torch-fidelity's own seeded NumPy stream like its "normal" source
    register_noise_source("uniform_-1_1", lambda rng, shape: torch.from_numpy(rng.uniform(-1.0, 1.0, shape)).float())


def add_metric_flags(p):
    p.add_argument("--evaluate", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="print the Inception Score, FID and KID of a trained G (a run folder's checkpoints/last.pt, "
                        "or a checkpoint file such as checkpoints/best.pt), write metrics.json into its run "
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


def evaluation_args(parser, argv, args):
    """--evaluate: the configuration of the run that wrote the checkpoint, and the checkpoint."""
    if args.resume:
        fail("--resume and --evaluate exclude each other")
    path = checkpoint_path(args.evaluate)
    if not path.is_file():
        fail(f"--evaluate {args.evaluate}: no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        fail(f"--evaluate {args.evaluate}: {path} is not a readable checkpoint ({reason_of(error)})")
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("args"), dict) and "G" in checkpoint):
        fail(f"--evaluate {args.evaluate}: {path} is not a checkpoint written by train.py")
    # Every folder has flags of its own, and a checkpoint records the flags of the train.py that wrote it.
    foreign = sorted(set(checkpoint["args"]) - {action.dest for action in parser._actions} - {"channels"})
    if foreign:
        fail(f"--evaluate {args.evaluate}: {path} was written by another folder's train.py (its "
             f"settings {', '.join(foreign)} are not {FOLDER}'s)")
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    given = vars(quiet.parse_args(argv))
    changed = sorted(k for k, v in given.items() if k not in EVALUABLE and v != checkpoint["args"].get(k))
    if changed:
        fail(f"--evaluate uses the run's own configuration; {', '.join(changed)} cannot change "
             f"(allowed: {', '.join(sorted(EVALUABLE - {'evaluate'}))})")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    args = argparse.Namespace(**{**vars(args), **checkpoint["args"], **given, "resume": None, "out": str(run)})
    check_args(parser, args)
    return args, checkpoint


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
        return load_images(args.dataset, args.data_root, args.image_size)
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
    G = Generator(args.image_size, args.channels, args.z_dim, args.width).to(device)
    try:
        G.load_state_dict(checkpoint["G"])
    except RuntimeError as error:
        fail(f"--evaluate {args.evaluate}: G's weights do not fit {FOLDER}'s generator ({reason_of(error)})")
    real = RealSet(args)
    path = checkpoint_path(args.evaluate)
    print(f"{FOLDER}: {path} (step {checkpoint['step']}), {args.eval_samples} samples against {real.description}")
    scores = sample_metrics(G, args, device, real, args.eval_samples)
    report_metrics(scores, args.eval_samples, real)
    record = {"folder": FOLDER, "checkpoint": str(path.resolve()), "step": checkpoint["step"],
              "samples": args.eval_samples, "dataset": args.dataset, "image_size": args.image_size,
              "real_split": args.eval_real, "real_images": len(real.dataset), **scores,
              "isc_splits": ISC_SPLITS, "kid_subsets": KID_SUBSETS, "z_prior": Z_PRIOR, "seed": args.seed,
              "feature_extractor": args.feature_extractor,
              "feature_extractor_weights": args.inception_weights or (
                  inception_weights_file() if args.feature_extractor == "inception-v3-compat" else "default"),
              "torch_fidelity": torch_fidelity_version, "device": str(device)}
    temporary = run / "metrics.json.tmp"
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, run / "metrics.json")
    print(f"wrote {run / 'metrics.json'}")
    return 0


class MetricsDuringTraining:
    """--eval-every: IS, FID and KID every N steps, logged as metrics/...; the best FID so far is part of the
    checkpoint, and its weights are kept as checkpoints/best.pt."""

    def __init__(self, args, device, checkpoint):
        self.args, self.device = args, device
        self.best = checkpoint.get("best") if checkpoint is not None else None
        self.real = None
        if args.eval_every:
            check_feature_extractor(args, device)

    def due(self, step):
        return self.args.eval_every is not None and step % self.args.eval_every == 0

    def update(self, G, step, writer, save_best):
        """Score G at this step; call save_best() when its FID is the best so far (after self.best is updated)."""
        if self.real is None:
            self.real = RealSet(self.args)
        scores = sample_metrics(G, self.args, self.device, self.real, self.args.eval_every_samples)
        writer.add_scalar("metrics/fid", scores["fid"], step)
        writer.add_scalar("metrics/is", scores["inception_score"], step)
        writer.add_scalar("metrics/kid", scores["kid"], step)
        if math.isfinite(scores["fid"]) and (self.best is None or scores["fid"] < self.best["fid"]):
            self.best = {"fid": scores["fid"], "step": step, "samples": self.args.eval_every_samples}
            save_best()
        best = f"; best FID {self.best['fid']:.3f} at step {self.best['step']}" if self.best else ""
        tqdm.write(f"step {step}: FID {scores['fid']:.3f}, IS {scores['inception_score']:.3f}, KID "
                   f"{scores['kid']:.5f} ({self.args.eval_every_samples} samples){best}")
# <<< copied: sample metrics <<<


def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    seed_everything(args.seed)
    if args.evaluate:
        return evaluate_checkpoint(args, checkpoint, device)
    metrics = MetricsDuringTraining(args, device, checkpoint)

    out = Path(args.out or HERE / "runs" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    if checkpoint is None and (out / "checkpoints" / "last.pt").exists():
        fail(f"{out} already holds a run; continue it with --resume {out}, or choose another --out")
    try:
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "args.json").touch()
    except OSError as error:
        fail(f"cannot write the run folder --out {out}: {error.strerror or error}")

    try:
        images = load_images(args.dataset, args.data_root, args.image_size)
        batches = Batches(images, args.batch_size, device, args.seed)
    except DataError as error:
        fail(error)
    args.channels = CHANNELS[args.dataset]

    # Table 3; weights N(0, 0.02) (official code); Alg. 1: u initialised for every layer of D
    G = Generator(args.image_size, args.channels, args.z_dim, args.width).to(device)
    D = Discriminator(args.image_size, args.channels, args.width).to(device)
    # §4.1: "we used the Adam optimizer ... in all of our experiments", with Table 1's alpha, beta1, beta2
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2))
    fixed_z = sample_z(GRID, args.z_dim, device)
    step = 0
    if checkpoint is not None:
        G.load_state_dict(checkpoint["G"])
        D.load_state_dict(checkpoint["D"])  # the weights and each layer's power-iteration vectors u, v
        opt_G.load_state_dict(checkpoint["opt_G"])
        opt_D.load_state_dict(checkpoint["opt_D"])
        batches.load_state_dict(checkpoint["batches"])
        fixed_z = checkpoint["fixed_z"].to(device)
        step = checkpoint["step"]
        set_rng_states(checkpoint["rng"])
    # --precision and --compile; by default neither changes anything (float32, eager: the papers' setting)
    speed_up({"G": G, "D": D}, args.precision, args.compile, device)

    total = args.iters if args.max_steps is None else min(args.iters, args.max_steps)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"SN-DCGAN on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x{args.channels}) "
          f"on {device}: generator updates {step} -> {total}, setting {args.setting} (lr {args.lr}, betas "
          f"{args.beta1}/{args.beta2}, n_dis {args.n_dis}), {args.loss} loss; run folder {out}")

    def state():
        return {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "batches": batches.state_dict(), "fixed_z": fixed_z, "step": step, "rng": rng_states(),
                "best": metrics.best, "args": vars(args)}

    def check_finite():
        """Stop, keeping the last good checkpoint, if a loss, a weight or a buffer has become NaN or Inf.

        Buffers too: G's batch-norm running statistics and D's power-iteration vectors go into the checkpoint.
        """
        bad_step = first_bad_step.item()
        tensors = [t for t in [*G.parameters(), *D.parameters(), *G.buffers(), *D.buffers()] if t.is_floating_point()]
        if bad_step < 0 and not torch.stack([t.isfinite().all() for t in tensors]).all():
            bad_step = step
        if bad_step >= 0:
            writer.close()
            last = out / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
            fail(f"a loss, weight or buffer became NaN or Inf at step {bad_step}; stopped there, and {kept}", code=1)

    # The first step whose losses were not finite, kept on the device: no host sync per step.
    first_bad_step = torch.tensor(-1, device=device)
    stop = StopRequest()
    progress = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    started = time.perf_counter()
    while step < total and stop.signal is None:
        # Table 1: n_dis updates of D per update of G, each on a fresh real minibatch x and fresh z ~ N(0, I)
        for _ in range(args.n_dis):
            x = next(batches)
            loss_D, D_real, D_fake = discriminator_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device),
                                                        args.loss)
        # one update of G on a fresh minibatch of z
        loss_G = generator_step(G, D, opt_G, sample_z(args.batch_size, args.z_dim, device), args.loss)
        step += 1
        progress.update()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_D + loss_G), step, first_bad_step)

        if step % args.log_every == 0 or step == total:
            check_finite()
            scalars = {"loss/D": loss_D.item(), "loss/G": loss_G.item(), "D/real": D_real.item(),
                       "D/fake": D_fake.item()}
            # Appendix C.1, Fig. 9: the spectral norm of each normalised layer should stay near 1
            scalars.update({f"sn/sigma_{name}": sigma.item() for name, sigma in normalized_sigmas(D).items()})
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(loss_D=f"{scalars['loss/D']:.3f}", loss_G=f"{scalars['loss/G']:.3f}")
        if step % args.sample_every == 0 or step == total:
            grid = vutils.make_grid(sample(G, fixed_z), nrow=8, normalize=True, value_range=(-1, 1))
            vutils.save_image(grid, out / "samples" / f"step_{step:07d}.png")
            writer.add_image("samples", grid, step)
        if metrics.due(step):
            check_finite()
            metrics.update(G, step, writer, lambda: save_checkpoint(out / "checkpoints" / "best.pt", state()))
        if step % args.checkpoint_every == 0:
            check_finite()
            save_checkpoint(out / "checkpoints" / "last.pt", state())
    progress.close()

    check_finite()
    save_checkpoint(out / "checkpoints" / "last.pt", state())
    write_gif(out / "samples", out / "progress.gif")
    writer.close()
    elapsed = time.perf_counter() - started
    if stop.signal is not None:
        print(f"stopped by {signal.Signals(stop.signal).name} at step {step}; continue with: "
              f"python train.py --resume {out}")
        return 128 + stop.signal
    print(f"done: generator update {step} of {total} in {elapsed / 60:.1f} min; samples and checkpoint in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
