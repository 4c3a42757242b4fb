"""WGAN-GP's 2-D toy experiments (Gulrajani et al. 2017, arXiv 1704.00028, §3 and Figure 1;
official code: gan_toy.py): WGAN with the gradient penalty (Alg. 1) or with WGAN's weight clipping,
on 8 Gaussians, 25 Gaussians or the Swiss roll, with gan_toy.py's ReLU MLPs. The image networks
and sets are in train.py.

    python toy.py --dataset 8gaussians                   # a toy GAN: toy.png, metrics.json
    python toy.py --dataset swissroll --constraint clip  # weight clipping (c 0.01, RMSProp 5e-5)
    python toy.py --figure 1a --seeds 0-7   # Figure 1(a): critics against G = data + N(0, I),
                                            # and a table of seeds with the bounds on W1
    python toy.py --figure 1b               # Figure 1(b): per-layer gradient norms, weights

A flag that does not apply to the chosen --figure is refused.
"""

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import support
from dataset import TOY_SETS, sample_toy, toy_modes

HERE = Path(__file__).resolve().parent
FOLDER = "WGAN-GP-toy"  # the name the toy GAN's checkpoints carry
MEASURE_SAMPLES = 2500  # samples behind metrics/modes, metrics/high_quality, metrics/nearest_real
CLIPS = (0.1, 0.01, 0.001)  # §3.2: the clipping thresholds c of Figure 1(b)
# W1(P, P * N(0, I)) <= E|n| for n ~ N(0, I) in 2-D (the coupling x -> x + n), whatever P is
NOISE_BOUND = math.sqrt(math.pi / 2)
# (real, real + noise) pairs behind a fixed-G critic's start and end estimates and its bounds; the
# first TRACE_PAIRS of them behind the estimate traced every TRACE_EVERY critic iterations. They
# are the same pairs for every critic seed (EVAL_SEED).
EVAL_PAIRS, TRACE_PAIRS, TRACE_EVERY, EVAL_SEED = 20_000, 2048, 100, 2017
# settled: from then on, every 1,000 iterations move the traced estimate by less than 0.02
SETTLE_WINDOW, SETTLE_TOLERANCE = 1000, 0.02
# --figure 1a trains every --seeds critic on this set (lower_bound is W1 there within 0.035)
TABLE_SET = "8gaussians"
SPIRAL_POINTS = 2000  # the noise-free Swiss roll that the distance bound uses (spacing 0.006)
# The flags each mode takes, besides EVERY_MODE's
APPLIES = {
    "none": set(
        "dataset constraint clip n_critic iters max_steps resume sample_every log_every "
        "checkpoint_every eval_every precision compile".split()
    ),
    "1a": {"clip", "critic_iters", "seeds", "sets"},
    "1b": {"n_critic", "iters"},
}
EVERY_MODE = set("figure seed device out batch_size lr beta1 lambda_gp width depth".split())


class MLP(nn.Module):
    """official code (gan_toy.py): in -> `depth` ReLU layers of `width` -> out, no normalisation;
    ReLU layers He uniform (std sqrt(2 / fan_in)), the output layer Glorot uniform (std
    sqrt(2 / (fan_in + fan_out))), biases 0. With zero biases the network starts positively
    homogeneous, D(a x) = a D(x) for a > 0: a cone with its tip at the origin."""

    def __init__(self, n_in, n_out, width=512, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(n_in if i == 0 else width, width) for i in range(depth)
        )
        self.out = nn.Linear(width, n_out)
        for layer in [*self.layers, self.out]:
            fans = layer.in_features if layer is not self.out else layer.in_features + n_out
            bound = math.sqrt(3) * math.sqrt(2 / fans)  # a uniform law with that std
            nn.init.uniform_(layer.weight, -bound, bound)
            nn.init.zeros_(layer.bias)

    def forward(self, x, activations=None):
        for layer in self.layers:
            x = torch.relu(layer(x))
            if activations is not None:  # Figure 1(b): each layer's output
                activations.append(x)
        return self.out(x).squeeze(-1)


class Sampled:
    """Endless batches draw(n, generator) of a toy set, fresh every step as gan_toy.py draws them,
    from a generator seeded by `seed` whose state is in the checkpoint: a resume draws the same
    batches."""

    def __init__(self, draw, batch_size, device, seed):
        self.draw, self.batch_size, self.device = draw, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self):
        return self.draw(self.batch_size, self.generator).to(self.device)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


# ---- the losses (Alg. 1) ----


