"""Generative Adversarial Nets (Goodfellow et al. 2014, arXiv 1406.2661): Algorithm 1 on MNIST.

Algorithm 1, with the settings of the paper's MNIST experiment (§5, official code mnist.yaml):
    for each training iteration:
        for k steps (k = 1):
            sample a minibatch of m noise samples z ~ U(-sqrt 3, sqrt 3)^100 and m examples x
            update D by ascending its stochastic gradient of  log D(x) + log(1 - D(G(z)))
        sample a minibatch of m noise samples z
        update G by ascending  log D(G(z))   (§3's non-saturating form of descending log(1 - D(G(z))))
with SGD: m = 100, lr 0.1 divided by 1.000004 every minibatch down to 1e-6, momentum 0.5 rising to 0.7
by epoch 250. The paper's metric (§5, Table 1) is the Parzen-window log-likelihood of the test set.

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
from dataset import DATASETS, DataError, batches, load_images, pixel_means, to_unit_range
from model import (D_WIDTH, FOLDER, G_WIDTH, Z_DIM, Discriminator, Generator, init_discriminator, init_generator,
                   sample, sample_z)

GRID = 100  # fixed-noise samples in each grid (10 x 10)
# GAN paper §5, official code parzen_ll.py: sigma is chosen from numpy.logspace(-1, 0, 10)
SIGMAS = tuple(10 ** np.linspace(-1, 0, 10))


def learning_rate(step, lr=0.1, decay=1.000004, lr_min=1e-6):
    """Official code, mnist.yaml, ExponentialDecay: iteration `step` (0, 1, ...) updates with lr / decay^step,
    never less than lr_min, which the defaults reach at step 2,878,238 (epoch 5,756)."""
    return max(lr / decay ** step, lr_min)


def momentum_at(epoch, initial=0.5, final=0.7, saturate=250):
    """Official code, mnist.yaml, MomentumAdjustor(start 1, saturate 250): linear in the epoch, from `initial`
    in the first epoch (epoch 0) to `final` in epoch saturate - 1 (the 250th) and every one after it."""
    alpha = 1.0 if epoch + 1 >= saturate else epoch / (saturate - 1)
    return initial + (final - initial) * alpha


def discriminator_step(G, D, opt_D, x, z, scale=1.0):
    """Alg. 1, D's update: ascend log D(x) + log(1 - D(G(z))), times `scale` (1 in Alg. 1, 0.5 in the
    official code). G is held fixed: its output carries no graph."""
    with torch.no_grad():
        fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    loss = scale * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                    + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    opt_D.zero_grad(set_to_none=True)
    loss.backward()
    opt_D.step()
    return loss.detach(), torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean()


def generator_step(G, D, opt_G, z):
    """Alg. 1, G's update, in the non-saturating form of §3: ascend log D(G(z)). D is held fixed.

    D keeps its dropout here, as in the official code, where G's objective uses the dropout pass of D.
    """
    D.requires_grad_(False)  # D is only a function here: no gradient is computed for its weights
    logits = D(G(z))
    loss = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    opt_G.zero_grad(set_to_none=True)
    loss.backward()
    opt_G.step()
    D.requires_grad_(True)
    return loss.detach()


def simultaneous_step(G, D, opt_G, opt_D, x, z, scale=1.0):
    """--simultaneous, the official code's update (AdversaryCost2.get_gradients): one forward pass, one set of
    D's dropout masks; D's gradient of its objective and G's gradient of log D(G(z)) are both taken at the
    current weights, then one SGD step applies both."""
    real_logits, fake_logits = D(x), D(G(z))
    loss_D = scale * (F.binary_cross_entropy_with_logits(real_logits, torch.ones_like(real_logits))
                      + F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits)))
    loss_G = F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))
    # each objective is differentiated only with respect to its own player's weights
    grads_G = torch.autograd.grad(loss_G, list(G.parameters()), retain_graph=True)
    grads_D = torch.autograd.grad(loss_D, list(D.parameters()))
    for params, grads in ((G.parameters(), grads_G), (D.parameters(), grads_D)):
        for param, grad in zip(params, grads):
            param.grad = grad
    opt_D.step()
    opt_G.step()
    return (loss_D.detach(), torch.sigmoid(real_logits.detach()).mean(), torch.sigmoid(fake_logits.detach()).mean(),
            loss_G.detach())


@torch.no_grad()
def parzen_log_likelihoods(x, samples, sigmas, chunk=1000):
    """§5: log p(x) in nats under a Gaussian Parzen window, one row per sigma, one column per point:
    p(x) = 1/N sum_i N(x; samples_i, sigma^2 I), so
    log p(x) = logsumexp_i(-|x - samples_i|^2 / (2 sigma^2)) - log N - d log(sigma sqrt(2 pi)).
    The squared distances of a chunk of x to all samples are one float64 matrix product, shared by every sigma:
    in float32 (or TF32 on a GPU) the expansion |x|^2 + |s|^2 - 2 x.s loses the small distances a narrow window
    scores."""
    x, samples = x.flatten(1).double(), samples.flatten(1).double()
    n, d = samples.shape
    samples_sq = samples.square().sum(1)
    out = []
    for part in x.split(chunk):
        distances = (part.square().sum(1, keepdim=True) + samples_sq - 2 * part @ samples.T).clamp_min_(0)
        out.append(torch.stack([torch.logsumexp(distances / (-2 * s * s), 1) for s in sigmas]))
    log_norm = torch.tensor([math.log(n) + d * math.log(s * math.sqrt(2 * math.pi)) for s in sigmas],
                            dtype=torch.float64, device=x.device)
    return torch.cat(out, 1) - log_norm[:, None]


def choose_sigma(valid_log_likelihoods, sigmas=SIGMAS):
    """§5: "The sigma parameter of the Gaussians was obtained by cross validation on the validation set": of
    the rows (one per sigma) of the validation images' log-likelihoods, the sigma whose mean is highest
    (official code, parzen_ll.py)."""
    return sigmas[valid_log_likelihoods.mean(1).argmax().item()]


def mean_and_stderr(log_p):
    """Table 1: the mean over the test images and its standard error, std / sqrt(n) with numpy's default
    ddof = 0 (official code, parzen_ll.py: ll.std() / numpy.sqrt(n))."""
    return log_p.mean().item(), log_p.std(unbiased=False).item() / math.sqrt(len(log_p))


def parzen_estimate(G, valid, points, args, device):
    """Table 1's protocol (official code, parzen_ll.py): --parzen-samples samples of G (z seeded by --seed),
    sigma chosen on the first --parzen-valid validation images, then the mean and standard error of the
    log-likelihood of `points` (the test set; the validation split for --select-every), and sigma."""
    with support.rng_untouched(device, args.seed):
        samples = sample(G, sample_z(args.parzen_samples, args.z_dim, device))
    sigma = choose_sigma(parzen_log_likelihoods(valid[:args.parzen_valid], samples, SIGMAS))
    return (*mean_and_stderr(parzen_log_likelihoods(points, samples, [sigma])[0]), sigma)


def main(argv=None):
    args, checkpoint = support.parse_args(build_parser(), argv, FOLDER, check_args,
                                          resumable={"epochs", "evaluate_at_end", "select_every", "parzen_samples",
                                                     "parzen_valid"},
                                          evaluable={"parzen_samples", "parzen_valid"})
    device = support.pick_device(args)
    support.seed_everything(args.seed)
    if args.evaluate:
        return evaluate(args, checkpoint, device)
    try:
        images = load_images(args.dataset, args.data_root, "train")
        data = batches(images, args.batch_size, device, args.seed)
        valid, test = evaluation_images(args, device) if args.select_every or args.evaluate_at_end else (None, None)
    except DataError as error:
        support.fail(error)

    G = Generator(args.z_dim, args.g_width).to(device)
    D = Discriminator(args.d_width).to(device)
    init_generator(G, pixel_means(images).to(device))
    init_discriminator(D)
    # official code, mnist.yaml: SGD with momentum for both networks; lr and momentum are set every iteration
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)
    steps_per_epoch = data.per_epoch / args.k

    def validation_metric():
        """--select-every: the validation split's Parzen log-likelihood (higher is better), for best.pt."""
        mean, _, sigma = parzen_estimate(G, valid, valid, args, device)
        return {"metrics/parzen_valid": mean, "metrics/parzen_valid_sigma": sigma}, mean

    run = support.Run(args, checkpoint, {"G": G, "D": D}, {"opt_G": opt_G, "opt_D": opt_D}, data,
                      fixed_z=sample_z(GRID, args.z_dim, device),
                      total=None if args.epochs is None else int(args.epochs * steps_per_epoch),
                      title=f"simpleGAN on {args.dataset} ({len(images)} training images, 28x28, "
                            f"{steps_per_epoch:g} steps per epoch)",
                      grid=lambda z: vutils.make_grid(sample(G, z), nrow=10, padding=2), folder=FOLDER,
                      metric=validation_metric, eval_every=round(args.select_every * steps_per_epoch),
                      d_wins=support.Separated(real=("D/real", 1), fake=("D/fake", 0)))

    while run.running():
        # official code: lr divided by 1.000004 every minibatch; momentum 0.5 -> 0.7 over 250 epochs
        lr = learning_rate(run.step, args.lr, args.lr_decay, args.lr_min)
        momentum = momentum_at(run.step * args.k // data.per_epoch, args.momentum, args.final_momentum,
                               args.momentum_saturate)
        for group in [*opt_D.param_groups, *opt_G.param_groups]:
            group["lr"], group["momentum"] = lr, momentum
        if args.simultaneous:
            # --simultaneous: the official code's single step on both players
            x = next(data)
            loss_D, D_x, D_G_z, loss_G = simultaneous_step(G, D, opt_G, opt_D, x, sample_z(len(x), args.z_dim, device),
                                                           args.d_loss_scale)
        else:
            for _ in range(args.k):
                # Alg. 1: for k steps, a minibatch of m examples x and m noise samples z, then D's update
                x = next(data)
                loss_D, D_x, D_G_z = discriminator_step(G, D, opt_D, x, sample_z(len(x), args.z_dim, device),
                                                        args.d_loss_scale)
            # Alg. 1: a fresh minibatch of m noise samples z, then G's update
            loss_G = generator_step(G, D, opt_G, sample_z(len(x), args.z_dim, device))
        run.end_step({"loss/D": loss_D, "loss/G": loss_G, "D/real": D_x, "D/fake": D_G_z},
                     also_log=lambda: {"lr": lr, "momentum": momentum})

    if run.stopped_by is None and args.evaluate_at_end:
        # --evaluate-at-end: the test log-likelihood of the best checkpoint (of the last one without --select-every)
        if run.best is not None:
            G.load_state_dict(support.read_checkpoint(run.out / "checkpoints" / "best.pt", FOLDER)["G"])
            print(f"best validation log-likelihood {run.best['score']:.2f} at step {run.best['step']}: "
                  f"evaluating best.pt")
        mean, stderr, sigma = parzen_estimate(G, valid, test, args, device)
        run.log({"parzen/log_likelihood": mean, "parzen/sigma": sigma})
        print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})")
    return run.finish()


