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
    python train.py --dataset mnist --train-subset 1000   # §5.6: also the held-out estimate
"""

import sys
from functools import partial

import torch
import torchvision.utils as vutils

import images
import support
from dataset import CHANNELS, DATASETS, DataError, batches, run_images, subset
from model import FOLDER, WIDTH, Z_DIM, Critic, Generator, init_weights, sample, sample_z

GRID = 64  # fixed-noise samples in each grid (8 x 8)
Z_PRIOR = "normal"  # official code (gan_cifar.py): z ~ N(0, I), as torch-fidelity names it
VALID_BATCHES = 10  # --train-subset: held-out batches of --batch-size images for estimate_valid


def gradient_penalty(D, real, fake):
    """§4, Eq. 3's penalty E[(||grad_x^ D(x^)||_2 - 1)^2] at x^ = eps x + (1 - eps) x~ (Alg. 1
    lines 4, 6, 7). One eps per sample, broadcast over its channels and pixels; the norm is taken
    over the whole flattened sample; the mean over the batch is line 9's (1/m) sum. Not multiplied
    by lambda."""
    # Alg. 1 line 4: a random number eps ~ U[0, 1] for each sample i (shape B, 1, 1, 1)
    shape = (real.shape[0], *[1] * (real.dim() - 1))
    eps = torch.rand(shape, device=real.device, dtype=real.dtype)
    # Alg. 1 line 6: x^ <- eps x + (1 - eps) x~
    x_hat = (eps * real + (1 - eps) * fake).requires_grad_(True)
    # Alg. 1 line 7: grad_x^ D(x^); create_graph=True, so that the penalty can be differentiated
    # w.r.t. w. D couples no samples, so the gradient of sum_i D(x^_i) w.r.t. x^_i is grad D(x^_i).
    (grad,) = torch.autograd.grad(D(x_hat).sum(), x_hat, create_graph=True)
    # Alg. 1 line 7: (||grad||_2 - 1)^2, the L2 norm over all C*H*W entries of each sample (§4)
    return (torch.linalg.vector_norm(grad.flatten(1), dim=1) - 1).pow(2).mean()


def critic_step(G, D, opt_D, x, z, lambda_gp):
    """Alg. 1 lines 4-9, one critic iteration. G is held fixed: its output carries no graph.
    Returns the critic loss, the Wasserstein estimate E[D(x)] - E[D(G(z))] and the penalty."""
    # Alg. 1 line 5: x~ <- G_theta(z)
    with torch.no_grad():
        fake = G(z)
    # Alg. 1 line 7's D_w(x) and D_w(x~), each averaged over the m samples
    real_score, fake_score = D(x).mean(), D(fake).mean()
    # Alg. 1 lines 4 (eps), 6 (x^) and 7 (the penalty term), in gradient_penalty
    gp = gradient_penalty(D, x, fake)
    # Alg. 1 line 7, averaged as in line 9: L = D(x~) - D(x) + lambda (||grad D(x^)|| - 1)^2
    loss = fake_score - real_score + lambda_gp * gp
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    # Alg. 1 line 9: w <- Adam(grad_w (1/m) sum_i L(i), w, alpha, beta1, beta2)
    opt_D.step()
    return loss.detach(), (real_score - fake_score).detach(), gp.detach()


def generator_step(G, D, opt_G, z):
    """Alg. 1 line 12: theta <- Adam(grad_theta (1/m) sum_i -D(G(z_i))). D is held fixed."""
    D.requires_grad_(False)  # D is only a function here: no gradient for its weights
    # (1/m) sum_i -D_w(G_theta(z(i)))
    loss = -D(G(z)).mean()
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


@torch.no_grad()
def wasserstein_valid(G, D, valid, z_dim, batch_size, seed):
    """§5.6, Fig. 4(b): the negative critic loss without the penalty, E[D(x)] - E[D(G(z))], on
    held-out x. Fresh z from a stream of its own (`seed`); G makes the fakes in train mode in
    batches of batch_size, as the critic sees them in training, on copies of its batch-norm
    statistics: no random stream, weight or statistic of training changes."""
    with support.rng_untouched(valid.device, seed):
        statistics = {name: buffer.clone() for name, buffer in G.named_buffers()}
        fakes = []
        for x in valid.split(batch_size):
            z = sample_z(len(x), z_dim, valid.device)
            fakes.append(torch.func.functional_call(G, statistics, (z,)))
    return (D(valid).mean() - D(torch.cat(fakes)).mean()).item()


def main(argv=None):
    parser = build_parser()
    evaluable = images.METRIC_EVALUABLE  # --evaluate: the flags of the metric may differ
    args, checkpoint = support.parse_args(
        parser, argv, FOLDER, check_args, resumable={"iters"}, evaluable=evaluable
    )
    device = support.pick_device(args)
    # --precision (support.PRECISION): fp32 is strict float32, the papers' arithmetic
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    support.seed_everything(args.seed)
    args.channels = CHANNELS[args.dataset]
    images_of_run = run_images(vars(args))  # (root, split) -> this run's images, for the metrics
    G = Generator(args.image_size, args.channels, args.z_dim, args.width)
    draw = partial(sample, G)  # G(z) in eval mode, for the grids and the metrics
    if args.evaluate:
        return images.evaluate_checkpoint(
            args, checkpoint, G, draw, device, FOLDER, Z_PRIOR, images_of_run
        )
    if args.eval_every:
        images.check_feature_extractor(args, device)
    try:
        train_set = images_of_run(args.data_root, "train")
        split = None
        if args.train_subset:
            # §5.6: train on a random subset; hold out images of the rest for validation
            recorded = checkpoint and checkpoint["batches"]["split"]
            held_out = VALID_BATCHES * args.batch_size
            train_set, valid, split = subset(
                train_set, args.train_subset, held_out, args.seed, recorded
            )
            valid = valid.to(device)
        data = batches(train_set, args.batch_size, device, args.seed, split)
    except DataError as error:
        support.fail(error)

    G.to(device)
    D = Critic(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    if args.compile:
        # G only: the penalty differentiates the critic's input gradient again (create_graph),
        # which torch.compile cannot, so the critic stays eager
        G.compile()
    # Alg. 1: Adam(alpha, beta1, beta2) for both the critic's w and the generator's theta
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2))
    size = f"{args.image_size}x{args.image_size}x{args.channels}"
    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=sample_z(GRID, args.z_dim, device),
        total=args.iters,
        title=f"WGAN-GP on {args.dataset} ({len(train_set)} images, {size}, {args.n_critic} critic "
        f"iterations per generator iteration, {data.per_epoch} real batches per epoch; data "
        f"{data.placement})",
        grid=lambda z: vutils.make_grid(draw(z), nrow=8, normalize=True, value_range=(-1, 1)),
        folder=FOLDER,
        metric=images.TrainingMetrics(draw, args, device, Z_PRIOR, images_of_run),
        eval_every=args.eval_every,
        higher_is_better=False,
        d_wins=support.RunsAway("wasserstein/estimate"),
    )

    def valid_estimate():
        """§5.6, Fig. 4(b): with --train-subset, the same estimate on held-out images."""
        seed = args.seed * 1_000_003 + run.step
        estimate = wasserstein_valid(G, D, valid, args.z_dim, args.batch_size, seed)
        return {"wasserstein/estimate_valid": estimate}

    # Alg. 1 line 1: while theta has not converged (here: a fixed number of generator iterations)
    while run.running():
        critic = []  # (loss, Wasserstein estimate, penalty) of each critic iteration
        # Alg. 1 line 2: for t = 1, ..., n_critic. Lines 3-8 ("for i = 1, ..., m") are the batch
        # axis of each tensor.
        for _ in range(args.n_critic):
            # Alg. 1 line 4: a fresh minibatch of real x ~ P_r and of z ~ p(z) each time
            x = next(data)
            z = sample_z(len(x), args.z_dim, device)
            with autocast:
                critic.append(critic_step(G, D, opt_D, x, z, args.lambda_gp))
        # Alg. 1 line 11: sample a batch of latent variables {z(i)}, i = 1..m
        z = sample_z(args.batch_size, args.z_dim, device)
        # Alg. 1 line 12: the generator's Adam step on -D(G(z))
        with autocast:
            loss_G = generator_step(G, D, opt_G, z)
        loss_D, w_estimate, gp = torch.stack([torch.stack(c) for c in critic]).float().mean(0)
        scalars = {"wasserstein/estimate": w_estimate, "penalty/gp": gp}
        scalars.update({"loss/D": loss_D, "loss/G": loss_G})
        run.end_step(scalars, valid_estimate if args.train_subset else None)
    return run.finish()


DATASET = "training data; official code: gan_cifar.py trains on CIFAR-10 (§5.3, Fig. 3)"
SIZE = "official code: gan_cifar.py, 32x32 (each doubling up to 256 adds a stride-2 layer)"
BETA1 = (
    "Alg. 1, App. B and official gan_64x64.py, gan_cifar_resnet.py: 0; App. E, gan_cifar.py: 0.5"
)
WIDTH_HELP = "official code: DIM = 128 (G: 4*DIM -> 2*DIM -> DIM; D: DIM -> 2*DIM -> 4*DIM)"
ITERS = "generator iterations; official code: gan_cifar.py ITERS = 200000 (Fig. 3's x axis)"
TRAIN_SUBSET = (
    "§5.6, Fig. 4(b): train on a random N-image subset (1000 there), fixed by --seed, and log "
    "wasserstein/estimate_valid on held-out images of the rest (default: the whole set)"
)


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help=DATASET)
    images.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64, 128, 256), help=SIZE)
    p.add_argument("--batch-size", type=int, default=64, help="Alg. 1: m; official: BATCH_SIZE 64")
    p.add_argument("--lr", type=float, default=1e-4, help="Alg. 1: Adam alpha = 0.0001")
    p.add_argument("--beta1", type=float, default=0.0, help=BETA1)
    p.add_argument("--beta2", type=float, default=0.9, help="Alg. 1: beta2 = 0.9")
    p.add_argument("--lambda-gp", type=float, default=10.0, help="Alg. 1, §4: lambda = 10")
    p.add_argument("--n-critic", type=int, default=5, help="Alg. 1: n_critic = 5 per G iteration")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="official code: 128-d z ~ N(0, I)")
    p.add_argument("--width", type=int, default=WIDTH, help=WIDTH_HELP)
    p.add_argument("--iters", type=int, default=200_000, help=ITERS)
    p.add_argument("--train-subset", type=int, default=None, metavar="N", help=TRAIN_SUBSET)
    support.add_run_flags(
        p,
        sample_every=1000,
        log_every=100,
        checkpoint_every=1000,
        sources={"log_every": "official code: every 100; each log the mean since the last"},
    )
    images.add_metric_flags(p)
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    support.require_at_least(parser, args, 1, "batch_size", "n_critic", "z_dim", "width", "iters")
    support.require_at_least(parser, args, args.batch_size, "train_subset")
    support.require_positive(parser, args, "lr")
    if not 0 <= args.lambda_gp < float("inf"):
        parser.error(f"--lambda-gp must be a non-negative number, got {args.lambda_gp}")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    images.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
