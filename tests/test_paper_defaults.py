"""The folders against their papers: every hyperparameter default, with its source in the flag's
help, and in the convolutional folders every place where two networks must see the same inputs, in
the step functions (stand-ins record what they are given) and in train.main (its wrapped steps
record their networks, optimisers and inputs)."""

import pytest
import torch
from torch import nn

from conftest import CONVOLUTIONAL, D_STEP, FOLDERS, LinearD, load_folder, run_main, small_networks

folders = {name: load_folder(name) for name in CONVOLUTIONAL}

# Flags that manage a run, its data or its evaluation rather than set the paper's algorithm (the
# README's "Reference: what every folder shares"); the evaluation protocols' defaults are tested in
# test_metrics.py and test_table1.py.
RUN_FLAGS = {
    "help",
    "data_root",
    "cache_dir",
    "max_steps",
    "device",
    "precision",
    "compile",
    "seed",
    "out",
    "resume",
    "sample_every",
    "log_every",
    "checkpoint_every",
    "evaluate",
    "evaluate_at_end",
    "eval_every",
    "eval_samples",
    "eval_every_samples",
    "eval_real",
    "feature_extractor",
    "evaluate_features",
    "evaluate_spectra",
}
# Flags that were removed (support.REMOVED names what replaced them): no train.py has them back.
REMOVED = {"data_on", "channels_last"}

# Every hyperparameter flag's default; the flag's help names its source (the paper; the official
# code where the paper is silent), and the test below sees that it does.
DEFAULTS = {
    "simpleGAN": dict(
        dataset="mnist",
        batch_size=100,
        k=1,
        d_loss_scale=1.0,
        simultaneous=False,
        lr=0.1,
        lr_decay=1.000004,
        lr_min=1e-06,
        momentum=0.5,
        final_momentum=0.7,
        momentum_saturate=250,
        z_dim=100,
        g_width=1200,
        d_width=240,
        epochs=None,
        select_every=0,
        parzen_samples=10_000,
        parzen_valid=1000,
    ),
    "CGAN": dict(
        dataset="mnist",
        image_size=28,
        valid_size=10_000,
        batch_size=100,
        lr=0.1,
        lr_decay=1.00004,
        min_lr=1e-06,
        momentum=0.5,
        final_momentum=0.7,
        momentum_saturate=250,
        dropout=0.5,
        z_dim=100,
        epochs=576,
        select_every=5,
        sampling_dropout=True,
        parzen_per_class=False,
        parzen_valid=1000,
    ),
    "DCGAN": dict(
        dataset="cifar10",
        image_size=64,
        batch_size=128,
        lr=0.0002,
        beta1=0.5,
        beta2=0.999,
        weight_decay=0.0,
        z_dim=100,
        width=128,
        epochs=25,
        lsun_classes=["bedroom_train"],
        svm_train_images=None,
        svm_c=0.001,
    ),
    "WGAN": dict(
        dataset="cifar10",
        image_size=64,
        batch_size=64,
        lr=5e-05,
        clip=0.01,
        n_critic=5,
        critic_warmup=True,
        z_dim=100,
        width=64,
        iters=None,
        lsun_classes=["bedroom_train"],
        generator="dcgan",
    ),
    "WGAN-GP": dict(
        dataset="cifar10",
        image_size=32,
        batch_size=64,
        lr=0.0001,
        beta1=0.0,
        beta2=0.9,
        lambda_gp=10.0,
        n_critic=5,
        z_dim=128,
        width=128,
        iters=200_000,
        train_subset=None,
    ),
    "LSGAN": dict(
        dataset="cifar10",
        image_size=32,
        coding="0-1",
        batch_size=64,
        lr=0.001,
        beta1=0.5,
        beta2=0.999,
        z_dim=1024,
        width=64,
        iters=1_000_000,
        lsun_classes=["bedroom_train"],
    ),
    "SN-DCGAN": dict(
        dataset="cifar10",
        image_size=32,
        batch_size=64,
        setting="B",
        lr=None,
        beta1=None,
        beta2=None,
        n_dis=None,
        loss="standard",
        z_dim=128,
        width=64,
        iters=100_000,
        no_sn=False,
    ),
}
# What a help text says to name a source.
CITATIONS = ("§", "Alg.", "Fig.", "Table", "Eq.", "App.", "figure", "paper", "official")

