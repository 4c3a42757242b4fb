"""WGAN-GP's 2-D toy experiments (Gulrajani et al. 2017, arXiv 1704.00028, §3 and Figure 1; official code:
gan_toy.py): WGAN with the gradient penalty (Alg. 1) or with WGAN's weight clipping, on 8 Gaussians, 25 Gaussians
or the Swiss roll, with gan_toy.py's ReLU MLPs. The image networks and sets are in train.py.

    python toy.py --dataset 8gaussians                    # WGAN-GP on a toy set: toy.png, metrics/modes, metrics.json
    python toy.py --dataset swissroll --constraint clip   # the same with weight clipping (c = 0.01, RMSProp 5e-5)
    python toy.py --figure 1a                             # Figure 1(a): critics trained to optimality, G held fixed
    python toy.py --figure 1b                             # Figure 1(b): gradient norms per layer, weight histograms
"""
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import support
from dataset import TOY_SETS, sample_toy, toy_modes
from model import FOLDER
from train import generator_step, gradient_penalty

MEASURE_SAMPLES = 2500  # samples behind metrics/modes, metrics/high_quality and metrics/nearest_real
CLIPS = (0.1, 0.01, 0.001)  # §3.2: the clipping thresholds c of Figure 1(b)


class MLP(nn.Module):
    """official code (gan_toy.py): in -> `depth` ReLU layers of `width` -> out, no normalisation; ReLU layers He
    uniform (std sqrt(2 / fan_in)), the output layer Glorot uniform (std sqrt(2 / (fan_in + fan_out))), biases 0."""

    def __init__(self, n_in, n_out, width=512, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(n_in if i == 0 else width, width) for i in range(depth))
        self.out = nn.Linear(width, n_out)
        for layer in [*self.layers, self.out]:
            std = math.sqrt(2 / layer.in_features if layer is not self.out else 2 / (layer.in_features + n_out))
            nn.init.uniform_(layer.weight, -std * math.sqrt(3), std * math.sqrt(3))
            nn.init.zeros_(layer.bias)

    def forward(self, x, activations=None):
        for layer in self.layers:
            x = torch.relu(layer(x))
            if activations is not None:  # Figure 1(b): each layer's output, to take the loss's gradient there
                x.retain_grad()
                activations.append(x)
        return self.out(x).squeeze(-1)


def critic_step(D, opt_D, x, fake, args, activations=None):
    """One critic iteration on real x and fixed fakes: descend D(x~) - D(x), plus lambda times the penalty (Alg. 1
    lines 4-9) or followed by clipping every weight into [-c, c] (WGAN's Alg. 1 line 7, after the update)."""
    real_score, fake_score = D(x, activations).mean(), D(fake).mean()
    loss = fake_score - real_score
    if args.constraint == "gp":
        loss = loss + args.lambda_gp * gradient_penalty(D, x, fake)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    if args.constraint == "clip":
        with torch.no_grad():
            for w in D.parameters():
                w.clamp_(-args.clip, args.clip)
    return (real_score - fake_score).detach()


def optimizer(net, args):
    """gan_toy.py: Adam(1e-4, beta1, 0.9) with the penalty (Alg. 1); RMSProp(5e-5) with clipping (WGAN's Alg. 1)."""
    if args.constraint == "clip":
        return torch.optim.RMSprop(net.parameters(), lr=5e-5)
    return torch.optim.Adam(net.parameters(), args.lr, (args.beta1, 0.9))


def measures(samples, dataset):
    """metrics/modes and metrics/high_quality for the Gaussian mixtures; metrics/nearest_real for the Swiss roll."""
    if dataset == "swissroll":
        real = sample_toy(dataset, MEASURE_SAMPLES, torch.Generator().manual_seed(1))
        return {"metrics/nearest_real": support.nearest_real_distance(samples, real)}
    modes, high_quality = support.mode_measures(samples, *toy_modes(dataset))
    return {"metrics/modes": modes, "metrics/high_quality": high_quality}


