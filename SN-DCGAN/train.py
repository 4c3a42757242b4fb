"""SN-DCGAN (Miyato, Kataoka, Koyama & Yoshida 2018, arXiv 1802.05957), trained as §4 describes.

The standard CNN of Table 3 with spectral normalisation on every layer of D (Alg. 1).
For every generator update:
    n_dis times, each on a fresh real minibatch x and fresh z ~ N(0, I)^128:
        D descends  -[log D(x) + log(1 - D(G(z)))]            (Eq. 15; or the hinge loss, Eq. 16)
        each training forward of D runs one power iteration per layer (Eq. 20-21), uses W / sigma(W) (Eq. 22)
    once: G descends  -log D(G(z))                             (§4's alternate cost; or -D(G(z)), Eq. 17)
each with Adam(alpha, beta1, beta2) and n_dis from Table 1's setting (default B).

    python train.py                                   # CIFAR-10 at 32x32, setting B, the standard loss
    python train.py --loss hinge                      # Table 2's "SN-GANs, Eq.(17)" row
    python train.py --dataset mnist --setting C
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --no-sn                           # the same D with plain weights, Fig. 3's comparison
    python train.py --evaluate-spectra runs/RUN       # Fig. 3: each layer's singular values -> RUN/spectra.png
"""
import sys

import torch
import torch.nn.functional as F
import torchvision.utils as vutils

import spectra
import support
from dataset import CHANNELS, DATASETS, DataError, batches, load_images
from model import FOLDER, WIDTH, Z_DIM, Discriminator, Generator, normalized_sigmas, sample, sample_z

GRID = 64  # fixed-noise samples in each grid (8 x 8)
Z_PRIOR = "normal"  # §4, z ~ N(0, I), as torch-fidelity names the prior of --evaluate's samples
# Table 1: the six optimiser settings, (alpha, beta1, beta2, n_dis). A follows Gulrajani et al. (2017),
# B Warde-Farley & Bengio (2017), C Radford et al. (2016); D, E, F are the aggressive ones.
SETTINGS = {"A": (1e-4, 0.5, 0.9, 5), "B": (1e-4, 0.5, 0.999, 1), "C": (2e-4, 0.5, 0.999, 1),
            "D": (1e-3, 0.5, 0.9, 5), "E": (1e-3, 0.5, 0.999, 5), "F": (1e-3, 0.9, 0.999, 5)}
# §4.1: Table 2 shows each method "with optimal settings"; footnote 4: "the optimal setting of
# SN-GANs (setting B, n_dis = 1) is computationally light".
DEFAULT_SETTING = "B"
SETTING_FLAGS = ("lr", "beta1", "beta2", "n_dis")


