"""LSGAN's Gaussian-mixture experiment (Mao et al. 2017, arXiv 1611.04076, §4's stability
comparison) as the authors' code runs it (xudonmao/LSGAN, stability_comparison/mixture_gaussian:
ls.py for the least squares loss, sig.py for the regular GAN): a mixture of Gaussians on the unit
circle, G and D small tanh networks, kernel density estimates of G's samples every 5,000 steps.
The image networks and sets are in train.py.

    python toy.py                     # least squares: toy.png (densities at 0, 5k, ..., 35k)
    python toy.py --loss bce          # the regular GAN: sigmoid cross entropy, G's -log D(G(z))
    python toy.py --resume runs/RUN   # continue a run exactly where it stopped
    python toy.py figure RUN_LS RUN_BCE --out mixture.png   # both runs' densities, a row each
"""

import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import support
from model import FOLDER
from train import CODINGS, discriminator_loss, generator_loss

# The mixture: the official code's sample_mog(n_mixture=9, std=0.01, radius=1.0), ls.py lines 21-27.
MODES = 8  # distinct modes: of linspace(0, 2 pi, 9)'s 9 angles, 0 and 2 pi are the same point
STD = 0.01
RADIUS = 1.0
MEASURE_SAMPLES = 2500  # G's samples behind metrics/modes and metrics/high_quality at each step
QUALITY_STDS = 3  # a sample is of high quality within 3 standard deviations of its nearest centre
DENSITY_BATCHES = 10  # official code, ls.py lines 98 and 104: n_batches_viz = 10 batches a plot
EXTENT = 4.0  # official code, ls.py lines 127-131: the plots span [-4, 4]^2 (clip, xlim, ylim)
DENSITY_LEVELS = 30  # official code, ls.py line 127: kdeplot(shade=True, n_levels=30, "Greens")
DENSITY_GRID = 100  # grid points a side on which each density is evaluated
LOSS_NAMES = {"ls": "LSGAN (least squares)", "bce": "regular GAN"}
ROW_NAMES = {"ls": "LSGAN", "bce": "regular GAN"}


# ---- the mixture ----


def mixture_angles(equal_modes=False, modes=MODES):
    """The components' angles. By default the official code's linspace(0, 2 pi, modes + 1), whose
    last angle (2 pi) repeats the first, so that mode has twice the weight of each other one; with
    equal_modes, `modes` distinct angles of equal weight."""
    if equal_modes:
        return torch.arange(modes, dtype=torch.float64) * 2 * math.pi / modes
    return torch.linspace(0, 2 * math.pi, modes + 1, dtype=torch.float64)


def to_plane(angles, radius=RADIUS):
    """Points on the circle: (x, y) = radius (sin angle, cos angle), the official code's order."""
    return (radius * torch.stack([angles.sin(), angles.cos()], 1)).float()


def mode_centres(modes=MODES, radius=RADIUS):
    """The distinct mode centres (modes, 2): angle 0 at (0, radius), then every 2 pi / modes."""
    return to_plane(mixture_angles(equal_modes=True, modes=modes), radius)


def sample_mixture(n, generator, equal_modes=False, std=STD, radius=RADIUS):
    """n points of the mixture, drawn from `generator`: a component picked uniformly, plus its
    Gaussian noise."""
    centres = to_plane(mixture_angles(equal_modes), radius)
    picked = torch.randint(len(centres), (n,), generator=generator)
    return centres[picked] + std * torch.randn(n, 2, generator=generator)


class MixtureBatches:
    """Endless fresh batches of the mixture, from a generator seeded by `seed` whose state goes
    into the checkpoint, so a resumed run draws exactly the batches it would have drawn."""

    def __init__(self, batch_size, device, seed, equal_modes=False):
        self.batch_size, self.device, self.equal_modes = batch_size, device, equal_modes
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self):
        return sample_mixture(self.batch_size, self.generator, self.equal_modes).to(self.device)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ---- the measures ----


def nearest_centre(samples, centres):
    """(distance to the nearest centre, that centre's index) of each sample."""
    return torch.cdist(samples.float().cpu(), centres.float().cpu()).min(1)


