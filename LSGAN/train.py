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

import sys
from functools import partial

import torch
import torchvision.utils as vutils

import images
import support
from dataset import CHANNELS, DATASETS, LSUN_CLASSES, DataError, batches, run_images
from model import (
    FOLDER,
    WIDTH,
    Z_DIM,
    Discriminator,
    Generator,
    check_image_size,
    init_weights,
    sample,
    sample_z,
)

GRID = 64  # fixed-noise samples in each grid (8 x 8)
Z_PRIOR = "uniform_-1_1"  # official code, z ~ U(-1, 1), as torch-fidelity names the prior
# §3.2.3: the codes (a, b, c): a for fake and b for real data in D's loss, c what G wants D to
# believe of its fakes.
CODINGS = {
    # §3.2.3: the 0-1 binary coding (c = b); official code: vgg.py loss_l2 trains with it
    "0-1": (0.0, 1.0, 1.0),
    # §3.2.2-3.2.3: b - c = 1, b - a = 2: G minimises the Pearson chi^2 divergence
    "pearson": (-1.0, 1.0, 0.0),
}


def discriminator_loss(real_out, fake_out, a, b):
    """§3.2, D's objective: 1/2 E_x[(D(x) - b)^2] + 1/2 E_z[(D(G(z)) - a)^2], each expectation
    a batch mean of squares."""
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
        data = batches(train_set, args.batch_size, device, args.seed)
    except DataError as error:
        support.fail(error)

    G.to(device)
    D = Discriminator(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    if args.compile:
        G.compile()
        D.compile()
    # §4.1: Adam with beta1 0.5; lr 0.001 for the scenes (official code: train_lsun.py)
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2))
    coding = CODINGS[args.coding]
    size = f"{args.image_size}x{args.image_size}x{args.channels}"
    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=sample_z(GRID, args.z_dim, device),
        total=args.iters,
        title=f"LSGAN on {args.dataset} ({len(train_set)} images, {size}, coding {args.coding} "
        f"(a, b, c) = {coding}, {data.per_epoch} steps per epoch; data {data.placement})",
        grid=lambda z: vutils.make_grid(draw(z), nrow=8, normalize=True, value_range=(-1, 1)),
        folder=FOLDER,
        metric=images.TrainingMetrics(draw, args, device, Z_PRIOR, images_of_run),
        eval_every=args.eval_every,
        higher_is_better=False,
        # §3.2: D's loss regresses D(x) to b and D(G(z)) to a
        d_wins=support.Separated(real=("D/real", coding[1]), fake=("D/fake", coding[0])),
    )

    while run.running():
        # a minibatch of m examples x and m noise samples z ~ U(-1, 1)^1024
        x = next(data)
        z = sample_z(len(x), args.z_dim, device)
        # D's update: regress D(x) to b and D(G(z)) to a
        with autocast:
            loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, z, coding)
        # G's update on the same z (official code: train_lsun.py feeds one batch_z to both)
        with autocast:
            loss_G = generator_step(G, D, opt_G, z, coding)
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z})
    return run.finish()


DATASET = (
    "training data; the paper used LSUN scenes and handwritten Chinese characters, this default "
    "downloads by itself"
)
LSUN = (
    "with --dataset lsun: LSUN sets under DATA_ROOT/lsun; one scene at a time, as §4.1 trains on "
    "five scene data sets; official code: convert_lsun.py's default set"
)
SIZE = (
    "a multiple of 16, at least 32; the paper's scene network is 112x112, 32 is CIFAR-10's own size"
)
CODING = (
    "the codes (a, b, c): 0-1 = (0, 1, 1), the official code's (vgg.py) and §3.2.3's; "
    "pearson = (-1, 1, 0), the Pearson chi^2 codes of §3.2.2"
)
LR = (
    "§4.1; official code: train_lsun.py 0.001 for the scenes (train_chn.py 0.0002 for the "
    "handwritten characters)"
)
WIDTH_HELP = (
    "channels of D's first and G's last hidden layer; official code: 64 "
    "(G 256-256-256-256-128-64, D 64-128-256-512)"
)
ITERS = "generator steps; official code: max_steps 1000000 (the paper gives none)"


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help=DATASET)
    p.add_argument(
        "--lsun-classes", nargs="+", default=list(LSUN_CLASSES), metavar="SET", help=LSUN
    )
    images.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=32, help=SIZE)
    p.add_argument("--coding", default="0-1", choices=sorted(CODINGS), help=CODING)
    p.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="official code: batch_size 64 (the paper gives none)",
    )
    p.add_argument("--lr", type=float, default=1e-3, help=LR)
    p.add_argument(
        "--beta1", type=float, default=0.5, help="§4.1; official code: train_lsun.py beta1 0.5"
    )
    p.add_argument(
        "--beta2", type=float, default=0.999, help="official code keeps Adam's default beta2"
    )
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="figure: 1024-dimensional z")
    p.add_argument("--width", type=int, default=WIDTH, help=WIDTH_HELP)
    p.add_argument("--iters", type=int, default=1_000_000, help=ITERS)
    support.add_run_flags(p)
    images.add_metric_flags(p)
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    support.require_at_least(parser, args, 1, "batch_size", "z_dim", "width", "iters")
    try:
        check_image_size(args.image_size)
    except ValueError as error:
        parser.error(f"--image-size: {error}")
    support.require_positive(parser, args, "lr")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    images.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
