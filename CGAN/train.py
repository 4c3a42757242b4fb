"""Conditional GAN (Mirza & Osindero 2014, arXiv 1411.1784), trained on MNIST as §4.1 describes.

The loop is the minibatch GAN algorithm (Goodfellow et al. 2014, Algorithm 1, k = 1) with
both players conditioned on the one-hot label y (§3, Eq. 2). For every minibatch (x, y):
    1. D ascends  log D(x|y) + log(1 - D(G(z|y)|y))   (fakes detached: G is held fixed)
    2. G ascends  log D(G(z|y)|y)                      (the non-saturating loss; D held fixed)
each with SGD, batch 100, lr 0.1 divided by 1.00004 every step down to 1e-6, momentum rising
from 0.5 to 0.7, dropout 0.5 in both networks and z ~ U[0, 1]^100.

    python train.py                                   # MNIST, the paper's settings
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --evaluate runs/RUN               # the paper's Parzen-window log-likelihood (Table 1)
"""
import argparse
import contextlib
import copy
import json
import math
import os
import pickle
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
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dataset import DATASETS, VALID_SIZE, Batches, DataError, load_labelled, split_validation, to_unit
from model import (CLASSES, D_IRANGE, DROPOUT, G_IRANGE, IMAGE_SIZE, Z_DIM, Discriminator, Generator,
                   checkpoint_path, grid_inputs, init_output_bias, init_weights, sample, sample_z)

HERE = Path(__file__).resolve().parent
FOLDER, FORMAT = "CGAN", 1  # written into every checkpoint, checked when one is read
PER_ROW = 10  # the fixed grid: 10 rows (digits 0 to 9) of 10 samples, one z per column
SAMPLES_PER_CLASS = 1000  # §4.1: "1000 samples were drawn from each 10 class"
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "max_steps", "epochs", "device", "sample_every", "log_every", "checkpoint_every",
             "evaluate_at_end", "select_every"}
