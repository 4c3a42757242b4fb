"""SN-DCGAN (Miyato, Kataoka, Koyama & Yoshida 2018, arXiv 1802.05957), trained as §4 describes.

The standard CNN of Table 3 with spectral normalisation on every layer of D (Alg. 1).
For every generator update:
    n_dis times, each on a fresh real minibatch x and fresh z ~ N(0, I)^128:
        D descends  -[log D(x) + log(1 - D(G(z)))]       (Eq. 15; or the hinge loss, Eq. 16)
        each training forward of D runs one power iteration per layer (Eq. 20-21) and uses
        W / sigma(W) (Eq. 22)
    once: G descends  -log D(G(z))                        (§4's alternate cost; or -D(G(z)), Eq. 17)
each with Adam(alpha, beta1, beta2) and n_dis from Table 1's setting (default B).

    python train.py                                   # CIFAR-10 at 32x32, setting B, standard loss
    python train.py --loss hinge                      # Table 2's "SN-GANs, Eq.(17)" row
    python train.py --dataset mnist --setting C
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --no-sn                           # the same D with plain weights (Fig. 3)
    python train.py --evaluate-spectra runs/RUN       # Fig. 3: each layer's singular values
"""

import contextlib
import sys
from functools import partial

import torch
import torch.nn.functional as F
import torchvision.utils as vutils
from torch.nn.utils import parametrize

import images
import spectra
import support
from dataset import CHANNELS, DATASETS, DataError, batches, run_images
from model import (
    FOLDER,
    WIDTH,
    Z_DIM,
    Discriminator,
    Generator,
    normalized_sigmas,
    sample,
    sample_z,
)

GRID = 64  # fixed-noise samples in each grid (8 x 8)
Z_PRIOR = "normal"  # §4, z ~ N(0, I), as torch-fidelity names the prior of --evaluate's samples
# Table 1: the six optimiser settings, (alpha, beta1, beta2, n_dis). A follows Gulrajani et al.
# (2017), B Warde-Farley & Bengio (2017), C Radford et al. (2016); D, E, F are the aggressive ones.
SETTINGS = {
    "A": (1e-4, 0.5, 0.9, 5),
    "B": (1e-4, 0.5, 0.999, 1),
    "C": (2e-4, 0.5, 0.999, 1),
    "D": (1e-3, 0.5, 0.9, 5),
    "E": (1e-3, 0.5, 0.999, 5),
    "F": (1e-3, 0.9, 0.999, 5),
}
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
    real = F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def generator_loss(fake_logits, kind):
    """G's loss to minimise: §4's alternate cost -E[log D(G(z))] (standard), or Eq. 17's
    -E[f(G(z))] (hinge)."""
    if kind == "hinge":
        return -fake_logits.mean()
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def discriminator_step(G, D, opt_D, x, z, kind):
    """One update of D (Alg. 1). G is held fixed: its output carries no graph.

    Real and fake images go through D in one forward, so each layer runs exactly one power
    iteration (Eq. 20-21) for this update and both halves of the loss see the same W / sigma(W)
    (Eq. 22). D has no batch norm, so putting them in one batch changes nothing else."""
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(torch.cat((x, fake))).split((len(x), len(fake)))
    loss = discriminator_loss(real_logits, fake_logits, kind)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    # Alg. 1 step 3 (Eq. 23): update W with the gradient taken through W / sigma(W), with Adam
    opt_D.step()
    return loss.detach(), real_logits.detach().mean(), fake_logits.detach().mean()


def generator_step(G, D, opt_G, z, kind):
    """One update of G on a fresh z. D is held fixed (its forward still refines u, as every
    training forward does)."""
    D.requires_grad_(False)  # D is only a function here: no gradient for its weights
    loss = generator_loss(D(G(z)), kind)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


@contextlib.contextmanager
def normalized_in_float32(D, grad):
    """Eq. 20-22 for every layer of D now, in float32: one power iteration and W / sigma(W),
    kept by parametrize.cached() for the forward of the step inside the block. `grad`: the weights
    carry a graph to D's parameters (D's step), or none (G's step: D is held fixed)."""
    with parametrize.cached():
        with torch.set_grad_enabled(grad):
            for _, layer in D.normalized_layers():
                layer.weight  # computed and cached (a plain weight with --no-sn)
        yield


