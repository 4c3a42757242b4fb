"""LSGAN's Gaussian-mixture experiment (Mao et al. 2017, arXiv 1611.04076, ICCV version, §4's stability
comparison): an LSGAN and a regular GAN (sigmoid cross entropy) on a mixture of 8 two-dimensional Gaussians, with
G and D of three fully-connected layers each; kernel density estimates of G's samples as training goes on. The
image networks and sets are in train.py.

    python toy.py                      # the least squares loss: toy.png (KDE at steps 0, 5k, ..., 25k), metrics.json
    python toy.py --loss bce           # the regular GAN: sigmoid cross entropy, G's -log D(G(z))
    python toy.py --resume runs/RUN    # continue a run exactly where it stopped
"""
import io
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import support
from dataset import MIXTURE_STD, mixture_centres, sample_mixture
from model import FOLDER
from train import CODINGS, discriminator_loss, generator_loss

MEASURE_SAMPLES = 2500  # samples behind metrics/modes and metrics/high_quality, and behind each density plot


def mlp(n_in, n_out, width):
    """Three fully-connected layers (§4): n_in -> width -> width -> n_out, ReLU between, a linear output."""
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, n_out))


def losses(kind, coding):
    """(D's loss(D(x), D(G(z))), G's loss(D(G(z)))): §3.2's least squares with the codes (a, b, c), or the
    regular GAN's sigmoid cross entropy on D's logits, with G's non-saturating -log D(G(z))."""
    a, b, c = coding
    if kind == "ls":
        return (lambda real, fake: discriminator_loss(real, fake, a, b)), (lambda fake: generator_loss(fake, c))
    return (lambda real, fake: F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))), \
        (lambda fake: F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)))


def main(argv=None):
    args, checkpoint = support.parse_args(build_parser(), argv, FOLDER + "-toy", check_args, resumable={"iters"})
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    G, D = mlp(args.z_dim, 2, args.width).to(device), mlp(2, 1, args.width).to(device)
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, 0.999))
    loss_D_of, loss_G_of = losses(args.loss, CODINGS[args.coding])
    data = support.Sampled(sample_mixture, args.batch_size, device, args.seed)
    real = sample_mixture(MEASURE_SAMPLES, torch.Generator().manual_seed(args.seed + 1))

    def draw(n):
        with torch.no_grad(), support.rng_untouched(device, args.seed):
            return G(torch.randn(n, args.z_dim, device=device)).cpu()

    def picture(z):
        fig, ax = support.pyplot().subplots(figsize=(4, 4))
        support.plot_plane(ax, real[:500], G(z), extent=3)
        return support.save_figure(fig)

    def metric():
        """metrics/modes and metrics/high_quality; the samples are kept for the density plot of this step."""
        samples = draw(MEASURE_SAMPLES)
        kept = torch.load(snapshots) if snapshots.exists() else {}
        support.write_atomically(snapshots, to_bytes({**kept, run.step: samples}))
        modes, high_quality = support.mode_measures(samples, mixture_centres(), MIXTURE_STD)
        return {"metrics/modes": modes, "metrics/high_quality": high_quality}, high_quality

    run = support.Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, data,
                      fixed_z=torch.randn(500, args.z_dim, device=device), total=args.iters,
                      title=f"{'LSGAN' if args.loss == 'ls' else 'regular GAN'} on the Gaussian mixture", grid=picture,
                      folder=FOLDER + "-toy", compiled=(), metric=metric, eval_every=args.eval_every)
    snapshots = run.out / "density_samples.pt"
    if checkpoint is None:
        metric()  # step 0
    started = time.process_time()
    while run.running():
        x, z = next(data), torch.randn(args.batch_size, args.z_dim, device=device)
        # D's update on real x and detached fakes, then G's on the same z (as train.py)
        with torch.no_grad():
            fake = G(z)
        loss_D = loss_D_of(D(x).squeeze(1), D(fake).squeeze(1))
        opt_D.zero_grad(set_to_none=True)
        loss_D.backward()
        opt_D.step()
        D.requires_grad_(False)
        loss_G = loss_G_of(D(G(z)).squeeze(1))
        opt_G.zero_grad(set_to_none=True)
        loss_G.backward()
        opt_G.step()
        D.requires_grad_(True)
        run.end_step({"loss/D": loss_D.detach(), "loss/G": loss_G.detach()})
    code = run.finish()
    kept = torch.load(snapshots)
    plt = support.pyplot()
    fig, axes = plt.subplots(1, len(kept) + 1, figsize=(2.2 * (len(kept) + 1), 2.4))
    for ax, (step, samples) in zip(axes, sorted(kept.items())):
        support.plot_plane(ax, density=samples, extent=3)
        ax.set_title(f"step {step // 1000}k" if step else "step 0", fontsize=9)
    support.plot_plane(axes[-1], density=real, extent=3)
    axes[-1].set_title("target", fontsize=9)
    fig.suptitle("LSGAN (least squares)" if args.loss == "ls" else "regular GAN (sigmoid cross entropy)")
    support.save_figure(fig, run.out / "toy.png")
    scalars, _ = metric()
    result = {"step": run.step, "cpu_seconds": time.process_time() - started, **scalars}
    support.write_atomically(run.out / "metrics.json", json.dumps(result, indent=2).encode())
    print(json.dumps(result))
    return code


def to_bytes(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="ls", choices=("ls", "bce"),
                   help="ls: §3.2's least squares (LSGAN); bce: the regular GAN's sigmoid cross entropy (§4 compares)")
    p.add_argument("--coding", default="0-1", choices=sorted(CODINGS), help="with --loss ls: the codes, as train.py")
    p.add_argument("--z-dim", type=int, default=256, help="z ~ N(0, I); the paper gives no size (chosen here)")
    p.add_argument("--width", type=int, default=128, help="hidden units; the paper gives none (chosen here)")
    p.add_argument("--batch-size", type=int, default=512, help="the paper gives none (chosen here)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam; the paper gives none for this experiment (chosen here)")
    p.add_argument("--beta1", type=float, default=0.5, help="§4.1's beta1 = 0.5")
    p.add_argument("--iters", type=int, default=25_000, help="steps; the figure's last density plot is at 25k")
    support.add_run_flags(p, sample_every=1000, log_every=100, checkpoint_every=1000)
    p.add_argument("--eval-every", type=int, default=5000,
                   help=f"steps between density plots and metrics/modes, metrics/high_quality on {MEASURE_SAMPLES} "
                        "samples (the figure: every 5k steps)")
    return p


def check_args(parser, args):
    support.require_at_least(parser, args, 1, "z_dim", "width", "batch_size", "iters", "eval_every")
    support.require_positive(parser, args, "lr")
    if not 0 <= args.beta1 < 1:
        parser.error(f"--beta1 must lie in [0, 1), got {args.beta1}")


if __name__ == "__main__":
    sys.exit(main())
