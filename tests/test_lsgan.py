"""LSGAN/: §3.2's least squares losses by value and gradient, the codings, a D without sigmoid, and
the figure's networks, their sizes and init."""

import pytest
import torch
from torch import nn

from conftest import (
    assert_image_shapes,
    conv_sizes,
    exits_2,
    frozen_d_update,
    frozen_g_update,
    linear_pair,
    load_folder,
    small_networks,
    value_and_grads,
)

lsgan = load_folder("LSGAN")
model, train = lsgan.model, lsgan.train
CODINGS = train.CODINGS


# --- the losses (§3.2) ---------------------------------------------------------------------------


def test_the_two_codings_are_the_papers():
    assert CODINGS["0-1"] == (0.0, 1.0, 1.0)
    a, b, c = CODINGS["pearson"]
    # §3.2.2's Pearson chi^2 conditions
    assert (a, b, c) == (-1.0, 1.0, 0.0) and b - c == 1 and b - a == 2
    assert train.build_parser().get_default("coding") == "0-1"


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_losses_are_exactly_zero_at_their_targets_and_positive_elsewhere(name):
    a, b, c = CODINGS[name]
    assert train.discriminator_loss(torch.full((16,), b), torch.full((16,), a), a, b).item() == 0.0
    assert train.generator_loss(torch.full((16,), c), c).item() == 0.0
    assert train.discriminator_loss(torch.full((16,), a), torch.full((16,), a), a, b).item() > 0
    assert train.generator_loss(torch.full((16,), a), c).item() > 0


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_losses_are_means_of_squares_not_squares_of_means(name):
    a, b, c = CODINGS[name]
    # the batch mean hits the target, every single output misses it by 1
    spread = torch.tensor([-1.0, 1.0])
    # mean of squares: 1/2 * mean(1, 1) = 0.5; the square of the mean would give 0
    assert train.discriminator_loss(b + spread, torch.full((2,), a), a, b).item() == 0.5
    assert train.discriminator_loss(torch.full((2,), b), a + spread, a, b).item() == 0.5
    assert train.generator_loss(c + spread, c).item() == 0.5


# D's outputs at known points: 1/2 mean((D(x) - b)^2) + 1/2 mean((D(G(z)) - a)^2) by hand, and its
# gradient w.r.t. each output, (output - target) / m.
REAL_OUT, FAKE_OUT = [1.5, 0.0, -1.0, 2.0], [0.5, -2.0]


@pytest.mark.parametrize(
    "name, value, real_grad, fake_grad",
    [
        # real: residuals (0.5, -1, -2, 1), 1/2 * 6.25 / 4; fake: residuals (0.5, -2), 1/2 * 4.25 /
        # 2
        ("0-1", 0.78125 + 1.0625, [0.125, -0.25, -0.5, 0.25], [0.25, -1.0]),
        # real as above; fake: residuals (1.5, -1), 1/2 * 3.25 / 2
        ("pearson", 0.78125 + 0.8125, [0.125, -0.25, -0.5, 0.25], [0.75, -0.5]),
    ],
)
def test_D_loss_by_value_and_gradient_at_known_outputs(name, value, real_grad, fake_grad):
    a, b, _ = CODINGS[name]
    loss, real, fake = value_and_grads(train.discriminator_loss, [REAL_OUT, FAKE_OUT], a, b)
    assert loss == pytest.approx(value, abs=1e-12)
    assert real == pytest.approx(real_grad, abs=1e-12) and fake == pytest.approx(
        fake_grad, abs=1e-12
    )


