"""Conditional GAN (Mirza & Osindero 2014, arXiv 1411.1784), trained on MNIST as §4.1 describes.

The GAN's Algorithm 1 (Goodfellow et al. 2014, k = 1) with both players conditioned on the one-hot
label y (§3, Eq. 2):
    for each minibatch of m examples (x, y):
        sample m noise samples z ~ U[0, 1]^100
        update D by ascending  log D(x|y) + log(1 - D(G(z|y)|y))    (G held fixed)
        sample m fresh noise samples z
        update G by ascending  log D(G(z|y)|y)           (the non-saturating form; D held fixed)
with SGD (§4.1): m = 100, lr 0.1 divided by 1.00004 every step down to 1e-6, momentum rising from
0.5 to 0.7, dropout 0.5 in both networks. The best validation log-likelihood picks the stopping
point. Images are MNIST's 28x28 (§4.1's 784-dimensional samples), the only size trained here.

    python train.py                                   # MNIST, the paper's settings
    python train.py --resume runs/RUN                 # continue a run exactly where it stopped
    python train.py --evaluate runs/RUN               # the Parzen-window log-likelihood (Table 1)
"""

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils as vutils

import support
from dataset import (
    DATASETS,
    VALID_SIZE,
    DataError,
    batches,
    evaluation_data,
    load_labelled,
    to_unit,
)
from model import (
    CLASSES,
    D_IRANGE,
    DROPOUT,
    FOLDER,
    G_IRANGE,
    IMAGE_SIZE,
    Z_DIM,
    Discriminator,
    Generator,
    grid_inputs,
    init_output_bias,
    init_weights,
    one_hot,
    sample,
    sample_z,
)

PER_ROW = 10  # the fixed grid: 10 rows (digits 0 to 9) of 10 samples, one z per column
SAMPLES_PER_CLASS = 1000  # §4.1: "1000 samples were drawn from each 10 class"
# GAN paper §5, official code parzen_ll.py: sigma is chosen from numpy.logspace(-1, 0, 10)
SIGMAS = tuple(10 ** np.linspace(-1, 0, 10))
# what --resume may change besides the length and the intervals, and --evaluate besides --seed
RESUMABLE = {"epochs", "evaluate_at_end", "select_every"}
EVALUABLE = {"sampling_dropout", "parzen_per_class", "parzen_valid"}


def learning_rate(step, args):
    """§4.1: lr 0.1 "exponentially decreased down to .000001 with decay factor of 1.00004" per
    step (official GAN code: pylearn2's ExponentialDecay divides the lr by it after each update)."""
    return max(args.lr / args.lr_decay**step, args.min_lr)


def momentum(epoch, args):
    """§4.1: momentum "with initial value of .5 which was increased up to 0.7"; the paper gives no
    schedule, so it follows the GAN's (official GAN code, MomentumAdjustor start 1, saturate 250):
    linear in the epoch, 0.5 in the first epoch (epoch 0), 0.7 from epoch 249 (the 250th) on, set
    once per epoch."""
    alpha = min(epoch / (args.momentum_saturate - 1), 1.0) if args.momentum_saturate > 1 else 1.0
    return args.momentum + (args.final_momentum - args.momentum) * alpha


