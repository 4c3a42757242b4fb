"""WGAN (Arjovsky, Chintala & Bottou 2017, arXiv 1701.07875), trained by Algorithm 1.

While theta has not converged:
    n_critic times (lines 2-8): a fresh real batch x and prior batch z; the critic f_w
        ascends E[f_w(x)] - E[f_w(G(z))] by one RMSProp step; then every weight of the
        critic is clipped to [-c, c]
    once (lines 9-11): a fresh prior batch z; G descends -E[f_w(G(z))] by one RMSProp step
with alpha = 0.00005, c = 0.01, m = 64, n_critic = 5, and z ~ N(0, 1)^100.

    python train.py                                   # CIFAR-10 at 64x64, the paper's settings
    python train.py --dataset mnist --image-size 32
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
"""
import argparse
import copy
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
import torchvision.utils as vutils
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dataset import CHANNELS, DATASETS, LSUN_CLASSES, Batches, DataError, load_images
from model import WIDTH, Z_DIM, Critic, Generator, checkpoint_path, init_weights, sample, sample_z

HERE = Path(__file__).resolve().parent
GRID = 64  # fixed-noise samples in each grid (8 x 8)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "data_on", "cache_dir", "max_steps", "iters", "device", "sample_every", "log_every",
             "checkpoint_every"}
# Official code (main.py), left out of the paper as its README says: 100 critic iterations
# for the first 25 generator iterations and at every 500th generator iteration.
WARMUP_STEPS, WARMUP_EVERY, WARMUP_CRITIC_ITERATIONS = 25, 500, 100
EPOCHS = 25  # official code: niter = 25 epochs of real batches (the paper names no length)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; the paper used LSUN bedrooms (§4.1), this default downloads by itself")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--lsun-classes", nargs="+", default=list(LSUN_CLASSES), metavar="SET",
                   help="with --dataset lsun: LSUN sets under DATA_ROOT/lsun; §4.1: the bedrooms")
    p.add_argument("--data-on", default="auto", choices=("auto", "device", "host", "disk"),
                   help="where the decoded uint8 set is kept: auto = the device when it fits in half its free "
                        "memory, else host memory, else a memory-mapped file; the batches are the same")
    p.add_argument("--cache-dir", default=None,
                   help="where image folders, CelebA and LSUN are cached once decoded (default: beside the data, "
                        "or ~/.cache/gan-papers when that is read-only)")
    p.add_argument("--strict-images", action="store_true",
                   help="stop at an image file that does not decode (default: leave it out with a warning)")
    p.add_argument("--image-size", type=int, default=64, choices=(32, 64), help="§4.1: 64x64 pixels")
    p.add_argument("--batch-size", type=int, default=64, help="Alg. 1: m = 64")
    p.add_argument("--lr", type=float, default=5e-5, help="Alg. 1: alpha = 0.00005, RMSProp for critic and G")
    p.add_argument("--clip", type=float, default=0.01, help="Alg. 1: c = 0.01; critic weights live in [-c, c]")
    p.add_argument("--n-critic", type=int, default=5, help="Alg. 1: n_critic = 5 critic iterations per G iteration")
    p.add_argument("--no-critic-warmup", dest="critic_warmup", action="store_false",
                   help=f"turn off the official code's schedule (main.py) of {WARMUP_CRITIC_ITERATIONS} critic "
                        f"iterations for the first {WARMUP_STEPS} G iterations and every {WARMUP_EVERY}th "
                        f"(warm-up on: %(default)s)")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="official code: nz = 100")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="channels of G's last and the critic's first hidden layer; official code: ngf = ndf = 64")
    p.add_argument("--iters", type=int, default=None,
                   help=f"generator iterations; %(default)s: as many as it takes the critic to draw {EPOCHS} epochs "
                        f"of real batches (official code: niter = {EPOCHS} epochs; the paper names no length)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator steps in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=500,
                   help="generator steps between fixed-noise sample grids (official code: every 500)")
    p.add_argument("--log-every", type=int, default=1,
                   help="generator steps between scalar logs (official code: every generator iteration)")
    p.add_argument("--checkpoint-every", type=int, default=500, help="generator steps between checkpoints")
    return p


