"""Conditional GAN (Mirza & Osindero 2014, arXiv 1411.1784), trained on MNIST as §4.1 describes.

The GAN's Algorithm 1 (Goodfellow et al. 2014, k = 1) with both players conditioned on the one-hot
label y (§3, Eq. 2):
    for each minibatch of m examples (x, y):
        sample m noise samples z ~ U[0, 1]^100
        update D by ascending  log D(x|y) + log(1 - D(G(z|y)|y))    (G held fixed)
        sample m fresh noise samples z
        update G by ascending  log D(G(z|y)|y)                       (the non-saturating form; D held fixed)
with SGD (§4.1): m = 100, lr 0.1 divided by 1.00004 every step down to 1e-6, momentum rising from
0.5 to 0.7, dropout 0.5 in both networks. The best validation log-likelihood picks the stopping point.

    python train.py                                   # MNIST, the paper's settings
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --evaluate runs/RUN               # the paper's Parzen-window log-likelihood (Table 1)
"""
import argparse
import contextlib
import errno
import json
import math
import os
import random
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils as vutils
from torch.nn.utils import parametrize
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dataset import DATASETS, VALID_SIZE, Batches, DataError, load_labelled, split_validation, to_unit
from model import (CLASSES, D_IRANGE, DROPOUT, FOLDER, FORMAT, G_IRANGE, IMAGE_SIZE, Z_DIM, CheckpointError,
                   Discriminator, FlagParser, Generator, checkpoint_path, fail, grid_inputs, init_output_bias,
                   init_weights, read_checkpoint, sample, sample_z)

HERE = Path(__file__).resolve().parent
PER_ROW = 10  # the fixed grid: 10 rows (digits 0 to 9) of 10 samples, one z per column
SAMPLES_PER_CLASS = 1000  # §4.1: "1000 samples were drawn from each 10 class"
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"data_root", "max_steps", "epochs", "device", "compile", "channels_last", "sample_every", "log_every",
             "checkpoint_every", "evaluate_at_end", "select_every"}
# Flags that may be given with --evaluate; the data set and the networks are the run's own.
EVALUABLE = {"data_root", "device", "seed", "sampling_dropout", "parzen_per_class", "parzen_valid"}


def learning_rate(step, args):
    """§4.1: lr 0.1 "exponentially decreased down to .000001 with decay factor of 1.00004" per step
    (official GAN code: pylearn2's ExponentialDecay divides the lr by the factor after every update)."""
    return max(args.lr / args.lr_decay ** step, args.min_lr)


def momentum(epoch, args):
    """§4.1: momentum "with initial value of .5 which was increased up to 0.7"; the paper gives no schedule,
    so it follows the GAN's (official GAN code, MomentumAdjustor start 1, saturate 250): linear in the epoch,
    0.5 in the first epoch (epoch 0), 0.7 from epoch 249 (the 250th) on, set once per epoch."""
    alpha = min(epoch / (args.momentum_saturate - 1), 1.0) if args.momentum_saturate > 1 else 1.0
    return args.momentum + (args.final_momentum - args.momentum) * alpha


def discriminator_step(G, D, opt_D, x, y, z):
    """Alg. 1, D's update, conditioned (Eq. 2): ascend log D(x|y) + log(1 - D(G(z|y)|y)).

    The fakes carry the minibatch's labels y, so their labels follow the data's p(y).
    G is held fixed: its output carries no graph.
    """
    with torch.no_grad():
        fake = G(z, y)
    real_logits, fake_logits = D(x, y), D(fake, y)
    loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach(), torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean()