def bce(logits, target):
    """-log D (target 1) or -log(1 - D) (target 0), D = sigmoid(logits), a minibatch mean."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_step(G, D, opt_D, x, y, z):
    """Alg. 1, D's update, conditioned (Eq. 2): ascend log D(x|y) + log(1 - D(G(z|y)|y)). The fakes
    carry the minibatch's labels y, so their labels follow the data's p(y). G is held fixed: its
    output carries no graph."""
    with torch.no_grad():
        fake = G(z, y)
    real_logits, fake_logits = D(x, y), D(fake, y)
    loss = bce(real_logits, 1) + bce(fake_logits, 0)
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    D_x, D_G_z = (torch.sigmoid(logits.detach()).mean() for logits in (real_logits, fake_logits))
    return loss.detach(), D_x, D_G_z


def generator_step(G, D, opt_G, z, y):
    """Alg. 1, G's update in the non-saturating form (GAN paper §3): ascend log D(G(z|y)|y). D is
    held fixed."""
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    loss = bce(D(G(z, y), y), 1)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


@torch.no_grad()
def parzen_log_likelihoods(x, samples, sigmas, chunk=1000):
    """GAN paper §5: log p(x) in nats under a Gaussian Parzen window, one row per sigma, one column
    per point: p(x) = 1/N sum_i N(x; samples_i, sigma^2 I), so
    log p(x) = logsumexp_i(-|x - samples_i|^2 / (2 sigma^2)) - log N - d log(sigma sqrt(2 pi)).
    A chunk's squared distances to all samples are one float64 matrix product, shared by every
    sigma: in float32 (or TF32) the expansion |x|^2 + |s|^2 - 2 x.s loses the small distances a
    narrow window scores."""
    x, samples = x.flatten(1).double(), samples.flatten(1).double()
    n, d = samples.shape
    samples_sq = samples.square().sum(1)
    out = []
    for part in x.split(chunk):
        distances = part.square().sum(1, keepdim=True) + samples_sq - 2 * part @ samples.T
        distances.clamp_min_(0)
        out.append(torch.stack([torch.logsumexp(distances / (-2 * s * s), 1) for s in sigmas]))
    log_norm = [math.log(n) + d * math.log(s * math.sqrt(2 * math.pi)) for s in sigmas]
    return torch.cat(out, 1) - torch.tensor(log_norm, dtype=torch.float64, device=x.device)[:, None]


def choose_sigma(valid_log_likelihoods, sigmas=SIGMAS):
    """GAN paper §5: "The sigma parameter of the Gaussians was obtained by cross validation on the
    validation set": of the rows (one per sigma) of the validation images' log-likelihoods, the
    sigma whose mean is highest (official code, parzen_ll.py)."""
    return sigmas[valid_log_likelihoods.mean(1).argmax().item()]


def mean_and_stderr(log_p):
    """Table 1: the mean over the test images and its standard error, std / sqrt(n) with numpy's
    default ddof = 0 (official code, parzen_ll.py: ll.std() / numpy.sqrt(n))."""
    return log_p.mean().item(), log_p.std(unbiased=False).item() / math.sqrt(len(log_p))


def draw_samples(G, args, device):
    """§4.1: "1000 samples were drawn from each 10 class", z (and G's dropout masks) seeded by
    --seed."""
    labels = torch.arange(CLASSES, device=device).repeat_interleave(SAMPLES_PER_CLASS)
    with support.rng_untouched(device, args.seed):
        z = sample_z(len(labels), args.z_dim, device)
        return sample(G, z, labels, args.sampling_dropout), labels


def log_likelihoods(x, labels, samples, sample_labels, sigmas, per_class):
    """§4.1: "a Gaussian Parzen window was fitted to these samples": one window on all 10,000
    samples, log p(x), the quantity Table 1 compares with the GAN's. per_class: each point under
    its own class's window, log p(x|y)."""
    if not per_class:
        return parzen_log_likelihoods(x, samples, sigmas)
    out = torch.empty(len(sigmas), len(x), dtype=torch.float64, device=x.device)
    for c in labels.unique():
        mine = labels == c
        out[:, mine] = parzen_log_likelihoods(x[mine], samples[sample_labels == c], sigmas)
    return out


def parzen_estimate(G, valid, points, args, device):
    """Table 1's protocol (official GAN code, parzen_ll.py): sigma chosen on the first
    --parzen-valid validation images, then the mean and standard error of the log-likelihood of
    `points` (the test set; the validation split for --select-every), and sigma. valid and points
    are pairs (images in [0, 1], labels)."""
    samples, sample_labels = draw_samples(G, args, device)
    valid_x, valid_y = valid[0][: args.parzen_valid], valid[1][: args.parzen_valid]
    per_class = args.parzen_per_class
    valid_p = log_likelihoods(valid_x, valid_y, samples, sample_labels, SIGMAS, per_class)
    sigma = choose_sigma(valid_p)
    log_p = log_likelihoods(*points, samples, sample_labels, [sigma], per_class)[0]
    return (*mean_and_stderr(log_p), sigma)


def main(argv=None):
    parser = build_parser()
    args, checkpoint = support.parse_args(parser, argv, FOLDER, check_args, RESUMABLE, EVALUABLE)
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    # --precision (support.PRECISION): fp32 is strict float32, the papers' arithmetic
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    torch.backends.cudnn.allow_tf32 = args.precision == "tf32"
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
    if args.evaluate:
        return evaluate(args, checkpoint, device)
    try:
        images, labels = load_labelled(args.dataset, args.data_root, "train", args.valid_size)
        data = batches(images, labels, args.batch_size, device, args.seed)
        valid, test = None, None
        if args.select_every or args.evaluate_at_end:
            valid, test = evaluation_data(args.dataset, args.data_root, args.valid_size, device)
    except DataError as error:
        support.fail(error)

    G = Generator(args.z_dim, CLASSES, args.dropout).to(device)
    D = Discriminator(CLASSES, args.dropout).to(device)
    init_weights(G, G_IRANGE)
    init_weights(D, D_IRANGE)
    init_output_bias(G, to_unit(images).mean(0).to(device))
    if args.compile:
        G.compile()
        D.compile()
    # §4.1: "stochastic gradient decent" with momentum; lr and momentum are set at every step below
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    fixed_z, fixed_labels = grid_inputs(PER_ROW, args.z_dim, device)

    def grid(z):
        # with G's dropout on, the same masks in every grid
        with support.rng_untouched(device, args.seed):
            images = sample(G, z, fixed_labels, args.sampling_dropout)
        return vutils.make_grid(images, nrow=PER_ROW, padding=2)

    def validation_metric():
        """--select-every, §4.1's stopping point: the validation split's Parzen log-likelihood."""
        mean, _, sigma = parzen_estimate(G, valid, valid, args, device)
        return {"metrics/parzen_valid": mean, "metrics/parzen_valid_sigma": sigma}, mean

    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z,
        total=args.epochs * data.per_epoch,
        title=f"CGAN on {args.dataset} ({len(images)} training images, {args.valid_size} kept for "
        f"validation, 28x28, {data.per_epoch} steps per epoch)",
        grid=grid,
        folder=FOLDER,
        metric=validation_metric,
        eval_every=args.select_every * data.per_epoch,
        d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", 0)),
    )

    while run.running():
        # a minibatch of m examples x with their labels, and §4.1's one-hot y
        x, labels = next(data)
        y = one_hot(labels)
        # §4.1: lr divided by 1.00004 after every step; momentum rising with the epoch
        lr, mu = learning_rate(run.step, args), momentum(data.epoch, args)
        for group in [*opt_D.param_groups, *opt_G.param_groups]:
            group["lr"], group["momentum"] = lr, mu
        # D's update on (x, y) and m noise samples z with the same labels
        z = sample_z(len(x), args.z_dim, device)
        with autocast:
            loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, y, z)
        # G's update on a fresh minibatch of m noise samples z
        z = sample_z(len(x), args.z_dim, device)
        with autocast:
            loss_G = generator_step(G, D, opt_G, z, y)
        scalars = {"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z}
        run.end_step(scalars, also_log=lambda: {"lr": lr, "momentum": mu})

    if run.stopped_by is None and args.evaluate_at_end:
        # --evaluate-at-end: the test estimate of best.pt (of last.pt without --select-every)
        if run.best is not None:
            best = support.read_checkpoint(run.out / "checkpoints" / "best.pt", FOLDER)
            G.load_state_dict(best["G"])
            score, step = run.best["score"], run.best["step"]
            print(f"best validation log-likelihood {score:.2f} at step {step}: evaluating best.pt")
        mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
        run.log({"parzen/log_likelihood": mean, "parzen/sigma": sigma})
        print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4g})")
    return run.finish()


