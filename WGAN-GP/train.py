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

from dataset import CHANNELS, DATASETS, Batches, DataError, load_images
from model import WIDTH, Z_DIM, Critic, Generator, checkpoint_path, init_weights, sample, sample_z

HERE = Path(__file__).resolve().parent
GRID = 64  # fixed-noise samples in each grid (8 x 8)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "data_on", "cache_dir", "max_steps", "iters", "device", "sample_every", "log_every",
             "checkpoint_every"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; official code: gan_cifar.py trains on CIFAR-10 (§5.3, Fig. 3)")
    p.add_argument("--data-root", default=str(HERE.parent / "data"), help="where data sets live (../data)")
    p.add_argument("--data-on", default="auto", choices=("auto", "device", "host", "disk"),
                   help="where the decoded uint8 set is kept: auto = the device when it fits in half its free "
                        "memory, else host memory, else a memory-mapped file; the batches are the same")
    p.add_argument("--cache-dir", default=None,
                   help="where image folders and CelebA are cached once decoded (default: beside the data, "
                        "or ~/.cache/gan-papers when that is read-only)")
    p.add_argument("--strict-images", action="store_true",
                   help="stop at an image file that does not decode (default: leave it out with a warning)")
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64),
                   help="official code: gan_cifar.py, 32x32 (64 adds one stride-2 layer to G and D)")
    p.add_argument("--batch-size", type=int, default=64, help="Alg. 1: m; official code: BATCH_SIZE = 64")
    p.add_argument("--lr", type=float, default=1e-4, help="Alg. 1: Adam alpha = 0.0001")
    p.add_argument("--beta1", type=float, default=0.0,
                   help="Alg. 1 and App. B: beta1 = 0; App. E and the official code use 0.5")
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
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=1000, help="generator iterations between fixed-noise grids")
    p.add_argument("--log-every", type=int, default=100,
                   help="generator iterations between scalar logs (official code: every 100); each log is the "
                        "mean over the iterations since the last one")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="generator iterations between checkpoints")
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
    for name in ("batch_size", "n_critic", "z_dim", "width", "iters", "sample_every", "log_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if not args.lambda_gp >= 0:
        parser.error(f"--lambda-gp must be non-negative, got {args.lambda_gp}")
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
                             strict=args.strict_images)
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
    # Events after the checkpoint's step came from a run that went on past it and are dropped;
    # those at the checkpoint's step were written before it, and are kept.
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"WGAN-GP on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x{args.channels}) "
          f"on {device}: generator iterations {step} -> {total}, {args.n_critic} critic iterations each "
          f"({batches.per_epoch} real batches per epoch); run folder {out}")
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
    # Sums since the last log of loss/D, wasserstein/estimate, penalty/gp (per critic iteration) and loss/G.
    sums, logged_at = torch.zeros(4, device=device), step
    stop = StopRequest()
    progress = tqdm(total=total, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    started = time.perf_counter()
    # Alg. 1 line 1: while theta has not converged (here: for a fixed number of generator iterations)
    while step < total and stop.signal is None:
        # Alg. 1 line 2: for t = 1, ..., n_critic. Lines 3-8 ("for i = 1, ..., m") are the batch axis of each tensor.
        for _ in range(args.n_critic):
            # Alg. 1 line 4: a fresh minibatch of real x ~ P_r and of z ~ p(z) for every critic iteration
            x = next(batches)
            loss_D, w_estimate, gp = critic_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device), args.lambda_gp)
            sums[:3] += torch.stack((loss_D, w_estimate, gp))
        # Alg. 1 line 11: sample a batch of latent variables {z(i)}, i = 1..m
        z = sample_z(args.batch_size, args.z_dim, device)
        # Alg. 1 line 12: the generator's Adam step on -D(G(z))
        loss_G = generator_step(G, D, opt_G, z)
        sums[3] += loss_G
        step += 1
        progress.update()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss_D + loss_G), step, first_bad_step)

        if step % args.log_every == 0 or step == total:
            check_finite()
            n = step - logged_at
            means = (sums / torch.tensor([n * args.n_critic] * 3 + [n], device=device)).tolist()
            scalars = dict(zip(("loss/D", "wasserstein/estimate", "penalty/gp", "loss/G"), means))
            for name, value in scalars.items():
                writer.add_scalar(name, value, step)
            sums.zero_()
            logged_at = step
            progress.set_postfix(W=f"{scalars['wasserstein/estimate']:.3f}", gp=f"{scalars['penalty/gp']:.3f}")
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
    print(f"done: generator iteration {step} of {total} in {elapsed / 60:.1f} min; samples and checkpoint in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