def gradient_penalty(D, real, fake, activations=None):
    """Eq. 3's E[(||grad D(x^)||_2 - 1)^2] at x^ = eps x + (1 - eps) x~, one eps ~ U[0, 1] per
    point (Alg. 1 lines 4, 6, 7; gan_toy.py's `slopes`, the norm over the two coordinates),
    two-sided. Not multiplied by lambda."""
    eps = torch.rand(len(real), 1, device=real.device, dtype=real.dtype)
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    # create_graph: the penalty is itself differentiated with respect to D's weights
    (grad,) = torch.autograd.grad(D(x_hat, activations).sum(), x_hat, create_graph=True)
    return (grad.norm(dim=1) - 1).pow(2).mean()


def critic_loss(D, x, fake, args, activations=None):
    """Alg. 1 line 7 averaged over the batch: E[D(x~)] - E[D(x)], plus lambda times the penalty
    with --constraint gp (clipping has none). Returns (loss, the estimate E[D(x)] - E[D(x~)]).
    `activations`, a dict of lists "real", "fake", "penalty", collects each forward pass's layer
    outputs (Figure 1(b))."""
    passes = activations or {}
    real_score = D(x, passes.get("real")).mean()
    fake_score = D(fake, passes.get("fake")).mean()
    loss = fake_score - real_score
    if args.constraint == "gp":
        loss = loss + args.lambda_gp * gradient_penalty(D, x, fake, passes.get("penalty"))
    return loss, (real_score - fake_score).detach()


def layer_gradients(loss, activations):
    """§3.2, Figure 1(b): the norm of the gradient of the whole critic loss with respect to each
    layer's activations, as (depth,) tensors: "whole" over every forward pass the loss made (the
    real batch, the fakes and, with the penalty, the interpolates), and each pass alone. The
    penalty reaches a ReLU critic's activations only through the ReLU masks, whose derivative is
    0, so its part is exactly 0."""
    passes = {name: layers for name, layers in activations.items() if layers}
    flat = [a for layers in passes.values() for a in layers]
    grads = iter(torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True))
    squares = {}
    for name, layers in passes.items():
        parts = [next(grads) for _ in layers]
        squares[name] = torch.stack(
            [torch.zeros(()) if g is None else g.detach().pow(2).sum().cpu() for g in parts]
        )
    return {"whole": sum(squares.values()).sqrt(), **{k: s.sqrt() for k, s in squares.items()}}


def critic_step(D, opt_D, x, fake, args, activations=None):
    """One critic iteration on real x and fixed fakes: descend critic_loss (Alg. 1 line 9), then
    with clipping put every weight back into [-c, c] (WGAN's Alg. 1 line 7). Returns the batch's
    estimate; with `activations`, (estimate, layer_gradients)."""
    loss, estimate = critic_loss(D, x, fake, args, activations)
    per_layer = None if activations is None else layer_gradients(loss, activations)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    if args.constraint == "clip":
        with torch.no_grad():
            for w in D.parameters():
                w.clamp_(-args.clip, args.clip)
    return estimate if activations is None else (estimate, per_layer)