def high_quality(samples, centres, std):
    """Which samples are of high quality: within QUALITY_STDS standard deviations of their
    nearest centre."""
    distance, _ = nearest_centre(samples, centres)
    return distance <= QUALITY_STDS * std


def high_quality_share(samples, centres, std):
    """The share of high-quality samples."""
    return high_quality(samples, centres, std).float().mean().item()


def modes_covered(samples, centres, std):
    """How many modes are covered: a mode is covered when it is the nearest centre of at least one
    high-quality sample."""
    _, nearest = nearest_centre(samples, centres)
    return len(nearest[high_quality(samples, centres, std)].unique())


# ---- the networks, losses and the step ----


def mlp(n_in, n_out, width=128, hidden=2):
    """`hidden` fully-connected layers of `width` units with tanh, then a linear output (official
    code, ls.py lines 30-40: slim.stack of fully_connected layers with activation_fn=tf.nn.tanh,
    then one with none)."""
    layers, size = [], n_in
    for _ in range(hidden):
        layers += [nn.Linear(size, width), nn.Tanh()]
        size = width
    return nn.Sequential(*layers, nn.Linear(size, n_out))


def init_orthogonal(net, gain):
    """Every weight orthogonal times `gain` (official code, ls.py line 65:
    tf.orthogonal_initializer(gain=1.4)); every bias 0 (slim.fully_connected's default)."""
    for layer in net.modules():
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, gain)
            nn.init.zeros_(layer.bias)
    return net


def losses(kind, coding, reduction):
    """(D's loss(D(x), D(G(z))), G's loss(D(G(z)))) on D's linear outputs.

    kind "ls": least squares with the codes (a, b, c); "bce": the regular GAN's sigmoid cross
    entropy on D's logits, with G's -log D(G(z)). reduction "official": the official code's batch
    reductions: ls.py's 0.5 * reduce_mean(tf.nn.l2_loss(t)) is a quarter of the batch's sum of
    squares (l2_loss sums and halves); sig.py averages D's loss and leaves G's unreduced (its
    gradient is the batch's sum). "mean": §3.2's 1/2 E[...] and the cross entropy as batch means.
    """
    a, b, c = coding
    if kind == "ls" and reduction == "official":
        return (
            lambda real, fake: 0.25 * (real - b).pow(2).sum() + 0.25 * (fake - a).pow(2).sum(),
            lambda fake: 0.25 * (fake - c).pow(2).sum(),
        )
    if kind == "ls":
        return (
            lambda real, fake: discriminator_loss(real, fake, a, b),
            lambda fake: generator_loss(fake, c),
        )
    g_reduction = "sum" if reduction == "official" else "mean"
    return (
        lambda real, fake: (
            F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
            + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        ),
        lambda fake: F.binary_cross_entropy_with_logits(
            fake, torch.ones_like(fake), reduction=g_reduction
        ),
    )


def simultaneous_step(G, D, opt_G, opt_D, x, z, loss_D_of, loss_G_of):
    """One step of both players on the same batch, each gradient taken before either moves
    (official code, ls.py line 101: one sess.run of g_train_op and d_train_op, on one draw of data
    and noise). Returns both losses."""
    fake = G(z)
    real_out, fake_out = D(x).squeeze(1), D(fake).squeeze(1)
    loss_D, loss_G = loss_D_of(real_out, fake_out), loss_G_of(fake_out)
    d_params, g_params = list(D.parameters()), list(G.parameters())
    d_grads = torch.autograd.grad(loss_D, d_params, retain_graph=True)
    g_grads = torch.autograd.grad(loss_G, g_params)
    for params, grads in ((d_params, d_grads), (g_params, g_grads)):
        for param, grad in zip(params, grads):
            param.grad = grad
    opt_D.step()
    opt_G.step()
    return loss_D.detach(), loss_G.detach()


# ---- the plots ----