def main(argv=None):
    parser = build_parser()
    evaluable = images.METRIC_EVALUABLE  # --evaluate: the flags of the metric may differ
    args, checkpoint = support.parse_args(
        parser, argv, FOLDER, check_args, resumable={"iters"}, evaluable=evaluable
    )
    if args.evaluate_spectra:
        return spectra.evaluate_spectra(parser, argv)
    device = support.pick_device(args)
    # --precision (support.PRECISION): fp32 is strict float32, the papers' arithmetic
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    support.seed_everything(args.seed)
    args.channels = CHANNELS[args.dataset]
    images_of_run = run_images(vars(args))  # (root, split) -> this run's images, for the metrics
    # Table 3; weights N(0, 0.02) (official code)
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
    # Table 3; Alg. 1: u initialised for every layer of D (--no-sn: plain weights)
    D = Discriminator(args.image_size, args.channels, args.width, not args.no_sn).to(device)
    if args.compile:
        G.compile()
        D.compile()
    # §4.1: "we used the Adam optimizer ... in all of our experiments", Table 1's settings
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
        title=f"SN-DCGAN on {args.dataset} ({len(train_set)} images, {size}, setting "
        f"{args.setting}, {args.loss} loss, n_dis {args.n_dis}, {data.per_epoch} real batches "
        f"per epoch; data {data.placement})",
        grid=lambda z: vutils.make_grid(draw(z), nrow=8, normalize=True, value_range=(-1, 1)),
        folder=FOLDER,
        metric=images.TrainingMetrics(draw, args, device, Z_PRIOR, images_of_run),
        eval_every=args.eval_every,
        higher_is_better=False,
        d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", -1)),
    )

    def sigmas():
        """Appendix C.1, Fig. 9: the spectral norm of each normalised layer should stay near 1."""
        return {f"sn/sigma_{name}": s.item() for name, s in normalized_sigmas(D).items()}

    # W / sigma(W) is computed before autocast starts (normalized_in_float32): under bfloat16
    # autocast on a GPU the power iteration's products W v would run in bfloat16 and
    # sigma = u^T (W v) would mix a float32 u with a bfloat16 W v and fail; computed first, u, v
    # and sigma stay float32, and autocast casts the normalised weight as it casts any weight.
    while run.running():
        # Table 1: n_dis updates of D per update of G, each on a fresh real x and fresh z
        for _ in range(args.n_dis):
            x = next(data)
            z = sample_z(len(x), args.z_dim, device)
            with normalized_in_float32(D, grad=True), autocast:
                loss_D, D_real, D_fake = discriminator_step(G, D, opt_D, x, z, args.loss)
        # one update of G on a fresh minibatch of z
        z = sample_z(args.batch_size, args.z_dim, device)
        with normalized_in_float32(D, grad=False), autocast:
            loss_G = generator_step(G, D, opt_G, z, args.loss)
        scalars = {"loss/D": loss_D, "loss/G": loss_G, "D/real": D_real, "D/fake": D_fake}
        run.end_step(scalars, also_log=sigmas)
    return run.finish()


DATASET = "training data; §4.1 and Table 2: CIFAR-10 (torchvision downloads it)"
BATCH_SIZE = "the paper gives none; official code: chainer-gan-lib train.py --batchsize 64"
WIDTH_HELP = "channels of D's first and G's last hidden layer; Table 3: 64 (512 at M/8)"
SETTING = (
    "Table 1's (alpha, beta1, beta2, n_dis): "
    + ", ".join(f"{k} {v}" for k, v in SETTINGS.items())
    + ". Default B: §4.1 reports Table 2 'with optimal settings', and footnote 4 names 'the "
    "optimal setting of SN-GANs (setting B, n_dis = 1)' (in its STL-10 discussion); App. C.1's "
    "Fig. 9 and the official code's SN-DCGAN command use C"
)
SIZE = (
    "M, a multiple of 8; Table 3: M = 32 for CIFAR-10 (48 for STL-10). G starts and D ends at "
    "M/8 x M/8"
)
LOSS = (
    "standard: Eq. 15 for D and -log D(G(z)) for G (§4; Table 2's 'SN-GANs' row); hinge: "
    "Eq. 16-17 (Table 2's 'SN-GANs, Eq.(17)' row)"
)
NO_SN = "D without spectral normalisation, plain weights: §4.1.1's Fig. 3 compares their spectra"
SPECTRA = (
    "write RUN/spectra.png, each layer's squared singular values as in Fig. 3, and the numbers"
)
ITERS = "generator updates; §4.1: 'The number of updates for GAN generator were 100K'"


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="cifar10", choices=DATASETS, help=DATASET)
    # no LSUN here: the paper trains on CIFAR-10 and STL-10
    images.add_image_data_flags(p)
    p.add_argument("--image-size", type=int, default=32, help=SIZE)
    p.add_argument("--batch-size", type=int, default=64, help=BATCH_SIZE)
    p.add_argument("--setting", default=DEFAULT_SETTING, choices=sorted(SETTINGS), help=SETTING)
    table = "the --setting's value (Table 1)"
    p.add_argument("--lr", type=float, default=None, help=f"Adam alpha; None: {table}")
    p.add_argument("--beta1", type=float, default=None, help=f"Adam beta1; None: {table}")
    p.add_argument("--beta2", type=float, default=None, help=f"Adam beta2; None: {table}")
    p.add_argument("--n-dis", type=int, default=None, help=f"D updates per G update; None: {table}")
    p.add_argument("--loss", default="standard", choices=("standard", "hinge"), help=LOSS)
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="§4: d_z = 128, z ~ N(0, I)")
    p.add_argument("--width", type=int, default=WIDTH, help=WIDTH_HELP)
    p.add_argument("--no-sn", action="store_true", help=NO_SN)
    p.add_argument("--evaluate-spectra", metavar="RUN_OR_CHECKPOINT", help=SPECTRA)
    p.add_argument("--iters", type=int, default=100_000, help=ITERS)
    support.add_run_flags(p)
    images.add_metric_flags(p)
    return p


def check_args(parser, args):
    """Table 1's setting fills in every optimiser flag that was not given; then the paper's flags,
    each inside its domain (support.parse_args checks the run's flags)."""
    for name, value in zip(SETTING_FLAGS, SETTINGS[args.setting]):
        if getattr(args, name) is None:
            setattr(args, name, value)
    support.require_at_least(parser, args, 1, "batch_size", "n_dis", "z_dim", "width", "iters")
    if args.image_size < 8 or args.image_size % 8:
        parser.error(
            f"--image-size must be a multiple of 8 (Table 3: G starts, D ends at M/8), "
            f"got {args.image_size}"
        )
    support.require_positive(parser, args, "lr")
    if not (0 <= args.beta1 < 1 and 0 <= args.beta2 < 1):
        parser.error(f"--beta1 and --beta2 must lie in [0, 1), got {args.beta1} and {args.beta2}")
    images.check_metric_args(parser, args)


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