def generator_step(G, D, opt_G, z):
    """Alg. 1 line 12: G descends -E[D(G(z))]; D is held fixed (no gradient for its weights)."""
    D.requires_grad_(False)
    loss = -D(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def optimizer(net, args):
    """gan_toy.py: Adam(1e-4, beta1, 0.9) with the penalty (Alg. 1); RMSProp(5e-5) with
    clipping (WGAN's Alg. 1)."""
    if args.constraint == "clip":
        return torch.optim.RMSprop(net.parameters(), lr=5e-5)
    return torch.optim.Adam(net.parameters(), args.lr, (args.beta1, 0.9))


# ---- measures and bounds ----


def distance_to(points, targets, chunk=4096):
    """Each point's distance to the nearest of `targets`, on the CPU, a chunk at a time."""
    targets = targets.float().cpu()
    chunks = points.detach().float().cpu().split(chunk)
    return torch.cat([torch.cdist(part, targets).min(1).values for part in chunks])


def data_support(dataset):
    """Points of the data's support: the mode centres, or the noise-free Swiss roll."""
    if dataset == "swissroll":
        t = torch.linspace(1.5 * math.pi, 4.5 * math.pi, SPIRAL_POINTS)
        return torch.stack([t * t.cos(), t * t.sin()], 1) / 7.5
    return toy_modes(dataset)[0]


def mode_measures(samples, centres, std):
    """(modes covered, share of high-quality samples): a sample is of high quality within 3
    standard deviations of its nearest mode centre; a mode is covered when it is the nearest
    centre of at least one such sample."""
    distance, nearest = torch.cdist(samples.detach().float().cpu(), centres.float()).min(1)
    good = distance <= 3 * std
    return len(nearest[good].unique()), good.float().mean().item()


def nearest_real_distance(samples, real):
    """The mean distance from each sample to its nearest point of `real`."""
    return distance_to(samples, real).mean().item()


def measures(samples, dataset):
    """metrics/modes and metrics/high_quality on the Gaussian mixtures; metrics/nearest_real on the
    Swiss roll."""
    if dataset == "swissroll":
        real = sample_toy(dataset, MEASURE_SAMPLES, torch.Generator().manual_seed(1))
        return {"metrics/nearest_real": nearest_real_distance(samples, real)}
    modes, high_quality = mode_measures(samples, *toy_modes(dataset))
    return {"metrics/modes": modes, "metrics/high_quality": high_quality}


def lower_bound(real, fake, dataset):
    """W1(real, fake) >= E[f(real)] - E[f(fake)] for every 1-Lipschitz f; f = -(distance to the
    data's support S) gives E[d(fake, S)] - E[d(real, S)], here on the samples given.

    On 8 Gaussians with fake = real + N(0, I) it is W1 to within 2 E[d(real, S)] = 0.035: by the
    mixture's 8-fold symmetry each centre's nearest region receives 1/8 of the fakes, so moving
    every fake to its nearest centre (then to a real point there) is a coupling."""
    centres = data_support(dataset)
    return (distance_to(fake, centres).mean() - distance_to(real, centres).mean()).item()


def noise_bounds(real, noise, dataset):
    """The bounds on W1(P, P * N(0, I)) for a fixed-G critic: lower_bound, the upper bound
    sqrt(pi / 2), and E|n| over these very pairs, which no 1-Lipschitz critic's estimate on them
    can exceed (D(x) - D(x + n) <= |n| for each pair)."""
    return {
        "lower_bound": lower_bound(real, real + noise, dataset),
        "upper_bound": NOISE_BOUND,
        "pairs_mean_noise": noise.norm(dim=1).mean().item(),
    }


def check(estimate, bounds):
    """An estimate read against noise_bounds."""
    if estimate > max(bounds["upper_bound"], bounds["pairs_mean_noise"]):
        return "not 1-Lipschitz"
    return "below the lower bound" if estimate < bounds["lower_bound"] else "within the bounds"


def bowl(D, points, dataset):
    """The correlation (Pearson) over `points` of D with the distance to the data's support: above
    0 the critic is higher away from the data, a bowl, the wrong way round when the fakes lie
    further from the data than the real points do."""
    with torch.no_grad():
        values = D(points).float().cpu()
    distance = distance_to(points, data_support(dataset))
    return torch.corrcoef(torch.stack([values, distance]))[0, 1].item()


@torch.no_grad()
def estimate_on(D, real, fake):
    """E[D(real)] - E[D(fake)] on the points given."""
    return (D(real).mean() - D(fake).mean()).item()


def eval_pairs(dataset, n, device):
    """n real points and their N(0, I) noise, the same for every seed (EVAL_SEED)."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    real = sample_toy(dataset, n, generator)
    return real.to(device), torch.randn(n, 2, generator=generator).to(device)


def positive_from(trace):
    """The first traced iteration from which every traced estimate is above 0 (the critic scores
    the real points above the fakes); None when the last one is not."""
    first = None
    for t, value in reversed(trace):
        if value <= 0:
            break
        first = t
    return first


def settled_at(trace, window=SETTLE_WINDOW, tolerance=SETTLE_TOLERANCE):
    """The first traced iteration t from which the estimate E stops moving: t and every later
    traced t' have |E(t') - E(t' - window)| < tolerance. None when the last one still moves, or
    the run is shorter than the window."""
    values, first = dict(trace), None
    for t, value in reversed(trace):
        if t - window not in values or abs(value - values[t - window]) >= tolerance:
            break
        first = t
    return first


@contextlib.contextmanager
def own_stream(device, seed):
    """Draws inside come from torch's stream seeded by `seed`; the run's streams are untouched
    afterwards, so an exact resume stays exact."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def write_file(path, data):
    """A text (str) or torch.save's `data` into `path`, its folder made; a failed write ends the
    command in one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data + "\n")
        else:
            torch.save(data, path)
    except OSError as error:
        support.fail(f"cannot write {path}: {error.strerror or error}")


# ---- pictures ----


def plot_plane(ax, real=None, fake=None, surface=None, extent=3.0, n=128):
    """One panel of the plane [-extent, extent]^2: the value surface of surface(points) as filled
    contours (yellow high), real points (orange) and G's samples (green)."""
    xs = torch.linspace(-extent, extent, n)
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    if surface is not None:
        with torch.no_grad():
            values = surface(points).float().cpu().reshape(n, n)
        ax.contourf(xs, xs, values, levels=20, cmap="viridis")
    for dots, colour in ((real, "orange"), (fake, "green")):
        if dots is not None:
            ax.scatter(*dots.detach().cpu().T, c=colour, marker="+", s=6, linewidths=0.5)
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])