def density(samples, extent=EXTENT, n=None, chunk=2000):
    """A Gaussian kernel density estimate of 2-D samples on an n x n grid over [-extent, extent]^2.
    The kernel's covariance is the samples' covariance times Scott's factor squared (scipy's
    gaussian_kde, which seaborn's kdeplot uses), at least a grid cell wide: a collapsed G shows."""
    n = n or DENSITY_GRID
    samples = samples.double().cpu()
    xs = torch.linspace(-extent, extent, n, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    cell = 2 * extent / (n - 1)
    factor = len(samples) ** (-1 / 6)  # Scott's rule in 2 dimensions: n^(-1 / (d + 4))
    covariance = torch.cov(samples.T) * factor**2 + cell**2 * torch.eye(2, dtype=torch.float64)
    whiten = torch.linalg.inv(torch.linalg.cholesky(covariance))
    points, grid = (samples @ whiten.T).float(), (grid @ whiten.T).float()
    parts = [
        torch.cdist(part, points).square_().mul_(-0.5).exp_().mean(1) for part in grid.split(chunk)
    ]
    return xs, torch.cat(parts).reshape(n, n) * whiten.det().item() / (2 * math.pi)


def plot_density(ax, samples, extent=EXTENT):
    """One panel: filled contours of the density of `samples` in greens, as the official code's
    kdeplot draws them."""
    xs, values = density(samples, extent)
    ax.set_facecolor(support.pyplot().get_cmap("Greens")(0))
    ax.contourf(xs, xs, values, levels=DENSITY_LEVELS, cmap="Greens")
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])


def plot_points(ax, real, fake, extent=1.5):
    """One panel: real points (orange) and G's samples (green)."""
    for points, colour in ((real, "orange"), (fake, "green")):
        ax.scatter(*points.detach().cpu().T, c=colour, marker="+", s=6, linewidths=0.5)
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])


def figure_tensor(fig):
    """A figure as a (3, H, W) image tensor in [0, 1] (a run's sample grid); closes the figure."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    support.pyplot().close(fig)
    return torch.from_numpy(image).permute(2, 0, 1).float() / 255


def step_name(step):
    return f"step {step // 1000}k" if step and step % 1000 == 0 else f"step {step}"


def density_figure(rows, target, path, extent=EXTENT):
    """Rows of density panels, {label: {step: samples}}, each row ending with the target's."""
    steps = sorted({step for kept in rows.values() for step in kept})
    fig, axes = support.pyplot().subplots(
        len(rows), len(steps) + 1, figsize=(1.6 * (len(steps) + 1), 1.75 * len(rows)), squeeze=False
    )
    for row, (label, kept) in zip(axes, rows.items()):
        for ax, step in zip(row, steps):
            if step in kept:
                plot_density(ax, kept[step], extent)
            else:
                ax.set_axis_off()
        plot_density(row[-1], target, extent)
        row[0].set_ylabel(label, fontsize=9)
    for ax, step in zip(axes[0], steps):
        ax.set_title(step_name(step), fontsize=9)
    axes[0][-1].set_title("target", fontsize=9)
    fig.tight_layout(pad=0.3)
    support.save_figure(fig, path)


def target_samples(seed, batch_size, equal_modes):
    """The mixture's own samples behind the target panel: one batch (official code, ls.py lines
    111-112 and 127: the target's kdeplot is of one sample_mog(batch_size))."""
    generator = torch.Generator().manual_seed(seed + 1)
    return sample_mixture(batch_size, generator, equal_modes)


