"""The folders against their papers: every hyperparameter default (all seven folders), and in the five
convolutional folders every place where two networks must see the same inputs (the losses' values and
gradients are in each folder's own test file; the MLP folders' inputs in test_simplegan.py, test_cgan.py and
test_table1.py).

- Defaults: a table per folder holds each hyperparameter flag's default against `train.build_parser()`,
  whose help for the flag must name the source (the paper; the official code where the paper is silent).
- Shared inputs: stand-ins record what they are given; the folders' own train.main runs two generator
  steps with its step functions wrapped, and the wrappers record which networks, optimisers and inputs
  each step received.
"""
import pytest
import torch
from torch import nn

from conftest import CONVOLUTIONAL, D_STEP, load_folder, run_main

folders = {name: load_folder(name) for name in CONVOLUTIONAL}

# Flags that manage a run, its data or its evaluation rather than set the paper's algorithm (CONVENTIONS.md's
# command line); the evaluation protocols' defaults are tested in test_metrics.py and test_table1.py.
RUN_FLAGS = {"help", "data_root", "max_steps", "device", "seed", "out", "resume", "sample_every", "log_every",
             "checkpoint_every", "evaluate", "eval_every", "precision", "compile", "data_on", "cache_dir",
             "strict_images", "eval_samples", "eval_every_samples", "eval_real", "feature_extractor",
             "inception_weights", "evaluate_at_end", "channels_last"}

# Every hyperparameter flag's default; the flag's help names its source (the paper; the official code where the
# paper is silent), and the test below sees that it does.
DEFAULTS = {
    "simpleGAN": dict(dataset="mnist", batch_size=100, k=1, d_loss_scale=1.0, simultaneous=False, lr=0.1,
                      lr_decay=1.000004, lr_min=1e-06, momentum=0.5, final_momentum=0.7, momentum_saturate=250,
                      z_dim=100, g_width=1200, d_width=240, epochs=None, select_every=0, parzen_samples=10_000,
                      parzen_valid=1000),
    "CGAN": dict(dataset="mnist", image_size=28, valid_size=10_000, batch_size=100, lr=0.1, lr_decay=1.00004,
                 min_lr=1e-06, momentum=0.5, final_momentum=0.7, momentum_saturate=250, dropout=0.5, z_dim=100,
                 epochs=576, select_every=5, sampling_dropout=True, parzen_per_class=False, parzen_valid=1000),
    "DCGAN": dict(dataset="cifar10", image_size=64, batch_size=128, lr=0.0002, beta1=0.5, beta2=0.999,
                  weight_decay=0.0, z_dim=100, width=128, epochs=25, lsun_classes=["bedroom_train"]),
    "WGAN": dict(dataset="cifar10", image_size=64, batch_size=64, lr=5e-05, clip=0.01, n_critic=5, critic_warmup=True,
                 z_dim=100, width=64, iters=None, lsun_classes=["bedroom_train"]),
    "WGAN-GP": dict(dataset="cifar10", image_size=32, batch_size=64, lr=0.0001, beta1=0.0, beta2=0.9, lambda_gp=10.0,
                    n_critic=5, z_dim=128, width=128, iters=200_000),
    "LSGAN": dict(dataset="cifar10", image_size=32, coding="0-1", batch_size=64, lr=0.001, beta1=0.5, beta2=0.999,
                  z_dim=1024, width=64, iters=1_000_000, lsun_classes=["bedroom_train"]),
    "SN-DCGAN": dict(dataset="cifar10", image_size=32, batch_size=64, setting="B", lr=None, beta1=None, beta2=None,
                     n_dis=None, loss="standard", z_dim=128, width=64, iters=100_000),
}
# What a help text says to name a source.
CITATIONS = ("§", "Alg.", "Fig.", "Table", "Eq.", "App.", "figure", "paper", "official")

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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- defaults ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DEFAULTS)
def test_every_hyperparameter_default_is_the_cited_one(name):
    actions = {action.dest: action for action in load_folder(name).train.build_parser()._actions}
    table = DEFAULTS[name]
    unlisted = sorted(set(actions) - RUN_FLAGS - set(table))
    assert not unlisted, f"{name}: hyperparameter flags missing from DEFAULTS: {unlisted}"
    for flag, value in table.items():
        assert flag in actions, f"{name}: --{flag} is gone"
        default = actions[flag].default
        assert default == value and type(default) is type(value), (name, flag, default, actions[flag].help)
        assert any(word in actions[flag].help for word in CITATIONS), (name, flag, "its help names no source")


# --- stand-in networks ------------------------------------------------------------------------------

SHAPE = (1, 2, 2)  # the stand-ins' images: one channel, 2x2 pixels
N = 8


class LinearG(nn.Module):
    """G(z) = tanh(Wz): deterministic, different for every z, no batch coupling."""

    def __init__(self, z_dim=3):
        super().__init__()
        self.linear = nn.Linear(z_dim, 4)

    def forward(self, z):
        return torch.tanh(self.linear(z)).view(len(z), *SHAPE)


class LinearD(nn.Module):
    """D(x) = sum over pixels of w * x, no bias, with w = (w_a, w_b, 0, 0). Every batch it is given is recorded
    in `seen`."""

    def __init__(self, w_a, w_b):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([w_a, w_b, 0.0, 0.0]).view(SHAPE))
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return (x * self.weight).flatten(1).sum(1)


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


# --- the same inputs where the paper needs them -------------------------------------------------------

def contains(batches, wanted):
    """True when `wanted` is, exactly, a block of consecutive samples of one of the recorded batches."""
    return any(torch.equal(batch[i:i + len(wanted)], wanted)
               for batch in batches for i in range(len(batch) - len(wanted) + 1))


# Each folder with each loss variant (LSGAN's codings, SN-DCGAN's losses; WGAN-GP's lambda).
VARIANTS = [("DCGAN", None), ("WGAN", None), ("WGAN-GP", 10.0), ("LSGAN", "0-1"), ("LSGAN", "pearson"),
            ("SN-DCGAN", "standard"), ("SN-DCGAN", "hinge")]


@pytest.mark.parametrize("name, variant", VARIANTS)
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


@pytest.mark.parametrize("name, variant", VARIANTS)
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
    d_name = D_STEP[name]
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

    setattr(train, d_name, recording_d_step)
    train.generator_step = recording_g_step
    try:
        code = run_main(train, "--dataset", "mnist", "--data-root", data_root, "--image-size", 32, "--width", 8,
                        "--batch-size", 4, "--max-steps", 2, "--device", "cpu", "--out", out)
    finally:
        setattr(train, d_name, real_d_step)
        train.generator_step = real_g_step
    assert code == 0
    return record


def optimiser_settings(opt):
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.Adam):
        return ("Adam", group["lr"], tuple(group["betas"]))
    return (type(opt).__name__, group["lr"], group["alpha"], group["momentum"])


@pytest.mark.parametrize("name", CONVOLUTIONAL)
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