def figure_image(fig):
    """A figure as a (3, H, W) tensor in [0, 1] (a run's sample grid); the figure is closed."""
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    support.pyplot().close(fig)
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 255


# ---- a toy GAN ----


def start_bowl(args, dataset):
    """bowl() of the GAN's critic as initialised, rebuilt from --seed (G first, then D, as
    train_gan builds them) on TRACE_PAIRS points real + N(0, I); the run's random streams are
    left as they were."""
    with own_stream(torch.device("cpu"), args.seed):
        MLP(2, 2, args.width, args.depth)
        D = MLP(2, 1, args.width, args.depth)
    real, noise = eval_pairs(dataset, TRACE_PAIRS, torch.device("cpu"))
    return bowl(D, real + noise, dataset)


def train_gan(args, checkpoint, device):
    """Alg. 1 on a toy set; at the end toy.png (critic surface, real points, G's samples) and
    metrics.json (the measures, the critic's start bowl, its end estimate and lower_bound)."""
    G = MLP(2, 2, args.width, args.depth).to(device)
    D = MLP(2, 1, args.width, args.depth).to(device)
    opt_G, opt_D = optimizer(G, args), optimizer(D, args)
    data = Sampled(lambda n, g: sample_toy(args.dataset, n, g), args.batch_size, device, args.seed)
    real = sample_toy(args.dataset, MEASURE_SAMPLES, torch.Generator().manual_seed(args.seed + 1))

    def picture(z, path=None):
        fig, ax = support.pyplot().subplots(figsize=(4, 4))
        plot_plane(ax, real[:1000], G(z), surface=lambda p: D(p.to(device)), extent=3)
        ax.set_title(f"{args.dataset}, {args.constraint}")
        return figure_image(fig) if path is None else support.save_figure(fig, path)

    def metric():
        with torch.no_grad(), own_stream(device, args.seed):
            scalars = measures(G(torch.randn(MEASURE_SAMPLES, 2, device=device)), args.dataset)
        return scalars, scalars.get("metrics/high_quality", -scalars.get("metrics/nearest_real", 0))

    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=torch.randn(500, 2, device=device),
        total=args.iters,
        title=f"WGAN ({args.constraint}) on {args.dataset}",
        grid=picture,
        folder=FOLDER,
        metric=metric,
        eval_every=args.eval_every,
    )
    started = time.process_time()
    while run.running():
        # Alg. 1 lines 2-10: n_critic critic iterations, each on a fresh real batch and fresh z
        for _ in range(args.n_critic):
            with torch.no_grad():
                fake = G(torch.randn(args.batch_size, 2, device=device))
            w_estimate = critic_step(D, opt_D, next(data), fake, args)
        # Alg. 1 lines 11-12: G descends -D(G(z))
        loss_G = generator_step(G, D, opt_G, torch.randn(args.batch_size, 2, device=device))
        run.end_step({"wasserstein/estimate": w_estimate, "loss/G": loss_G})
    code = run.finish()
    scalars, _ = metric()
    with torch.no_grad(), own_stream(device, args.seed):
        fake = G(torch.randn(MEASURE_SAMPLES, 2, device=device))
    picture(run.fixed_z, run.out / "toy.png")
    result = {
        "step": run.step,
        "cpu_seconds": time.process_time() - started,
        **scalars,
        "critic/start_bowl": start_bowl(args, args.dataset),
        "wasserstein/estimate_end": estimate_on(D, real.to(device), fake),
        "wasserstein/lower_bound": lower_bound(real, fake, args.dataset),
    }
    write_file(run.out / "metrics.json", json.dumps(result, indent=2))
    print(json.dumps(result))
    return code


# ---- Figure 1(a): critics against a fixed G ----


