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

import sys

import torch
import torchvision.utils as vutils

import images
import support
from dataset import CHANNELS, DATASETS, LSUN_CLASSES, DataError, batches, run_images
from model import (
    FOLDER,
    GENERATORS,
    WIDTH,
    Z_DIM,
    Critic,
    build_generator,
    init_weights,
    sample,
    sample_z,
)

GRID = 64  # fixed-noise samples in each grid (8 x 8)
# official code (main.py): z ~ N(0, 1), as torch-fidelity names it for --evaluate
Z_PRIOR = "normal"
# Official code (main.py), left out of the paper as its README says: 100 critic iterations
# for the first 25 generator iterations and at every 500th generator iteration.
WARMUP_STEPS, WARMUP_EVERY, WARMUP_CRITIC_ITERATIONS = 25, 500, 100
EPOCHS = 25  # official code: niter = 25 epochs of real batches (the paper names no length)


def critic_iterations(generator_step, n_critic, warmup):
    """Alg. 1 line 2: n_critic critic iterations before generator step `generator_step` (from 0).

    With `warmup`, the official code's schedule (main.py): 100 iterations for the first 25
    generator steps and for every 500th, so that the critic starts near its optimum and
    is brought back there from time to time.
    """
    if warmup and (generator_step < WARMUP_STEPS or generator_step % WARMUP_EVERY == 0):
        return WARMUP_CRITIC_ITERATIONS
    return n_critic


def default_iterations(per_epoch, n_critic, warmup, epochs=EPOCHS):
    """Generator iterations in which the critic draws `epochs` epochs of real batches (official
    code: niter)."""
    steps, drawn = 0, 0
    while drawn < epochs * per_epoch:
        drawn += critic_iterations(steps, n_critic, warmup)
        steps += 1
    return steps


def critic_step(G, D, opt_D, x, z, clip):
    """Alg. 1 lines 5-7: one RMSProp ascent step of the critic on E[f_w(x)] - E[f_w(G(z))], then
    the clip. G is held fixed: its output carries no graph. Returns the critic's loss and the
    Wasserstein estimate, both on this batch before the step."""
    with torch.no_grad():
        fake = G(z)
    # line 5: g_w = grad_w [1/m sum f_w(x_i) - 1/m sum f_w(G(z_i))]; the estimate of W(P_r, P_theta)
    # up to a constant
    estimate = D(x).mean() - D(fake).mean()
    loss = -estimate  # ascending the estimate = descending its negative
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    # line 6: w <- w + alpha * RMSProp(w, g_w)
    opt_D.step()
    # line 7: w <- clip(w, -c, c), after the update: every critic parameter, BN's gamma and beta too
    with torch.no_grad():
        for w in D.parameters():
            w.clamp_(-clip, clip)
    return loss.detach(), estimate.detach()


def generator_step(G, D, opt_G, z):
    """Alg. 1 lines 10-11: one RMSProp descent step of G on -E[f_w(G(z))]; the critic held fixed."""
    D.requires_grad_(False)  # the critic is only a function here: no gradient for its weights
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
    return torch.optim.RMSprop(
        params, lr=lr, alpha=0.99, eps=1e-8, momentum=0, centered=False, weight_decay=0
    )