def discriminator_loss(real_logits, fake_logits, kind):
    """D's loss to minimise, on the logits f(x) and f(G(z)).

    standard (Eq. 15, D maximises E[log D(x)] + E[log(1 - D(G(z)))] with D = sigmoid(f)):
        softplus(-f(x)) + softplus(f(G(z))), which BCEWithLogits computes stably.
    hinge (Eq. 16, D maximises E[min(0, -1 + f(x))] + E[min(0, -1 - f(G(z)))]):
        E[relu(1 - f(x))] + E[relu(1 + f(G(z)))]."""
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

    Real and fake images go through D in one forward, so each layer runs exactly one power iteration (Eq. 20-21)
    for this update and both halves of the loss see the same W / sigma(W) (Eq. 22). D has no batch norm, so putting
    them in one batch changes nothing else."""
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
    args, checkpoint = support.parse_args(build_parser(), argv, FOLDER, check_args, resumable={"iters"},
                                          evaluable=support.METRIC_EVALUABLE)
    if args.evaluate_spectra:
        return spectra.evaluate_spectra(args.evaluate_spectra, build_parser(), argv)
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    args.channels = CHANNELS[args.dataset]
    # Table 3; weights N(0, 0.02) (official code)
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
    # Table 3; Alg. 1: u initialised for every layer of D (with --no-sn: no normalisation, plain weights)
    D = Discriminator(args.image_size, args.channels, args.width, not args.no_sn).to(device)
    # §4.1: "we used the Adam optimizer ... in all of our experiments", with Table 1's alpha, beta1, beta2
    opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2))
    opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2))
    run = support.Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, data,
                      fixed_z=sample_z(GRID, args.z_dim, device), total=args.iters,
                      d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", -1)),
                      title=f"SN-DCGAN on {args.dataset} ({len(images)} images, {args.image_size}x{args.image_size}x"
                            f"{args.channels}, setting {args.setting}, {args.loss} loss, n_dis {args.n_dis}, "
                            f"{data.per_epoch} real batches per epoch; data {data.placement})",
                      grid=lambda z: vutils.make_grid(sample(G, z), nrow=8, normalize=True, value_range=(-1, 1)),
                      folder=FOLDER, eval_every=args.eval_every, higher_is_better=False,
                      metric=support.TrainingMetrics(lambda z: sample(G, z), args, device, Z_PRIOR, training_images))

    while run.running():
        # Table 1: n_dis updates of D per update of G, each on a fresh real minibatch x and fresh z ~ N(0, I)
        for _ in range(args.n_dis):
            x = next(data)
            loss_D, D_real, D_fake = discriminator_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device),
                                                        args.loss)
        # one update of G on a fresh minibatch of z
        loss_G = generator_step(G, D, opt_G, sample_z(args.batch_size, args.z_dim, device), args.loss)
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_real, "D/fake": D_fake},
                     # Appendix C.1, Fig. 9: the spectral norm of each normalised layer should stay near 1
                     also_log=lambda: {f"sn/sigma_{name}": s.item() for name, s in normalized_sigmas(D).items()})
    return run.finish()


def training_images(args):
    """The training set as a uint8 tensor (N, C, H, W), decoded once (see dataset.py)."""
    return load_images(args.dataset, args.data_root, args.image_size, cache_dir=args.cache_dir)


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS,
                   help="training data; §4.1 and Table 2: CIFAR-10 (torchvision downloads it)")
    # no LSUN here: the paper trains on CIFAR-10 and STL-10
    support.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=32,
                   help="M, a multiple of 8; Table 3: M = 32 for CIFAR-10 (48 for STL-10). G starts and D ends "
                        "at M/8 x M/8")
    p.add_argument("--batch-size", type=int, default=64,
                   help="the paper gives none; official code: chainer-gan-lib train.py --batchsize 64")
    p.add_argument("--setting", default=DEFAULT_SETTING, choices=sorted(SETTINGS),
                   help="Table 1's (alpha, beta1, beta2, n_dis): " +
                        ", ".join(f"{k} {v}" for k, v in SETTINGS.items()) +
                        ". Default B: §4.1 reports Table 2 'with optimal settings', and footnote 4 names "
                        "'the optimal setting of SN-GANs (setting B, n_dis = 1)' (in its STL-10 discussion); "
                        "App. C.1's Fig. 9 and the official code's SN-DCGAN command use C")
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
    p.add_argument("--no-sn", action="store_true",
                   help="D without spectral normalisation, plain weights: §4.1.1's Fig. 3 compares their spectra")
    p.add_argument("--evaluate-spectra", metavar="RUN_OR_CHECKPOINT",
                   help="write RUN/spectra.png, each layer's squared singular values as in Fig. 3, and the numbers")
    p.add_argument("--iters", type=int, default=100_000,
                   help="generator updates; §4.1: 'The number of updates for GAN generator were 100K'")
    support.add_run_flags(p)
    support.add_metric_flags(p)
    return p


def check_args(parser, args):
    """Table 1's setting fills in every optimiser flag that was not given; then the paper's flags, each inside its
    domain (support.parse_args checks the run's flags)."""
    for name, value in zip(SETTING_FLAGS, SETTINGS[args.setting]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    support.require_at_least(parser, args, 1, "batch_size", "n_dis", "z_dim", "width", "iters")
    if args.image_size < 8 or args.image_size % 8:
        parser.error(f"--image-size must be a multiple of 8 (Table 3: G starts, D ends at M/8), got {args.image_size}")
    support.require_positive(parser, args, "lr")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    support.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(main())