def fixed_generator_critic(dataset, constraint, seed, args, device):
    """§3.1 (gan_toy.py FIXED_GENERATOR): a critic seeded by `seed`, trained --critic-iters
    iterations against G held fixed at the real data plus N(0, I) noise (each batch's fakes are
    its own real points plus noise). Returns (D, its record): the bowl and estimate at the start,
    the estimate traced every TRACE_EVERY iterations, the end estimate on all EVAL_PAIRS, the
    bounds and their check, whether it stalled (end estimate <= 0), from when its estimate stayed
    above 0 and when it settled."""
    args = argparse.Namespace(**{**vars(args), "constraint": constraint})
    torch.manual_seed(seed)  # the critic's initialisation and the penalty's eps
    D = MLP(2, 1, args.width, args.depth).to(device)
    opt_D, data = optimizer(D, args), torch.Generator().manual_seed(seed)
    real, noise = eval_pairs(dataset, EVAL_PAIRS, device)
    fake = real + noise
    started = time.process_time()
    record = {
        "set": dataset,
        "constraint": constraint,
        "seed": seed,
        "start_bowl": bowl(D, fake, dataset),
        "start_estimate": estimate_on(D, real, fake),
    }
    trace = [(0, estimate_on(D, real[:TRACE_PAIRS], fake[:TRACE_PAIRS]))]
    for i in range(1, args.critic_iters + 1):
        x = sample_toy(dataset, args.batch_size, data)
        x_fake = x + torch.randn(x.shape, generator=data)
        critic_step(D, opt_D, x.to(device), x_fake.to(device), args)
        if i % TRACE_EVERY == 0:
            trace.append((i, estimate_on(D, real[:TRACE_PAIRS], fake[:TRACE_PAIRS])))
    bounds, end = noise_bounds(real, noise, dataset), estimate_on(D, real, fake)
    record.update(end_estimate=end, **bounds, check=check(end, bounds), stalled=end <= 0)
    record.update(positive_from=positive_from(trace), settled_at=settled_at(trace))
    record["cpu_seconds"] = time.process_time() - started
    record["trace"] = trace
    return D, record


def short(value, decimals=3):
    """A number with `decimals` decimals, or in powers of ten where they would show only zeros
    (a clipped critic's estimates)."""
    return f"{value:.{decimals}f}" if abs(value) >= 10**-decimals or value == 0 else f"{value:.1e}"


def table(records):
    """The records as printed lines: a header, then one line per critic."""
    lines = [
        f"{'set':<12} {'constraint':<10} {'seed':>4} {'bowl':>6} {'start':>7} {'end':>7} "
        f"{'lower':>6} {'upper':>6} {'stalled':>7} {'> 0 from':>8} {'settled at':>10}  check"
    ]
    for r in records:
        settled = "-" if r["settled_at"] is None else r["settled_at"]
        positive = "-" if r["positive_from"] is None else r["positive_from"]
        lines.append(
            f"{r['set']:<12} {r['constraint']:<10} {r['seed']:>4} {r['start_bowl']:>6.2f} "
            f"{short(r['start_estimate']):>7} {short(r['end_estimate']):>7} "
            f"{r['lower_bound']:>6.3f} {r['upper_bound']:>6.3f} "
            f"{'yes' if r['stalled'] else 'no':>7} {positive:>8} {settled:>10}  {r['check']}"
        )
    return lines


def figure_1a(args, device, out):
    """Value surfaces of critics trained against a fixed G: weight clipping (top) and the penalty
    (bottom). The penalty's critic on TABLE_SET is trained at every seed of --seeds (the seed
    table) and drawn at the first that did not stall; on the other sets seeds are tried in order
    until one does not stall. Clipping uses the first seed. The first seed whose critic started
    bowl-shaped (a negative start estimate), if any, gets a last column: as initialised (top)
    and trained (bottom)."""
    seeds = args.seeds or [args.seed]
    records, critics, shown = [], {}, {}
    for dataset in args.sets:
        for seed in seeds:
            D, record = fixed_generator_critic(dataset, "gp", seed, args, device)
            critics["gp", dataset, seed] = D
            records.append(record)
            print(table([record])[0 if len(records) == 1 else 1], flush=True)
            if len(records) == 1:
                print(table([record])[1], flush=True)
            if not record["stalled"] and dataset not in shown:
                shown[dataset] = record
                if dataset != TABLE_SET:
                    break
        shown.setdefault(dataset, record)  # every seed stalled: the last, titled as stalled
        D, record = fixed_generator_critic(dataset, "clip", seeds[0], args, device)
        critics["clip", dataset, seeds[0]] = D
        records.append(record)
        print(table([record])[1], flush=True)
    for (constraint, dataset, seed), D in critics.items():
        path = out / "critics" / f"{dataset}_{constraint}_seed{seed}.pt"
        write_file(path, D.state_dict())
    draw_figure_1a(args, device, critics, records, shown, out / "figure_1a.png")
    return {
        "critic_iters": args.critic_iters,
        "lambda_gp": args.lambda_gp,
        "beta1": args.beta1,
        "width": args.width,
        "settle": {"window": SETTLE_WINDOW, "tolerance": SETTLE_TOLERANCE},
        "figure_seeds": {dataset: record["seed"] for dataset, record in shown.items()},
        "table": table(records),
        "critics": records,
    }