def generator_step(G, D, opt_G, z, y):
    """Alg. 1, G's update in the non-saturating form (GAN paper §3): ascend log D(G(z|y)|y). D is held fixed."""
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    logits = D(G(z, y), y)
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
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
        return evaluate(args, checkpoint, device)
    try:
        images, labels = load_labelled(args.dataset, args.data_root, args.image_size)
        (train_images, train_labels), _ = split_validation(images, labels, args.valid_size)
        batches = Batches(train_images, train_labels, args.batch_size, device, args.seed)
        selecting = args.select_every or args.evaluate_at_end
        valid, test = load_evaluation_data(args, device) if selecting else (None, None)
    except DataError as error:
        fail(error)

    G = Generator(args.z_dim, CLASSES, args.image_size, args.dropout).to(device)
    D = Discriminator(CLASSES, args.image_size, args.dropout).to(device)
    init_weights(G, G_IRANGE)
    init_weights(D, D_IRANGE)
    init_output_bias(G, to_unit(train_images).mean(0).to(device))
    # §4.1: "stochastic gradient decent" with momentum; lr and momentum are set at every step below
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    fixed_z, fixed_labels = grid_inputs(PER_ROW, args.z_dim, device)

    def grid(z):
        with seeded(args.seed, device):  # with G's dropout on, the same masks in every grid
            return vutils.make_grid(sample(G, z, fixed_labels, args.sampling_dropout), nrow=PER_ROW, padding=2)

    run = Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, batches, fixed_z,
              total=args.epochs * batches.per_epoch,
              title=f"CGAN on {args.dataset} ({len(train_images)} training images, {args.valid_size} kept for "
                    f"validation, {args.image_size}x{args.image_size}, {batches.per_epoch} steps per epoch)",
              grid=grid, metric=lambda: validation_metric(G, valid, args, device),
              eval_every=args.select_every * batches.per_epoch)

    while run.running():
        # a minibatch of m examples x with their labels y
        x, y = next(batches)
        # §4.1: lr divided by 1.00004 after every step; momentum rising with the epoch
        lr, mu = learning_rate(run.step, args), momentum(batches.epoch, args)
        for group in [*opt_D.param_groups, *opt_G.param_groups]:
            group["lr"], group["momentum"] = lr, mu
        # D's update on (x, y) and m noise samples z with the same labels
        loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, y, sample_z(len(x), args.z_dim, device))
        # G's update on a fresh minibatch of m noise samples z
        loss_G = generator_step(G, D, opt_G, sample_z(len(x), args.z_dim, device), y)
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z},
                     also_log=lambda: {"lr": lr, "momentum": mu})

    if run.stopped_by is None and args.evaluate_at_end:
        final_evaluation(G, run, valid, test, args, device)
    return run.finish()


