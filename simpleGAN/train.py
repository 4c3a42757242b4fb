"""Generative Adversarial Nets (Goodfellow et al. 2014, arXiv 1406.2661): Algorithm 1 on MNIST.

Algorithm 1, with the settings of the paper's MNIST experiment (§5, official code mnist.yaml):
    for each training iteration:
        for k steps (k = 1):
            sample a minibatch of m noise samples z ~ U(-sqrt 3, sqrt 3)^100 and m examples x
            update D by ascending its stochastic gradient of  log D(x) + log(1 - D(G(z)))
        sample a minibatch of m noise samples z
        update G by ascending  log D(G(z))   (§3's non-saturating form of descending log(1 - D(G(z))))
with SGD: m = 100, lr 0.1 divided by 1.000004 every minibatch down to 1e-6, momentum 0.5 rising to 0.7
by epoch 250. The paper's metric (§5, Table 1) is the Parzen-window log-likelihood of the test set.

    python train.py                                  # MNIST, the paper's settings, until stopped
    python train.py --resume runs/RUN                # continue a run exactly where it stopped
    python train.py --evaluate runs/RUN              # Parzen log-likelihood of the MNIST test set
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

from dataset import DATASETS, Batches, DataError, load_images, pixel_means, to_unit_range
from model import (D_WIDTH, FOLDER, FORMAT, G_WIDTH, Z_DIM, CheckpointError, Discriminator, FlagParser, Generator,
                   checkpoint_path, fail, init_discriminator, init_generator, read_checkpoint, sample, sample_z)

HERE = Path(__file__).resolve().parent
GRID = 100  # fixed-noise samples in each grid (10 x 10)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"data_root", "max_steps", "epochs", "device", "compile", "channels_last", "sample_every", "log_every",
             "checkpoint_every", "evaluate_at_end", "select_every", "parzen_samples", "parzen_valid"}
# Flags that may be given with --evaluate.
EVALUABLE = {"data_root", "device", "seed", "parzen_samples", "parzen_valid"}


def learning_rate(step, lr=0.1, decay=1.000004, lr_min=1e-6):
    """Official code, mnist.yaml, ExponentialDecay: iteration `step` (0, 1, ...) updates with lr / decay^step,
    never less than lr_min, which the defaults reach at step 2,878,238 (epoch 5,756)."""
    return max(lr / decay ** step, lr_min)


def momentum_at(epoch, initial=0.5, final=0.7, saturate=250):
    """Official code, mnist.yaml, MomentumAdjustor(start 1, saturate 250): linear in the epoch, from `initial`
    in the first epoch (epoch 0) to `final` in epoch saturate - 1 (the 250th) and every one after it."""
    alpha = 1.0 if epoch + 1 >= saturate else epoch / (saturate - 1)
    return initial + (final - initial) * alpha


def set_hyperparameters(optimizers, lr, momentum):
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"], group["momentum"] = lr, momentum


def discriminator_step(G, D, opt_D, x, z, scale=1.0):
    """Alg. 1, D's update: ascend log D(x) + log(1 - D(G(z))), times `scale` (1 in Alg. 1, 0.5 in the
    official code). G is held fixed: its output carries no graph."""
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    loss = scale * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                    + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach(), torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean()


def generator_step(G, D, opt_G, z):
    """Alg. 1, G's update, in the non-saturating form of §3: ascend log D(G(z)). D is held fixed.

    D keeps its dropout here, as in the official code, where G's objective uses the dropout pass of D.
    """
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    logits = D(G(z))
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def simultaneous_step(G, D, opt_G, opt_D, x, z, scale=1.0):
    """--simultaneous, the official code's update (AdversaryCost2.get_gradients): one forward pass, one set of
    D's dropout masks; D's gradient of its objective and G's gradient of log D(G(z)) are both taken at the
    current weights, then one SGD step applies both."""
    fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    loss_D = scale * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                      + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    loss_G = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    # each objective is differentiated only with respect to its own player's weights
    grads_G = torch.autograd.grad(loss_G, list(G.parameters()), retain_graph=True)
    grads_D = torch.autograd.grad(loss_D, list(D.parameters()))
    for params, grads in ((G.parameters(), grads_G), (D.parameters(), grads_D)):
        for param, grad in zip(params, grads):
            param.grad = grad
    opt_D.step()
    opt_G.step()
    return (loss_D.detach(), torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean(),
            loss_G.detach())


def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = pick_device(args)
    seed_everything(args.seed)
    if args.evaluate:
        return evaluate(args, checkpoint, device)
    try:
        images = load_images(args.dataset, args.data_root, "train")
        batches = Batches(images, args.batch_size, device, args.seed)
        selecting = args.select_every or args.evaluate_at_end
        valid, test = load_evaluation_images(args, device) if selecting else (None, None)
    except DataError as error:
        fail(error)

    G = Generator(args.z_dim, args.g_width).to(device)
    D = Discriminator(args.d_width).to(device)
    init_generator(G, pixel_means(images).to(device))
    init_discriminator(D)
    # official code, mnist.yaml: SGD with momentum for both networks; lr and momentum are set every iteration
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    steps_per_epoch = batches.per_epoch / args.k
    run = Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, batches,
              fixed_z=sample_z(GRID, args.z_dim, device),
              total=None if args.epochs is None else int(args.epochs * steps_per_epoch),
              title=f"simpleGAN on {args.dataset} ({len(images)} training images, 28x28, "
                    f"{steps_per_epoch:g} steps per epoch)",
              grid=lambda z: vutils.make_grid(sample(G, z), nrow=10, padding=2),
              metric=lambda: validation_metric(G, valid, args, device),
              eval_every=round(args.select_every * steps_per_epoch))

    while run.running():
        # official code: lr divided by 1.000004 every minibatch; momentum 0.5 -> 0.7 over 250 epochs
        lr = learning_rate(run.step, args.lr, args.lr_decay, args.lr_min)
        momentum = momentum_at(run.step * args.k // batches.per_epoch, args.momentum, args.final_momentum,
                               args.momentum_saturate)
        set_hyperparameters((opt_G, opt_D), lr, momentum)
        if args.simultaneous:
            # --simultaneous: the official code's single step on both players
            x = next(batches)
            z = sample_z(len(x), args.z_dim, device)
            loss_D, D_x, D_G_z, loss_G = simultaneous_step(G, D, opt_G, opt_D, x, z, args.d_loss_scale)
        else:
            for _ in range(args.k):
                # Alg. 1: for k steps, a minibatch of m examples x and m noise samples z, then D's update
                x = next(batches)
                z = sample_z(len(x), args.z_dim, device)
                loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, z, args.d_loss_scale)
            # Alg. 1: a fresh minibatch of m noise samples z, then G's update
            loss_G = generator_step(G, D, opt_G, sample_z(len(x), args.z_dim, device))
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z},
                     also_log=lambda: {"lr": lr, "momentum": momentum})

    if run.stopped_by is None and args.evaluate_at_end:
        final_evaluation(G, run, valid, test, args, device)
    return run.finish()


def build_parser():
    p = FlagParser(description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="§5: MNIST")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--batch-size", type=int, default=100, help="official code, mnist.yaml: batch_size 100")
    p.add_argument("--k", type=int, default=1,
                   help="D steps per G step; Alg. 1: 'We used k = 1, the least expensive option'")
    p.add_argument("--d-loss-scale", type=float, default=1.0,
                   help="factor on D's objective; Alg. 1 ascends it unscaled, the official code "
                        "(AdversaryCost2: d_obj = 0.5 * (...)) halves it: --d-loss-scale 0.5")
    p.add_argument("--simultaneous", action="store_true",
                   help="update D and G in one SGD step from one forward pass, as the official code's "
                        "AdversaryCost2 does; default: Alg. 1's alternation, D first, then G against the new D")
    p.add_argument("--lr", type=float, default=0.1, help="official code, mnist.yaml: SGD learning_rate .1")
    p.add_argument("--lr-decay", type=float, default=1.000004,
                   help="lr divided by this every iteration of Alg. 1 (every minibatch at k = 1); "
                        "official code, mnist.yaml: ExponentialDecay decay_factor")
    p.add_argument("--lr-min", type=float, default=1e-6, help="official code, mnist.yaml: ExponentialDecay min_lr")
    p.add_argument("--momentum", type=float, default=0.5, help="official code, mnist.yaml: init_momentum .5")
    p.add_argument("--final-momentum", type=float, default=0.7,
                   help="official code, mnist.yaml: MomentumAdjustor final_momentum .7")
    p.add_argument("--momentum-saturate", type=int, default=250,
                   help="epoch by which momentum reaches --final-momentum; official code, mnist.yaml: saturate 250")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="official code, mnist.yaml: 100-dimensional z")
    p.add_argument("--g-width", type=int, default=G_WIDTH, help="G's two ReLU layers; official code: 1200")
    p.add_argument("--d-width", type=int, default=D_WIDTH, help="D's two maxout layers (5 pieces); official code: 240")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over train[0:50000]; default: until stopped, as the official mnist.yaml, "
                        "which sets no termination criterion (the paper names no length)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator steps in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    add_speed_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=500, help="steps between fixed-noise sample grids")
    p.add_argument("--log-every", type=int, default=50, help="steps between scalar logs")
    p.add_argument("--checkpoint-every", type=int, default=500,
                   help="steps between checkpoints (official code: save_freq 1 epoch = 500 steps)")
    p.add_argument("--select-every", type=int, default=0, metavar="EPOCHS",
                   help="every EPOCHS epochs, log the validation split's Parzen log-likelihood and keep the best "
                        "weights as checkpoints/best.pt (0: off; the official mnist.yaml keeps the last model, its "
                        "MonitorBasedSaveBest is commented out)")
    p.add_argument("--evaluate", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="print the Parzen log-likelihood of the test set under a trained G, and exit; a run "
                        "folder means its checkpoints/best.pt when it kept one, else its last.pt")
    p.add_argument("--evaluate-at-end", action="store_true", help="the same evaluation after training")
    p.add_argument("--parzen-samples", type=int, default=10000,
                   help="samples of G in the Parzen window; official code, parzen_ll.py: num_samples 10000")
    p.add_argument("--parzen-valid", type=int, default=1000,
                   help="validation images used to choose sigma; official code, parzen_ll.py: limit_size 1000")
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain; the flags every folder shares are checked by check_run_flags."""
    for name in ("batch_size", "k", "z_dim", "g_width", "d_width", "momentum_saturate", "parzen_samples",
                 "parzen_valid"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or a number of epochs, got {args.select_every}")
    if not 0 < args.lr < math.inf:
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if not 0 < args.d_loss_scale < math.inf:
        parser.error(f"--d-loss-scale must be a positive number, got {args.d_loss_scale}")
    if args.simultaneous and args.k != 1:
        parser.error(f"--simultaneous updates D and G in one step; it needs --k 1, got --k {args.k}")
    if not 1 <= args.lr_decay < math.inf:
        parser.error(f"--lr-decay divides the learning rate and must be at least 1, got {args.lr_decay}")
    if not 0 <= args.lr_min <= args.lr:
        parser.error(f"--lr-min must lie in [0, --lr], got {args.lr_min}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {args.momentum} and "
                     f"{args.final_momentum}")


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
    """§5: the Parzen window's samples of G (10,000 by default), with z seeded by --seed."""
    with seeded(args.seed, device):
        return sample(G, sample_z(args.parzen_samples, args.z_dim, device))


@torch.no_grad()
def parzen_estimate(G, valid, points, args, device):
    """Table 1's protocol (official code, parzen_ll.py): sigma chosen on the first --parzen-valid validation
    images, then the mean and standard error of the log-likelihood of `points` (the test set; the validation
    split for --select-every), and sigma."""
    samples = draw_samples(G, args, device)
    sigma = choose_sigma(parzen_log_likelihoods(valid[:args.parzen_valid], samples, SIGMAS))
    return (*mean_and_stderr(parzen_log_likelihoods(points, samples, [sigma])[0]), sigma)


def validation_metric(G, valid, args, device):
    """--select-every: the validation split's Parzen log-likelihood (higher is better), for best.pt."""
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
    """python train.py --evaluate RUN: Table 1's number for a trained G, printed."""
    G = Generator(args.z_dim, args.g_width)
    G.load_state_dict(checkpoint["G"])
    try:
        valid, test = load_evaluation_images(args, device)
    except DataError as error:
        fail(error)
    print(f"{checkpoint_path(args.evaluate, 'auto')}: step {checkpoint['step']}")
    report(*parzen_estimate(G.to(device), valid, test, args, device))
    return 0


def load_evaluation_images(args, device):
    """The validation split (train[50000:60000]) and the test set, in [0, 1], on the device."""
    return [to_unit_range(load_images(args.dataset, args.data_root, split).to(device)) for split in ("valid", "test")]


def report(mean, stderr, sigma):
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})")


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