def draw_figure_1a(args, device, critics, records, shown, path):
    """figure_1a's panels, each titled with its seed, its estimate and the lower bound."""
    penalised = [r for r in records if r["constraint"] == "gp"]
    bowl_start = next((r for r in penalised if r["start_estimate"] < 0), None)
    columns = [*args.sets, *(["bowl"] if bowl_start else [])]
    size = (3.2 * len(columns), 6.8)
    fig, axes = support.pyplot().subplots(2, len(columns), figsize=size, squeeze=False)
    clipped = {r["set"]: r for r in records if r["constraint"] == "clip"}

    def panel(ax, D, record, title):
        real = sample_toy(record["set"], 500, torch.Generator().manual_seed(1))
        plot_plane(ax, real, surface=lambda p: D(p.to(device)), extent=3)
        ax.set_title(title, fontsize=8)

    def numbers(record, estimate="end_estimate"):
        return f"estimate {short(record[estimate], 2)}, W1 >= {record['lower_bound']:.2f}"

    def trained(record):
        name = "weight clipping" if record["constraint"] == "clip" else "penalty"
        note = ": stalled" if record["stalled"] else ""
        return f"{record['set']}, {name}, seed {record['seed']}{note}\n{numbers(record)}"

    for column, dataset in enumerate(columns):
        if dataset != "bowl":
            for row, record in enumerate((clipped[dataset], shown[dataset])):
                D = critics[record["constraint"], dataset, record["seed"]]
                panel(axes[row, column], D, record, trained(record))
            continue
        seed, where = bowl_start["seed"], bowl_start["set"]
        torch.manual_seed(seed)
        initial = MLP(2, 1, args.width, args.depth).to(device)
        title = f"{where}, seed {seed} as initialised\n{numbers(bowl_start, 'start_estimate')}"
        panel(axes[0, column], initial, bowl_start, title)
        if bowl_start is shown[where]:  # drawn already
            axes[1, column].axis("off")
            continue
        title = trained(bowl_start)
        if bowl_start["positive_from"] is not None:
            title = title.replace("\n", f", above 0 from {bowl_start['positive_from']}\n")
        panel(axes[1, column], critics["gp", where, seed], bowl_start, title)
    fig.suptitle(
        f"Critics after {args.critic_iters} iterations against G = data + N(0, I), so "
        f"W1 <= {NOISE_BOUND:.2f}; penalty lambda = {args.lambda_gp:g}, Adam beta1 "
        f"{args.beta1:g}, width {args.width}",
        fontsize=9,
    )
    support.save_figure(fig, path)


# ---- Figure 1(b): gradient norms through a deep critic ----


def figure_1b(args, device, out):
    """§3.2: a deep WGAN (--depth ReLU layers in G and D) on the Swiss roll, for each c and for the
    penalty: the norm of the gradient of the whole critic loss with respect to each layer's
    activations (layer_gradients), averaged in log10 over every critic iteration; the critic's
    weight histograms at the end."""
    plt = support.pyplot()
    fig, (left, top, bottom) = plt.subplots(1, 3, figsize=(13, 3.5))
    numbers, weights = {}, {}
    for constraint, c in [("clip", c) for c in CLIPS] + [("gp", None)]:
        args.constraint, args.clip = constraint, c
        torch.manual_seed(args.seed)
        G = MLP(2, 2, args.width, args.depth).to(device)
        D = MLP(2, 1, args.width, args.depth).to(device)
        opt_G, opt_D = optimizer(G, args), optimizer(D, args)
        data = torch.Generator().manual_seed(args.seed)
        log_norms, largest = {}, {}
        for _ in range(args.iters):
            for _ in range(args.n_critic):
                with torch.no_grad():
                    fake = G(torch.randn(args.batch_size, 2, device=device))
                x = sample_toy("swissroll", args.batch_size, data).to(device)
                activations = {"real": [], "fake": [], "penalty": []}
                _, per_layer = critic_step(D, opt_D, x, fake, args, activations)
                for term, norms in per_layer.items():
                    logs = norms.clamp_min(1e-38).log10() / args.n_critic / args.iters
                    log_norms[term] = log_norms.get(term, 0) + logs
                    largest[term] = torch.maximum(largest.get(term, norms), norms)
            generator_step(G, D, opt_G, torch.randn(args.batch_size, 2, device=device))
        name = f"weight clipping c={c}" if c else "gradient penalty"
        left.plot(range(1, args.depth + 1), 10 ** log_norms["whole"], marker="o", label=name)
        numbers[name] = {term: (10**logs).tolist() for term, logs in log_norms.items()}
        if "penalty" in largest:
            numbers[name]["penalty: largest norm at any layer"] = largest["penalty"].max().item()
        weights[c or "gp"] = torch.cat(
            [w.detach().flatten().cpu() for w in D.parameters() if w.dim() == 2]
        )
    left.set(yscale="log", xlabel="critic layer", ylabel="gradient norm of the critic loss")
    left.legend(fontsize=7)
    top.hist(weights[0.01], bins=50)
    top.set(title="weight clipping (c = 0.01)", xlabel="weights")
    bottom.hist(weights["gp"], bins=50)
    bottom.set(title="gradient penalty", xlabel="weights")
    support.save_figure(fig, out / "figure_1b.png")
    at_c = (weights[0.01].abs() >= 0.01 * 0.999).float().mean().item()
    numbers["clip 0.01: share of weights at +-c"] = at_c
    return numbers


