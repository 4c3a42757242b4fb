"""Generative Adversarial Nets (Goodfellow et al. 2014, arXiv 1406.2661): Algorithm 1 on MNIST.

Algorithm 1, with the settings of the paper's MNIST experiment (§5, official code mnist.yaml):
    for each training iteration:
        for k steps (k = 1):
            sample a minibatch of m noise samples z ~ U(-sqrt 3, sqrt 3)^100 and m examples x
            update D by ascending its stochastic gradient of  log D(x) + log(1 - D(G(z)))
        sample a minibatch of m noise samples z
        update G by ascending  log D(G(z))   (§3: instead of descending log(1 - D(G(z))))
with SGD: m = 100, lr 0.1 divided by 1.000004 every minibatch down to 1e-6, momentum 0.5 rising
to 0.7 by epoch 250. The paper's metric (§5, Table 1): the Parzen-window log-likelihood of the
test set.

    python train.py                                  # MNIST, the paper's settings, until stopped
    python train.py --resume runs/RUN                # continue a run exactly where it stopped
    python train.py --evaluate runs/RUN              # Parzen log-likelihood of the MNIST test set
"""

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.utils as vutils

import support
from dataset import DATASETS, DataError, batches, evaluation_images, load_images, pixel_means
from model import (
    D_WIDTH,
    FOLDER,
    G_WIDTH,
    Z_DIM,
    Discriminator,
    Generator,
    init_discriminator,
    init_generator,
    sample,
    sample_z,
)

GRID = 100  # fixed-noise samples in each grid (10 x 10)
# GAN paper §5, official code parzen_ll.py: sigma is chosen from numpy.logspace(-1, 0, 10)
SIGMAS = tuple(10 ** np.linspace(-1, 0, 10))
# what --resume may change besides the length and the intervals, and --evaluate besides --seed
RESUMABLE = {"epochs", "evaluate_at_end", "select_every", "parzen_samples", "parzen_valid"}
EVALUABLE = {"parzen_samples", "parzen_valid"}


def learning_rate(step, lr=0.1, decay=1.000004, lr_min=1e-6):
    """Official code, mnist.yaml, ExponentialDecay: iteration `step` (0, 1, ...) updates with
    lr / decay^step, never less than lr_min, reached at step 2,878,238 (epoch 5,756)."""
    return max(lr / decay**step, lr_min)


def momentum_at(epoch, initial=0.5, final=0.7, saturate=250):
    """Official code, mnist.yaml, MomentumAdjustor(start 1, saturate 250): linear in the epoch, from
    `initial` in the first epoch (epoch 0) to `final` in epoch saturate - 1 (the 250th) on."""
    alpha = 1.0 if epoch + 1 >= saturate else epoch / (saturate - 1)
    return initial + (final - initial) * alpha


def bce(logits, target):
    """-log D (target 1) or -log(1 - D) (target 0), D = sigmoid(logits), a minibatch mean."""
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def discriminator_step(G, D, opt_D, x, z, scale=1.0):
    """Alg. 1, D's update: ascend log D(x) + log(1 - D(G(z))), times `scale` (1 in Alg. 1, 0.5 in
    the official code). G is held fixed: its output carries no graph."""
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    loss = scale * (bce(real_logits, 1) + bce(fake_logits, 0))
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    D_x, D_G_z = (torch.sigmoid(logits.detach()).mean() for logits in (real_logits, fake_logits))
    return loss.detach(), D_x, D_G_z


def generator_step(G, D, opt_G, z):
    """Alg. 1, G's update, in the non-saturating form of §3: ascend log D(G(z)). D is held fixed;
    it keeps its dropout, as in the official code, where G's objective uses D's dropout pass."""
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    loss = bce(D(G(z)), 1)
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def simultaneous_step(G, D, opt_G, opt_D, x, z, scale=1.0):
    """--simultaneous, the official code's update (AdversaryCost2.get_gradients): one forward pass,
    one set of D's dropout masks; D's gradient of its objective and G's of log D(G(z)) are both
    taken at the current weights, then one SGD step applies both."""
    real_logits, fake_logits = D(x), D(G(z))
    loss_D = scale * (bce(real_logits, 1) + bce(fake_logits, 0))
    loss_G = bce(fake_logits, 1)
    # each objective is differentiated only with respect to its own player's weights
    grads_G = torch.autograd.grad(loss_G, list(G.parameters()), retain_graph=True)
    grads_D = torch.autograd.grad(loss_D, list(D.parameters()))
    for params, grads in ((G.parameters(), grads_G), (D.parameters(), grads_D)):
        for param, grad in zip(params, grads):
            param.grad = grad
    opt_D.step()
    opt_G.step()
    D_x, D_G_z = (torch.sigmoid(logits.detach()).mean() for logits in (real_logits, fake_logits))
    return loss_D.detach(), D_x, D_G_z, loss_G.detach()