def train_gan(args, checkpoint, device):
    """Alg. 1 on a toy set; at the end toy.png (critic surface, real points, G's samples) and metrics.json."""
    G = MLP(2, 2, args.width, args.depth).to(device)
    D = MLP(2, 1, args.width, args.depth).to(device)
    opt_G, opt_D = optimizer(G, args), optimizer(D, args)
    data = support.Sampled(lambda n, g: sample_toy(args.dataset, n, g), args.batch_size, device, args.seed)
    real = sample_toy(args.dataset, MEASURE_SAMPLES, torch.Generator().manual_seed(args.seed + 1))

    def picture(z, path=None):
        fig, ax = support.pyplot().subplots(figsize=(4, 4))
        support.plot_plane(ax, real[:1000], G(z), surface=lambda p: D(p.to(device)), extent=3)
        ax.set_title(f"{args.dataset}, {args.constraint}")
        return support.save_figure(fig, path)

    def metric():
        with torch.no_grad(), support.rng_untouched(device, args.seed):
            scalars = measures(G(torch.randn(MEASURE_SAMPLES, 2, device=device)), args.dataset)
        return scalars, scalars.get("metrics/high_quality", -scalars.get("metrics/nearest_real", 0))

    run = support.Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, data,
                      fixed_z=torch.randn(500, 2, device=device), total=args.iters,
                      title=f"WGAN ({args.constraint}) on {args.dataset}", grid=picture, folder=FOLDER + "-toy",
                      compiled=(), metric=metric, eval_every=args.eval_every)
    started = time.process_time()
    while run.running():
        # Alg. 1 lines 2-10: n_critic critic iterations, each on a fresh real batch and fresh z ~ N(0, I)^2
        for _ in range(args.n_critic):
            with torch.no_grad():
                fake = G(torch.randn(args.batch_size, 2, device=device))
            w_estimate = critic_step(D, opt_D, next(data), fake, args)
        # Alg. 1 lines 11-12: G descends -D(G(z))
        loss_G = generator_step(G, D, opt_G, torch.randn(args.batch_size, 2, device=device))
        run.end_step({"wasserstein/estimate": w_estimate, "loss/G": loss_G})
    code = run.finish()
    scalars, _ = metric()
    picture(run.fixed_z, run.out / "toy.png")
    result = {"step": run.step, "cpu_seconds": time.process_time() - started, **scalars}
    support.write_atomically(run.out / "metrics.json", json.dumps(result, indent=2).encode())
    print(json.dumps(result))
    return code


def optimal_critic(dataset, args, device, activations=None):
    """§3.1, Figure 1(a): a critic trained for --critic-iters steps against a G held fixed at the real data plus
    N(0, 1) noise (gan_toy.py's FIXED_GENERATOR). Returns D and its last Wasserstein estimate."""
    D = MLP(2, 1, args.width, args.depth).to(device)
    opt_D, data = optimizer(D, args), torch.Generator().manual_seed(args.seed)
    for _ in range(args.critic_iters):
        x = sample_toy(dataset, args.batch_size, data).to(device)
        w_estimate = critic_step(D, opt_D, x, x + torch.randn_like(x), args)
    return D, w_estimate.item()


def figure_1a(args, device, out):
    """Value surfaces of critics trained to optimality: weight clipping (top), gradient penalty (bottom)."""
    fig, axes = support.pyplot().subplots(2, 3, figsize=(9, 6))
    numbers = {}
    for row, constraint in enumerate(("clip", "gp")):
        for column, dataset in enumerate(TOY_SETS):
            args.constraint = constraint
            D, numbers[f"{constraint}/{dataset}/wasserstein"] = optimal_critic(dataset, args, device)
            real = sample_toy(dataset, 500, torch.Generator().manual_seed(args.seed + 1))
            support.plot_plane(axes[row, column], real, surface=lambda p: D(p.to(device)), extent=3)
            axes[row, column].set_title(f"{dataset}, {'weight clipping' if constraint == 'clip' else 'penalty'}")
    support.save_figure(fig, out / "figure_1a.png")
    return numbers


def figure_1b(args, device, out):
    """§3.2: a deep WGAN (--depth ReLU layers in G and D) on the Swiss roll; the gradient norm of the critic loss at
    each layer's activations, averaged (in log) over training, for each c and for the penalty; weight histograms."""
    plt = support.pyplot()
    fig, (left, top, bottom) = plt.subplots(1, 3, figsize=(13, 3.5))
    numbers, weights = {}, {}
    for constraint, c in [("clip", c) for c in CLIPS] + [("gp", None)]:
        args.constraint, args.clip = constraint, c
        torch.manual_seed(args.seed)
        G, D = MLP(2, 2, args.width, args.depth).to(device), MLP(2, 1, args.width, args.depth).to(device)
        opt_G, opt_D, data = optimizer(G, args), optimizer(D, args), torch.Generator().manual_seed(args.seed)
        log_norms = torch.zeros(args.depth)
        for _ in range(args.iters):
            for _ in range(args.n_critic):
                activations = []
                with torch.no_grad():
                    fake = G(torch.randn(args.batch_size, 2, device=device))
                critic_step(D, opt_D, sample_toy("swissroll", args.batch_size, data).to(device), fake, args, activations)
                norms = torch.stack([a.grad.norm().clamp_min(1e-38).log10().cpu() for a in activations])
                log_norms += norms / args.n_critic / args.iters
            generator_step(G, D, opt_G, torch.randn(args.batch_size, 2, device=device))
        name = f"weight clipping c={c}" if c else "gradient penalty"
        left.plot(range(1, args.depth + 1), 10 ** log_norms, marker="o", label=name)
        numbers[name] = {"first_layer": 10 ** log_norms[0].item(), "last_layer": 10 ** log_norms[-1].item()}
        weights[c or "gp"] = torch.cat([w.detach().flatten().cpu() for w in D.parameters() if w.dim() == 2])
    left.set(yscale="log", xlabel="critic layer", ylabel="gradient norm (log scale)")
    left.legend(fontsize=7)
    top.hist(weights[0.01], bins=50)
    top.set(title="weight clipping (c = 0.01)", xlabel="weights")
    bottom.hist(weights["gp"], bins=50)
    bottom.set(title="gradient penalty", xlabel="weights")
    support.save_figure(fig, out / "figure_1b.png")
    numbers["clip 0.01: share of weights at +-c"] = (weights[0.01].abs() >= 0.01 * 0.999).float().mean().item()
    return numbers