def build_parser():
    p = FlagParser(description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="§4.1: MNIST with its class labels")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, help="§4.1: 784-dimensional (28x28) samples")
    p.add_argument("--valid-size", type=int, default=VALID_SIZE,
                   help="last training images kept for validation; official GAN code: train[50000:60000]")
    p.add_argument("--batch-size", type=int, default=100, help="§4.1: mini-batches of size 100")
    p.add_argument("--lr", type=float, default=0.1, help="§4.1: initial learning rate 0.1")
    p.add_argument("--lr-decay", type=float, default=1.00004,
                   help="§4.1: the learning rate is divided by this decay factor after every step")
    p.add_argument("--min-lr", type=float, default=1e-6, help="§4.1: exponentially decreased down to .000001")
    p.add_argument("--momentum", type=float, default=0.5, help="§4.1: initial momentum .5")
    p.add_argument("--final-momentum", type=float, default=0.7, help="§4.1: momentum increased up to 0.7")
    p.add_argument("--momentum-saturate", type=int, default=250,
                   help="epochs for the momentum to rise linearly to its final value; not in the paper, "
                        "official GAN code, mnist.yaml: MomentumAdjustor saturate 250")
    p.add_argument("--dropout", type=float, default=DROPOUT, help="§4.1: dropout 0.5 in G and in D")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="§4.1: z of dimensionality 100")
    p.add_argument("--epochs", type=int, default=576,
                   help="the paper stopped at the best validation log-likelihood and gives no length; "
                        "576 epochs is where the lr schedule reaches its floor 1e-6")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator steps in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    add_speed_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--select-every", type=int, default=5, metavar="EPOCHS",
                   help="every EPOCHS epochs, log the validation split's Parzen log-likelihood and keep the best "
                        "weights as checkpoints/best.pt; §4.1: 'Best estimate of log-likelihood on the validation "
                        "set was used as stopping point' (0: off)")
    p.add_argument("--evaluate", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="print the Parzen-window log-likelihood of the test set (§4.1, Table 1) and exit; a run "
                        "folder means its validation-selected checkpoints/best.pt, or last.pt if it kept none")
    p.add_argument("--evaluate-at-end", action="store_true", help="the same evaluation when training ends")
    p.add_argument("--sampling-dropout", action=argparse.BooleanOptionalAction, default=True,
                   help="draw samples (grids, Parzen window) with G's dropout on, as D saw G's samples in training; "
                        "the GAN paper (§5) treats such dropout as G's noise, and the official GAN code's "
                        "IntrinsicDropoutGenerator keeps it on when sampling. --no-sampling-dropout: eval mode")
    p.add_argument("--parzen-per-class", action="store_true",
                   help="score each image under the window of its own class's 1,000 samples, log p(x|y); "
                        "default: §4.1's one window fitted to all 10,000 samples, log p(x), as in Table 1")
    p.add_argument("--parzen-valid", type=int, default=1000,
                   help="validation images used to choose sigma; official GAN code, parzen_ll.py: limit_size 1000")
    p.add_argument("--sample-every", type=int, default=500, help="steps between fixed-noise sample grids")
    p.add_argument("--log-every", type=int, default=50, help="steps between scalar logs")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain; the flags every folder shares are checked by check_run_flags."""
    for name in ("batch_size", "z_dim", "epochs", "image_size", "valid_size", "momentum_saturate", "parzen_valid"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or a number of epochs, got {args.select_every}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 < args.min_lr <= args.lr:
        parser.error(f"--min-lr must be positive and at most --lr, got {args.min_lr}")
    if not 1 <= args.lr_decay < math.inf:
        parser.error(f"--lr-decay must be at least 1 (the lr is divided by it), got {args.lr_decay}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {args.momentum} and "
                     f"{args.final_momentum}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")


# >>> copied: parzen >>>
# GAN paper §5, official code parzen_ll.py: sigma is chosen from numpy.logspace(-1, 0, 10)
SIGMAS = tuple(10 ** np.linspace(-1, 0, 10))


@torch.no_grad()
def parzen_log_likelihoods(x, samples, sigmas, chunk=1000):
    """GAN paper §5: log p(x) in nats under a Gaussian Parzen window, one row per sigma, one column per point.

    p(x) = 1/N sum_i N(x; samples_i, sigma^2 I), so
    log p(x) = logsumexp_i(-|x - samples_i|^2 / (2 sigma^2)) - log N - d log(sigma sqrt(2 pi)).
    The squared distances of a chunk of x to all samples are one matrix product, shared by every sigma, in
    float64: in float32 (or TF32 on a GPU) the expansion |x|^2 + |s|^2 - 2 x.s loses the small distances that
    a narrow window scores.
    """
    x, samples = x.flatten(1).double(), samples.flatten(1).double()
    n, d = samples.shape
    samples_sq = samples.square().sum(1)
    out = []
    for part in x.split(chunk):
        distances = (part.square().sum(1, keepdim=True) + samples_sq - 2 * part @ samples.T).clamp_min_(0)
        out.append(torch.stack([torch.logsumexp(distances / (-2 * s * s), 1) for s in sigmas]))
    log_norm = torch.tensor([math.log(n) + d * math.log(s * math.sqrt(2 * math.pi)) for s in sigmas],
                            dtype=torch.float64, device=x.device)
    return torch.cat(out, 1) - log_norm[:, None]


def choose_sigma(valid_log_likelihoods, sigmas=SIGMAS):
    """GAN paper §5: "The sigma parameter of the Gaussians was obtained by cross validation on the validation
    set": of the rows (one per sigma) of the validation images' log-likelihoods, the sigma whose mean is
    highest (official code, parzen_ll.py)."""
    return sigmas[valid_log_likelihoods.mean(1).argmax().item()]


def mean_and_stderr(log_p):
    """Table 1: the mean over the test images and its standard error, std / sqrt(n) with numpy's default
    ddof = 0 (official code, parzen_ll.py: ll.std() / numpy.sqrt(n))."""
    return log_p.mean().item(), log_p.std(unbiased=False).item() / math.sqrt(len(log_p))


@contextlib.contextmanager
def seeded(seed, device):
    """Draws inside come from their own seeded stream; the training's RNG streams are left untouched."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield
# <<< copied: parzen <<<


def draw_samples(G, args, device):
    """§4.1: "1000 samples were drawn from each 10 class", z (and G's dropout masks) seeded by --seed."""
    labels = torch.arange(CLASSES, device=device).repeat_interleave(SAMPLES_PER_CLASS)
    with seeded(args.seed, device):
        return sample(G, sample_z(len(labels), args.z_dim, device), labels, args.sampling_dropout), labels