@torch.no_grad()
def parzen_log_likelihoods(x, samples, sigmas, chunk=1000):
    """§5: log p(x) in nats under a Gaussian Parzen window, one row per sigma, one column per point:
    p(x) = 1/N sum_i N(x; samples_i, sigma^2 I), so
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
    """§5: "The sigma parameter of the Gaussians was obtained by cross validation on the validation
    set": of the rows (one per sigma) of the validation images' log-likelihoods, the sigma whose
    mean is highest (official code, parzen_ll.py)."""
    return sigmas[valid_log_likelihoods.mean(1).argmax().item()]


def mean_and_stderr(log_p):
    """Table 1: the mean over the test images and its standard error, std / sqrt(n) with numpy's
    default ddof = 0 (official code, parzen_ll.py: ll.std() / numpy.sqrt(n))."""
    return log_p.mean().item(), log_p.std(unbiased=False).item() / math.sqrt(len(log_p))


def parzen_estimate(G, valid, points, args, device):
    """Table 1's protocol (official code, parzen_ll.py): --parzen-samples samples of G (z seeded by
    --seed), sigma chosen on the first --parzen-valid validation images, then the mean and standard
    error of the log-likelihood of `points` (the test set; the validation split for
    --select-every), and sigma."""
    with support.rng_untouched(device, args.seed):
        samples = sample(G, sample_z(args.parzen_samples, args.z_dim, device))
    sigma = choose_sigma(parzen_log_likelihoods(valid[: args.parzen_valid], samples, SIGMAS))
    return (*mean_and_stderr(parzen_log_likelihoods(points, samples, [sigma])[0]), sigma)


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
        images = load_images(args.dataset, args.data_root, "train")
        data = batches(images, args.batch_size, device, args.seed)
        valid, test = None, None
        if args.select_every or args.evaluate_at_end:
            valid, test = evaluation_images(args.dataset, args.data_root, device)
    except DataError as error:
        support.fail(error)

    G = Generator(args.z_dim, args.g_width).to(device)
    D = Discriminator(args.d_width).to(device)
    init_generator(G, pixel_means(images).to(device))
    init_discriminator(D)
    if args.compile:
        G.compile()
        D.compile()
    # official code, mnist.yaml: SGD with momentum for both; lr and momentum set every iteration
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    per_epoch, scale = data.per_epoch / args.k, args.d_loss_scale

    def validation_metric():
        """--select-every: the validation split's Parzen log-likelihood (higher is better)."""
        mean, _, sigma = parzen_estimate(G, valid, valid, args, device)
        return {"metrics/parzen_valid": mean, "metrics/parzen_valid_sigma": sigma}, mean

    run = support.Run(
        args,
        checkpoint,
        {"G": G, "D": D},
        {"opt_G": opt_G, "opt_D": opt_D},
        data,
        fixed_z=sample_z(GRID, args.z_dim, device),
        total=None if args.epochs is None else int(args.epochs * per_epoch),
        title=f"simpleGAN on {args.dataset} ({len(images)} training images, 28x28, "
        f"{per_epoch:g} steps per epoch)",
        grid=lambda z: vutils.make_grid(sample(G, z), nrow=10, padding=2),
        folder=FOLDER,
        metric=validation_metric,
        eval_every=round(args.select_every * per_epoch),
        d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", 0)),
    )

    while run.running():
        # official code: lr divided by 1.000004 every minibatch; momentum 0.5 -> 0.7 in 250 epochs
        lr = learning_rate(run.step, args.lr, args.lr_decay, args.lr_min)
        epoch = run.step * args.k // data.per_epoch
        momentum = momentum_at(epoch, args.momentum, args.final_momentum, args.momentum_saturate)
        for group in [*opt_D.param_groups, *opt_G.param_groups]:
            group["lr"], group["momentum"] = lr, momentum
        if args.simultaneous:
            # --simultaneous: the official code's single step on both players
            x = next(data)
            z = sample_z(len(x), args.z_dim, device)
            with autocast:
                loss_D, D_x, D_G_z, loss_G = simultaneous_step(G, D, opt_G, opt_D, x, z, scale)
        else:
            for _ in range(args.k):
                # Alg. 1: for k steps, m examples x and m noise samples z, then D's update
                x = next(data)
                z = sample_z(len(x), args.z_dim, device)
                with autocast:
                    loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, z, scale)
            # Alg. 1: a fresh minibatch of m noise samples z, then G's update
            z = sample_z(len(x), args.z_dim, device)
            with autocast:
                loss_G = generator_step(G, D, opt_G, z)
        scalars = {"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z}
        run.end_step(scalars, also_log=lambda: {"lr": lr, "momentum": momentum})

    if run.stopped_by is None and args.evaluate_at_end:
        # --evaluate-at-end: the test estimate of best.pt (of last.pt without --select-every)
        if run.best is not None:
            best = support.read_checkpoint(run.out / "checkpoints" / "best.pt", FOLDER)
            G.load_state_dict(best["G"])
            score, step = run.best["score"], run.best["step"]
            print(f"best validation log-likelihood {score:.2f} at step {step}: evaluating best.pt")
        mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
        run.log({"parzen/log_likelihood": mean, "parzen/sigma": sigma})
        print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})")
    return run.finish()