def main(argv=None):
    parser, evaluable = build_parser(), images.METRIC_EVALUABLE
    args, checkpoint = support.parse_args(parser, argv, FOLDER, check_args, {"iters"}, evaluable)
    device = support.pick_device(args)
    # --precision (support.PRECISION): fp32 is strict float32, the papers' arithmetic
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    support.seed_everything(args.seed)
    args.channels = CHANNELS[args.dataset]
    G = build_generator(vars(args))  # §4.3: --generator
    data_set = run_images(vars(args))  # (root, split) -> this run's images, for the metrics
    if args.evaluate:
        return images.evaluate_checkpoint(
            args, checkpoint, G, lambda z: sample(G, z), device, FOLDER, Z_PRIOR, data_set
        )
    if args.eval_every:
        images.check_feature_extractor(args, device)
    try:
        training_set = data_set(args.data_root, "train")
        data = batches(training_set, args.batch_size, device, args.seed)
    except DataError as error:
        support.fail(error)
    if args.iters is None:
        args.iters = default_iterations(data.per_epoch, args.n_critic, args.critic_warmup)

    G.to(device)
    D = Critic(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    if args.compile:
        G.compile()
        D.compile()
    # Alg. 1 lines 6 and 11: RMSProp with alpha = 0.00005 for both networks
    opt_G = rmsprop(G.parameters(), args.lr)
    opt_D = rmsprop(D.parameters(), args.lr)
    shape = f"{args.image_size}x{args.image_size}x{args.channels}"
    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=sample_z(GRID, args.z_dim, device),
        total=args.iters,
        d_wins=support.RunsAway("wasserstein/estimate"),
        title=f"WGAN on {args.dataset} ({len(training_set)} images, {shape}, "
        f"{data.per_epoch} real batches per epoch; data {data.placement})",
        grid=lambda z: vutils.make_grid(sample(G, z), nrow=8, normalize=True, value_range=(-1, 1)),
        folder=FOLDER,
        eval_every=args.eval_every,
        higher_is_better=False,
        metric=images.TrainingMetrics(lambda z: sample(G, z), args, device, Z_PRIOR, data_set),
    )

    # Alg. 1 line 1: while theta has not converged (here: a fixed number of generator iterations)
    while run.running():
        # line 2: n_critic critic iterations (100 during the official code's warm-up). The box
        # writes "for t = 0, ..., n_critic"; its Require line and the official code mean n_critic
        for _ in range(critic_iterations(run.step, args.n_critic, args.critic_warmup)):
            # line 3: a fresh batch of m real examples for every critic iteration
            x = next(data)
            # line 4: a batch of m prior samples z ~ p(z)
            z = sample_z(len(x), args.z_dim, device)
            # lines 5-7: the critic's gradient, its RMSProp step, then the clip to [-c, c]
            with autocast:
                loss_D, estimate = critic_step(G, D, opt_D, x, z, args.clip)
        # line 9: a fresh batch of m prior samples
        z = sample_z(args.batch_size, args.z_dim, device)
        # lines 10-11: G's gradient and its RMSProp step
        with autocast:
            loss_G = generator_step(G, D, opt_G, z)
        # §4.2: the critic's last estimate of the EM distance, the curve of Fig. 3
        run.end_step({"wasserstein/estimate": estimate, "loss/D": loss_D, "loss/G": loss_G})
    return run.finish()


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help=DATASET)
    p.add_argument(
        "--lsun-classes", nargs="+", default=list(LSUN_CLASSES), metavar="SET", help=LSUN
    )
    images.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128, 256), help=SIZE)
    p.add_argument("--batch-size", type=int, default=64, help="Alg. 1: m = 64")
    p.add_argument("--lr", type=float, default=5e-5, help="Alg. 1: alpha = 0.00005, RMSProp")
    p.add_argument("--clip", type=float, default=0.01, help="Alg. 1: c = 0.01, weights in [-c, c]")
    p.add_argument("--n-critic", type=int, default=5, help="Alg. 1: n_critic = 5 per G iteration")
    p.add_argument("--no-critic-warmup", dest="critic_warmup", action="store_false", help=WARMUP)
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="official code: nz = 100")
    p.add_argument("--width", type=int, default=WIDTH, help=WIDTH_HELP)
    p.add_argument("--generator", default="dcgan", choices=GENERATORS, help=GENERATOR)
    p.add_argument("--iters", type=int, help=ITERS)
    sources = {"sample_every": "official code: every 500", "log_every": "official code: every 1"}
    support.add_run_flags(p, log_every=1, sources=sources)
    images.add_metric_flags(p)
    return p


DATASET = "training data; the paper used LSUN bedrooms (§4.1); this default downloads by itself"
LSUN = "with --dataset lsun: LSUN sets under DATA_ROOT/lsun; §4.1: the LSUN bedrooms"
SIZE = "§4.1: 64x64 pixels; 32 to 256 add or remove a stride-2 layer in G and D per doubling"
WARMUP = (
    f"turn off the official code's schedule (main.py) of {WARMUP_CRITIC_ITERATIONS} critic "
    f"iterations for the first {WARMUP_STEPS} G iterations and every {WARMUP_EVERY}th"
)
WIDTH_HELP = "channels of G's last and the critic's first hidden layer; official: ngf = ndf = 64"
GENERATOR = (
    "G, §4.3: dcgan, the official DCGAN_G (Fig. 5); nobn, no batch norm and --width filters in "
    "every layer (Fig. 6; the official DCGAN_G_nobn keeps DCGAN's halving filter counts); mlp, "
    "a ReLU MLP with 4 hidden layers of 512 units (Fig. 7; the official MLP_G has 3)"
)
ITERS = (
    f"generator iterations (default: as many as it takes the critic to draw {EPOCHS} epochs of "
    f"real batches; official code: niter = {EPOCHS} epochs; the paper names no length)"
)


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    support.require_at_least(parser, args, 1, "batch_size", "n_critic", "z_dim", "width", "iters")
    support.require_positive(parser, args, "lr", "clip")
    images.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