def evaluate(args, checkpoint, device):
    """python train.py --evaluate RUN: the Parzen-window log-likelihood of the test set, printed
    and written into the run folder's metrics.json under the checkpoint's name (best or last)."""
    try:
        valid, test = evaluation_data(args.dataset, args.data_root, args.valid_size, device)
    except DataError as error:
        support.fail(error)
    G = Generator(args.z_dim, CLASSES, args.dropout).to(device)
    G.load_state_dict(checkpoint["G"])
    mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
    path, best = support.checkpoint_path(args.evaluate, "auto"), checkpoint["best"]
    selected = f", selected on validation (log-likelihood {best['score']:.2f})" if best else ""
    dropout = "on" if args.sampling_dropout else "off"
    window = "one window per class" if args.parzen_per_class else "one window"
    print(f"{path}: step {checkpoint['step']}{selected}; {len(test[0])} test images; ", end="")
    print(f"{SAMPLES_PER_CLASS} samples per class, G's dropout {dropout}, {window}")
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4g})")
    # metrics.json: the number, how it was measured, and the protocol's settings
    record = support.record(FOLDER, path, checkpoint, args, device)
    record.update(parzen_log_likelihood=mean, stderr=stderr, sigma=float(sigma))
    record.update(samples_per_class=SAMPLES_PER_CLASS, sampling_dropout=args.sampling_dropout)
    record.update(parzen_per_class=args.parzen_per_class, parzen_valid=args.parzen_valid)
    support.merge_metrics(args.out, {path.stem: record})
    return 0


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="§4.1: MNIST and labels")
    p.add_argument("--data-root", default=str(support.DATA_ROOT), help="where data sets live")
    p.add_argument("--image-size", type=int, default=IMAGE_SIZE, choices=[IMAGE_SIZE], help=SIZE)
    # the paper's hyperparameters and their sources (the official GAN code where §4.1 is silent)
    for name, kind, default, source in (
        ("--valid-size", int, VALID_SIZE, "validation split; official GAN code: train[50000:]"),
        ("--batch-size", int, 100, "§4.1: mini-batches of size 100"),
        ("--lr", float, 0.1, "§4.1: initial learning rate 0.1"),
        ("--lr-decay", float, 1.00004, "§4.1: the lr is divided by this after every step"),
        ("--min-lr", float, 1e-6, "§4.1: exponentially decreased down to .000001"),
        ("--momentum", float, 0.5, "§4.1: initial momentum .5"),
        ("--final-momentum", float, 0.7, "§4.1: momentum increased up to 0.7"),
        ("--momentum-saturate", int, 250, MOMENTUM_SATURATE),
        ("--dropout", float, DROPOUT, "§4.1: dropout 0.5 in G and in D"),
        ("--z-dim", int, Z_DIM, "§4.1: z of dimensionality 100"),
        ("--epochs", int, 576, EPOCHS),
        ("--parzen-valid", int, 1000, "validation images that pick sigma; official: limit_size"),
    ):
        p.add_argument(name, type=kind, default=default, help=source)
    support.add_run_flags(p)
    p.add_argument("--select-every", type=int, default=5, metavar="EPOCHS", help=SELECT_EVERY)
    p.add_argument("--evaluate", metavar="RUN_OR_CHECKPOINT", help=EVALUATE)
    p.add_argument("--evaluate-at-end", action="store_true", help="the same when training ends")
    p.add_argument("--sampling-dropout", action=support.ON_OFF, default=True, help=SAMPLING)
    p.add_argument("--parzen-per-class", action="store_true", help=PER_CLASS)
    return p


