"""LSGAN (Mao et al. 2017, arXiv 1611.04076, ICCV version), trained as §3-4 describe.

The GAN game with least squares losses in place of the sigmoid cross entropy (§3.2).
With the codes a (fake), b (real) and c (what G wants D to say about its fakes), for every
minibatch:
    1. D descends  1/2 E_x[(D(x) - b)^2] + 1/2 E_z[(D(G(z)) - a)^2]   (fakes detached: G held fixed)
    2. G descends  1/2 E_z[(D(G(z)) - c)^2]                          (D held fixed)
each with Adam(lr 0.001, beta1 0.5) (§4.1) and z ~ U(-1, 1)^1024. The default codes are the
0-1 coding (a, b, c) = (0, 1, 1) that §3.2.3 trains with; --coding pearson gives
(-1, 1, 0), for which §3.2.2 shows that G minimises the Pearson chi^2 divergence.

    python train.py                                   # CIFAR-10 at 32x32
    python train.py --dataset folder --data-root DIR --image-size 112   # the paper's LSUN setting
    python train.py --dataset mnist --lr 0.0002       # §4.1's rate for handwritten characters
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
"""
import argparse
import copy
import json
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
from model import WIDTH, Z_DIM, Discriminator, Generator, check_image_size, checkpoint_path, init_weights, sample, \
    sample_z

HERE = Path(__file__).resolve().parent
GRID = 64  # fixed-noise samples in each grid (8 x 8)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "data_on", "cache_dir", "max_steps", "iters", "device", "sample_every", "log_every",
             "checkpoint_every"}
# §3.2.3: the codes (a, b, c): a for fake data and b for real data in D's loss, c what G wants D to believe of its fakes.
CODINGS = {
    "0-1": (0.0, 1.0, 1.0),  # §3.2.3: the 0-1 binary coding (c = b), the one the paper's experiments use
    "pearson": (-1.0, 1.0, 0.0),  # §3.2.2-3.2.3: b - c = 1 and b - a = 2, G minimises the Pearson chi^2 divergence
}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; the paper used LSUN scenes (and CIFAR-10 in the ICCV version), "
                        "this default downloads by itself")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--lsun-classes", nargs="+", default=list(LSUN_CLASSES), metavar="SET",
                   help="with --dataset lsun: LSUN sets under DATA_ROOT/lsun; the paper trains one model on each of "
                        "five scene sets, the official code (convert_lsun.py) defaults to the bedrooms")
    p.add_argument("--data-on", default="auto", choices=("auto", "device", "host", "disk"),
                   help="where the decoded uint8 set is kept: auto = the device when it fits in half its free "
                        "memory, else host memory, else a memory-mapped file; the batches are the same")
    p.add_argument("--cache-dir", default=None,
                   help="where image folders, CelebA and LSUN are cached once decoded (default: beside the data, "
                        "or ~/.cache/gan-papers when that is read-only)")
    p.add_argument("--strict-images", action="store_true",
                   help="stop at an image file that does not decode (default: leave it out with a warning)")
    p.add_argument("--image-size", type=int, default=32,
                   help="a multiple of 16, at least 32; the paper's scene network is 112x112, "
                        "32 is CIFAR-10's own size")
    p.add_argument("--coding", default="0-1", choices=sorted(CODINGS),
                   help="the codes (a, b, c): 0-1 = (0, 1, 1), which §3.2.3 trains with; "
                        "pearson = (-1, 1, 0), the Pearson chi^2 codes of §3.2.2")
    p.add_argument("--batch-size", type=int, default=64, help="official code: batch_size 64 (the paper gives none)")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="§4.1: Adam learning rate 0.001 for the scenes (0.0002 for the handwritten characters)")
    p.add_argument("--beta1", type=float, default=0.5, help="§4.1: Adam beta1 0.5, following DCGAN")
    p.add_argument("--beta2", type=float, default=0.999, help="official code keeps Adam's default beta2")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="figure: 1024-dimensional z")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="channels of D's first and G's last hidden layer; official code: 64 "
                        "(G 256-256-256-256-128-64, D 64-128-256-512)")
    p.add_argument("--iters", type=int, default=1_000_000,
                   help="generator steps; official code: max_steps 1000000 (the paper gives none)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator steps in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=500, help="steps between fixed-noise sample grids")
    p.add_argument("--log-every", type=int, default=50, help="steps between scalar logs")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
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
    for name in ("batch_size", "z_dim", "width", "iters", "sample_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    try:
        check_image_size(args.image_size)
    except ValueError as error:
        parser.error(f"--image-size: {error}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
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


def discriminator_loss(real_out, fake_out, a, b):
    """§3.2, D's objective: 1/2 E_x[(D(x) - b)^2] + 1/2 E_z[(D(G(z)) - a)^2], each expectation a batch mean of squares."""
    return 0.5 * (real_out - b).pow(2).mean() + 0.5 * (fake_out - a).pow(2).mean()


def generator_loss(fake_out, c):
    """§3.2, G's objective: 1/2 E_z[(D(G(z)) - c)^2], a batch mean of squares."""
    return 0.5 * (fake_out - c).pow(2).mean()


def discriminator_step(G, D, opt_D, x, z, coding):
    """D's update: descend §3.2's D objective. G is held fixed: its output carries no graph."""
    a, b, _ = coding
    with torch.no_grad():
        fake = G(z)
    real_out, fake_out = D(x), D(fake)
    loss = discriminator_loss(real_out, fake_out, a, b)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach(), real_out.detach().mean(), fake_out.detach().mean()


def generator_step(G, D, opt_G, z, coding):
    """G's update: descend §3.2's G objective, pulling D(G(z)) towards c. D is held fixed."""
    _, _, c = coding
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    loss = generator_loss(D(G(z)), c)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


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

    G = Generator(args.image_size, args.channels, args.z_dim, args.width).to(device)
    D = Discriminator(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    # §4.1: Adam for both networks, lr 0.001 (scenes) and beta1 0.5
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2))
    coding = CODINGS[args.coding]
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

    total = args.iters
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"LSGAN ({args.coding} coding, (a, b, c) = {coding}) on {args.dataset} ({len(images)} images, "
          f"{args.image_size}x{args.image_size}x{args.channels}) on {device}: steps {step} -> {total} "
          f"({batches.per_epoch} per epoch); run folder {out}")
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
    while step < total and stop.signal is None:
        # a minibatch of m examples x and m noise samples z ~ U(-1, 1)^1024
        x = next(batches)
        z = sample_z(len(x), args.z_dim, device)
        # D's update: regress D(x) to b and D(G(z)) to a
        loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, z, coding)
        # G's update on the same z (official code: train_lsun.py feeds one batch_z to both updates)
        loss_G = generator_step(G, D, opt_G, z, coding)
        step += 1
        progress.update()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_D + loss_G), step, first_bad_step)

        if step % args.log_every == 0 or step == total:
            check_finite()
            scalars = {"loss/D": loss_D.item(), "loss/G": loss_G.item(), "D/real": D_x.item(), "D/fake": D_G_z.item()}
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            progress.set_postfix(loss_D=f"{scalars['loss/D']:.3f}", loss_G=f"{scalars['loss/G']:.3f}")
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
