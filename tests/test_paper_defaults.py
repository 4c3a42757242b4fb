"""The folders against their papers: every hyperparameter default (all seven folders), and in the five
convolutional folders the sign and target of every loss and every place where two networks must see the same
inputs (the MLP folders' are in test_simplegan.py, test_cgan.py and test_table1.py).

- Defaults: a table per folder names the source of each hyperparameter flag's default (the paper; the
  official code where the paper is silent) and is held against `train.build_parser()`.
- Losses: one plain SGD step on tiny stand-in networks must move D's answers towards the paper's targets
  (D(x) towards "real", D(G(z)) towards "fake"), and G's step must move D's answer on the fakes towards
  G's target. Reals and fakes light different pixels of a linear D, so the real and the fake term of D's
  loss each move their own weight and each direction is seen separately.
- Shared inputs: stand-ins record what they are given; the folders' own train.main runs two generator
  steps with its step functions wrapped, and the wrappers record which networks, optimisers and inputs
  each step received.
"""
import signal

import pytest
import torch
from torch import nn

from conftest import load_folder

FOLDERS = ("DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
folders = {name: load_folder(name) for name in FOLDERS}

# Flags that manage a run, its data or its evaluation rather than set the paper's algorithm (CONVENTIONS.md's
# command line); the evaluation protocols' defaults are tested in test_metrics.py and test_table1.py.
RUN_FLAGS = {"help", "data_root", "max_steps", "device", "seed", "out", "resume", "sample_every", "log_every",
             "checkpoint_every", "evaluate", "eval_every", "precision", "compile", "data_on", "cache_dir",
             "strict_images", "eval_samples", "eval_every_samples", "eval_real", "feature_extractor",
             "inception_weights", "evaluate_at_end", "channels_last"}

# Every hyperparameter flag: (its default, the source of that default).
DEFAULTS = {
    "simpleGAN": {
        "dataset": ("mnist", "§5: MNIST"),
        "batch_size": (100, "official code: mnist.yaml batch_size 100"),
        "k": (1, "Alg. 1: 'We used k = 1, the least expensive option'"),
        "d_loss_scale": (1.0, "Alg. 1: D's objective unscaled; official code: AdversaryCost2 halves it (a flag)"),
        "simultaneous": (False, "Alg. 1 alternates D and G; official code: one simultaneous step (a flag)"),
        "lr": (0.1, "official code: mnist.yaml learning_rate .1"),
        "lr_decay": (1.000004, "official code: mnist.yaml ExponentialDecay decay_factor 1.000004"),
        "lr_min": (1e-6, "official code: mnist.yaml ExponentialDecay min_lr .000001"),
        "momentum": (0.5, "official code: mnist.yaml init_momentum .5"),
        "final_momentum": (0.7, "official code: mnist.yaml MomentumAdjustor final_momentum .7"),
        "momentum_saturate": (250, "official code: mnist.yaml MomentumAdjustor saturate 250"),
        "z_dim": (100, "official code: mnist.yaml nvis 100"),
        "g_width": (1200, "official code: mnist.yaml two RectifiedLinear layers of dim 1200"),
        "d_width": (240, "official code: mnist.yaml two Maxout layers of 240 units"),
        "epochs": (None, "until stopped: mnist.yaml sets no termination criterion, the paper no length"),
        "select_every": (0, "off: mnist.yaml keeps the last model (its MonitorBasedSaveBest is commented out)"),
        "parzen_samples": (10_000, "official code: parzen_ll.py num_samples 10000"),
        "parzen_valid": (1000, "official code: parzen_ll.py limit_size 1000"),
    },
    "CGAN": {
        "dataset": ("mnist", "§4.1: MNIST with its class labels"),
        "image_size": (28, "§4.1: 784-dimensional samples"),
        "valid_size": (10_000, "official GAN code: mnist.yaml, train[50000:60000] is the validation split"),
        "batch_size": (100, "§4.1: mini-batches of size 100"),
        "lr": (0.1, "§4.1: initial learning rate .1"),
        "lr_decay": (1.00004, "§4.1: decay factor of 1.00004"),
        "min_lr": (1e-6, "§4.1: exponentially decreased down to .000001"),
        "momentum": (0.5, "§4.1: initial momentum .5"),
        "final_momentum": (0.7, "§4.1: increased up to 0.7"),
        "momentum_saturate": (250, "not in §4.1; official GAN code: mnist.yaml MomentumAdjustor saturate 250"),
        "dropout": (0.5, "§4.1: dropout with probability 0.5 in G and D"),
        "z_dim": (100, "§4.1: noise prior of dimensionality 100"),
        "epochs": (576, "§4.1 stops at the best validation log-likelihood; 576 epochs reach the lr floor"),
        "select_every": (5, "§4.1: the best validation log-likelihood is the stopping point"),
        "sampling_dropout": (True, "G's samples as D saw them in training; GAN paper §5, IntrinsicDropoutGenerator"),
        "parzen_per_class": (False, "§4.1 / Table 1: one window fitted to all 10,000 samples, log p(x)"),
        "parzen_valid": (1000, "official GAN code: parzen_ll.py limit_size 1000"),
    },
    "DCGAN": {
        "dataset": ("cifar10", "a choice: the paper trains on LSUN, faces and ImageNet-1k; CIFAR-10 downloads"),
        "image_size": (64, "Fig. 1: 64x64 output"),
        "batch_size": (128, "§4: mini-batch size of 128"),
        "lr": (2e-4, "§4: Adam learning rate 0.0002 (0.001 too high)"),
        "beta1": (0.5, "§4: beta1 0.5 (0.9 oscillated)"),
        "beta2": (0.999, "§4 changes only beta1; official code: lib/updates.py Adam b2=0.999"),
        "weight_decay": (0.0, "not in the paper; official code's l2 = 1e-5 is a flag"),
        "z_dim": (100, "Fig. 1: 100-dimensional uniform z"),
        "width": (128, "Fig. 1: 128 channels before G's output (1024 at 4x4); official code: ngf = ndf = 128"),
        "epochs": (25, "official code: faces/train_uncond_dcgan.py niter = 25; the paper gives no length"),
        "lsun_classes": (["bedroom_train"], "§4.1: LSUN bedrooms"),
    },
    "WGAN": {
        "dataset": ("cifar10", "a choice: §4.1 trains on LSUN bedrooms; CIFAR-10 downloads"),
        "image_size": (64, "§4.1: 64x64 pixels"),
        "batch_size": (64, "Alg. 1: m = 64"),
        "lr": (5e-5, "Alg. 1: alpha = 0.00005"),
        "clip": (0.01, "Alg. 1: c = 0.01"),
        "n_critic": (5, "Alg. 1: n_critic = 5"),
        "critic_warmup": (True, "official code: main.py, 100 critic iterations for 25 and every 500th G step"),
        "z_dim": (100, "official code: main.py nz = 100"),
        "width": (64, "official code: main.py ngf = ndf = 64"),
        "iters": (None, "None: the G steps of 25 epochs of critic batches; official code: main.py niter = 25"),
        "lsun_classes": (["bedroom_train"], "§4.1: LSUN bedrooms"),
    },
    "WGAN-GP": {
        "dataset": ("cifar10", "§5.3; official code: gan_cifar.py"),
        "image_size": (32, "official code: gan_cifar.py, 32x32 CIFAR-10"),
        "batch_size": (64, "official code: gan_cifar.py BATCH_SIZE = 64"),
        "lr": (1e-4, "Alg. 1: alpha = 0.0001"),
        "beta1": (0.0, "Alg. 1: beta1 = 0"),
        "beta2": (0.9, "Alg. 1: beta2 = 0.9"),
        "lambda_gp": (10.0, "Alg. 1: lambda = 10"),
        "n_critic": (5, "Alg. 1: n_critic = 5"),
        "z_dim": (128, "official code: gan_cifar.py, 128-dimensional z"),
        "width": (128, "official code: gan_cifar.py DIM = 128"),
        "iters": (200_000, "official code: gan_cifar.py ITERS = 200000"),
    },
    "LSGAN": {
        "dataset": ("cifar10", "a choice: the paper trains on LSUN scenes and HWDB1.0; CIFAR-10 downloads"),
        "image_size": (32, "a choice: CIFAR-10's own size; the paper's network is 112x112"),
        "coding": ("0-1", "§3.2.3's 0-1 coding; official code: vgg.py loss_l2 targets 1 (real), 0 (fake), 1 (G)"),
        "batch_size": (64, "official code: train_lsun.py batch_size 64"),
        "lr": (1e-3, "§4.1 for the scenes; official code: train_lsun.py learning_rate 0.001"),
        "beta1": (0.5, "§4.1; official code: train_lsun.py beta1 0.5"),
        "beta2": (0.999, "official code: TensorFlow's Adam default"),
        "z_dim": (1024, "figure; official code: train_lsun.py z_dim 1024"),
        "width": (64, "official code: vgg.py gf_dim = df_dim = 64"),
        "iters": (1_000_000, "official code: train_lsun.py max_steps 1000000"),
        "lsun_classes": (["bedroom_train"], "official code: convert_lsun.py's default set; §4 trains per scene"),
    },
    "SN-DCGAN": {
        "dataset": ("cifar10", "§4.1, Table 2: CIFAR-10"),
        "image_size": (32, "Table 3: M = 32 for CIFAR-10"),
        "batch_size": (64, "official code: chainer-gan-lib --batchsize 64; the paper gives none"),
        "setting": ("B", "§4.1 and footnote 4: setting B is SN-GANs' optimal setting"),
        "lr": (None, "None: Table 1's alpha of --setting"),
        "beta1": (None, "None: Table 1's beta1 of --setting"),
        "beta2": (None, "None: Table 1's beta2 of --setting"),
        "n_dis": (None, "None: Table 1's n_dis of --setting"),
        "loss": ("standard", "§4 and Table 2's 'SN-GANs' row: Eq. 15 for D, -log D(G(z)) for G"),
        "z_dim": (128, "§4: d_z = 128"),
        "width": (64, "Table 3: 64 channels in D's first layers, 512 at M/8"),
        "iters": (100_000, "§4.1: 100K generator updates"),
    },
}

# The optimiser each network gets under the defaults: Adam (lr, (beta1, beta2)) or RMSProp (lr, alpha, momentum).
OPTIMISERS = {
    "DCGAN": ("Adam", 2e-4, (0.5, 0.999)),  # §4
    "WGAN": ("RMSprop", 5e-5, 0.99, 0.0),  # Alg. 1, §4.2: no momentum; official code: PyTorch's alpha 0.99
    "WGAN-GP": ("Adam", 1e-4, (0.0, 0.9)),  # Alg. 1
    "LSGAN": ("Adam", 1e-3, (0.5, 0.999)),  # §4.1; official code: train_lsun.py
    "SN-DCGAN": ("Adam", 1e-4, (0.5, 0.999)),  # Table 1, setting B
}
# D (critic) updates before each of the first two G updates under the defaults.
D_STEPS = {
    "DCGAN": 1,  # GAN Alg. 1 with k = 1
    "WGAN": 100,  # official code: main.py, the warm-up's 100 critic iterations for the first 25 G iterations
    "WGAN-GP": 5,  # Alg. 1: n_critic = 5
    "LSGAN": 1,
    "SN-DCGAN": 1,  # Table 1, setting B: n_dis = 1
}
# The step functions of each folder's train.py.
STEP_NAMES = {"DCGAN": "discriminator_step", "WGAN": "critic_step", "WGAN-GP": "critic_step",
              "LSGAN": "discriminator_step", "SN-DCGAN": "discriminator_step"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- defaults ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DEFAULTS)
def test_every_hyperparameter_default_is_the_cited_one(name):
    parser = load_folder(name).train.build_parser()
    defaults = {action.dest: action.default for action in parser._actions}
    table = DEFAULTS[name]
    uncited = sorted(set(defaults) - RUN_FLAGS - set(table))
    assert not uncited, f"{name}: flags without a cited default in DEFAULTS: {uncited}"
    for flag, (value, source) in table.items():
        assert flag in defaults, f"{name}: --{flag} is gone ({source})"
        assert defaults[flag] == value and type(defaults[flag]) is type(value), (name, flag, defaults[flag], source)


def test_sn_dcgan_setting_b_fills_in_table_1s_optimiser():
    args, _ = folders["SN-DCGAN"].train.parse_args([])
    # Table 1, setting B: alpha 0.0001, beta1 0.5, beta2 0.999, n_dis 1
    assert (args.lr, args.beta1, args.beta2, args.n_dis) == (1e-4, 0.5, 0.999, 1)


# --- stand-in networks ------------------------------------------------------------------------------

SHAPE = (1, 2, 2)  # the stand-ins' images: one channel, 2x2 pixels
REAL_PIXEL, FAKE_PIXEL = 0, 1  # the pixel that real images light, and the one that fakes light
N = 8


class ConstantG(nn.Module):
    """G(z) = the same learnable image for every z: `value` at FAKE_PIXEL, 0 elsewhere."""

    def __init__(self, value):
        super().__init__()
        image = torch.zeros(SHAPE)
        image.view(-1)[FAKE_PIXEL] = value
        self.image = nn.Parameter(image)

    def forward(self, z):
        return self.image.expand(len(z), *SHAPE)


class LinearG(nn.Module):
    """G(z) = tanh(Wz): deterministic, different for every z, no batch coupling."""

    def __init__(self, z_dim=3):
        super().__init__()
        self.linear = nn.Linear(z_dim, 4)

    def forward(self, z):
        return torch.tanh(self.linear(z)).view(len(z), *SHAPE)


class LinearD(nn.Module):
    """D(x) = sum over pixels of w * x, no bias: a real image's answer depends only on w[REAL_PIXEL], a fake's
    only on w[FAKE_PIXEL]. Every batch it is given is recorded in `seen`."""

    def __init__(self, w_real=0.0, w_fake=0.0):
        super().__init__()
        weight = torch.zeros(SHAPE)
        weight.view(-1)[REAL_PIXEL], weight.view(-1)[FAKE_PIXEL] = w_real, w_fake
        self.weight = nn.Parameter(weight)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return (x * self.weight).flatten(1).sum(1)


def real_images(value=1.0, n=N):
    x = torch.zeros(n, *SHAPE)
    x.flatten(1)[:, REAL_PIXEL] = value
    return x


def z_batch(n=N, z_dim=3):
    return torch.randn(n, z_dim)


def d_step(name, G, D, opt, x, z, variant=None):
    """One D (critic) update of the folder with its loss variant (LSGAN's coding, SN-DCGAN's loss, WGAN-GP's
    lambda, 0 unless given); WGAN's clip is set far outside the weights, so that it does nothing here."""
    train = folders[name].train
    if name == "DCGAN":
        return train.discriminator_step(G, D, opt, x, z)
    if name == "WGAN":
        return train.critic_step(G, D, opt, x, z, 1e9)
    if name == "WGAN-GP":
        return train.critic_step(G, D, opt, x, z, 0.0 if variant is None else variant)
    coding = train.CODINGS[variant] if name == "LSGAN" else variant
    return train.discriminator_step(G, D, opt, x, z, coding)


def g_step(name, G, D, opt, z, variant=None):
    train = folders[name].train
    if name in ("DCGAN", "WGAN", "WGAN-GP"):
        return train.generator_step(G, D, opt, z)
    coding = train.CODINGS[variant] if name == "LSGAN" else variant
    return train.generator_step(G, D, opt, z, coding)


def answers(D, x, fake):
    with torch.no_grad():
        return D(x).mean().item(), D(fake).mean().item()


# Where each loss pulls: a number is a target (least squares), +inf / -inf "up" / "down" without a target.
UP, DOWN = float("inf"), float("-inf")
TARGETS = [  # (folder, loss variant, D(x)'s target, D(G(z))'s target in D's step, D(G(z))'s target in G's step)
    ("DCGAN", None, UP, DOWN, UP),  # GAN Alg. 1: D ascends log D(x) + log(1 - D(G(z))); G ascends log D(G(z))
    ("WGAN", None, UP, DOWN, UP),  # Alg. 1 lines 5 and 10: the critic ascends f(x) - f(G(z)); G descends -f(G(z))
    ("WGAN-GP", None, UP, DOWN, UP),  # Alg. 1 lines 7 and 12: L = D(x~) - D(x) + penalty; G descends -D(G(z))
    ("LSGAN", "0-1", 1.0, 0.0, 1.0),  # §3.2: D regresses D(x) to b and D(G(z)) to a; G pulls D(G(z)) to c
    ("LSGAN", "pearson", 1.0, -1.0, 0.0),  # (a, b, c) = (-1, 1, 0): here b != c, so b and c can be told apart
    ("SN-DCGAN", "standard", UP, DOWN, UP),  # Eq. 15 and §4's -log D(G(z))
    ("SN-DCGAN", "hinge", UP, DOWN, UP),  # Eq. 16-17
]
STARTS = (-1.5, -0.5, 0.5, 1.5)  # D's answers before the step; none is a target, so each has a direction


def moves_towards(before, after, target):
    """True when one small step went from `before` strictly towards `target` without passing it."""
    if target in (UP, DOWN):
        return after > before if target == UP else after < before
    return abs(after - target) < abs(before - target) and (after - before) * (target - before) > 0


# --- the sign and target of each loss ---------------------------------------------------------------

@pytest.mark.parametrize("name, variant, real_target, fake_target, _", TARGETS)
@pytest.mark.parametrize("start", STARTS)
def test_D_step_moves_D_x_and_D_G_z_towards_their_targets(name, variant, real_target, fake_target, _, start):
    # hinge (Eq. 16) is flat beyond its margins: start inside them, where it pulls
    if variant == "hinge" and abs(start) > 1:
        start = start / 3
    G, D = ConstantG(1.0), LinearD(w_real=start, w_fake=start)  # D(x) = D(G(z)) = start
    x, z = real_images(), z_batch()
    G_before = G.image.detach().clone()
    before = answers(D, x, G(z))
    d_step(name, G, D, torch.optim.SGD(D.parameters(), lr=0.01), x, z, variant)
    after = answers(D, x, G(z))
    assert moves_towards(before[0], after[0], real_target), (name, variant, "D(x)", before[0], after[0])
    assert moves_towards(before[1], after[1], fake_target), (name, variant, "D(G(z))", before[1], after[1])
    assert torch.equal(G.image, G_before)  # G is held fixed in D's step


@pytest.mark.parametrize("name, variant, _, __, generator_target", TARGETS)
@pytest.mark.parametrize("start", STARTS)
def test_G_step_on_a_fixed_D_moves_D_G_z_towards_Gs_target(name, variant, _, __, generator_target, start):
    G, D = ConstantG(start), LinearD(w_real=1.0, w_fake=1.0)  # D(G(z)) = start
    z = z_batch()
    D_before = D.weight.detach().clone()
    before = answers(D, real_images(), G(z))[1]
    g_step(name, G, D, torch.optim.SGD(G.parameters(), lr=0.01), z, variant)
    after = answers(D, real_images(), G(z))[1]
    assert moves_towards(before, after, generator_target), (name, variant, before, after)
    assert torch.equal(D.weight, D_before)  # D is held fixed in G's step


@pytest.mark.parametrize("coding", ["0-1", "pearson"])
def test_lsgan_generator_step_is_the_gradient_of_half_the_mean_square_distance_to_c(coding):
    """§3.2: G minimises 1/2 E[(D(G(z)) - c)^2]. With D(x) = the fake pixel's value, one SGD step of size lr
    takes every fake, and so D(G(z)), from 0.25 to 0.25 - lr (0.25 - c)."""
    a, b, c = folders["LSGAN"].train.CODINGS[coding]
    assert (a, b, c) == {"0-1": (0.0, 1.0, 1.0), "pearson": (-1.0, 1.0, 0.0)}[coding]
    G, D = ConstantG(0.25), LinearD(w_real=0.0, w_fake=1.0)
    z = z_batch()
    g_step("LSGAN", G, D, torch.optim.SGD(G.parameters(), lr=0.1), z, coding)
    assert answers(D, real_images(), G(z))[1] == pytest.approx(0.25 - 0.1 * (0.25 - c))


# --- the same inputs where the paper needs them -------------------------------------------------------

def contains(batches, wanted):
    """True when `wanted` is, exactly, a block of consecutive samples of one of the recorded batches."""
    return any(torch.equal(batch[i:i + len(wanted)], wanted)
               for batch in batches for i in range(len(batch) - len(wanted) + 1))


@pytest.mark.parametrize("name, variant", [("DCGAN", None), ("WGAN", None), ("WGAN-GP", 10.0), ("LSGAN", "0-1"),
                                           ("LSGAN", "pearson"), ("SN-DCGAN", "standard"), ("SN-DCGAN", "hinge")])
def test_D_step_sees_the_given_real_batch_and_G_of_the_given_z(name, variant):
    torch.manual_seed(0)
    G, D = LinearG(), LinearD(0.3, -0.2)
    x, z = torch.rand(N, *SHAPE) * 2 - 1, z_batch()
    d_step(name, G, D, torch.optim.SGD(D.parameters(), lr=0.01), x, z, variant)
    with torch.no_grad():
        fake = G(z)
    assert contains(D.seen, x), name  # the real term: the minibatch that was drawn
    assert contains(D.seen, fake), name  # the fake term: G(z) for the z that was drawn, from the fixed G


def test_wgan_gp_penalty_is_taken_between_the_critic_terms_own_real_and_fake_samples():
    """Alg. 1 lines 4-7: x^ = eps x + (1 - eps) x~ with the x and x~ = G(z) of the same iteration, pair by pair."""
    torch.manual_seed(0)
    G, D = LinearG(), LinearD(0.3, -0.2)
    x, z = torch.rand(16, *SHAPE) * 2 - 1, z_batch(16)
    d_step("WGAN-GP", G, D, torch.optim.SGD(D.parameters(), lr=0.01), x, z, 10.0)
    with torch.no_grad():
        fake = G(z)
    others = [batch for batch in D.seen if not contains([batch], x) and not contains([batch], fake)]
    assert len(others) == 1, "the critic is evaluated once on the interpolates"
    direction, offset = (x - fake).flatten(1), (others[0] - fake).flatten(1)
    eps = (offset * direction).sum(1) / (direction * direction).sum(1)
    # each x^_i lies on the segment from x~_i to x_i of its own pair
    assert torch.allclose(offset, eps[:, None] * direction, atol=1e-6)
    assert eps.min() >= 0 and eps.max() <= 1
    assert eps.max() - eps.min() > 0.3  # drawn per sample: not one end of every segment


@pytest.mark.parametrize("name, variant", [("DCGAN", None), ("WGAN", None), ("WGAN-GP", None), ("LSGAN", "0-1"),
                                           ("LSGAN", "pearson"), ("SN-DCGAN", "standard"), ("SN-DCGAN", "hinge")])
def test_G_step_sends_G_of_the_given_z_through_the_given_D(name, variant):
    torch.manual_seed(0)
    G, D = LinearG(), LinearD(0.3, -0.2)
    z = z_batch()
    with torch.no_grad():
        fake = G(z)
    g_step(name, G, D, torch.optim.SGD(G.parameters(), lr=0.01), z, variant)
    assert len(D.seen) == 1 and torch.equal(D.seen[0], fake), name


# --- the same wiring inside train.main -----------------------------------------------------------------

def run_main_recording(name, data_root, out):
    """train.main for two generator steps at the defaults (tiny networks), with its step functions wrapped."""
    train = folders[name].train
    d_name = STEP_NAMES[name]
    real_d_step, real_g_step = getattr(train, d_name), train.generator_step
    record = {"D": [], "G": []}

    def recording_d_step(G, D, opt, x, z, *rest, **options):
        result = real_d_step(G, D, opt, x, z, *rest, **options)
        record["D"].append({"G": G, "D": D, "opt": opt, "x": x.clone(), "z": z.clone(),
                            "D_after": [p.detach().clone() for p in D.parameters()], "G_step": len(record["G"])})
        return result

    def recording_g_step(G, D, opt, z, *rest, **options):
        record["G"].append({"G": G, "D": D, "opt": opt, "z": z.clone(),
                            "D_now": [p.detach().clone() for p in D.parameters()]})
        return real_g_step(G, D, opt, z, *rest, **options)

    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    setattr(train, d_name, recording_d_step)
    train.generator_step = recording_g_step
    try:
        code = train.main(["--dataset", "mnist", "--data-root", str(data_root), "--image-size", "32",
                           "--width", "8", "--batch-size", "4", "--max-steps", "2", "--device", "cpu",
                           "--out", str(out)])
    finally:
        setattr(train, d_name, real_d_step)
        train.generator_step = real_g_step
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert code == 0
    return record


def optimiser_settings(opt):
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.Adam):
        return ("Adam", group["lr"], tuple(group["betas"]))
    return (type(opt).__name__, group["lr"], group["alpha"], group["momentum"])