# ---- the command line ----


def main(argv=None):
    parser = build_parser()
    refuse_strays(parser, argv)
    args, checkpoint = support.parse_args(parser, argv, FOLDER, check_args, resumable={"iters"})
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    if args.figure == "none":
        return train_gan(args, checkpoint, device)
    out = Path(args.out or HERE / "runs" / f"figure_{args.figure}")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        support.fail(f"--out {out}: {error.strerror or error}")
    started = time.process_time()
    try:
        numbers = (figure_1a if args.figure == "1a" else figure_1b)(args, device, out)
    except KeyboardInterrupt:
        support.fail(
            f"stopped by Ctrl-C; no figure written (run toy.py --figure {args.figure} again)",
            code=130,
        )
    numbers["cpu_seconds"] = time.process_time() - started
    write_file(out / "metrics.json", json.dumps(numbers, indent=2))
    if args.figure == "1b":
        print(json.dumps(numbers, indent=2))
        return 0
    print("\n".join(numbers["table"]))
    print(
        f"start and end: the estimate E D(real) - E D(real + noise) on {EVAL_PAIRS} pairs; "
        f"bowl: the correlation of D at the start with the distance to the data; lower: "
        f"E d(fake, data) - E d(real, data) <= W1; upper: W1 <= E|noise| = sqrt(pi / 2); "
        f"stalled: end <= 0; > 0 from: the iteration from which the traced estimate stays above "
        f"0; settled at: the iteration from which every {SETTLE_WINDOW} "
        f"iterations move the estimate less than {SETTLE_TOLERANCE} (-: not by the end)\n"
        f"{numbers['cpu_seconds']:.0f} s of CPU; figure and metrics.json in {out}"
    )
    return 0


def seed_list(text):
    """--seeds: comma-separated seeds and ranges, such as 0-7 or 0,3,5-6."""
    seeds = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise argparse.ArgumentTypeError(
                f"seeds are numbers and ranges such as 0-7 or 0,3,5-6, got {text!r}"
            )
        seeds += range(int(first), int(last or first) + 1)
    if not seeds or max(seeds) >= 2**32:
        raise argparse.ArgumentTypeError(f"{text!r} holds no seed in [0, 2^32)")
    return seeds