def evaluate(args, checkpoint, device):
    """python train.py --evaluate RUN: Table 1's number for a trained G, printed."""
    G = Generator(args.z_dim, args.g_width)
    G.load_state_dict(checkpoint["G"])
    try:
        valid, test = evaluation_images(args, device)
    except DataError as error:
        support.fail(error)
    print(f"{support.checkpoint_path(args.evaluate, 'auto')}: step {checkpoint['step']}")
    mean, stderr, sigma = parzen_estimate(G.to(device), valid, test, args, device)
    print(f"Parzen log-likelihood: {mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})")
    return 0


def evaluation_images(args, device):
    """The validation split (train[50000:60000]) and the test set, in [0, 1], on the device."""
    return [to_unit_range(load_images(args.dataset, args.data_root, split).to(device)) for split in ("valid", "test")]


def build_parser():
    p = support.FlagParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="mnist", choices=DATASETS, help="§5: MNIST")
    p.add_argument("--data-root", default=str(support.DATA_ROOT), help="where data sets live (../data)")
    p.add_argument("--batch-size", type=int, default=100, help="official code, mnist.yaml: batch_size 100")
    p.add_argument("--k", type=int, default=1,
                   help="D steps per G step; Alg. 1: 'We used k = 1, the least expensive option'")
    p.add_argument("--d-loss-scale", type=float, default=1.0,
                   help="factor on D's objective; Alg. 1 ascends it unscaled, the official code "
                        "(AdversaryCost2: d_obj = 0.5 * (...)) halves it: --d-loss-scale 0.5")
    p.add_argument("--simultaneous", action="store_true",
                   help="update D and G in one SGD step from one forward pass, as the official code's "
                        "AdversaryCost2 does; default: Alg. 1's alternation, D first, then G against the new D")
    p.add_argument("--lr", type=float, default=0.1, help="official code, mnist.yaml: SGD learning_rate .1")
    p.add_argument("--lr-decay", type=float, default=1.000004,
                   help="lr divided by this every iteration of Alg. 1 (every minibatch at k = 1); "
                        "official code, mnist.yaml: ExponentialDecay decay_factor")
    p.add_argument("--lr-min", type=float, default=1e-6, help="official code, mnist.yaml: ExponentialDecay min_lr")
    p.add_argument("--momentum", type=float, default=0.5, help="official code, mnist.yaml: init_momentum .5")
    p.add_argument("--final-momentum", type=float, default=0.7,
                   help="official code, mnist.yaml: MomentumAdjustor final_momentum .7")
    p.add_argument("--momentum-saturate", type=int, default=250,
                   help="epoch by which momentum reaches --final-momentum; official code, mnist.yaml: saturate 250")
    p.add_argument("--z-dim", type=int, default=Z_DIM, help="official code, mnist.yaml: 100-dimensional z")
    p.add_argument("--g-width", type=int, default=G_WIDTH, help="G's two ReLU layers; official code: 1200")
    p.add_argument("--d-width", type=int, default=D_WIDTH, help="D's two maxout layers (5 pieces); official code: 240")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over train[0:50000]; default: until stopped, as the official mnist.yaml, "
                        "which sets no termination criterion (the paper names no length)")
    support.add_run_flags(p, sources={"checkpoint_every": "official code: save_freq 1 epoch = 500 steps"})
    p.add_argument("--select-every", type=int, default=0, metavar="EPOCHS",
                   help="every EPOCHS epochs, log the validation split's Parzen log-likelihood and keep the best "
                        "weights as checkpoints/best.pt (0: off; the official mnist.yaml keeps the last model, its "
                        "MonitorBasedSaveBest is commented out)")
    p.add_argument("--evaluate", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="print the Parzen log-likelihood of the test set under a trained G, and exit; a run "
                        "folder means its checkpoints/best.pt when it kept one, else its last.pt")
    p.add_argument("--evaluate-at-end", action="store_true", help="the same evaluation after training")
    p.add_argument("--parzen-samples", type=int, default=10000,
                   help="samples of G in the Parzen window; official code, parzen_ll.py: num_samples 10000")
    p.add_argument("--parzen-valid", type=int, default=1000,
                   help="validation images used to choose sigma; official code, parzen_ll.py: limit_size 1000")
    return p


def check_args(parser, args):
    """The paper's flags, each inside its domain (support.parse_args checks the run's flags)."""
    support.require_at_least(parser, args, 1, "batch_size", "k", "z_dim", "g_width", "d_width", "momentum_saturate",
                             "parzen_samples", "parzen_valid", "epochs")
    if args.select_every < 0:
        parser.error(f"--select-every must be 0 (off) or a number of epochs, got {args.select_every}")
    support.require_positive(parser, args, "lr", "d_loss_scale")
    if args.simultaneous and args.k != 1:
        parser.error(f"--simultaneous updates D and G in one step; it needs --k 1, got --k {args.k}")
    if not 1 <= args.lr_decay < math.inf:
        parser.error(f"--lr-decay divides the learning rate and must be at least 1, got {args.lr_decay}")
    if not 0 <= args.lr_min <= args.lr:
        parser.error(f"--lr-min must lie in [0, --lr], got {args.lr_min}")
    if not (0 <= args.momentum < 1 and 0 <= args.final_momentum < 1):
        parser.error(f"--momentum and --final-momentum must lie in [0, 1), got {args.momentum} and "
                     f"{args.final_momentum}")


if __name__ == "__main__":
    sys.exit(main())