@pytest.mark.parametrize("name", FOLDERS)
def test_main_wires_the_networks_optimisers_and_inputs_as_the_paper_does(name, mnist_root, tmp_path):
    record = run_main_recording(name, mnist_root, tmp_path / "run")
    assert len(record["G"]) == 2
    for step, g in enumerate(record["G"]):
        ds = [d for d in record["D"] if d["G_step"] == step]
        # n_critic / n_dis / k D updates before each G update
        assert len(ds) == D_STEPS[name], (name, step, len(ds))
        last = ds[-1]
        # G's step sends its fakes through the current D: the same network, with the last D update's weights
        assert g["D"] is last["D"] and g["G"] is last["G"]
        assert all(torch.equal(a, b) for a, b in zip(g["D_now"], last["D_after"]))
        # each optimiser holds its own network's parameters, with the paper's settings
        assert {id(p) for group in last["opt"].param_groups for p in group["params"]} == \
               {id(p) for p in last["D"].parameters()}
        assert {id(p) for group in g["opt"].param_groups for p in group["params"]} == \
               {id(p) for p in g["G"].parameters()}
        assert optimiser_settings(last["opt"]) == OPTIMISERS[name]
        assert optimiser_settings(g["opt"]) == OPTIMISERS[name]
        if name == "DCGAN":
            assert last["opt"].param_groups[0]["weight_decay"] == 0 == g["opt"].param_groups[0]["weight_decay"]
        # z of G's step: LSGAN's official train_lsun.py feeds D's batch_z to G's update too; the others
        # draw fresh noise for G (GAN Alg. 1; WGAN Alg. 1 line 9; WGAN-GP Alg. 1 line 11; SN-DCGAN)
        if name == "LSGAN":
            assert torch.equal(g["z"], last["z"])
        else:
            assert not any(torch.equal(g["z"], d["z"]) for d in ds)
        # every D update of a G step draws its own real minibatch (WGAN Alg. 1 line 3; WGAN-GP line 4)
        assert len({tuple(d["x"].flatten().tolist()) for d in ds}) == len(ds)


