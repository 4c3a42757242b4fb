"""DCGAN (Radford, Metz & Chintala 2015, arXiv 1511.06434), trained as §4 describes.

The loop is the minibatch GAN algorithm (Goodfellow et al. 2014, Algorithm 1, k = 1)
with DCGAN's optimiser. For every minibatch:
    1. D ascends  log D(x) + log(1 - D(G(z)))      (fakes detached: G is held fixed)
    2. G ascends  log D(G(z))                       (the non-saturating loss; D held fixed)
each with Adam(lr 0.0002, beta1 0.5) and z ~ U(-1, 1)^100.

    python train.py                                   # CIFAR-10 at 64x64, the paper's settings
    python train.py --dataset mnist --image-size 32
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --evaluate-features runs/RUN      # §5.1: D's features in a linear SVM
"""

import sys

import torch
import torch.nn.functional as F
import torchvision.utils as vutils

import features
import images
import support
from dataset import CHANNELS, DATASETS, LSUN_CLASSES, DataError, batches, run_images
from model import FOLDER, WIDTH, Z_DIM, Discriminator, Generator, init_weights, sample, sample_z

GRID = 64  # fixed-noise samples in each grid (8 x 8)
SVM_C = 0.001  # --evaluate-features; §5.1 gives no C: chosen on a validation split (README)
Z_PRIOR = "uniform_-1_1"  # Fig. 1, z ~ U(-1, 1), as torch-fidelity names it for --evaluate


def discriminator_step(G, D, opt_D, x, z):
    """Alg. 1, D's update: ascend log D(x) + log(1 - D(G(z))). G is held fixed: its output
    carries no graph."""
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    loss = real_loss + fake_loss
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    D_x, D_G_z = torch.sigmoid(real_logits.detach()), torch.sigmoid(fake_logits.detach())
    return loss.detach(), D_x.mean(), D_G_z.mean()


def generator_step(G, D, opt_G, z):
    """Alg. 1, G's update, in the non-saturating form: ascend log D(G(z)). D is held fixed."""
    D.requires_grad_(False)  # D is only a function here: no gradient for its weights
    logits = D(G(z))
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def main(argv=None):
    parser = build_parser()
    args, checkpoint = support.parse_args(
        parser, argv, FOLDER, check_args, resumable={"epochs"}, evaluable=images.METRIC_EVALUABLE
    )
    if args.evaluate_features:
        return features.evaluate(parser, argv)
    device = support.pick_device(args)
    # --precision (support.PRECISION): fp32 is strict float32, the papers' arithmetic
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    support.seed_everything(args.seed)
    args.channels = CHANNELS[args.dataset]
    G = Generator(args.image_size, args.channels, args.z_dim, args.width)
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

    G.to(device)
    D = Discriminator(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    if args.compile:
        G.compile()
        D.compile()
    # §4: Adam with lr 0.0002 and beta1 0.5 for both networks
    betas = (args.beta1, args.beta2)
    opt_G = torch.optim.Adam(G.parameters(), args.lr, betas, weight_decay=args.weight_decay)
    opt_D = torch.optim.Adam(D.parameters(), args.lr, betas, weight_decay=args.weight_decay)
    shape = f"{args.image_size}x{args.image_size}x{args.channels}"
    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=sample_z(GRID, args.z_dim, device),
        total=args.epochs * data.per_epoch,
        title=f"DCGAN on {args.dataset} ({len(training_set)} images, {shape}, "
        f"{data.per_epoch} steps per epoch; data {data.placement})",
        grid=lambda z: vutils.make_grid(sample(G, z), nrow=8, normalize=True, value_range=(-1, 1)),
        folder=FOLDER,
        eval_every=args.eval_every,
        higher_is_better=False,
        # D(x) and D(G(z)) are probabilities: D's loss drives them to 1 and 0
        d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", 0)),
        metric=images.TrainingMetrics(lambda z: sample(G, z), args, device, Z_PRIOR, data_set),
    )

    while run.running():
        # D's update on a minibatch of m examples x and m noise samples z
        x = next(data)
        z = sample_z(len(x), args.z_dim, device)
        with autocast:
            loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, z)
        # G's update on a fresh minibatch of m noise samples z
        z = sample_z(len(x), args.z_dim, device)
        with autocast:
            loss_G = generator_step(G, D, opt_G, z)
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z})
    return run.finish()


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help=DATASET)
    p.add_argument(
        "--lsun-classes", nargs="+", default=list(LSUN_CLASSES), metavar="SET", help=LSUN
    )
    images.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128, 256), help=SIZE)
    p.add_argument("--batch-size", type=int, default=128, help="§4: mini-batch size of 128")
    p.add_argument("--lr", type=float, default=2e-4, help="§4: Adam learning rate 0.0002")
    p.add_argument("--beta1", type=float, default=0.5, help="§4: Adam momentum term beta1 0.5")
    p.add_argument("--beta2", type=float, default=0.999, help="§4 keeps Adam's suggested beta2")
    p.add_argument("--weight-decay", type=float, default=0.0, help=DECAY)
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="Fig. 1: 100-dimensional z")
    p.add_argument("--width", type=int, default=WIDTH, help=WIDTH_HELP)
    p.add_argument("--epochs", type=int, default=25, help=EPOCHS)
    support.add_run_flags(p)
    images.add_metric_flags(p)
    p.add_argument("--evaluate-features", metavar="RUN_OR_CHECKPOINT", help=features.EVALUATE)
    p.add_argument("--svm-train-images", type=int, help=features.TRAIN_IMAGES)
    p.add_argument("--svm-c", type=float, default=SVM_C, help=features.C)
    return p


DATASET = "training data; the paper used LSUN, faces and ImageNet; this default downloads by itself"
LSUN = "with --dataset lsun: LSUN sets under DATA_ROOT/lsun; §4.1: the LSUN bedrooms"
SIZE = "Fig. 1: 64x64; 32 to 256 add or remove a stride-2 layer in G and D per doubling"
DECAY = "L2 weight decay; not in the paper, the official code uses 1e-5"
WIDTH_HELP = "channels of G's last and D's first hidden layer; Fig. 1: 128 (1024 at 4x4)"
EPOCHS = (
    "official code: niter = 25 (the paper gives none); one D and one G update per minibatch give "
    "each network twice the official code's updates, which alternates them"
)


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    support.require_at_least(parser, args, 1, "batch_size", "z_dim", "width", "epochs")
    support.require_positive(parser, args, "lr", "svm_c")
    support.require_at_least(parser, args, 1, "svm_train_images")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    if not 0 <= args.weight_decay < float("inf"):
        parser.error(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    if args.evaluate_features and (args.resume or args.evaluate):
        parser.error("give --evaluate-features alone, without --resume or --evaluate")
    images.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
