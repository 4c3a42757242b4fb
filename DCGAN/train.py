"""DCGAN (Radford, Metz & Chintala 2015, arXiv 1511.06434), trained as §4 describes.

The loop is the minibatch GAN algorithm (Goodfellow et al. 2014, Algorithm 1, k = 1)
with DCGAN's optimiser. For every minibatch:
    1. D ascends  log D(x) + log(1 - D(G(z)))      (fakes detached: G is held fixed)
    2. G ascends  log D(G(z))                       (the non-saturating loss; D held fixed)
each with Adam(lr 0.0002, beta1 0.5) and z ~ U(-1, 1)^100.

    python train.py                                   # CIFAR-10 at 64x64, the paper's settings
    python train.py --dataset mnist --image-size 32
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --evaluate-features runs/RUN      # §5.1: D's features in a linear SVM (features.py)
"""
import sys

import torch
import torch.nn.functional as F
import torchvision.utils as vutils

import features
import support
from dataset import CHANNELS, DATASETS, LSUN_CLASSES, DataError, batches, load_images
from model import FOLDER, WIDTH, Z_DIM, Discriminator, Generator, init_weights, sample, sample_z

GRID = 64  # fixed-noise samples in each grid (8 x 8)
SVM_C = 0.001  # --evaluate-features; §5.1 gives no C: chosen on a validation split (README)
Z_PRIOR = "uniform_-1_1"  # Fig. 1, z ~ U(-1, 1), as torch-fidelity names the prior of --evaluate's samples


def discriminator_step(G, D, opt_D, x, z):
    """Alg. 1, D's update: ascend log D(x) + log(1 - D(G(z))). G is held fixed: its output carries no graph."""
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    loss = (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
            + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach(), torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean()


def generator_step(G, D, opt_G, z):
    """Alg. 1, G's update, in the non-saturating form: ascend log D(G(z)). D is held fixed."""
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    logits = D(G(z))
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def main(argv=None):
    parser = build_parser()
    args, checkpoint = support.parse_args(parser, argv, FOLDER, check_args, resumable={"epochs"},
                                          evaluable=support.METRIC_EVALUABLE)
    if args.evaluate_features:
        return features.evaluate(parser, argv, args)
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    args.channels = CHANNELS[args.dataset]
    G = Generator(args.image_size, args.channels, args.z_dim, args.width)
    if args.evaluate:
        return support.evaluate_checkpoint(args, checkpoint, G, lambda z: sample(G, z), device, FOLDER, Z_PRIOR,
                                           training_images)
    if args.eval_every:
        support.check_feature_extractor(args, device)
    try:
        images = training_images(args)
        data = batches(images, args.batch_size, device, args.seed, args.data_on)
    except DataError as error:
        support.fail(error)

    G.to(device)
    D = Discriminator(args.image_size, args.channels, args.width).to(device)
    G.apply(init_weights)
    D.apply(init_weights)
    # §4: Adam with lr 0.0002 and beta1 0.5 for both networks
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2), weight_decay=args.weight_decay)
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2), weight_decay=args.weight_decay)
    run = support.Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, data,
                      fixed_z=sample_z(GRID, args.z_dim, device), total=args.epochs * data.per_epoch,
                      title=f"DCGAN on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x"
                            f"{args.channels}, {data.per_epoch} steps per epoch; data {data.placement})",
                      grid=lambda z: vutils.make_grid(sample(G, z), nrow=8, normalize=True, value_range=(-1, 1)),
                      folder=FOLDER, eval_every=args.eval_every, higher_is_better=False,
                      # D(x) and D(G(z)) are probabilities: D's loss drives them to 1 and 0
                      d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", 0)),
                      metric=support.TrainingMetrics(lambda z: sample(G, z), args, device, Z_PRIOR, training_images))

    while run.running():
        # D's update on a minibatch of m examples x and m noise samples z
        x = next(data)
        loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device))
        # G's update on a fresh minibatch of m noise samples z
        loss_G = generator_step(G, D, opt_G, sample_z(len(x), args.z_dim, device))
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z})
    return run.finish()


def training_images(args):
    """The training set as a uint8 tensor (N, C, H, W), decoded once (see dataset.py)."""
    return load_images(args.dataset, args.data_root, args.image_size, cache_dir=args.cache_dir,
                       lsun_classes=args.lsun_classes)


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; the paper used LSUN, faces and ImageNet, this default downloads by itself")
    p.add_argument("--lsun-classes", nargs="+", default=list(LSUN_CLASSES), metavar="SET",
                   help="with --dataset lsun: LSUN sets under DATA_ROOT/lsun; §4.1: the LSUN bedrooms")
    support.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=64, choices=(32, 64, 128, 256),
                   help="Fig. 1: 64x64; 32 to 256 add or remove a stride-2 layer in G and D per doubling")
    p.add_argument("--batch-size", type=int, default=128, help="§4: mini-batch size of 128")
    p.add_argument("--lr", type=float, default=2e-4, help="§4: Adam learning rate 0.0002")
    p.add_argument("--beta1", type=float, default=0.5, help="§4: Adam momentum term beta1 0.5")
    p.add_argument("--beta2", type=float, default=0.999, help="§4 keeps Adam's suggested beta2")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="L2 weight decay; not in the paper, the official code uses 1e-5")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="Fig. 1: 100-dimensional z")
    p.add_argument("--width", type=int, default=WIDTH,
                   help="channels of G's last and D's first hidden layer; Fig. 1: 128 (1024 at 4x4)")
    p.add_argument("--epochs", type=int, default=25,
                   help="official code: niter = 25 (the paper gives none); one D and one G update per minibatch "
                        "give each network twice the official code's updates, which alternates them")
    support.add_run_flags(p)
    support.add_metric_flags(p)
    p.add_argument("--evaluate-features", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="§5.1: test accuracy of a linear L2-SVM on the run's D features (every layer max-pooled to "
                        "4x4), on a random D's and on pixels; writes them into its metrics.json, and exits")
    p.add_argument("--svm-train-images", type=int, default=None,
                   help="training images the SVM of --evaluate-features learns from, drawn with --seed "
                        "(default: all, as §5.1)")
    p.add_argument("--svm-c", type=float, default=SVM_C,
                   help="the SVM's C; §5.1 gives none: chosen on MNIST by accuracy on a validation split of the "
                        "training set (README)")
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    support.require_at_least(parser, args, 1, "batch_size", "z_dim", "width", "epochs")
    support.require_positive(parser, args, "lr", "svm_c")
    support.require_at_least(parser, args, 1, "svm_train_images")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    if not 0 <= args.weight_decay < float("inf"):
        parser.error(f"--weight-decay must be a non-negative number, got {args.weight_decay}")
    support.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(main())
