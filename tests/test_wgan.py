"""WGAN/: the official networks, Algorithm 1's losses by value and gradient, the clip after the
update, RMSProp without momentum, the official critic schedule and length, the critic iterations of
a run, §4.3's three generators (--generator) layer by layer, and the data's resize."""

import copy

import pytest
import torch
from torch import nn

from conftest import (
    frozen_d_update,
    frozen_g_update,
    linear_pair,
    load_checkpoint,
    load_folder,
    quick_run,
    run_main,
    small_networks,
    two_logged_steps,
)

wgan = load_folder("WGAN")


def test_official_architecture_at_64px():
    G, D = wgan.model.Generator(64, 3), wgan.model.Critic(64, 3)
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (100, 512, (4, 4), (1, 1)),
        (512, 256, (4, 4), (2, 2)),
        (256, 128, (4, 4), (2, 2)),
        (128, 64, (4, 4), (2, 2)),
        (64, 3, (4, 4), (2, 2)),
    ]
    downs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in downs] == [
        (3, 64, (4, 4)),
        (64, 128, (4, 4)),
        (128, 256, (4, 4)),
        (256, 512, (4, 4)),
        (512, 1, (4, 4)),
    ]
    assert all(m.bias is None for m in [*ups, *downs])
    # batch norm after every critic convolution except the input layer and the score
    layers = list(D.net)
    assert isinstance(layers[1], nn.LeakyReLU) and layers[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 3
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)


def test_no_sigmoid_in_the_critic_its_output_is_linear():
    _, D = small_networks("WGAN")
    assert not any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in D.modules())
    x = torch.rand(8, 1, 32, 32) * 2 - 1
    before = D(x).detach()
    with torch.no_grad():
        D.score.weight.mul_(-300)
    after = D(x).detach()
    # a linear last layer: scaling it scales the score, sign and all; a sigmoid would squash it
    assert torch.allclose(after, -300 * before, rtol=1e-4, atol=1e-6)
    assert after.abs().max() > 1 and (after < 0).any() and (after > 0).any()


def test_losses_by_value_and_gradient_on_a_linear_critic():
    G, D, x, w, image = linear_pair(6, (1, 4, 4))
    # lines 5-6 with lr 0 and a clip far outside w: the loss and gradient before any update
    loss, estimate = frozen_d_update(wgan.train.critic_step, G, D, x, 1e9)
    # the estimate E[f_w(x)] - E[f_w(G(z))] = w . (mean x - G's image); the critic descends minus it
    assert torch.allclose(estimate, (w * (x.mean(0) - image)).sum(), atol=1e-6)
    assert torch.equal(loss, -estimate)
    # line 5: g_w = grad_w of the estimate; the loss's gradient is its negative, G's image - mean x
    assert torch.allclose(D.w.grad, image - x.mean(0), atol=1e-6)
    # line 10: G descends -E[f_w(G(z))] = -w . image, whose gradient w.r.t. the image is -w
    loss_G = frozen_g_update(wgan.train.generator_step, G, D, 6)
    assert torch.allclose(loss_G, -(w * image).sum(), atol=1e-6)
    assert torch.allclose(G.image.grad, -w)


def test_clip_puts_every_critic_weight_in_the_box_after_the_rmsprop_step():
    G, D = small_networks("WGAN")
    with torch.no_grad():
        for i, w in enumerate(D.parameters()):
            w.fill_(
                0.5 if i % 2 else -0.7
            )  # every critic parameter, batch norm's included, outside [-c, c]
    reference = copy.deepcopy(D)
    x, z = torch.rand(8, 1, 32, 32) * 2 - 1, wgan.model.sample_z(8)
    # lr 1: one RMSProp step moves each weight by up to 10
    wgan.train.critic_step(G, D, wgan.train.rmsprop(D.parameters(), 1.0), x, z, clip=0.01)

    # line 7 after line 6: the same RMSProp step by hand, then the clamp
    with torch.no_grad():
        fake = G(z)
    (reference(fake).mean() - reference(x).mean()).backward()
    torch.optim.RMSprop(reference.parameters(), lr=1.0).step()
    for (name, w), stepped in zip(D.named_parameters(), reference.parameters()):
        assert w.abs().max() <= 0.01, name
        assert torch.equal(w.detach(), stepped.detach().clamp(-0.01, 0.01)), name
    assert any(
        w.abs().max() > 0.01 for w in reference.parameters()
    )  # unclipped, the step leaves the box