def log_likelihoods(x, labels, samples, sample_labels, sigmas, per_class):
    """§4.1: "a Gaussian Parzen window was fitted to these samples": one window on all 10,000 samples, log p(x),
    the quantity Table 1 compares with the GAN's. per_class: each point under its own class's window, log p(x|y)."""
    if not per_class:
        return parzen_log_likelihoods(x, samples, sigmas)
    out = torch.empty(len(sigmas), len(x), dtype=torch.float64, device=x.device)
    for c in labels.unique():
        mine = labels == c
        out[:, mine] = parzen_log_likelihoods(x[mine], samples[sample_labels == c], sigmas)
    return out


@torch.no_grad()
def parzen_estimate(G, valid, points, args, device):
    """Table 1's protocol (official GAN code, parzen_ll.py): sigma chosen on the first --parzen-valid validation
    images, then the mean and standard error of the log-likelihood of `points` (the test set; the validation
    split for --select-every), and sigma. valid and points are pairs (images in [0, 1], labels)."""
    samples, sample_labels = draw_samples(G, args, device)
    valid_x, valid_y = valid[0][:args.parzen_valid], valid[1][:args.parzen_valid]
    sigma = choose_sigma(log_likelihoods(valid_x, valid_y, samples, sample_labels, SIGMAS, args.parzen_per_class))
    log_p = log_likelihoods(*points, samples, sample_labels, [sigma], args.parzen_per_class)[0]
    return (*mean_and_stderr(log_p), sigma)


def validation_metric(G, valid, args, device):
    """--select-every, §4.1's stopping point: the validation split's Parzen log-likelihood (higher is better)."""
    mean, _, sigma = parzen_estimate(G, valid, valid, args, device)
    return {"metrics/parzen_valid": mean, "metrics/parzen_valid_sigma": sigma}, mean


def final_evaluation(G, run, valid, test, args, device):
    """--evaluate-at-end: the test log-likelihood of the best checkpoint (of the last one without --select-every)."""
    if run.best is not None:
        G.load_state_dict(read_checkpoint(run.out / "checkpoints" / "best.pt")["G"])
        print(f"best validation log-likelihood {run.best['score']:.2f} at step {run.best['step']}: evaluating best.pt")
    mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
    run.log({"parzen/log_likelihood": mean, "parzen/sigma": sigma})
    report(mean, stderr, sigma)


def evaluate(args, checkpoint, device):
    """python train.py --evaluate RUN: the Parzen-window log-likelihood of the test set, printed."""
    G = Generator(args.z_dim, CLASSES, args.image_size, args.dropout)
    G.load_state_dict(checkpoint["G"])
    try:
        valid, test = load_evaluation_data(args, device)
    except DataError as error:
        fail(error)
    started = time.perf_counter()
    mean, stderr, sigma = parzen_estimate(G.to(device), valid, test, args, device)
    best = checkpoint["best"]
    selected = f", selected on validation (log-likelihood {best['score']:.2f})" if best else ""
    print(f"{checkpoint_path(args.evaluate, 'auto')}: step {checkpoint['step']}{selected}; {len(test[0])} test "
          f"images; {SAMPLES_PER_CLASS} samples per class, G's dropout {'on' if args.sampling_dropout else 'off'}, "
          f"{'one window per class' if args.parzen_per_class else 'one window'}; {time.perf_counter() - started:.1f} s")
    report(mean, stderr, sigma)
    return 0


def load_evaluation_data(args, device):
    """The validation split (train[50000:60000]) and the test set: images in [0, 1] and labels, on the device."""
    images, labels = load_labelled(args.dataset, args.data_root, args.image_size, train=True)
    _, valid = split_validation(images, labels, args.valid_size)
    test = load_labelled(args.dataset, args.data_root, args.image_size, train=False)
    return [(to_unit(x.to(device)), y.to(device)) for x, y in (valid, test)]


def report(mean, stderr, sigma):
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4g})")


# >>> copied: speed >>>
# The networks that --compile compiles. torch.compile cannot differentiate a gradient a second time
# (double backward), so a network whose input gradient enters the loss (a gradient penalty) stays eager.
COMPILED = ("G", "D")  # per-folder


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