# Flags that may be given with --evaluate; the data set and the networks are the run's own.
EVALUATE = {"evaluate", "data_root", "device", "seed", "sampling_dropout", "parzen_per_class", "parzen_valid"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


def parse_args(argv):
    """The run's configuration, and the checkpoint to continue (or to evaluate); None for a new run."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and args.evaluate:
        parser.error("give --resume or --evaluate, not both")
    checkpoint = None
    if args.resume or args.evaluate:
        flag, allowed, value = ("--resume", RESUMABLE, args.resume) if args.resume else (
            "--evaluate", EVALUATE, args.evaluate)
        path = checkpoint_path(value, best=flag == "--evaluate")
        if not path.is_file():
            parser.error(f"{flag} {value}: no checkpoint at {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            parser.error(f"{flag} {value}: {path} is not a readable checkpoint ({error})")
        # The run keeps its own configuration; only the allowed flags may be given.
        quiet = copy.deepcopy(parser)
        for action in quiet._actions:
            action.default = argparse.SUPPRESS
        given = vars(quiet.parse_args(argv))
        changed = sorted(k for k, v in given.items() if k not in allowed and v != checkpoint["args"].get(k))
        if changed:
            parser.error(f"{flag} uses the run's own configuration; {', '.join(changed)} cannot "
                         f"change (allowed: {', '.join(sorted(allowed - {flag[2:]}))})")
        args = argparse.Namespace(**{**vars(args), **checkpoint["args"], **given, "out": str(path.parent.parent)})
    check_args(parser, args)
    return args, checkpoint


def check_args(parser, args):
    for name in ("batch_size", "z_dim", "epochs", "image_size", "valid_size", "momentum_saturate",
                 "sample_every", "log_every", "checkpoint_every", "parzen_valid"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or a number of epochs, got {args.select_every}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not 0 < args.min_lr <= args.lr:
        parser.error(f"--min-lr must be positive and at most --lr, got {args.min_lr}")
    if not args.lr_decay >= 1:
        parser.error(f"--lr-decay must be at least 1 (the lr is divided by it), got {args.lr_decay}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {args.momentum} and "
                     f"{args.final_momentum}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; use --device cpu")


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


def restore_best(out, checkpoint):
    """A kill between writing last.pt and best.pt at a new best leaves best.pt behind: rewrite it from last.pt."""
    best, path = checkpoint.get("best"), out / "checkpoints" / "best.pt"
    if best is not None and best["step"] == checkpoint["step"]:
        try:
            stale = torch.load(path, map_location="cpu", weights_only=False)["step"] != best["step"]
        except (OSError, RuntimeError, KeyError, EOFError, pickle.UnpicklingError):
            stale = True
        if stale:
            save_checkpoint(path, checkpoint)


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


# >>> copied: parzen >>>
# GAN paper §5, official code parzen_ll.py: sigma is chosen from numpy.logspace(-1, 0, 10)
SIGMAS = tuple(10 ** np.linspace(-1, 0, 10))


@torch.no_grad()
def parzen_log_likelihoods(x, samples, sigmas, chunk=1000):
    """GAN paper §5: log p(x) in nats under a Gaussian Parzen window, one row per sigma, one column per point.

    p(x) = 1/N sum_i N(x; samples_i, sigma^2 I), so
    log p(x) = logsumexp_i(-|x - samples_i|^2 / (2 sigma^2)) - log N - d log(sigma sqrt(2 pi)).
    The squared distances of a chunk of x to all samples are one matrix product, shared by every sigma.
    """
    x, samples = x.flatten(1).float(), samples.flatten(1).float()
    n, d = samples.shape
    samples_sq = samples.square().sum(1)
    out = []
    for part in x.split(chunk):
        distances = (part.square().sum(1, keepdim=True) + samples_sq - 2 * part @ samples.T).clamp_min_(0)
        out.append(torch.stack([torch.logsumexp(distances / (-2 * s * s), 1) for s in sigmas]))
    log_norm = torch.tensor([math.log(n) + d * math.log(s * math.sqrt(2 * math.pi)) for s in sigmas])
    return torch.cat(out, 1).double() - log_norm.double().to(x.device)[:, None]


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


def pick_device(args):
    return torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                        else "cpu" if args.device == "auto" else args.device)


def load_evaluation_data(args, device):
    """The validation split (train[50000:60000]) and the test set: images in [0, 1] and labels, on the device."""
    images, labels = load_labelled(args.dataset, args.data_root, args.image_size, train=True)
    _, valid = split_validation(images, labels, args.valid_size)
    test = load_labelled(args.dataset, args.data_root, args.image_size, train=False)
    return [(to_unit(x.to(device)), y.to(device)) for x, y in (valid, test)]


def report(mean, stderr, sigma):
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4g})")


def evaluate(args, checkpoint):
    """python train.py --evaluate RUN: the Parzen-window log-likelihood of the test set, printed."""
    device = pick_device(args)
    try:
        valid, test = load_evaluation_data(args, device)
    except DataError as error:
        fail(error)
    G = Generator(args.z_dim, CLASSES, args.image_size, args.dropout).to(device)
    G.load_state_dict(checkpoint["G"])
    started = time.perf_counter()
    mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
    best = checkpoint.get("best")
    selected = f", selected on validation (log-likelihood {best['score']:.2f})" if best else ""
    print(f"{checkpoint_path(args.evaluate, best=True)}: step {checkpoint['step']}{selected}; {len(test[0])} test "
          f"images; {SAMPLES_PER_CLASS} samples per class, G's dropout {'on' if args.sampling_dropout else 'off'}, "
          f"{'one window per class' if args.parzen_per_class else 'one window'}; {time.perf_counter() - started:.1f} s")
    report(mean, stderr, sigma)
    return 0


def main(argv=None):
    args, checkpoint = parse_args(argv)
    if args.evaluate:
        return evaluate(args, checkpoint)
    device = pick_device(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seed_everything(args.seed)

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
        images, labels = load_labelled(args.dataset, args.data_root, args.image_size)
        (train_images, train_labels), _ = split_validation(images, labels, args.valid_size)
        batches = Batches(train_images, train_labels, args.batch_size, device, args.seed)
        valid, test = load_evaluation_data(args, device) if args.select_every or args.evaluate_at_end else (None, None)
    except DataError as error:
        fail(error)

    G = Generator(args.z_dim, CLASSES, args.image_size, args.dropout).to(device)
    D = Discriminator(CLASSES, args.image_size, args.dropout).to(device)
    init_weights(G, G_IRANGE)
    init_weights(D, D_IRANGE)
    init_output_bias(G, to_unit(train_images).mean(0))
    # §4.1: "stochastic gradient decent" with momentum; lr and momentum are set at every step below
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    fixed_z, fixed_labels = grid_inputs(PER_ROW, args.z_dim, device)
    step, best = 0, None
    if checkpoint is not None:
        G.load_state_dict(checkpoint["G"])
        D.load_state_dict(checkpoint["D"])
        opt_G.load_state_dict(checkpoint["opt_G"])
        opt_D.load_state_dict(checkpoint["opt_D"])
        batches.load_state_dict(checkpoint["batches"])
        fixed_z = checkpoint["fixed_z"].to(device)
        step, best = checkpoint["step"], checkpoint.get("best")
        set_rng_states(checkpoint["rng"])
        restore_best(out, checkpoint)

    total = args.epochs * batches.per_epoch
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"CGAN on {args.dataset} ({len(train_images)} training images, {args.valid_size} kept for validation, "
          f"{args.image_size}x{args.image_size}) on {device}: steps {step} -> {total} "
          f"({batches.per_epoch} per epoch); run folder {out}")

    def state():
        return {"folder": FOLDER, "format": FORMAT, "G": G.state_dict(), "D": D.state_dict(),
                "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(), "batches": batches.state_dict(),
                "fixed_z": fixed_z, "step": step, "best": best, "rng": rng_states(), "args": vars(args)}

    def check_finite():
        """Stop, keeping the last good checkpoint, if a loss, a weight or a buffer has become NaN or Inf."""
        bad_step = first_bad_step.item()
        tensors = [t for t in [*G.parameters(), *D.parameters(), *G.buffers(), *D.buffers()] if t.is_floating_point()]
        if bad_step < 0 and not torch.stack([t.isfinite().all() for t in tensors]).all():
            bad_step = step
        if bad_step >= 0:
            writer.close()
            last = out / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
            fail(f"a loss or weight became NaN or Inf at step {bad_step}; stopped there, and {kept}", code=1)

    # The first step whose losses were not finite, kept on the device: no host sync per step.
    first_bad_step = torch.tensor(-1, device=device)
    stop = StopRequest()
    progress = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    started = time.perf_counter()
    while step < total and stop.signal is None:
        # a minibatch of m examples x with their labels y
        x, y = next(batches)
        # §4.1: lr divided by 1.00004 after every step; momentum rising with the epoch
        lr, mu = learning_rate(step, args), momentum(batches.epoch, args)
        for group in [*opt_D.param_groups, *opt_G.param_groups]:
            group["lr"], group["momentum"] = lr, mu
        # D's update on (x, y) and m noise samples z with the same labels
        loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, y, sample_z(len(x), args.z_dim, device))
        # G's update on a fresh minibatch of m noise samples z
        loss_G = generator_step(G, D, opt_G, sample_z(len(x), args.z_dim, device), y)
        step += 1
        progress.update()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_D + loss_G), step, first_bad_step)

        if step % args.log_every == 0 or step == total:
            check_finite()
            scalars = {"loss/D": loss_D.item(), "loss/G": loss_G.item(), "D/real": D_x.item(), "D/fake": D_G_z.item(),
                       "lr": lr, "momentum": mu}
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(loss_D=f"{scalars['loss/D']:.3f}", loss_G=f"{scalars['loss/G']:.3f}")
        if step % args.sample_every == 0 or step == total:
            with seeded(args.seed, device):  # with dropout on, the same masks in every grid
                grid = vutils.make_grid(sample(G, fixed_z, fixed_labels, args.sampling_dropout), nrow=PER_ROW, padding=2)
            vutils.save_image(grid, out / "samples" / f"step_{step:07d}.png")
            writer.add_image("samples", grid, step)
        if args.select_every and step % (args.select_every * batches.per_epoch) == 0:
            # §4.1: the validation split's log-likelihood; the best weights so far are kept as best.pt
            check_finite()
            score, _, sigma = parzen_estimate(G, valid, valid, args, device)
            writer.add_scalar("metrics/parzen_valid", score, step)
            writer.add_scalar("metrics/parzen_valid_sigma", sigma, step)
            if best is None or score > best["score"]:
                best = {"score": score, "step": step, "epoch": step // batches.per_epoch}
                save_checkpoint(out / "checkpoints" / "last.pt", state())
                save_checkpoint(out / "checkpoints" / "best.pt", state())
        if step % args.checkpoint_every == 0:
            check_finite()
            save_checkpoint(out / "checkpoints" / "last.pt", state())
    progress.close()

    check_finite()
    save_checkpoint(out / "checkpoints" / "last.pt", state())
    write_gif(out / "samples", out / "progress.gif")
    elapsed = time.perf_counter() - started
    if stop.signal is not None:
        writer.close()
        print(f"stopped by {signal.Signals(stop.signal).name} at step {step}; continue with: "
              f"python train.py --resume {out}")
        return 128 + stop.signal
    print(f"done: step {step} of {total} in {elapsed / 60:.1f} min; samples and checkpoint in {out}")
    if args.evaluate_at_end:
        if best is not None:
            G.load_state_dict(torch.load(out / "checkpoints" / "best.pt", map_location=device, weights_only=False)["G"])
            print(f"best validation log-likelihood {best['score']:.2f} at step {best['step']}: evaluating best.pt")
        mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
        writer.add_scalar("parzen/log_likelihood", mean, step)
        writer.add_scalar("parzen/sigma", sigma, step)
        report(mean, stderr, sigma)
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