def test_critic_schedule():
    schedule = wgan.train.critic_iterations
    assert (
        schedule(0, 5, True) == 100
        and schedule(24, 5, True) == 100
        and schedule(500, 5, True) == 100
    )
    assert schedule(25, 5, True) == 5 and schedule(30, 5, True) == 5 and schedule(501, 5, True) == 5
    assert schedule(1000, 7, True) == 100 and schedule(999, 7, True) == 7
    assert all(schedule(step, 5, False) == 5 for step in range(0, 2001))


def test_default_length_is_25_epochs_of_critic_batches():
    per_epoch = 50000 // 64  # CIFAR-10 at batch 64
    steps = wgan.train.default_iterations(per_epoch, 5, True)
    drawn = [wgan.train.critic_iterations(s, 5, True) for s in range(steps)]
    assert sum(drawn) >= 25 * per_epoch > sum(drawn[:-1])
    assert wgan.train.default_iterations(100, 5, False) == 25 * 100 // 5


def test_run_draws_a_real_batch_per_critic_iteration_and_keeps_the_clip(mnist_root, tmp_path):
    checkpoint, tags = two_logged_steps(
        "WGAN", mnist_root, tmp_path / "run", "--batch-size", 4, "--n-critic", 3
    )
    assert checkpoint["batches"] == {
        "epoch": 0,
        "index": 2 * 3,
    }  # n_critic fresh real batches per G step
    assert all(
        v.abs().max() <= 0.01 for k, v in checkpoint["D"].items() if k.endswith(("weight", "bias"))
    )
    assert all(
        set(s) == {"step", "square_avg"} for s in checkpoint["opt_D"]["state"].values()
    )  # no momentum
    assert [s for s, _ in tags["wasserstein/estimate"]] == [1, 2]
    for (_, w), (_, loss_D) in zip(tags["wasserstein/estimate"], tags["loss/D"]):
        assert w == pytest.approx(-loss_D)


def run_args(generator, size, channels=1, width=8):
    return {
        "generator": generator,
        "image_size": size,
        "channels": channels,
        "z_dim": 100,
        "width": width,
    }


@pytest.mark.parametrize("generator", ["dcgan", "nobn", "mlp"])
@pytest.mark.parametrize("size, channels", [(32, 1), (64, 3)])
def test_each_generator_makes_images_the_critic_scores(generator, size, channels):
    torch.manual_seed(0)
    G = wgan.model.build_generator(run_args(generator, size, channels))
    D = wgan.model.Critic(size, channels, width=8)
    images = G(wgan.model.sample_z(5))
    assert images.shape == (5, channels, size, size)
    assert D(images).shape == (5,)
    assert images.std(0).mean() > 0  # each z gives its own image


def describe(net):
    """The modules that run in `net`, in order: each layer's type with its sizes."""
    shown = []
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            k, stride, pad = m.kernel_size[0], m.stride[0], m.padding[0]
            shown.append(f"{type(m).__name__} {m.in_channels}->{m.out_channels} {k}/{stride}/{pad}")
        elif isinstance(m, nn.Linear):
            shown.append(f"Linear {m.in_features}->{m.out_features}")
        elif isinstance(m, nn.BatchNorm2d):
            shown.append(f"BatchNorm2d {m.num_features}")
        elif isinstance(m, nn.LeakyReLU):
            shown.append(f"LeakyReLU {m.negative_slope}")
        elif not list(m.children()):
            shown.append(type(m).__name__)
    return shown


# at 32 px, 1 channel, width 8: kernel/stride/padding of each convolution
LAYERS = {
    # Fig. 5, official DCGAN_G: z as a 1x1 image to 4x4, then batch norm and ReLU after each
    # doubling but the last, which has tanh
    "dcgan": [
        "ConvTranspose2d 100->32 4/1/0", "BatchNorm2d 32", "ReLU",
        "ConvTranspose2d 32->16 4/2/1", "BatchNorm2d 16", "ReLU",
        "ConvTranspose2d 16->8 4/2/1", "BatchNorm2d 8", "ReLU",
        "ConvTranspose2d 8->1 4/2/1", "Tanh",
    ],
    # Fig. 6: no batch norm, --width filters in every hidden layer
    "nobn": [
        "Unflatten",
        "ConvTranspose2d 100->8 4/1/0", "ReLU",
        "ConvTranspose2d 8->8 4/2/1", "ReLU",
        "ConvTranspose2d 8->8 4/2/1", "ReLU",
        "ConvTranspose2d 8->1 4/2/1", "Tanh",
    ],
    # Fig. 7: 4 hidden ReLU layers of 512 units; a linear output, as the official MLP_G
    "mlp": [
        "Linear 100->512", "ReLU",
        "Linear 512->512", "ReLU",
        "Linear 512->512", "ReLU",
        "Linear 512->512", "ReLU",
        "Linear 512->1024", "Unflatten",
    ],
}  # fmt: skip


