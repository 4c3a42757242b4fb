"""SN-DCGAN/: Table 3's shapes, spectral normalisation (§2.1, Appendix A), §4's losses by value and
gradient, Table 1's settings, Fig. 9's sigmas in a run, and Fig. 3's spectra with --no-sn as the
comparison."""

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from conftest import (
    QUICK,
    assert_image_shapes,
    bce,
    exits_2,
    frozen_d_update,
    frozen_g_update,
    linear_pair,
    load_checkpoint,
    load_folder,
    run_main,
    sigmoid,
    small_networks,
    two_logged_steps,
    value_and_grads,
)

sn_dcgan = load_folder("SN-DCGAN")
model, train = sn_dcgan.model, sn_dcgan.train
LAYER_NAMES = ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "dense"]


def normalized(D):
    return [layer for _, layer in D.normalized_layers()]


def power_vectors(D):
    return [layer.parametrizations.weight[0]._u.clone() for layer in normalized(D)]


def parse(*argv):
    """train.py's configuration for ARGV, as its main() reads it."""
    return sn_dcgan.support.parse_args(
        train.build_parser(), list(argv), model.FOLDER, train.check_args
    )[0]


# --- Table 3 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_table3_layers_and_feature_map_sizes(channels):
    G, D = model.Generator(32, channels), model.Discriminator(32, channels)
    convs = [m for m in D.net if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0], m.out_channels) for m in convs] == [
        (3, 1, 64),
        (4, 2, 64),
        (3, 1, 128),
        (4, 2, 128),
        (3, 1, 256),
        (4, 2, 256),
        (3, 1, 512),
    ]
    assert convs[0].in_channels == channels
    assert (D.logit.in_features, D.logit.out_features) == (4 * 4 * 512, 1)
    assert G.project[0].in_features == 128 and G.project[0].out_features == 4 * 4 * 512
    ups = [m for m in G.net if isinstance(m, nn.ConvTranspose2d)]
    assert [
        (m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in ups
    ] == [(512, 256, 4, 2, 1), (256, 128, 4, 2, 1), (128, 64, 4, 2, 1)]
    assert [type(m) for m in G.net[-2:]] == [nn.Conv2d, nn.Tanh]
    out = G.net[-2]
    assert (out.in_channels, out.out_channels, out.kernel_size[0], out.stride[0]) == (
        64,
        channels,
        3,
        1,
    )
    # every batch-normed layer of G is a deconv followed by BN and ReLU (Table 3: "deconv. BN ...
    # ReLU")
    for i, m in enumerate(G.net):
        if isinstance(m, nn.ConvTranspose2d):
            assert isinstance(G.net[i + 1], nn.BatchNorm2d) and isinstance(G.net[i + 2], nn.ReLU)

    sizes = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(
                lambda mod, inp, o: sizes.append((mod, inp[0].shape[1:], o.shape[1:]))
            )
    images = G(model.sample_z(2))
    # tanh output
    assert images.shape == (2, channels, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert D(images).shape == (2,)
    assert [(i[-1], o[-1]) for m, i, o in sizes if isinstance(m, nn.ConvTranspose2d)] == [
        (4, 8),
        (8, 16),
        (16, 32),
    ]
    d_outputs = [tuple(o) for m, i, o in sizes if any(m is layer for layer in D.net)]
    assert d_outputs == [
        (64, 32, 32),
        (64, 16, 16),
        (128, 16, 16),
        (128, 8, 8),
        (256, 8, 8),
        (256, 4, 4),
        (512, 4, 4),
    ]


@pytest.mark.parametrize("size", [16, 48, 64])
def test_other_image_sizes_follow_m_over_8(size):
    G, D = model.Generator(size, 3, width=8), model.Discriminator(size, 3, width=8)
    assert_image_shapes(G, D, model.sample_z(2), 3, size)
    assert D.logit.in_features == 8 * 8 * (size // 8) ** 2


def test_no_batch_norm_in_D_and_leaky_relu_slope_is_0_1():
    D = model.Discriminator(32, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    slopes = [m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 7
    # D returns the logit f(x)
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid)) for m in D.modules())


# --- spectral normalisation -----------------------------------------------------------------------


def test_spectral_norm_on_every_D_layer_and_on_no_G_layer():
    G, D = model.Generator(32, 3), model.Discriminator(32, 3)
    d_layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(d_layers) == 8
    assert all(parametrize.is_parametrized(m, "weight") for m in d_layers)
    assert [name for name, _ in D.normalized_layers()] == LAYER_NAMES
    assert not any(parametrize.is_parametrized(m) for m in G.modules())
    assert all(type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm" for m in d_layers)
    assert all(
        m.parametrizations.weight[0].n_power_iterations == 1 for m in d_layers if m.weight.ndim > 1
    )


def test_normalized_weights_have_largest_singular_value_one_after_training_forwards():
    G, D = small_networks("SN-DCGAN", 3, width=16)
    opt_D = torch.optim.Adam(D.parameters(), 1e-3, (0.5, 0.9))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(3):  # the weights move, so u must follow them
        train.discriminator_step(G, D, opt_D, x, model.sample_z(8), "standard")
    with torch.no_grad():
        for _ in range(40):  # one power iteration per training forward (Alg. 1)
            D(x)
    raw = [
        torch.linalg.matrix_norm(layer.parametrizations.weight.original.flatten(1), ord=2).item()
        for layer in normalized(D)
    ]
    # the unnormalised weights are not near 1 by themselves
    assert max(abs(s - 1) for s in raw) > 0.2
    D.eval()  # read W / sigma(W) without running another power iteration
    sigmas = [
        torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2).item() for layer in normalized(D)
    ]
    assert all(abs(s - 1) < 0.05 for s in sigmas), sigmas
    # the logged values (train.py's sn/sigma_*) are the same quantity
    logged = model.normalized_sigmas(D)
    assert list(logged) == LAYER_NAMES
    assert all(abs(logged[name].item() - s) < 1e-4 for name, s in zip(LAYER_NAMES, sigmas))


def test_power_iteration_vector_is_frozen_in_eval_and_updated_in_train():
    _, D = small_networks("SN-DCGAN")
    x = torch.rand(4, 1, 32, 32)
    before = power_vectors(D)
    D.eval()
    assert torch.equal(D(x), D(x))
    assert all(torch.equal(a, b) for a, b in zip(before, power_vectors(D)))
    D.train()
    D(x)
    after = power_vectors(D)
    # every convolution's u moves; the dense layer's u is a 1-vector (its single row), already exact
    assert all(not torch.equal(a, b) for a, b in zip(before[:7], after[:7]))
    assert "parametrizations.weight.0._u" in "".join(D.state_dict())  # u persists in checkpoints


def test_one_D_update_runs_exactly_one_power_iteration():
    G, D = small_networks("SN-DCGAN")
    opt_D = torch.optim.Adam(D.parameters(), 1e-4, (0.5, 0.999))
    reference = copy.deepcopy(D)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        reference(x)  # one training forward = one power iteration per layer
    train.discriminator_step(G, D, opt_D, x, model.sample_z(4), "standard")
    assert all(torch.equal(a, b) for a, b in zip(power_vectors(reference), power_vectors(D)))


def test_under_bf16_each_step_computes_w_over_sigma_once_in_float32_outside_autocast():
    G, D = small_networks("SN-DCGAN", 3)
    _, twin = small_networks("SN-DCGAN", 3)  # the same D, trained in float32
    calls = []
    for _, layer in D.normalized_layers():
        layer.parametrizations.weight[0].register_forward_pre_hook(
            lambda module, inputs: calls.append(torch.is_autocast_enabled("cpu"))
        )
    convs = []
    D.net[0].register_forward_hook(lambda module, inputs, output: convs.append(output.dtype))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for _ in range(3):
        with train.normalized_in_float32(D, grad=False), torch.autocast("cpu", torch.bfloat16):
            D(x)
            D(x)  # a second forward in the same step reuses the cached W / sigma(W)
        twin(x)
    # Eq. 20-22: one power iteration per layer and step, outside autocast, in float32 ...
    assert calls == [False] * 3 * len(D.normalized_layers()) and convs == [torch.bfloat16] * 6
    # ... so u, v and the normalised weights are exactly those of the float32 network
    for (_, layer), (_, other) in zip(D.normalized_layers(), twin.normalized_layers()):
        sn, sn_twin = layer.parametrizations.weight[0], other.parametrizations.weight[0]
        assert sn._u.dtype == torch.float32
        assert torch.equal(sn._u, sn_twin._u) and torch.equal(sn._v, sn_twin._v)
    # D's step: the cached W / sigma(W) carries the gradient to W; G's step (D held fixed): no
    # graph through W / sigma(W) is built
    opt_D = torch.optim.SGD(D.parameters(), lr=0.0)
    with train.normalized_in_float32(D, grad=True), torch.autocast("cpu", torch.bfloat16):
        assert all(layer.weight.requires_grad for layer in normalized(D))
        train.discriminator_step(G, D, opt_D, x, model.sample_z(4), "standard")
    assert all(layer.parametrizations.weight.original.grad is not None for layer in normalized(D))
    with train.normalized_in_float32(D, grad=False):
        assert not any(layer.weight.requires_grad for layer in normalized(D))


# --- the losses (Eq. 15-17, §4) -------------------------------------------------------------------

REAL, FAKE = [2.0, -1.0], [0.5, -3.0]  # logits f(x), f(G(z)) at known points; m = 2


def test_standard_losses_by_value_and_gradient_at_known_logits():
    loss, real, fake = value_and_grads(train.discriminator_loss, [REAL, FAKE], "standard")
    # Eq. 15 negated: mean softplus(-f(x)) + mean softplus(f(G(z))), i.e. -E[log D(x)] - E[log(1 -
    # D(G(z)))]
    assert loss == pytest.approx(bce(REAL, 1) + bce(FAKE, 0))
    # its gradient: (sigmoid(f(x)) - 1) / m for the real logits, sigmoid(f(G(z))) / m for the fake
    # ones
    assert real == pytest.approx([(sigmoid(v) - 1) / 2 for v in REAL])
    assert fake == pytest.approx([sigmoid(v) / 2 for v in FAKE])
    assert train.discriminator_loss(
        torch.zeros(3), torch.zeros(3), "standard"
    ).item() == pytest.approx(2 * math.log(2))

    # §4: G minimises -E[log D(G(z))] = mean softplus(-f(G(z))); gradient (sigmoid(f(G(z))) - 1) / m
    loss, fake = value_and_grads(train.generator_loss, [FAKE], "standard")
    assert loss == pytest.approx(bce(FAKE, 1)) and fake == pytest.approx(
        [(sigmoid(v) - 1) / 2 for v in FAKE]
    )
    # non-saturating: a confident D (f(G(z)) = -10) still gives G a full-size gradient, about -1 per
    # sample
    confident = torch.full((4,), -10.0, requires_grad=True)
    train.generator_loss(confident, "standard").backward()
    assert torch.allclose(confident.grad, torch.full((4,), -0.25), atol=1e-4)


def test_hinge_losses_by_value_and_gradient_at_known_logits():
    loss, real, fake = value_and_grads(
        train.discriminator_loss, [[2.0, 0.5, -1.0], [-2.0, 0.0, 1.0]], "hinge"
    )
    # Eq. 16 negated: E[relu(1 - f(x))] + E[relu(1 + f(G(z)))] = mean(0, 0.5, 2) + mean(0, 1, 2)
    assert loss == pytest.approx(2.5 / 3 + 1.0)
    # its gradient: -1/m where a real logit is below the margin 1, +1/m where a fake one is above
    # -1, else 0
    assert real == pytest.approx([0.0, -1 / 3, -1 / 3]) and fake == pytest.approx(
        [0.0, 1 / 3, 1 / 3]
    )
    # both margins met
    assert train.discriminator_loss(torch.ones(2), -torch.ones(2), "hinge").item() == 0

    # Eq. 17: G minimises -E[f(G(z))]; gradient -1/m for every sample, however confident D is
    loss, fake = value_and_grads(train.generator_loss, [[-2.0, 0.0, 1.0]], "hinge")
    assert loss == pytest.approx(1 / 3) and fake == pytest.approx([-1 / 3] * 3)


@pytest.mark.parametrize("kind", ["standard", "hinge"])
def test_the_updates_take_the_gradient_of_their_loss_and_hold_the_other_network_fixed(kind):
    G, D, x, w, image = linear_pair()
    # lr 0: the loss and gradient of D's update, nothing moves
    loss, real_mean, fake_mean = frozen_d_update(train.discriminator_step, G, D, x, kind)
    real, fake = (x * w).flatten(1).sum(1), (image * w).sum()
    if kind == "standard":
        value = torch.nn.functional.softplus(-real).mean() + torch.nn.functional.softplus(fake)
        real_grad, fake_grad = (torch.sigmoid(real) - 1) / 4, torch.sigmoid(fake)
    else:
        value = (1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0)
        real_grad, fake_grad = -(real < 1).float() / 4, (fake > -1).float()
    assert torch.allclose(loss, value, atol=1e-6)
    assert torch.allclose(real_mean, real.mean(), atol=1e-6) and torch.allclose(
        fake_mean, fake, atol=1e-6
    )
    # d/dw: sum_i dloss/df(x_i) x_i + dloss/df(G(z)) G's image (the m fakes are one image)
    assert torch.allclose(
        D.w.grad, (real_grad.view(4, 1, 1, 1) * x).sum(0) + fake_grad * image, atol=1e-6
    )
    loss_G = frozen_g_update(train.generator_step, G, D, 4, kind)
    # G's loss at f(G(z)) = w . image, and its gradient w.r.t. the image: dloss/df times w
    if kind == "standard":
        value, slope = torch.nn.functional.softplus(-fake), torch.sigmoid(fake) - 1
    else:
        value, slope = -fake, torch.tensor(-1.0)
    assert torch.allclose(loss_G, value, atol=1e-6)
    assert torch.allclose(G.image.grad, slope * w, atol=1e-6)


# --- Table 1, and a run ---------------------------------------------------------------


def test_table1_settings_default_and_overrides():
    assert train.SETTINGS == {
        "A": (1e-4, 0.5, 0.9, 5),
        "B": (1e-4, 0.5, 0.999, 1),
        "C": (2e-4, 0.5, 0.999, 1),
        "D": (1e-3, 0.5, 0.9, 5),
        "E": (1e-3, 0.5, 0.999, 5),
        "F": (1e-3, 0.9, 0.999, 5),
    }
    args = parse()
    assert (args.setting, args.lr, args.beta1, args.beta2, args.n_dis) == ("B", 1e-4, 0.5, 0.999, 1)
    assert (args.loss, args.z_dim, args.width, args.iters, args.batch_size, args.image_size) == (
        "standard",
        128,
        64,
        100_000,
        64,
        32,
    )
    for setting, values in train.SETTINGS.items():
        args = parse("--setting", setting)
        assert (args.lr, args.beta1, args.beta2, args.n_dis) == values
    args = parse("--setting", "F", "--lr", "3e-4", "--n-dis", "2")
    assert (args.lr, args.beta1, args.beta2, args.n_dis) == (3e-4, 0.9, 0.999, 2)
    help_text = " ".join(train.build_parser().format_help().split())
    assert "setting B, n_dis = 1" in help_text and "100K" in help_text


def test_run_draws_n_dis_real_batches_per_step_and_logs_fig_9s_sigmas(mnist_root, tmp_path):
    checkpoint, tags = two_logged_steps(
        "SN-DCGAN",
        mnist_root,
        tmp_path / "run",
        "--batch-size",
        4,
        "--setting",
        "A",
        "--loss",
        "hinge",
    )
    assert checkpoint["batches"] == {
        "epoch": 0,
        "index": 2 * 5,
    }  # setting A: n_dis = 5 fresh real batches a step
    # the power iteration's u goes on from where it was
    assert any(k.endswith("._u") for k in checkpoint["D"])
    # Appendix C.1, Fig. 9: sigma(W_SN) of every layer stays near 1 (one power iteration per update
    # lags the moving weights by a few per cent)
    for name in LAYER_NAMES:
        assert [s for s, _ in tags[f"sn/sigma_{name}"]] == [1, 2]
        assert all(abs(sigma - 1) < 0.1 for _, sigma in tags[f"sn/sigma_{name}"])


# --- Fig. 3: the singular values of D's layers, with and without spectral normalisation -----------


def test_spectrum_of_a_normalized_layer_has_largest_value_one_after_power_iterations():
    D = model.Discriminator(32, 1, width=8)
    with torch.no_grad():
        for layer in normalized(D):
            # raw sigmas far from 1; u must catch up
            layer.parametrizations.weight.original.mul_(7.0)
        for _ in range(30):  # one power iteration per training forward (Alg. 1)
            D(torch.rand(2, 1, 32, 32))
    values = model.singular_values(D)
    assert list(values) == LAYER_NAMES
    D.eval()
    for layer, s in zip(normalized(D), values.values()):
        # W / sigma(W) as the forward uses it, a convolution as d_out x (d_in h w)
        W = layer.weight.flatten(1)
        assert len(s) == min(W.shape) and torch.all(s[:-1] >= s[1:])
        assert abs(s[0].item() - 1) < 0.02, s[0]
        assert torch.allclose(s.float(), torch.linalg.svdvals(W), atol=1e-4)


@pytest.fixture(scope="module")
def no_sn_run(mnist_root, tmp_path_factory):
    """A tiny run with --no-sn: one generator step."""
    run = tmp_path_factory.mktemp("no_sn") / "run"
    assert (
        run_main(
            train,
            *QUICK["SN-DCGAN"],
            "--data-root",
            mnist_root,
            "--out",
            run,
            "--no-sn",
            "--max-steps",
            1,
        )
        == 0
    )
    return run


def test_no_sn_builds_a_plain_D_that_trains_and_resumes(no_sn_run):
    D = model.Discriminator(32, 1, width=8, spectral=False)
    assert (
        not any(parametrize.is_parametrized(m) for m in D.modules())
        and len(D.normalized_layers()) == 8
    )
    checkpoint = load_checkpoint(no_sn_run)
    assert checkpoint["args"]["no_sn"] is True and checkpoint["step"] == 1
    # plain weight tensors, no u or v
    assert not any("parametrizations" in key for key in checkpoint["D"])
    # --resume reads --no-sn from the checkpoint: an SN D could not load these weights
    assert run_main(train, "--resume", no_sn_run, "--max-steps", 2) == 0
    assert load_checkpoint(no_sn_run)["step"] == 2


def test_evaluate_spectra_writes_the_figure_and_merges_the_numbers(no_sn_run, capsys):
    (no_sn_run / "metrics.json").write_text('{"fid": 12.5}')
    capsys.readouterr()
    assert run_main(train, "--evaluate-spectra", no_sn_run) == 0
    printed = capsys.readouterr().out
    assert (no_sn_run / "spectra.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((no_sn_run / "metrics.json").read_text())
    assert metrics["fid"] == 12.5  # another evaluation's record stays
    record = metrics["spectra"]
    assert record["spectral_norm"] is False and list(record["layers"]) == LAYER_NAMES
    D = model.Discriminator(32, 1, width=8, spectral=False)
    D.load_state_dict(load_checkpoint(no_sn_run)["D"])
    for name, layer in D.normalized_layers():
        s = torch.linalg.svdvals(layer.weight.detach().flatten(1).double())
        assert record["layers"][name]["largest"] == pytest.approx(s[0].item(), rel=1e-6)
        share = ((s / s[0]) ** 2 > 0.1).double().mean().item()
        assert record["layers"][name]["share_squared_above"] == pytest.approx(share)
        assert f"{s[0].item():.4f}" in printed
    # everything comes from the run: where and how fast may be given, a flag that changes what is
    # computed is refused in one line
    assert run_main(train, "--evaluate-spectra", no_sn_run, "--device", "cpu") == 0
    line = exits_2(capsys, train, "--evaluate-spectra", no_sn_run, "--width", 4, "--device", "cpu")
    assert "--width cannot change" in line and "--device" not in line.split("(")[0]