# ---- the run ----


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(arg) for arg in argv]
    if argv[:1] == ["figure"]:
        return figure_main(argv[1:])
    parser = build_parser()
    args, checkpoint = support.parse_args(
        parser, argv, FOLDER + "-toy", check_args, resumable={"iters"}
    )
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    G = init_orthogonal(mlp(args.z_dim, 2, args.width, args.hidden_layers), args.init_gain)
    D = init_orthogonal(mlp(2, 1, args.width, args.hidden_layers), args.init_gain)
    G, D = G.to(device), D.to(device)
    betas = (args.beta1, 0.999)
    opt_G = torch.optim.Adam(G.parameters(), args.lr_g, betas, eps=args.adam_eps)
    opt_D = torch.optim.Adam(D.parameters(), args.lr_d, betas, eps=args.adam_eps)
    loss_D_of, loss_G_of = losses(args.loss, CODINGS[args.coding], args.reduction)
    data = MixtureBatches(args.batch_size, device, args.seed, args.equal_modes)
    real = target_samples(args.seed, args.batch_size, args.equal_modes)
    centres = mode_centres()

    def draw(n):
        with torch.no_grad(), support.rng_untouched(device, args.seed):
            return G(torch.randn(n, args.z_dim, device=device)).cpu()

    def picture(z):
        fig, ax = support.pyplot().subplots(figsize=(4, 4))
        with torch.no_grad():
            plot_points(ax, real[: len(z)], G(z))
        return figure_tensor(fig)

    def metric():
        """metrics/modes and metrics/high_quality on MEASURE_SAMPLES of G's samples, into
        measures.json too; the DENSITY_BATCHES batches drawn are kept for the density plot."""
        samples = draw(DENSITY_BATCHES * args.batch_size)
        kept = torch.load(snapshots) if snapshots.exists() else {}
        support.write_atomically(snapshots, to_bytes({**kept, run.step: samples}))
        measured = samples[:MEASURE_SAMPLES]
        scalars = {
            "metrics/modes": modes_covered(measured, centres, STD),
            "metrics/high_quality": high_quality_share(measured, centres, STD),
        }
        done = json.loads(measures.read_text()) if measures.exists() else {}
        done[str(run.step)] = scalars
        support.write_atomically(measures, json.dumps(done, indent=2).encode())
        return scalars, scalars["metrics/high_quality"]

    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=torch.randn(500, args.z_dim, device=device),
        total=args.iters,
        title=f"{LOSS_NAMES[args.loss]} on the Gaussian mixture",
        grid=picture,
        folder=FOLDER + "-toy",
        metric=metric,
        eval_every=args.eval_every,
    )
    snapshots, measures = run.out / "density_samples.pt", run.out / "measures.json"
    if checkpoint is None:
        metric()  # step 0
    started = time.process_time()
    while run.running():
        x, z = next(data), torch.randn(args.batch_size, args.z_dim, device=device)
        loss_D, loss_G = simultaneous_step(G, D, opt_G, opt_D, x, z, loss_D_of, loss_G_of)
        run.end_step({"loss/D": loss_D, "loss/G": loss_G})
    cpu_seconds = time.process_time() - started
    code = run.finish()
    row = f"{ROW_NAMES[args.loss]}\nseed {args.seed}"
    density_figure({row: torch.load(snapshots)}, real, run.out / "toy.png")
    result = {"step": run.step, "cpu_seconds": cpu_seconds, **json.loads(measures.read_text())}
    support.write_atomically(run.out / "metrics.json", json.dumps(result, indent=2).encode())
    print(json.dumps({"step": run.step, "cpu_seconds": round(cpu_seconds, 1)}))
    return code