# The optimiser each network gets under the defaults: Adam (lr, (beta1, beta2), weight decay) or
# RMSProp (lr, alpha, momentum, eps, centred).
OPTIMISERS = {
    # §4; the official code's weight decay is off by default
    "DCGAN": ("Adam", 2e-4, (0.5, 0.999), 0.0),
    # Alg. 1, §4.2: no momentum; official code: PyTorch's rest
    "WGAN": ("RMSprop", 5e-5, 0.99, 0.0, 1e-8, False),
    "WGAN-GP": ("Adam", 1e-4, (0.0, 0.9), 0.0),  # Alg. 1
    "LSGAN": ("Adam", 1e-3, (0.5, 0.999), 0.0),  # §4.1; official code: train_lsun.py
    "SN-DCGAN": ("Adam", 1e-4, (0.5, 0.999), 0.0),  # Table 1, setting B
}
# D (critic) updates before each of the first two G updates under the defaults.
D_STEPS = {
    "DCGAN": 1,  # GAN Alg. 1 with k = 1
    # official code: main.py, the warm-up's 100 critic iterations for the first 25 G iterations
    "WGAN": 100,
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


# --- defaults ------------------------------------------------------------------------------------


def parser_flags(name):
    return {action.dest: action for action in load_folder(name).train.build_parser()._actions}


@pytest.mark.parametrize("name", DEFAULTS)
def test_every_hyperparameter_default_is_the_cited_one(name):
    actions, table = parser_flags(name), DEFAULTS[name]
    unlisted = sorted(set(actions) - RUN_FLAGS - set(table))
    assert not unlisted, f"{name}: hyperparameter flags missing from DEFAULTS: {unlisted}"
    for flag, value in table.items():
        assert flag in actions, f"{name}: --{flag} is gone"
        default, text = actions[flag].default, actions[flag].help
        assert default == value and type(default) is type(value), (name, flag, default, text)
        assert any(word in text for word in CITATIONS), (name, flag, "its help names no source")


def test_the_run_flags_are_todays_and_the_removed_ones_stay_removed():
    """RUN_FLAGS lists no flag that no folder has (it would hide a hyperparameter of that name)."""
    everywhere = set().union(*(parser_flags(name) for name in FOLDERS))
    assert sorted(RUN_FLAGS - everywhere) == []
    assert sorted(REMOVED & everywhere) == []


# --- stand-in networks ---------------------------------------------------------------------------

SHAPE = (1, 2, 2)  # the stand-ins' images: one channel, 2x2 pixels
N = 8


def stand_ins():
    """G(z) = tanh(Wz): a different image for every z, no batch coupling; D(x) = w . x with
    w = (0.3, -0.2, 0, 0)."""
    torch.manual_seed(0)
    G = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Unflatten(1, SHAPE))
    return G, LinearD(torch.tensor([0.3, -0.2, 0.0, 0.0]).view(SHAPE))


def step_options(name, variant):
    """The D and G steps' extra arguments: the loss variant, WGAN-GP's lambda, WGAN's clip far
    outside the weights."""
    variant = folders[name].train.CODINGS[variant] if name == "LSGAN" else variant
    d_options = {"DCGAN": (), "WGAN": (1e9,)}.get(name, (variant,))
    return d_options, (variant,) if name in ("LSGAN", "SN-DCGAN") else ()


# --- the same inputs where the paper needs them --------------------------------------------------


def contains(batches, wanted):
    """True when `wanted` is, exactly, a block of consecutive samples of a recorded batch."""
    return any(
        torch.equal(batch[i : i + len(wanted)], wanted)
        for batch in batches
        for i in range(len(batch) - len(wanted) + 1)
    )


# Each folder with each loss variant (LSGAN's codings, SN-DCGAN's losses; WGAN-GP's lambda).
VARIANTS = [
    ("DCGAN", None),
    ("WGAN", None),
    ("WGAN-GP", 10.0),
    ("LSGAN", "0-1"),
    ("LSGAN", "pearson"),
    ("SN-DCGAN", "standard"),
    ("SN-DCGAN", "hinge"),
]


@pytest.mark.parametrize("name, variant", VARIANTS)
def test_the_steps_see_the_given_real_batch_and_G_of_the_given_z(name, variant):
    G, D = stand_ins()
    x, z = torch.rand(N, *SHAPE) * 2 - 1, torch.randn(N, 3)
    d_options, g_options = step_options(name, variant)
    d_step = getattr(folders[name].train, D_STEP[name])
    d_step(G, D, torch.optim.SGD(D.parameters(), lr=0.01), x, z, *d_options)
    with torch.no_grad():
        fake = G(z)
    assert contains(D.inputs, x), name  # the real term: the minibatch that was drawn
    # the fake term: G(z) for the z that was drawn, from the fixed G
    assert contains(D.inputs, fake), name
    D.inputs.clear()
    # G's step sends G(z) of the given z through the given D
    g_step = folders[name].train.generator_step
    g_step(G, D, torch.optim.SGD(G.parameters(), lr=0.01), z, *g_options)
    assert len(D.inputs) == 1 and torch.equal(D.inputs[0], fake), name


