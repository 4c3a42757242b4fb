"""Generative Adversarial Nets (Goodfellow et al. 2014, arXiv 1406.2661): Algorithm 1 on MNIST.

For every iteration of Algorithm 1:
    k times: D ascends  log D(x) + log(1 - D(G(z)))   on a fresh real minibatch (G held fixed)
    once:    G ascends  log D(G(z))                    the non-saturating form of §3 (D held fixed)
with SGD (batch 100, lr 0.1 divided by 1.000004 every minibatch down to 1e-6, momentum
0.5 rising to 0.7 by epoch 250) and z ~ U(-sqrt 3, sqrt 3)^100, as the official code's mnist.yaml.
The paper's metric (§5, Table 1) is the Parzen-window log-likelihood of the test set.

    python train.py                                  # MNIST, the paper's settings, until stopped
    python train.py --resume runs/RUN                # continue a run exactly where it stopped
    python train.py --evaluate runs/RUN              # Parzen log-likelihood of the MNIST test set
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

from dataset import DATASETS, Batches, DataError, load_images, pixel_means, to_unit_range
from model import (D_WIDTH, G_WIDTH, Z_DIM, Discriminator, Generator, checkpoint_path, init_discriminator,
                   init_generator, sample, sample_z)

HERE = Path(__file__).resolve().parent
FOLDER, FORMAT = "simpleGAN", 1  # written into every checkpoint, checked when one is read
GRID = 100  # fixed-noise samples in each grid (10 x 10)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "max_steps", "epochs", "device", "sample_every", "log_every", "checkpoint_every",
             "evaluate_at_end", "select_every", "parzen_samples", "parzen_valid"}
# Flags that may be given with --evaluate.
EVALUABLE = {"evaluate", "data_root", "device", "seed", "parzen_samples", "parzen_valid"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


def parse_args(argv):
    """The run's configuration, and the checkpoint to continue from or evaluate (None for a new run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    checkpoint = None
    if args.resume and args.evaluate:
        parser.error("--resume and --evaluate exclude each other")
    if args.resume or args.evaluate:
        flag, allowed = ("--resume", RESUMABLE) if args.resume else ("--evaluate", EVALUABLE)
        path = checkpoint_path(args.resume) if args.resume else checkpoint_path(args.evaluate, best=True)
        if not path.is_file():
            parser.error(f"{flag} {args.resume or args.evaluate}: no checkpoint at {path}")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            parser.error(f"{flag} {args.resume or args.evaluate}: {path} is not a readable checkpoint ({error})")
        # The run continues with its own configuration; only the allowed flags may be given.
        quiet = copy.deepcopy(parser)
        for action in quiet._actions:
            action.default = argparse.SUPPRESS
        given = vars(quiet.parse_args(argv))
        changed = sorted(k for k, v in given.items() if k not in allowed and v != checkpoint["args"].get(k))
        if changed:
            parser.error(f"{flag} uses the run's own configuration; {', '.join(changed)} cannot "
                         f"change (allowed: {', '.join(sorted(allowed - {'resume', 'evaluate'}))})")
        args = argparse.Namespace(**{**vars(args), **checkpoint["args"], "resume": None, "evaluate": None, **given,
                                     "out": str(path.parent.parent)})
    check_args(parser, args)
    return args, checkpoint


def check_args(parser, args):
    for name in ("batch_size", "k", "z_dim", "g_width", "d_width", "momentum_saturate", "sample_every", "log_every",
                 "checkpoint_every", "parzen_samples", "parzen_valid"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("epochs", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or a number of epochs, got {args.select_every}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.d_loss_scale > 0:
        parser.error(f"--d-loss-scale must be positive, got {args.d_loss_scale}")
    if args.simultaneous and args.k != 1:
        parser.error(f"--simultaneous updates D and G in one step; it needs --k 1, got --k {args.k}")
    if not args.lr_decay >= 1:
        parser.error(f"--lr-decay divides the learning rate and must be at least 1, got {args.lr_decay}")
    if not 0 <= args.lr_min <= args.lr:
        parser.error(f"--lr-min must lie in [0, --lr], got {args.lr_min}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {args.momentum} and "
                     f"{args.final_momentum}")
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


def load_evaluation_images(args, device):
    """The validation split (train[50000:60000]) and the test set, in [0, 1], on the device."""
    try:
        return [to_unit_range(load_images(args.dataset, args.data_root, split).to(device))
                for split in ("valid", "test")]
    except DataError as error:
        fail(error)


def report(mean, stderr, sigma):
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})")