def main(argv=None):
    args, checkpoint = support.parse_args(build_parser(), argv, FOLDER + "-toy", check_args, resumable={"iters"})
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    if args.figure == "none":
        return train_gan(args, checkpoint, device)
    out = Path(args.out or support.HERE / "runs" / f"figure_{args.figure}")
    with support.writing(out):
        out.mkdir(parents=True, exist_ok=True)
    started = time.process_time()
    numbers = (figure_1a if args.figure == "1a" else figure_1b)(args, device, out)
    numbers["cpu_seconds"] = time.process_time() - started
    support.write_atomically(out / "metrics.json", json.dumps(numbers, indent=2).encode())
    print(json.dumps(numbers, indent=2))
    return 0


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="8gaussians", choices=TOY_SETS,
                   help="official code: gan_toy.py DATASET (8gaussians, 25gaussians, swissroll; §3, Figure 1)")
    p.add_argument("--constraint", default="gp", choices=("gp", "clip"),
                   help="gp: the gradient penalty (Alg. 1); clip: WGAN's weight clipping with RMSProp(5e-5), as §3 "
                        "compares and gan_toy.py MODE 'wgan' trains")
    p.add_argument("--figure", default="none", choices=("none", "1a", "1b"),
                   help="none: train a GAN on --dataset; 1a: Figure 1(a) (§3.1); 1b: Figure 1(b) (§3.2)")
    p.add_argument("--clip", type=float, default=0.01, help="WGAN's c = 0.01 (gan_toy.py clip_bounds)")
    p.add_argument("--batch-size", type=int, default=256, help="official code: gan_toy.py BATCH_SIZE = 256")
    p.add_argument("--lr", type=float, default=1e-4, help="Alg. 1: Adam alpha = 0.0001 (gan_toy.py: 1e-4)")
    p.add_argument("--beta1", type=float, default=0.0, help="Alg. 1: beta1 = 0 (gan_toy.py: 0.5)")
    p.add_argument("--lambda-gp", type=float, default=10.0,
                   help="§4: lambda = 10 in all experiments (gan_toy.py: LAMBDA = .1, 'faster for toy tasks')")
    p.add_argument("--n-critic", type=int, default=5, help="Alg. 1 and gan_toy.py: CRITIC_ITERS = 5")
    p.add_argument("--width", type=int, default=512, help="official code: gan_toy.py DIM = 512")
    p.add_argument("--depth", type=int, default=3,
                   help="ReLU layers in G and D: gan_toy.py 3; §3.2 (Figure 1(b)): 12-layer MLPs, so --depth 11")
    p.add_argument("--iters", type=int, default=100_000, help="generator iterations; gan_toy.py ITERS = 100000")
    p.add_argument("--critic-iters", type=int, default=2000,
                   help="--figure 1a: critic iterations to reach 'optimality' (§3.1 gives no count)")
    support.add_run_flags(p, sample_every=100, log_every=100, checkpoint_every=500,
                          sources={"sample_every": "gan_toy.py: a picture every 100 iterations"})
    p.add_argument("--eval-every", type=int, default=100,
                   help=f"generator iterations between metrics/modes and metrics/high_quality on {MEASURE_SAMPLES} "
                        "samples (metrics/nearest_real on the Swiss roll); keeps checkpoints/best.pt")
    return p


def check_args(parser, args):
    support.require_at_least(parser, args, 1, "batch_size", "n_critic", "width", "depth", "iters", "critic_iters",
                             "eval_every")
    support.require_positive(parser, args, "lr", "clip")
    if not 0 <= args.lambda_gp < math.inf:
        parser.error(f"--lambda-gp must be a non-negative number, got {args.lambda_gp}")
    if not 0 <= args.beta1 < 1:
        parser.error(f"--beta1 must lie in [0, 1), got {args.beta1}")


if __name__ == "__main__":
    sys.exit(main())