def set_list(text):
    """--sets: comma-separated toy sets."""
    sets = [name.strip() for name in text.split(",")]
    if not set(sets) <= set(TOY_SETS) or len(set(sets)) != len(sets):
        raise argparse.ArgumentTypeError(
            f"give distinct sets among {', '.join(TOY_SETS)}, got {text!r}"
        )
    return sets


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every default in --help (as support.FlagParser shows them); the examples kept as written."""


def build_parser():
    summary, examples = __doc__.split("\n\n", 1)
    p = support.FlagParser(description=summary, epilog=examples)
    p.formatter_class = HelpFormatter
    add = p.add_argument
    add(
        "--figure",
        default="none",
        choices=("none", "1a", "1b"),
        help="none: train a toy GAN on --dataset; 1a: Figure 1(a) (§3.1) and the seed table; "
        "1b: Figure 1(b) (§3.2)",
    )
    add("--dataset", default="8gaussians", choices=TOY_SETS, help="GAN only: gan_toy.py DATASET")
    add(
        "--constraint",
        default="gp",
        choices=("gp", "clip"),
        help="GAN only: gp, the gradient penalty (Alg. 1); clip, WGAN's weight clipping with "
        "RMSProp(5e-5), as §3 compares and gan_toy.py MODE 'wgan' trains",
    )
    add(
        "--clip",
        type=float,
        default=0.01,
        help="GAN and 1a: WGAN's c (gan_toy.py clip_bounds); 1b sweeps 0.1, 0.01 and 0.001",
    )
    add("--batch-size", type=int, default=256, help="gan_toy.py BATCH_SIZE")
    add("--lr", type=float, default=1e-4, help="Alg. 1 and gan_toy.py: Adam's alpha")
    add("--beta1", type=float, default=0.0, help="Adam's beta1: Alg. 1 0; gan_toy.py 0.5")
    add(
        "--lambda-gp",
        type=float,
        default=10.0,
        help="§4: lambda = 10 in all experiments; gan_toy.py: LAMBDA = .1, 'faster for toy tasks'",
    )
    add(
        "--n-critic",
        type=int,
        default=5,
        help="GAN and 1b: critic iterations per generator iteration (Alg. 1, gan_toy.py)",
    )
    add("--width", type=int, default=512, help="gan_toy.py DIM")
    add(
        "--depth",
        type=int,
        default=3,
        help="ReLU layers in G and D: gan_toy.py 3; §3.2's 12-layer MLPs (Figure 1(b)): 11",
    )
    add(
        "--iters",
        type=int,
        default=100_000,
        help="GAN and 1b: generator iterations; gan_toy.py ITERS",
    )
    add(
        "--critic-iters",
        type=int,
        default=2000,
        help="1a only: critic iterations against the fixed G; §3.1 says 'to optimality', "
        "gan_toy.py's FIXED_GENERATOR runs 5 x ITERS = 500,000",
    )
    add(
        "--seeds",
        type=seed_list,
        default=None,
        help=f"1a only: critic seeds, such as 0-7 or 0,3; each is trained on {TABLE_SET} (the "
        "seed table), and on the other sets in order until one does not stall (None: --seed)",
    )
    add(
        "--sets",
        type=set_list,
        default=",".join(TOY_SETS),
        help="1a only: the toy sets, comma-separated",
    )
    support.add_run_flags(
        p,
        sample_every=100,
        log_every=100,
        checkpoint_every=500,
        sources={"sample_every": "gan_toy.py: a picture every 100 iterations"},
    )
    add(
        "--eval-every",
        type=int,
        default=100,
        help=f"GAN only: generator iterations between metrics/modes and metrics/high_quality on "
        f"{MEASURE_SAMPLES} samples (metrics/nearest_real on the Swiss roll); keeps best.pt",
    )
    for action in p._actions:  # the run flags apply to the GAN only
        if action.dest in APPLIES["none"] and not action.help.startswith("GAN"):
            action.help = "GAN only: " + action.help
    return p


def flag(name):
    return "--" + name.replace("_", "-")


def refuse_strays(parser, argv):
    """Any flag given that does not apply to the --figure chosen is refused in one line (also
    before --resume reads a checkpoint)."""
    args = parser.parse_args(argv)
    unset = object()
    blank = argparse.Namespace(**dict.fromkeys(vars(args), unset))
    given = {
        name for name, value in vars(parser.parse_args(argv, blank)).items() if value is not unset
    }
    if {"seed", "seeds"} <= given:
        parser.error("give --seed or --seeds, not both")
    takes = (EVERY_MODE | APPLIES[args.figure]) & set(vars(args))
    stray = sorted(flag(name) for name in given - takes)
    if stray:
        mode = "a toy GAN (no --figure)" if args.figure == "none" else f"--figure {args.figure}"
        verb = "does" if len(stray) == 1 else "do"
        listed = " ".join(sorted(flag(name) for name in takes - {"figure"}))
        parser.error(f"{', '.join(stray)} {verb} not apply to {mode}; it takes {listed}")


def check_args(parser, args):
    """The ranges of the flags."""
    for name in ("batch_size", "n_critic", "width", "depth", "iters", "critic_iters", "eval_every"):
        if getattr(args, name) < 1:
            parser.error(f"{flag(name)} must be at least 1, got {getattr(args, name)}")
    for name in ("lr", "clip"):
        if not 0 < getattr(args, name) < math.inf:
            parser.error(f"{flag(name)} must be a positive number, got {getattr(args, name)}")
    if not 0 <= args.lambda_gp < math.inf:
        parser.error(f"--lambda-gp must be a non-negative number, got {args.lambda_gp}")
    if not 0 <= args.beta1 < 1:
        parser.error(f"--beta1 must lie in [0, 1), got {args.beta1}")


if __name__ == "__main__":
    sys.exit(main())