@pytest.mark.parametrize("generator", ["dcgan", "nobn", "mlp"])
def test_each_generators_layers_in_order(generator):
    assert describe(wgan.model.build_generator(run_args(generator, 32))) == LAYERS[generator]


def test_the_critics_layers_in_order():
    """Fig. 3: DCGAN's discriminator without the sigmoid: no batch norm on the input layer, and a
    4x4 convolution to one linear score (official code)."""
    assert describe(wgan.model.Critic(32, 1, width=8)) == [
        "Conv2d 1->8 4/2/1", "LeakyReLU 0.2",
        "Conv2d 8->16 4/2/1", "BatchNorm2d 16", "LeakyReLU 0.2",
        "Conv2d 16->32 4/2/1", "BatchNorm2d 32", "LeakyReLU 0.2",
        "Conv2d 32->1 4/1/0",
    ]  # fmt: skip


def test_nobn_has_an_order_of_magnitude_fewer_parameters():
    """Fig. 6's caption: "a bit more than an order of magnitude" fewer parameters than the DCGAN
    generator, at the paper's 64 px and width 64."""
    nobn = wgan.model.build_generator(run_args("nobn", 64, 3, width=64))
    dcgan = wgan.model.build_generator(run_args("dcgan", 64, 3, width=64))
    ratio = sum(w.numel() for w in dcgan.parameters()) / sum(w.numel() for w in nobn.parameters())
    assert 10 < ratio < 15


def test_mlp_run_trains_and_resume_and_sampling_rebuild_the_mlp(tiny_mnist_root, tmp_path):
    run = quick_run(
        "WGAN", tiny_mnist_root, tmp_path / "run", "--generator", "mlp", "--max-steps", 1
    )
    first = load_checkpoint(run)
    assert first["args"]["generator"] == "mlp" and first["step"] == 1
    assert first["G"]["0.weight"].shape == (512, 100)
    # --resume reads the choice from the checkpoint: the MLP's weights load only into an MLP
    assert run_main(wgan.train, "--resume", run, "--max-steps", 2) == 0
    resumed = load_checkpoint(run)
    assert resumed["step"] == 2 and resumed["args"]["generator"] == "mlp"
    assert not torch.equal(resumed["G"]["0.weight"], first["G"]["0.weight"])  # it trained on
    assert run_main(wgan.model, run, "--num", 4, "--out", tmp_path / "grid.png") == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_in_memory_sets_are_resized_antialiased_and_rounded(tiny_mnist_root):
    data = wgan.dataset
    # 4x4 -> 2x2: antialiased bilinear weighs every pixel (plain bilinear: 25, 45, 105, 125)
    x = (torch.arange(16) * 10).to(torch.uint8).view(1, 1, 4, 4)
    assert data.resize(x, 2).flatten().tolist() == [36, 51, 99, 114]
    # 2x2 -> 1x1: the mean 1.75 rounds to 2; the stored size is left as it is
    x = torch.tensor([[1, 2], [2, 2]], dtype=torch.uint8).view(1, 1, 2, 2)
    assert data.resize(x, 1).flatten().tolist() == [2] and data.resize(x, 2) is x
    for split, count in (("train", 600), ("test", 200)):  # tiny MNIST's sizes
        stored, _ = wgan.support.read_split("mnist", tiny_mnist_root, split == "train")
        images = data.load_images("mnist", tiny_mnist_root, 32, split)
        assert images.shape == (count, 1, 32, 32) and torch.equal(images, data.resize(stored, 32))
    with pytest.raises(data.DataError, match="has no test split"):
        data.load_images("celeba", tiny_mnist_root, 32, "test")