def to_bytes(value):
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def figure_main(argv):
    """`toy.py figure RUN ... --out PNG`: a row of density plots per run folder, in that order."""
    p = support.FlagParser(description=figure_main.__doc__)
    p.add_argument("runs", nargs="+", help="toy.py run folders, a row each (least squares first)")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--extent", type=float, default=EXTENT, help="half-width of each panel")
    args = p.parse_args(argv)
    rows, target = {}, None
    for folder in map(Path, args.runs):
        try:
            kept = torch.load(folder / "density_samples.pt")
            run_args = json.loads((folder / "args.json").read_text())
            label = f"{ROW_NAMES[run_args['loss']]}\nseed {run_args['seed']}"
            settings = run_args["seed"], run_args["batch_size"], run_args["equal_modes"]
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            support.fail(f"{folder}: not a toy.py run with density samples ({error!r})")
        rows[label] = kept
        target = target_samples(*settings) if target is None else target
    density_figure(rows, target, args.out, args.extent)
    print(f"wrote {args.out}")
    return 0


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--loss",
        default="ls",
        choices=("ls", "bce"),
        help="ls: least squares (official code, ls.py); bce: the regular GAN's sigmoid cross "
        "entropy with G's -log D(G(z)) (official code, sig.py lines 70-72 and 81)",
    )
    p.add_argument(
        "--coding",
        default="0-1",
        choices=sorted(CODINGS),
        help="with --loss ls, the codes (a, b, c) (official code, ls.py lines 70-71 and 81: D's "
        "targets 1 for real and 0 for fake, G's target 1: 0-1 = (0, 1, 1))",
    )
    p.add_argument(
        "--reduction",
        default="official",
        choices=("official", "mean"),
        help="official: the official code's batch reductions (ls.py lines 70-71 and 81: 0.5 * "
        "reduce_mean(tf.nn.l2_loss(...)), a quarter of the batch's sum of squares; sig.py lines "
        "70-72 and 81: D's mean, G's left unreduced, so summed); mean: §3.2's 1/2 E[...] as batch "
        "means. Adam divides out a constant factor: the two differ only in epsilon's relative size",
    )
    p.add_argument(
        "--equal-modes",
        action="store_true",
        help="8 modes of equal weight, at angles 2 pi k / 8. The official code (ls.py lines 21-22: "
        "n_mixture=9, linspace(0, 2 pi, 9)) repeats angle 0 as 2 pi, giving the mode at (0, 1) "
        "twice the weight of each other one, which the paper does not describe; this removes it",
    )
    p.add_argument(
        "--z-dim",
        type=int,
        default=256,
        help="z ~ N(0, I) of this size (official code, ls.py lines 52 and 62-63: z_dim=256, "
        "ds.Normal(0, 1))",
    )
    p.add_argument(
        "--width",
        type=int,
        default=128,
        help="units of each hidden layer of G and D (official code, ls.py lines 30 and 36: "
        "n_hidden=128)",
    )
    p.add_argument(
        "--hidden-layers",
        type=int,
        default=2,
        help="tanh hidden layers of G and D (official code, ls.py lines 30 and 36: n_layer=2)",
    )
    p.add_argument(
        "--init-gain",
        type=float,
        default=1.4,
        help="gain of every weight's orthogonal initialisation (official code, ls.py line 65: "
        "tf.orthogonal_initializer(gain=1.4)); biases start at 0 (slim's default)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=512,
        help="real and fake samples a step (official code, ls.py line 45: batch_size=512)",
    )
    p.add_argument(
        "--lr-d",
        type=float,
        default=1e-4,
        help="D's Adam learning rate (official code, ls.py lines 46 and 77: "
        "disc_learning_rate=1e-4)",
    )
    p.add_argument(
        "--lr-g",
        type=float,
        default=1e-3,
        help="G's Adam learning rate (official code, ls.py lines 47 and 83: "
        "gen_learning_rate=1e-3)",
    )
    p.add_argument(
        "--beta1",
        type=float,
        default=0.5,
        help="Adam's beta1 for G and D (official code, ls.py lines 48, 77 and 83: beta1=0.5); "
        "beta2 is 0.999, both optimisers' default there",
    )
    p.add_argument(
        "--adam-eps",
        type=float,
        default=1e-8,
        help="Adam's epsilon for G and D (official code, ls.py line 49: epsilon=1e-8)",
    )
    p.add_argument(
        "--iters",
        type=int,
        default=35_000,
        help="steps, each of G and D together on a fresh batch (official code, ls.py lines 50 and "
        "100: max_iter=35000)",
    )
    support.add_run_flags(
        p,
        sample_every=5000,
        log_every=100,
        checkpoint_every=1000,
        sources={"sample_every": "official code, ls.py line 51: viz_every=5000"},
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=5000,
        help=f"steps between density plots, each of {DENSITY_BATCHES} batches of G's samples "
        f"(official code, ls.py lines 51, 98 and 103-104: viz_every=5000, n_batches_viz=10), and "
        f"metrics/modes and metrics/high_quality on the first {MEASURE_SAMPLES} of them",
    )
    return p


def check_args(parser, args):
    names = ("z_dim", "width", "hidden_layers", "batch_size", "iters", "eval_every")
    support.require_at_least(parser, args, 1, *names)
    support.require_positive(parser, args, "lr_d", "lr_g", "init_gain", "adam_eps")
    if not 0 <= args.beta1 < 1:
        parser.error(f"--beta1 must lie in [0, 1), got {args.beta1}")
    if DENSITY_BATCHES * args.batch_size < MEASURE_SAMPLES:
        least = math.ceil(MEASURE_SAMPLES / DENSITY_BATCHES)
        parser.error(
            f"--batch-size must be at least {least}: the measures take {MEASURE_SAMPLES} of the "
            f"{DENSITY_BATCHES} batches drawn for each density plot"
        )


if __name__ == "__main__":
    sys.exit(main())