def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    seed_everything(args.seed)

    if args.evaluate:
        G = Generator(args.z_dim, args.g_width).to(device)
        G.load_state_dict(checkpoint["G"])
        valid, test = load_evaluation_images(args, device)
        print(f"{checkpoint_path(args.evaluate, best=True)}: step {checkpoint['step']}")
        report(*parzen_estimate(G, valid, test, args, device))
        return 0

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
        images = load_images(args.dataset, args.data_root, "train")
        batches = Batches(images, args.batch_size, device, args.seed)
    except DataError as error:
        fail(error)
    valid, test = load_evaluation_images(args, device) if args.select_every or args.evaluate_at_end else (None, None)

    G = Generator(args.z_dim, args.g_width).to(device)
    D = Discriminator(args.d_width).to(device)
    init_generator(G, pixel_means(images).to(device))
    init_discriminator(D)
    # official code, mnist.yaml: SGD with momentum for both networks
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    fixed_z = sample_z(GRID, args.z_dim, device)
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

    total = None if args.epochs is None else args.epochs * batches.per_epoch // args.k
    if args.max_steps is not None:
        total = args.max_steps if total is None else min(total, args.max_steps)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"simpleGAN on {args.dataset} ({len(images)} training images, 28x28) on {device}: steps {step} -> "
          f"{total or 'until stopped'} ({batches.per_epoch / args.k:g} per epoch); run folder {out}")

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
    while (total is None or step < total) and stop.signal is None:
        # official code: lr divided by 1.000004 every minibatch; momentum 0.5 -> 0.7 over 250 epochs
        lr = learning_rate(step, args.lr, args.lr_decay, args.lr_min)
        momentum = momentum_at(step * args.k // batches.per_epoch, args.momentum, args.final_momentum,
                               args.momentum_saturate)
        set_hyperparameters((opt_G, opt_D), lr, momentum)
        if args.simultaneous:
            x = next(batches)
            loss_D, D_x, D_G_z, loss_G = simultaneous_step(G, D, opt_G, opt_D, x, sample_z(len(x), args.z_dim, device),
                                                           args.d_loss_scale)
        else:
            # Alg. 1: for k steps, D's update on a fresh minibatch of m examples x and m noise samples z
            for _ in range(args.k):
                x = next(batches)
                loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device),
                                                        args.d_loss_scale)
            # Alg. 1: G's update on a fresh minibatch of m noise samples z
            loss_G = generator_step(G, D, opt_G, sample_z(len(x), args.z_dim, device))
        step += 1
        progress.update()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_D + loss_G), step, first_bad_step)

        if step % args.log_every == 0 or step == total:
            check_finite()
            scalars = {"loss/D": loss_D.item(), "loss/G": loss_G.item(), "D/real": D_x.item(),
                       "D/fake": D_G_z.item(), "lr": lr, "momentum": momentum}
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(loss_D=f"{scalars['loss/D']:.3f}", loss_G=f"{scalars['loss/G']:.3f}")
        if step % args.sample_every == 0 or step == total:
            grid = vutils.make_grid(sample(G, fixed_z), nrow=10, padding=2)
            vutils.save_image(grid, out / "samples" / f"step_{step:07d}.png")
            writer.add_image("samples", grid, step)
        epoch = step * args.k // batches.per_epoch
        if args.select_every and epoch > (step - 1) * args.k // batches.per_epoch and epoch % args.select_every == 0:
            # the validation split's Parzen log-likelihood; the best weights so far are kept as best.pt
            check_finite()
            score, _, sigma = parzen_estimate(G, valid, valid, args, device)
            writer.add_scalar("metrics/parzen_valid", score, step)
            writer.add_scalar("metrics/parzen_valid_sigma", sigma, step)
            if best is None or score > best["score"]:
                best = {"score": score, "step": step, "epoch": epoch}
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