def evaluate(args, checkpoint, device):
    """python train.py --evaluate RUN: Table 1's number for a trained G, printed and written into
    the run folder's metrics.json under the checkpoint's name ("best" or "last")."""
    try:
        valid, test = evaluation_images(args.dataset, args.data_root, device)
    except DataError as error:
        support.fail(error)
    G = Generator(args.z_dim, args.g_width).to(device)
    G.load_state_dict(checkpoint["G"])
    path = support.checkpoint_path(args.evaluate, "auto")
    print(f"{path}: step {checkpoint['step']}")
    mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})")
    # metrics.json: the number, how it was measured (28x28: this folder has no --image-size), and
    # the protocol's settings
    record = {**support.record(FOLDER, path, checkpoint, args, device), "image_size": 28}
    record.update(parzen_log_likelihood=mean, stderr=stderr, sigma=float(sigma))
    record.update(parzen_samples=args.parzen_samples, parzen_valid=args.parzen_valid)
    support.merge_metrics(args.out, {path.stem: record})
    return 0


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="§5: MNIST")
    p.add_argument("--data-root", default=str(support.DATA_ROOT), help="where data sets live")
    # the paper's hyperparameters and their sources; mnist.yaml is the official code's
    for name, kind, default, source in (
        ("--batch-size", int, 100, "official code, mnist.yaml: batch_size 100"),
        ("--k", int, 1, "D steps per G step; Alg. 1: 'We used k = 1, the least expensive option'"),
        ("--d-loss-scale", float, 1.0, "D's objective times this: Alg. 1: 1, official code: 0.5"),
        ("--lr", float, 0.1, "official code, mnist.yaml: SGD learning_rate .1"),
        (
            "--lr-decay",
            float,
            1.000004,
            "divides lr every Alg. 1 iteration; official: decay_factor",
        ),
        ("--lr-min", float, 1e-6, "official code, mnist.yaml: ExponentialDecay min_lr"),
        ("--momentum", float, 0.5, "official code, mnist.yaml: init_momentum .5"),
        ("--final-momentum", float, 0.7, "official code, mnist.yaml: final_momentum .7"),
        ("--momentum-saturate", int, 250, "epoch of --final-momentum; official code: saturate 250"),
        ("--z-dim", int, Z_DIM, "official code, mnist.yaml: 100-dimensional z"),
        ("--g-width", int, G_WIDTH, "G's two ReLU layers; official code: 1200"),
        ("--d-width", int, D_WIDTH, "D's two maxout layers (5 pieces); official code: 240"),
        ("--epochs", int, None, "epochs of train[0:50000]; default: until stopped (official code)"),
        ("--parzen-samples", int, 10000, "G's samples in the window; official code, parzen_ll.py"),
        ("--parzen-valid", int, 1000, "validation images that pick sigma; official: limit_size"),
    ):
        p.add_argument(name, type=kind, default=default, help=source)
    p.add_argument("--simultaneous", action="store_true", help=SIMULTANEOUS)
    saves = {"checkpoint_every": "official code: save_freq 1 epoch = 500 steps"}
    support.add_run_flags(p, sources=saves)
    p.add_argument("--select-every", type=int, default=0, metavar="EPOCHS", help=SELECT_EVERY)
    p.add_argument("--evaluate", metavar="RUN_OR_CHECKPOINT", help=EVALUATE)
    p.add_argument("--evaluate-at-end", action="store_true", help="the same after training")
    return p


SIMULTANEOUS = "D and G in one SGD step, as the official code's AdversaryCost2 (Alg. 1 alternates)"
SELECT_EVERY = (
    "validation estimate every EPOCHS epochs, the best as best.pt (0: off, official code)"
)
EVALUATE = (
    "print the test set's Parzen log-likelihood (Table 1) under a run's best.pt (else last.pt) or "
    "a checkpoint, write it into the run folder's metrics.json, and exit"
)


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    counts = ("batch_size", "k", "z_dim", "g_width", "d_width", "momentum_saturate", "epochs")
    support.require_at_least(parser, args, 1, *counts, "parzen_samples", "parzen_valid")
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or epochs, got {args.select_every}")
    support.require_positive(parser, args, "lr", "d_loss_scale")
    if args.simultaneous and args.k != 1:
        parser.error(f"--simultaneous is one step on D and G: it needs --k 1, got --k {args.k}")
    if not 1 <= args.lr_decay < math.inf:
        parser.error(f"--lr-decay divides the lr and must be at least 1, got {args.lr_decay}")
    if not 0 <= args.lr_min <= args.lr:
        parser.error(f"--lr-min must lie in [0, --lr], got {args.lr_min}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        momenta = f"{args.momentum} and {args.final_momentum}"
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {momenta}")


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