@pytest.mark.parametrize(
    "name, value, grad",
    [
        ("0-1", (0.25 + 9 + 1) / 6, [-0.5 / 3, -1.0, 1 / 3]),  # residuals (-0.5, -3, 1) from c = 1
        (
            "pearson",
            (0.25 + 4 + 4) / 6,
            [0.5 / 3, -2 / 3, 2 / 3],
        ),  # residuals (0.5, -2, 2) from c = 0
    ],
)
def test_G_loss_by_value_and_gradient_at_known_outputs(name, value, grad):
    loss, fake = value_and_grads(train.generator_loss, [[0.5, -2.0, 2.0]], CODINGS[name][2])
    assert loss == pytest.approx(value, abs=1e-12) and fake == pytest.approx(grad, abs=1e-12)


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_the_updates_take_the_gradient_of_their_loss_and_hold_the_other_network_fixed(name):
    a, b, c = CODINGS[name]
    G, D, x, w, image = linear_pair()
    # lr 0: the loss and gradient of D's update, nothing moves
    loss, real_mean, fake_mean = frozen_d_update(train.discriminator_step, G, D, x, CODINGS[name])
    real_out, fake_out = (x * w).flatten(1).sum(1), (image * w).sum()
    assert torch.allclose(
        loss, 0.5 * ((real_out - b) ** 2).mean() + 0.5 * (fake_out - a) ** 2, atol=1e-6
    )
    assert torch.allclose(real_mean, real_out.mean(), atol=1e-6) and torch.allclose(
        fake_mean, fake_out, atol=1e-6
    )
    # d/dw: sum_i (D(x_i) - b) x_i / m + (D(G(z)) - a) G's image (the m fakes are one image)
    expected = ((real_out - b).view(4, 1, 1, 1) * x).mean(0) + (fake_out - a) * image
    assert torch.allclose(D.w.grad, expected, atol=1e-6)
    # G's update: 1/2 (w . image - c)^2, whose gradient w.r.t. the image is (w . image - c) w
    loss_G = frozen_g_update(train.generator_step, G, D, 4, CODINGS[name])
    assert torch.allclose(loss_G, 0.5 * (fake_out - c) ** 2, atol=1e-6)
    assert torch.allclose(G.image.grad, (fake_out - c) * w, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_D_steps_regress_D_to_its_codes(name):
    a, b, _ = CODINGS[name]
    G, D = small_networks("LSGAN")
    opt_D = torch.optim.Adam(D.parameters(), 1e-3, (0.5, 0.999))
    x, z = torch.rand(16, 1, 32, 32) * 2 - 1, model.sample_z(16)
    losses = [train.discriminator_step(G, D, opt_D, x, z, CODINGS[name]) for _ in range(25)]
    loss, real, fake = losses[-1]
    assert loss < losses[0][0] / 10
    assert abs(real - b) < 0.2 and abs(fake - a) < 0.2, (real, fake)


# --- D has a linear output ------------------------------------------------------------------------

BOUNDED = (
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.Hardsigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Softsign,
)


@pytest.mark.parametrize("size", [32, 112])
def test_no_sigmoid_anywhere_in_D_and_its_output_is_unbounded(size):
    _, D = small_networks("LSGAN", 3, size)
    # batch norm at its initial statistics (mean 0, variance 1): D's answer depends on x alone
    D.eval()
    assert not [m for m in D.modules() if isinstance(m, BOUNDED)]
    x = torch.rand(8, 3, size, size) * 2 - 1
    # D's answer is exactly its last linear layer's output: nothing squashes it afterwards
    seen = {}
    D.fc.register_forward_hook(lambda module, inputs, output: seen.update(fc=output))
    assert torch.equal(D(x), seen["fc"].squeeze(1))
    # with all biases 0 and batch norm at its initial statistics, D is positively homogeneous:
    # scaling the input scales the answer, without bound
    assert torch.allclose(D(1e6 * x), 1e6 * D(x), rtol=1e-3)
    assert D(1e6 * x).abs().min() > 1


# --- the figure's networks and their adaptation to other sizes ------------------------------------


def test_figure_layers_at_112px():
    G, D = model.Generator(112, 3), model.Discriminator(112, 3)
    assert G.project[0].in_features == 1024 and G.project[0].out_features == 7 * 7 * 256
    deconvs = [
        (m.in_channels, m.out_channels, m.kernel_size, m.stride)
        for m in G.modules()
        if isinstance(m, nn.ConvTranspose2d)
    ]
    assert deconvs == [
        (256, 256, (3, 3), (2, 2)),
        (256, 256, (3, 3), (1, 1)),
        (256, 256, (3, 3), (2, 2)),
        (256, 256, (3, 3), (1, 1)),
        (256, 128, (3, 3), (2, 2)),
        (128, 64, (3, 3), (2, 2)),
        (64, 3, (3, 3), (1, 1)),
    ]
    convs = [
        (m.out_channels, m.kernel_size, m.stride) for m in D.modules() if isinstance(m, nn.Conv2d)
    ]
    assert convs == [
        (64, (5, 5), (2, 2)),
        (128, (5, 5), (2, 2)),
        (256, (5, 5), (2, 2)),
        (512, (5, 5), (2, 2)),
    ]
    assert D.fc.in_features == 7 * 7 * 512 and D.fc.out_features == 1
    assert isinstance(G.net[-1], nn.Tanh) and not isinstance(G.net[-2], nn.BatchNorm2d)
    # no batch norm on D's input
    assert isinstance(D.net[1], nn.LeakyReLU) and D.net[1].negative_slope == 0.2


@pytest.mark.parametrize("size", [32, 48, 112])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_layer_doubles_keeps_or_halves_the_size_exactly(size, channels):
    G, D = model.Generator(size, channels, width=8), model.Discriminator(size, channels, width=8)
    assert_image_shapes(G, D, model.sample_z(2), channels, size)
    ups, downs = conv_sizes(G, D, model.sample_z(2))
    assert (
        ups[0][1] == size // 16
        and ups[-1][2] == size
        and all(o == m.stride[0] * i for m, i, o in ups)
    )
    assert (
        downs[0][1] == size and downs[-1][2] == size // 16 and all(2 * o == i for _, i, o in downs)
    )


@pytest.mark.parametrize("size", [16, 28, 50])
def test_sizes_that_are_not_multiples_of_16_are_refused(size, capsys):
    with pytest.raises(ValueError, match="multiple of 16"):
        model.Generator(size, 1, width=8)
    assert "multiple of 16" in exits_2(capsys, train, "--image-size", size, "--device", "cpu")


def test_init_statistics():
    G, D = small_networks("LSGAN", 3, 64, model.WIDTH)
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.numel() > 10000:
            # a normal truncated at 2 sigma
            expected = 0.02 * 0.88 if isinstance(m, nn.Conv2d) else 0.02
            assert (
                abs(m.weight.std().item() - expected) < 0.001
                and abs(m.weight.mean().item()) < 0.001
            )
        if isinstance(m, nn.Conv2d):
            assert m.weight.abs().max() <= 0.04
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1)
        if getattr(m, "bias", None) is not None:
            assert torch.all(m.bias == 0)
