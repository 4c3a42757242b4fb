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
import torch.nn.functional as F
import torchvision.utils as vutils
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from dataset import CHANNELS, DATASETS, Batches, DataError, load_images
from model import WIDTH, Z_DIM, Discriminator, Generator, checkpoint_path, normalized_sigmas, sample, sample_z

HERE = Path(__file__).resolve().parent
GRID = 64  # fixed-noise samples in each grid (8 x 8)
# Flags that may be given with --resume; everything else comes from the run's own args.json.
RESUMABLE = {"resume", "data_root", "data_on", "cache_dir", "max_steps", "iters", "device", "sample_every", "log_every",
             "checkpoint_every"}
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
    p.add_argument("--data-on", default="auto", choices=("auto", "device", "host", "disk"),
                   help="where the decoded uint8 set is kept: auto = the device when it fits in half its free "
                        "memory, else host memory, else a memory-mapped file; the batches are the same")
    p.add_argument("--cache-dir", default=None,
                   help="where image folders and CelebA are cached once decoded (default: beside the data, "
                        "or ~/.cache/gan-papers when that is read-only)")
    p.add_argument("--strict-images", action="store_true",
                   help="stop at an image file that does not decode (default: leave it out with a warning)")
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
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=500, help="generator updates between fixed-noise grids")
    p.add_argument("--log-every", type=int, default=50, help="generator updates between scalar logs")
    p.add_argument("--checkpoint-every", type=int, default=500, help="generator updates between checkpoints")
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

    total = args.iters if args.max_steps is None else min(args.iters, args.max_steps)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    writer = SummaryWriter(out, purge_step=step + 1 if checkpoint is not None else None)
    print(f"SN-DCGAN on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x{args.channels}) "
          f"on {device}: generator updates {step} -> {total}, setting {args.setting} (lr {args.lr}, betas "
          f"{args.beta1}/{args.beta2}, n_dis {args.n_dis}), {args.loss} loss; run folder {out}")
    print(f"data {batches.placement}")

    def state():
        return {"G": G.state_dict(), "D": D.state_dict(), "opt_G": opt_G.state_dict(), "opt_D": opt_D.state_dict(),
                "batches": batches.state_dict(), "fixed_z": fixed_z, "step": step, "rng": rng_states(),
                "args": vars(args)}

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