SIZE = "§4.1: 784-dimensional (28x28) samples, the only size of the paper's networks"
MOMENTUM_SATURATE = "epochs for momentum to reach its final value; official GAN code: saturate 250"
EPOCHS = "none in the paper (it stops at the best validation estimate): lr reaches 1e-6 at 576"
SELECT_EVERY = (
    "every EPOCHS epochs, log the validation split's Parzen log-likelihood and keep the best "
    "weights as checkpoints/best.pt; §4.1: the best validation estimate is the stopping point "
    "(0: off)"
)
EVALUATE = (
    "print the test set's Parzen log-likelihood (Table 1) under a run's best.pt (else last.pt) or "
    "a checkpoint, write it into the run folder's metrics.json, and exit"
)
SAMPLING = (
    "samples (grids, Parzen window) with G's dropout on, as D saw them in training; the GAN paper "
    "(§5) treats such dropout as G's noise, and the official GAN code's IntrinsicDropoutGenerator "
    "keeps it on when sampling. --no-sampling-dropout: eval mode"
)
PER_CLASS = (
    "score each image under its own class's 1,000 samples, log p(x|y); default: §4.1's one "
    "window fitted to all 10,000 samples, log p(x), as in Table 1"
)


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    counts = ("batch_size", "z_dim", "epochs", "valid_size", "momentum_saturate", "parzen_valid")
    support.require_at_least(parser, args, 1, *counts)
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or epochs, got {args.select_every}")
    support.require_positive(parser, args, "lr")
    if not 0 < args.min_lr <= args.lr:
        parser.error(f"--min-lr must be positive and at most --lr, got {args.min_lr}")
    if not 1 <= args.lr_decay < math.inf:
        parser.error(f"--lr-decay divides the lr and must be at least 1, got {args.lr_decay}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        momenta = f"{args.momentum} and {args.final_momentum}"
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {momenta}")
    if not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