# --- architecture choices the official code makes where the paper is silent ---------------------------

def test_dcgan_has_no_bias_anywhere_as_the_official_code():
    """Official code (faces/train_uncond_dcgan.py): no layer has a bias, including G's output layer and D's
    input and output layers, which have no batch norm either."""
    model = folders["DCGAN"].model
    G, D = model.Generator(64, 3), model.Discriminator(64, 3)
    layers = [m for m in [*G.modules(), *D.modules()] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert len(layers) == 10 and all(m.bias is None for m in layers)


def test_lsgan_batch_norm_after_the_fc_layer_is_per_channel():
    """Official code (vgg.py): g_bn0 normalises the reshaped s/16 x s/16 x 256 map per channel."""
    model = folders["LSGAN"].model
    torch.manual_seed(0)
    G = model.Generator(64, 3, width=8)
    G.apply(model.init_weights)
    norms = [m for m in G.project.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == 1 and isinstance(norms[0], nn.BatchNorm2d) and norms[0].num_features == 32
    # after it, in training mode, every channel has mean 0 and variance 1 over the batch and the 4x4 positions
    seen = {}
    norms[0].register_forward_hook(lambda module, inputs, output: seen.update(out=output))
    G(model.sample_z(6))
    out = seen["out"]
    assert out.shape == (6, 32, 4, 4)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(32), atol=1e-5)
    assert torch.allclose(out.var((0, 2, 3), unbiased=False), torch.ones(32), atol=1e-3)
    # ... but not each single feature over the batch alone, as a per-feature norm would make it
    assert out.mean(0).abs().max() > 0.1