def parse_args(argv):
    """The run's configuration, and the checkpoint to continue from (None for a new run)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
        args = argparse.Namespace(**{**checkpoint["args"], **given, "out": str(path.parent.parent)})
    check_args(parser, args)
    return args, checkpoint


def check_args(parser, args):
    for name in ("batch_size", "n_critic", "z_dim", "width", "sample_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    for name in ("iters", "max_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be positive, got {args.lr}")
    if not (args.clip > 0 and math.isfinite(args.clip)):
        parser.error(f"--clip must be positive (the critic's weights are clipped to [-c, c]), got {args.clip}")
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


def critic_iterations(generator_step, n_critic, warmup):
    """Alg. 1 line 2: n_critic critic iterations before generator step `generator_step` (counted from 0).

    With `warmup`, the official code's schedule (main.py): 100 iterations for the first 25
    generator steps and for every 500th, so that the critic starts near its optimum and
    is brought back there from time to time.
    """
    if warmup and (generator_step < WARMUP_STEPS or generator_step % WARMUP_EVERY == 0):
        return WARMUP_CRITIC_ITERATIONS
    return n_critic


def default_iterations(per_epoch, n_critic, warmup, epochs=EPOCHS):
    """Generator iterations in which the critic draws `epochs` epochs of real batches (official code: niter)."""
    steps, drawn = 0, 0
    while drawn < epochs * per_epoch:
        drawn += critic_iterations(steps, n_critic, warmup)
        steps += 1
    return steps


def critic_step(G, D, opt_D, x, z, clip):
    """Alg. 1 lines 5-7: one RMSProp ascent step of the critic on E[f_w(x)] - E[f_w(G(z))], then the clip.

    G is held fixed: its output carries no graph. Returns the critic's loss and the
    Wasserstein estimate, both on this batch before the step.
    """
    with torch.no_grad():
        fake = G(z)
    # line 5: g_w = grad_w [1/m sum f_w(x_i) - 1/m sum f_w(G(z_i))]; the estimate of W(P_r, P_theta), up to a constant
    estimate = D(x).mean() - D(fake).mean()
    loss = -estimate  # ascending the estimate = descending its negative
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    # line 6: w <- w + alpha * RMSProp(w, g_w)
    opt_D.step()
    # line 7: w <- clip(w, -c, c), after the update: every critic parameter, batch norm's gamma and beta included
    with torch.no_grad():
        for w in D.parameters():
            w.clamp_(-clip, clip)
    return loss.detach(), estimate.detach()


def generator_step(G, D, opt_G, z):
    """Alg. 1 lines 10-11: one RMSProp descent step of G on -E[f_w(G(z))]. The critic is held fixed."""
    D.requires_grad_(False)  # the critic is only a function here: no gradient is computed for its weights
    # line 10: g_theta = -grad_theta 1/m sum f_w(G(z_i))
    loss = -D(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    # line 11: theta <- theta - alpha * RMSProp(theta, g_theta)
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def rmsprop(params, lr):
    """§4.2: RMSProp, no momentum ("momentum based methods seemed to perform worse").

    The official code (main.py) calls optim.RMSprop(lr=5e-5) with PyTorch's defaults,
    written out here: alpha 0.99, eps 1e-8, momentum 0, not centred, no weight decay.
    """
    return torch.optim.RMSprop(params, lr=lr, alpha=0.99, eps=1e-8, momentum=0, centered=False, weight_decay=0)


def main(argv=None):
    args, checkpoint = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
        images = load_images(args.dataset, args.data_root, args.image_size, cache_dir=args.cache_dir,
                             strict=args.strict_images, lsun_classes=args.lsun_classes)
        batches = Batches(images, args.batch_size, device, args.seed, data_on=args.data_on)
    except DataError as error:
        fail(error)
    args.channels = CHANNELS[args.dataset]
    if args.iters is None:
        args.iters = default_iterations(batches.per_epoch, args.n_critic, args.critic_warmup)

    G = Generator(args.image_size, args.channels, args.z_dim, args.width).to(device)
    D = Critic(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    # Alg. 1 lines 6 and 11, §4.2: RMSProp with alpha = 0.00005 for both networks
    opt_G = rmsprop(G.parameters(), args.lr)
    opt_D = rmsprop(D.parameters(), args.lr)
    fixed_z = sample_z(GRID, args.z_dim, device)
    step = 0
    if checkpoint is not None:
        G.load_state_dict(checkpoint["G"])
        D.load_state_dict(checkpoint["D"])
        opt_G.load_state_dict(checkpoint["opt_G"])
        opt_D.load_state_dict(checkpoint["opt_D"])
        batches.load_state_dict(checkpoint["batches"])
        fixed_z = checkpoint["fixed_z"].to(device)
        step = checkpoint["step"]
        set_rng_states(checkpoint["rng"])

    total = args.iters if args.max_steps is None else min(args.iters, args.max_steps)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    # a resumed run writes from step + 1 on: events after the checkpoint, from a run that went on past it, are dropped
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"WGAN on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x{args.channels}) "
          f"on {device}: generator steps {step} -> {total} of {args.iters}; run folder {out}")
    print(f"data {batches.placement}")

    def state():
        return {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "batches": batches.state_dict(), "fixed_z": fixed_z, "step": step, "rng": rng_states(),
                "args": vars(args)}

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
    # Alg. 1 line 1: while theta has not converged (here: for a fixed number of generator iterations)
    while step < total and stop.signal is None:
        # line 2: n_critic critic iterations (100 during the official code's warm-up). The box writes
        # "for t = 0, ..., n_critic"; its Require line and the official code mean n_critic, not n_critic + 1
        for _ in range(critic_iterations(step, args.n_critic, args.critic_warmup)):
            # line 3: a fresh batch of m real examples for every critic iteration
            x = next(batches)
            # line 4: a batch of m prior samples z ~ p(z)
            z = sample_z(len(x), args.z_dim, device)
            # lines 5-7: the critic's gradient, its RMSProp step, then the clip to [-c, c]
            loss_D, estimate = critic_step(G, D, opt_D, x, z, args.clip)
        # line 9: a fresh batch of m prior samples
        z = sample_z(args.batch_size, args.z_dim, device)
        # lines 10-11: G's gradient and its RMSProp step
        loss_G = generator_step(G, D, opt_G, z)
        step += 1
        progress.update()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_D + loss_G), step, first_bad_step)

        if step % args.log_every == 0 or step == total:
            check_finite()
            # §4.2: the critic's last estimate of the EM distance, the curve of Fig. 3
            scalars = {"wasserstein/estimate": estimate.item(), "loss/D": loss_D.item(), "loss/G": loss_G.item()}
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(W=f"{scalars['wasserstein/estimate']:.4f}", loss_G=f"{scalars['loss/G']:.4f}")
        if step % args.sample_every == 0 or step == total:
            grid = vutils.make_grid(sample(G, fixed_z), nrow=8, normalize=True, value_range=(-1, 1))
            vutils.save_image(grid, out / "samples" / f"step_{step:07d}.png")
            writer.add_image("samples", grid, step)
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
    print(f"done: step {step} of {total} in {elapsed / 60:.1f} min; samples and checkpoint in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
