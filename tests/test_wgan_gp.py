"""WGAN-GP/: Algorithm 1's penalty and losses by value and gradient, eps per sample, the
whole-sample norm, a critic without normalisation or cross-sample coupling (§4), the official
networks and init, the critic steps of a run, and §5.6's --train-subset: a seeded subset kept by
--resume, and the estimate on held-out images that changes no training; dataset.py's resize and
splits."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import (
    QUICK,
    LinearD,
    assert_same_networks,
    exits_2,
    frozen_d_update,
    frozen_g_update,
    linear_pair,
    load_checkpoint,
    load_folder,
    quick_run,
    run_main,
    scalar_tags,
    small_networks,
    two_logged_steps,
)

wgan_gp = load_folder("WGAN-GP")
NORMALISATION = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.LocalResponseNorm,
)


def cross_sample_gradient(D, x):
    """The largest |d D(x)_i / d x_j| over i != j, and the smallest max |d D(x)_i / d x_i|, on
    one batch."""
    x = x.clone().requires_grad_(True)
    scores = D(x)
    off, own = 0.0, math.inf
    for i in range(len(x)):
        (grad,) = torch.autograd.grad(scores[i], x, retain_graph=True)
        others = torch.cat([grad[:i], grad[i + 1 :]])
        off = max(off, others.abs().max().item())
        own = min(own, grad[i].abs().max().item())
    return off, own


def test_official_cifar10_network():
    G, D = wgan_gp.model.Generator(32, 3), wgan_gp.model.Critic(32, 3)
    assert G.project[0].in_features == 128 and G.project[0].out_features == 4 * 4 * 4 * 128
    assert isinstance(G.project[1], nn.BatchNorm1d) and isinstance(G.project[2], nn.ReLU)
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (512, 256, (5, 5), (2, 2)),
        (256, 128, (5, 5), (2, 2)),
        (128, 3, (5, 5), (2, 2)),
    ]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 2  # none on G's output
    assert isinstance(G.net[-1], nn.Tanh)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (3, 128, (5, 5), (2, 2)),
        (128, 256, (5, 5), (2, 2)),
        (256, 512, (5, 5), (2, 2)),
    ]
    slopes = [m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2, 0.2]
    assert (D.score.in_features, D.score.out_features) == (4 * 4 * 512, 1)
    # a critic's score, not a probability
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())


def test_critic_has_no_normalisation_and_no_cross_sample_coupling_in_train_mode():
    for D in (wgan_gp.model.Critic(32, 3, width=8), wgan_gp.model.Critic(64, 3, width=8)):
        assert not [m for m in D.modules() if isinstance(m, NORMALISATION)]
    # G keeps its BN
    assert any(isinstance(m, nn.BatchNorm2d) for m in wgan_gp.model.Generator(32, 3).modules())
    _, D = small_networks("WGAN-GP", 3)
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    off, own = cross_sample_gradient(D.train(), x)
    assert off == 0.0 and own > 0
    # the same check sees the coupling that batch norm brings
    coupled = nn.Sequential(
        nn.Conv2d(3, 4, 5, 2, 2),
        nn.BatchNorm2d(4),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 1),
        nn.Flatten(0),
    ).train()
    assert cross_sample_gradient(coupled, x)[0] > 0


def test_penalty_of_a_linear_critic_is_analytic_by_value_and_gradient():
    torch.manual_seed(0)
    # per-channel scales make the norm over the whole sample differ from any per-channel norm
    w = torch.randn(3, 8, 8) * torch.tensor([0.02, 0.1, 0.3]).view(3, 1, 1)
    D = LinearD(w)
    real, fake = torch.rand(16, 3, 8, 8) * 2 - 1, torch.rand(16, 3, 8, 8) * 2 - 1
    gp = wgan_gp.train.gradient_penalty(D, real, fake)
    norm = w.norm()
    assert torch.allclose(gp, (norm - 1) ** 2, rtol=1e-5)
    per_channel = ((w.flatten(1).norm(dim=1) - 1) ** 2).mean()
    # a per-channel norm would fail the line above
    assert not torch.allclose(per_channel, gp, rtol=1e-2)
    # create_graph=True: the penalty has a gradient w.r.t. w, 2 (||w|| - 1) w / ||w||
    (grad_w,) = torch.autograd.grad(gp, D.w)
    assert grad_w.abs().max() > 0
    assert torch.allclose(grad_w, 2 * (norm - 1) * w / norm, rtol=1e-4, atol=1e-7)


def test_losses_by_value_and_gradient_on_a_linear_critic():
    G, D, x, w, image = linear_pair(6, (1, 4, 4))
    norm = w.norm()
    # Alg. 1 line 7 with lambda = 10, and line 9 at lr 0: the loss and its gradient before any
    # update
    loss, estimate, gp = frozen_d_update(wgan_gp.train.critic_step, G, D, x, 10.0)
    # E[D(x)] - E[D(x~)] = w . (mean x - G's image); the penalty (||w|| - 1)^2, since grad_x^ D = w
    # everywhere
    assert torch.allclose(estimate, (w * (x.mean(0) - image)).sum(), atol=1e-6)
    assert torch.allclose(gp, (norm - 1) ** 2, rtol=1e-5)
    # L = D(x~) - D(x) + lambda (||w|| - 1)^2, averaged over the batch
    assert torch.allclose(loss, -estimate + 10 * (norm - 1) ** 2, rtol=1e-5, atol=1e-6)
    # grad_w L = G's image - mean x + lambda 2 (||w|| - 1) w / ||w||
    assert torch.allclose(
        D.w.grad, image - x.mean(0) + 10 * 2 * (norm - 1) * w / norm, rtol=1e-4, atol=1e-6
    )
    # Alg. 1 line 12: G descends -D(G(z)) = -w . image, whose gradient w.r.t. the image is -w
    loss_G = frozen_g_update(wgan_gp.train.generator_step, G, D, 6)
    assert torch.allclose(loss_G, -(w * image).sum(), atol=1e-6)
    assert torch.allclose(G.image.grad, -w)


def test_eps_is_drawn_per_sample():
    torch.manual_seed(0)
    D = LinearD(torch.ones(1, 8, 8))
    real, fake = torch.ones(256, 1, 8, 8), -torch.ones(256, 1, 8, 8)
    wgan_gp.train.gradient_penalty(D, real, fake)
    (x_hat,) = D.inputs  # eps x + (1 - eps) x~ = 2 eps - 1 for these images
    first = x_hat.flatten(1)[:, :1]
    assert torch.equal(x_hat.flatten(1), first.expand(-1, 64))  # one eps for all pixels of a sample
    assert len(torch.unique(first)) == 256  # a different eps for every sample
    assert first.min() >= -1 and first.max() <= 1
    eps = (first + 1) / 2  # U[0, 1]: mean 1/2, variance 1/12
    assert abs(eps.mean().item() - 0.5) < 0.06 and abs(eps.var().item() - 1 / 12) < 0.02


def test_penalty_stays_finite_when_fake_equals_real_or_the_gradient_is_zero():
    _, D = small_networks("WGAN-GP")
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    gp = wgan_gp.train.gradient_penalty(D, real, real.clone())
    gp.backward()
    # the last bias does not move the gradient
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert torch.isfinite(gp) and len(grads) == len(list(D.parameters())) - 1
    assert all(torch.isfinite(g).all() for g in grads)
    # A critic whose input gradient is exactly zero: the penalty is 1, and its weight gradient is
    # finite (d||g||/dg at g = 0 is NaN when the norm is written as sqrt(sum(g^2))).
    D.zero_grad()
    nn.init.zeros_(D.score.weight)
    gp = wgan_gp.train.gradient_penalty(D, real, real.clone())
    gp.backward()
    assert gp.item() == 1.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in D.parameters())


def test_init_follows_the_official_code():
    G, D = small_networks("WGAN-GP", 3, width=wgan_gp.model.WIDTH)
    conv = [m for m in D.modules() if isinstance(m, nn.Conv2d)][1]  # 128 -> 256, 5x5, stride 2
    deconv = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)][0]  # 512 -> 256
    expected = {
        conv: math.sqrt(4 / (128 * 25 + 256 * 25 / 4)),
        deconv: math.sqrt(4 / (512 * 25 / 4 + 256 * 25)),
        D.score: math.sqrt(2 / (8192 + 1)),
        G.project[0]: math.sqrt(2 / (128 + 8192)),
    }
    for module, std in expected.items():
        assert abs(module.weight.std().item() / std - 1) < 0.03
        assert module.weight.abs().max().item() <= std * math.sqrt(3)  # uniform
        assert torch.all(module.bias == 0)


def test_run_draws_n_critic_real_batches_per_generator_iteration_and_logs_the_penalty(
    mnist_root, tmp_path
):
    checkpoint, tags = two_logged_steps(
        "WGAN-GP", mnist_root, tmp_path / "run", "--batch-size", 4, "--n-critic", 3
    )
    assert checkpoint["batches"] == {
        "epoch": 0,
        "index": 2 * 3,
    }  # Alg. 1 line 4: a fresh x each time
    assert [s for s, _ in tags["penalty/gp"]] == [1, 2] and all(
        gp >= 0 for _, gp in tags["penalty/gp"]
    )
    assert [s for s, _ in tags["wasserstein/estimate"]] == [1, 2]


def test_train_subset_has_n_images_fixed_by_the_seed_and_holds_out_the_others():
    # image i is all i
    images = torch.arange(200, dtype=torch.uint8).view(200, 1, 1, 1).expand(200, 1, 2, 2)
    train, valid, split = wgan_gp.dataset.subset(images, 50, 30, seed=3)
    assert len(train) == 50 and torch.equal(train, images[split["subset"]])
    assert len(valid) == 30 and torch.equal(
        valid, wgan_gp.dataset.to_tanh_range(images[split["valid"]])
    )
    # held out: none of them is trained on
    assert not set(split["subset"].tolist()) & set(split["valid"].tolist())
    again, other = (
        wgan_gp.dataset.subset(images, 50, 30, seed=3)[2],
        wgan_gp.dataset.subset(images, 50, 30, seed=4)[2],
    )
    assert torch.equal(again["subset"], split["subset"]) and torch.equal(
        again["valid"], split["valid"]
    )
    assert set(other["subset"].tolist()) != set(split["subset"].tolist())


def test_subset_run_logs_the_held_out_estimate_and_resume_keeps_the_recorded_subset(
    tiny_mnist_root, tmp_path
):
    run = quick_run(
        "WGAN-GP",
        tiny_mnist_root,
        tmp_path / "run",
        "--train-subset",
        40,
        "--max-steps",
        2,
        "--log-every",
        1,
    )
    split = load_checkpoint(run)["batches"]["split"]
    # --batch-size 8
    assert len(split["subset"]) == 40 and len(split["valid"]) == wgan_gp.train.VALID_BATCHES * 8
    assert not set(split["subset"].tolist()) & set(split["valid"].tolist())
    assert [step for step, _ in scalar_tags(run)["wasserstein/estimate_valid"]] == [1, 2]
    # --resume trains on the subset the checkpoint recorded, not on one drawn anew: plant another
    # one there
    checkpoint = load_checkpoint(run)
    planted = {"subset": torch.arange(40), "valid": torch.arange(40, 120)}
    checkpoint["batches"]["split"] = planted
    torch.save(checkpoint, run / "checkpoints" / "last.pt")
    assert run_main(wgan_gp.train, "--resume", run, "--max-steps", 3) == 0
    resumed = load_checkpoint(run)
    assert resumed["step"] == 3 and all(
        torch.equal(resumed["batches"]["split"][k], planted[k]) for k in planted
    )


def test_held_out_estimate_changes_no_random_stream_weight_or_statistic(
    tiny_mnist_root, tmp_path, monkeypatch
):
    flags = ("--train-subset", 40, "--max-steps", 3, "--log-every", 1)
    with_valid = quick_run("WGAN-GP", tiny_mnist_root, tmp_path / "with", *flags)
    monkeypatch.setattr(wgan_gp.train, "wasserstein_valid", lambda *args: 0.0)
    without_valid = quick_run("WGAN-GP", tiny_mnist_root, tmp_path / "without", *flags)
    a, b = load_checkpoint(with_valid), load_checkpoint(without_valid)
    assert_same_networks(a, b)  # every weight and G's batch-norm statistics
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert scalar_tags(with_valid)["loss/D"] == scalar_tags(without_valid)["loss/D"]


def test_train_subset_must_leave_images_out_and_fill_a_batch(tiny_mnist_root, tmp_path, capsys):
    quick = (*QUICK["WGAN-GP"], "--data-root", tiny_mnist_root, "--out", tmp_path / "run")
    # the tiny set's 600 images
    assert "held out" in exits_2(capsys, wgan_gp.train, *quick, "--train-subset", 600)
    assert "--train-subset must be at least 8" in exits_2(
        capsys, wgan_gp.train, *quick, "--train-subset", 4
    )


# --- dataset.py: the in-memory sets resized here, and the splits ---------------------------------


def test_resize_is_bilinear_antialiased_and_rounded_in_chunks(monkeypatch):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (7, 1, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(wgan_gp.dataset, "RESIZE_CHUNK", 3)  # 7 images: chunks of 3, 3 and 1
    for size, source in ((32, images), (16, images[..., :24, :24])):  # up, and down from 24 px
        reference = F.interpolate(source.float(), (size, size), mode="bilinear", antialias=True)
        resized = wgan_gp.dataset.resize(source, size)
        assert resized.dtype == torch.uint8 and torch.equal(
            resized, reference.round().to(torch.uint8)
        )
        assert not torch.equal(resized, reference.to(torch.uint8))  # rounded, not truncated
    plain = F.interpolate(images[..., :24, :24].float(), (16, 16), mode="bilinear")
    assert not torch.equal(
        wgan_gp.dataset.resize(images[..., :24, :24], 16), plain.round().to(torch.uint8)
    )
    assert wgan_gp.dataset.resize(images, 28) is images  # already the size: left as it is


def test_load_images_gives_the_train_or_test_split_at_the_size_and_refuses_a_missing_one(
    tiny_mnist_root, tmp_path
):
    data, support = wgan_gp.dataset, wgan_gp.support
    for split, count in (("train", 600), ("test", 200)):  # the tiny MNIST's splits
        stored, _ = support.read_split("mnist", tiny_mnist_root, train=split == "train")
        images = data.load_images("mnist", tiny_mnist_root, 32, split)
        assert images.shape == (count, 1, 32, 32) and torch.equal(images, data.resize(stored, 32))
    (tmp_path / "images").mkdir()
    with pytest.raises(support.DataError, match="no test split"):
        data.load_images("folder", tmp_path / "images", 32, "test")