def test_wgan_gp_penalty_is_taken_between_the_critic_terms_own_real_and_fake_samples():
    """Alg. 1 lines 4-7: x^ = eps x + (1 - eps) x~ with the x and x~ = G(z) of the same
    iteration, pair by pair."""
    G, D = stand_ins()
    x, z = torch.rand(16, *SHAPE) * 2 - 1, torch.randn(16, 3)
    opt = torch.optim.SGD(D.parameters(), lr=0.01)
    folders["WGAN-GP"].train.critic_step(G, D, opt, x, z, 10.0)
    with torch.no_grad():
        fake = G(z)
    others = [b for b in D.inputs if not contains([b], x) and not contains([b], fake)]
    assert len(others) == 1, "the critic is evaluated once on the interpolates"
    direction, offset = (x - fake).flatten(1), (others[0] - fake).flatten(1)
    eps = (offset * direction).sum(1) / (direction * direction).sum(1)
    # each x^_i lies on the segment from x~_i to x_i of its own pair
    assert torch.allclose(offset, eps[:, None] * direction, atol=1e-6)
    assert eps.min() >= 0 and eps.max() <= 1
    assert eps.max() - eps.min() > 0.3  # drawn per sample: not one end of every segment


# --- the same wiring inside train.main ----------------------------------------------------------


def optimiser_settings(opt):
    group = opt.param_groups[0]
    if isinstance(opt, torch.optim.Adam):
        return ("Adam", group["lr"], tuple(group["betas"]), group["weight_decay"])
    rest = (group[key] for key in ("alpha", "momentum", "eps", "centered"))
    return (type(opt).__name__, group["lr"], *rest)


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", CONVOLUTIONAL)
def test_main_wires_the_networks_optimisers_and_inputs_as_the_paper_does(
    name, tiny_mnist_root, tmp_path, monkeypatch
):
    """train.main for two generator steps at the defaults (tiny networks), recording what each
    step received."""
    train = folders[name].train
    real_d_step, real_g_step = getattr(train, D_STEP[name]), train.generator_step
    d_records, g_records = [[]], []

    def recording_d_step(G, D, opt, x, z, *rest):
        result = real_d_step(G, D, opt, x, z, *rest)
        record = {"G": G, "D": D, "opt": opt, "x": x.clone(), "z": z.clone()}
        d_records[-1].append({**record, "D_after": weights(D)})
        return result

    def recording_g_step(G, D, opt, z, *rest):
        g_records.append({"G": G, "D": D, "opt": opt, "z": z.clone(), "D_now": weights(D)})
        d_records.append([])
        return real_g_step(G, D, opt, z, *rest)

    monkeypatch.setattr(train, D_STEP[name], recording_d_step)
    monkeypatch.setattr(train, "generator_step", recording_g_step)
    data = ["--dataset", "mnist", "--data-root", tiny_mnist_root, "--image-size", 32]
    tiny = ["--width", 8, "--batch-size", 4, "--max-steps", 2, "--device", "cpu"]
    assert run_main(train, *data, *tiny, "--out", tmp_path / "run") == 0
    assert len(g_records) == 2
    for step, (g, ds) in enumerate(zip(g_records, d_records)):
        # n_critic / n_dis / k D updates before each G update
        assert len(ds) == D_STEPS[name], (name, step, len(ds))
        last = ds[-1]
        # G's step sends its fakes through the current D: the same network, with the last D
        # update's weights
        assert g["D"] is last["D"] and g["G"] is last["G"]
        assert all(torch.equal(a, b) for a, b in zip(g["D_now"], last["D_after"]))
        # each optimiser holds its own network's parameters, with the paper's settings
        for opt, net in ((last["opt"], last["D"]), (g["opt"], g["G"])):
            held = {id(p) for group in opt.param_groups for p in group["params"]}
            assert held == {id(p) for p in net.parameters()}
            assert optimiser_settings(opt) == OPTIMISERS[name]
        # z of G's step: LSGAN's official train_lsun.py feeds D's batch_z to G's update too; the
        # others draw fresh noise for G (GAN Alg. 1; WGAN Alg. 1 line 9; WGAN-GP Alg. 1 line 11;
        # SN-DCGAN)
        if name == "LSGAN":
            assert torch.equal(g["z"], last["z"])
        else:
            assert not any(torch.equal(g["z"], d["z"]) for d in ds)
        # every D update of a G step draws its own real minibatch (WGAN Alg. 1 line 3; WGAN-GP
        # line 4)
        assert len({tuple(d["x"].flatten().tolist()) for d in ds}) == len(ds)


def test_lsgan_batch_norm_after_the_fc_layer_is_per_channel():
    """Official code (vgg.py): g_bn0 normalises the reshaped s/16 x s/16 x 256 map per channel."""
    G, _ = small_networks("LSGAN", 3, 64)
    norms = [m for m in G.project.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert len(norms) == 1 and isinstance(norms[0], nn.BatchNorm2d) and norms[0].num_features == 32
    # after it, in training mode, every channel has mean 0 and variance 1 over the batch and the
    # 4x4 positions
    seen = {}
    norms[0].register_forward_hook(lambda module, inputs, output: seen.update(out=output))
    G(folders["LSGAN"].model.sample_z(6))
    out = seen["out"]
    assert out.shape == (6, 32, 4, 4)
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(32), atol=1e-5)
    assert torch.allclose(out.var((0, 2, 3), unbiased=False), torch.ones(32), atol=1e-3)
    # ... but not each single feature over the batch alone, as a per-feature norm would make it
    assert out.mean(0).abs().max() > 0.1
