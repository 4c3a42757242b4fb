"""LSGAN's Gaussian-mixture experiment (LSGAN/toy.py): the measures, the mixture, the networks,
the losses by value, the simultaneous update and an exact resume."""

import copy
import gc
import json
import math

import pytest
import torch
from torch import nn

from conftest import load_checkpoint, load_toy, run_main

STD = 0.01


@pytest.fixture(scope="module")
def toy():
    return load_toy("LSGAN")[0]


def at_distance(centres, indices, distance):
    """One point per index, `distance` from that centre, straight out from the circle's middle."""
    picked = centres[indices]
    return picked + distance * picked / picked.norm(dim=1, keepdim=True)


def test_lsgan_measures_count_samples_within_three_std_of_a_centre(toy):
    centres = toy.mode_centres()
    inside = at_distance(centres, [0, 1, 2, 3], 2.9 * STD)  # high quality: modes 0-3 covered
    outside = at_distance(centres, [4, 5, 6, 7], 3.1 * STD)  # not: modes 4-7 stay uncovered
    samples = torch.cat([inside, outside])
    assert toy.high_quality(samples, centres, STD).tolist() == [True] * 4 + [False] * 4
    assert toy.high_quality_share(samples, centres, STD) == pytest.approx(0.5)
    assert toy.modes_covered(samples, centres, STD) == 4
    # many samples on one mode cover one mode; a sample counts for the centre nearest to it
    crowd = at_distance(centres, [2] * 10, 1.0 * STD)
    assert toy.modes_covered(crowd, centres, STD) == 1
    assert toy.high_quality_share(crowd, centres, STD) == 1.0
    assert toy.modes_covered(outside, centres, STD) == 0
    assert toy.high_quality_share(outside, centres, STD) == 0.0
    # every mode, each by one sample exactly on its centre
    assert toy.modes_covered(centres, centres, STD) == 8


def test_lsgan_mixture_has_8_modes_with_angle_0_of_double_weight(toy):
    centres = toy.mode_centres()
    assert centres.shape == (8, 2)
    assert torch.allclose(
        centres[0], torch.tensor([0.0, 1.0])
    )  # (sin 0, cos 0): the official code's order
    assert torch.allclose(centres.norm(dim=1), torch.ones(8))
    assert torch.pdist(centres).min() > 0.7  # 8 distinct points, 2 sin(pi / 8) = 0.765 apart
    angles = toy.mixture_angles()
    assert len(angles) == 9 and angles[-1] == pytest.approx(2 * math.pi)  # linspace(0, 2 pi, 9)

    n = 90_000
    samples = toy.sample_mixture(n, torch.Generator().manual_seed(0))
    distance, nearest = torch.cdist(samples, centres).min(1)
    assert distance.max() < 6 * STD  # every sample on a mode, with noise of std 0.01
    assert (samples - centres[nearest]).std().item() == pytest.approx(STD, rel=0.02)
    share = torch.bincount(nearest, minlength=8).float() / n
    assert share[0].item() == pytest.approx(2 / 9, abs=0.006)
    assert share[1:].tolist() == pytest.approx([1 / 9] * 7, abs=0.006)

    equal = toy.sample_mixture(n, torch.Generator().manual_seed(0), equal_modes=True)
    share = torch.bincount(torch.cdist(equal, centres).argmin(1), minlength=8).float() / n
    assert share.tolist() == pytest.approx([1 / 8] * 8, abs=0.006)


def test_lsgan_mixture_batches_resume_from_their_state(toy):
    batches = toy.MixtureBatches(16, "cpu", seed=3)
    next(batches)
    state = copy.deepcopy(batches.state_dict())
    expected = next(batches)
    resumed = toy.MixtureBatches(16, "cpu", seed=99)
    resumed.load_state_dict(state)
    assert torch.equal(next(resumed), expected)


def test_lsgan_networks_are_tanh_mlps_with_orthogonal_weights(toy):
    torch.manual_seed(0)
    G = toy.init_orthogonal(toy.mlp(256, 2), 1.4)
    D = toy.init_orthogonal(toy.mlp(2, 1), 1.4)
    for net, sizes in (
        (G, [(256, 128), (128, 128), (128, 2)]),
        (D, [(2, 128), (128, 128), (128, 1)]),
    ):
        assert [type(layer) for layer in net] == [nn.Linear, nn.Tanh, nn.Linear, nn.Tanh, nn.Linear]
        linears = [layer for layer in net if isinstance(layer, nn.Linear)]
        assert [(layer.in_features, layer.out_features) for layer in linears] == sizes
        assert all(torch.equal(layer.bias, torch.zeros_like(layer.bias)) for layer in linears)
    square = G[2].weight  # 128 x 128: W W^T = W^T W = gain^2 I
    eye = torch.eye(128)
    assert torch.allclose(square @ square.T, 1.4**2 * eye, atol=1e-4)
    assert torch.allclose(square.T @ square, 1.4**2 * eye, atol=1e-4)
    wide = G[0].weight  # 128 x 256: orthonormal rows, times the gain
    assert torch.allclose(wide @ wide.T, 1.4**2 * eye, atol=1e-4)
    tall = G[4].weight  # 2 x 128
    assert torch.allclose(tall @ tall.T, 1.4**2 * torch.eye(2), atol=1e-4)


def test_lsgan_losses_are_least_squares_and_sigmoid_cross_entropy_by_value(toy):
    coding = (0.0, 1.0, 1.0)
    d_ls, g_ls = toy.losses("ls", coding, "mean")
    d_bce, g_bce = toy.losses("bce", coding, "mean")
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    # D: 1/2 mean((D(x) - 1)^2) + 1/2 mean(D(G(z))^2) = 1/2 * 2 + 1/2 * 2
    # G: 1/2 mean((D(G(z)) - 1)^2) = 1/2 * 5
    assert d_ls(real, fake).item() == pytest.approx(2.0) and g_ls(fake).item() == pytest.approx(2.5)
    assert d_ls(torch.ones(3), torch.zeros(3)).item() == 0
    # at logits 0, D = 1/2: -log 1/2 for real and for fake; G's -log D(G(z)) = log 2
    zeros = torch.zeros(4)
    assert d_bce(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert g_bce(zeros).item() == pytest.approx(math.log(2))
    assert g_bce(torch.tensor([3.0])).item() == pytest.approx(math.log1p(math.exp(-3.0)))


def test_lsgan_losses_have_the_official_batch_reductions(toy):
    coding = (0.0, 1.0, 1.0)
    d_ls, g_ls = toy.losses("ls", coding, "official")
    d_bce, g_bce = toy.losses("bce", coding, "official")
    real, fake = torch.tensor([1.0, 3.0, 0.0, 1.0]), torch.tensor([0.0, -2.0, 1.0, 0.0])
    # 0.5 * tf.nn.l2_loss(t) = 0.5 * sum(t^2) / 2
    # D: (0 + 4 + 1 + 0) / 4 + (0 + 4 + 1 + 0) / 4; G: (1 + 9 + 0 + 1) / 4
    assert d_ls(real, fake).item() == pytest.approx(2.5)
    assert g_ls(fake).item() == pytest.approx(2.75)
    # sig.py: D's cross entropy is a batch mean, G's is summed over the batch
    zeros = torch.zeros(4)
    assert d_bce(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert g_bce(zeros).item() == pytest.approx(4 * math.log(2))
    # the Pearson codes (a, b, c) = (-1, 1, 0)
    d_pearson, g_pearson = toy.losses("ls", (-1.0, 1.0, 0.0), "official")
    assert d_pearson(torch.ones(2), -torch.ones(2)).item() == 0
    assert g_pearson(fake).item() == pytest.approx((0 + 4 + 1 + 0) / 4)


def test_lsgan_toy_steps_g_and_d_on_the_same_batch_from_the_same_parameters(toy):
    torch.manual_seed(0)
    G, D = toy.mlp(3, 2, width=4), toy.mlp(2, 1, width=4)
    x, z = torch.randn(5, 2), torch.randn(5, 3)
    loss_D_of, loss_G_of = toy.losses("ls", (0.0, 1.0, 1.0), "mean")
    # the expected gradients: each at the parameters both players had before the step
    before_G, before_D = copy.deepcopy(G), copy.deepcopy(D)
    fake = before_G(z)
    expected_D = torch.autograd.grad(
        loss_D_of(before_D(x).squeeze(1), before_D(fake.detach()).squeeze(1)),
        list(before_D.parameters()),
    )
    expected_G = torch.autograd.grad(
        loss_G_of(before_D(fake).squeeze(1)), list(before_G.parameters())
    )
    lr = 0.1
    opt_G, opt_D = torch.optim.SGD(G.parameters(), lr), torch.optim.SGD(D.parameters(), lr)
    toy.simultaneous_step(G, D, opt_G, opt_D, x, z, loss_D_of, loss_G_of)
    for net, before, grads in ((D, before_D, expected_D), (G, before_G, expected_G)):
        for param, old, grad in zip(net.parameters(), before.parameters(), grads):
            assert torch.allclose(param, old - lr * grad, atol=1e-6)


def test_lsgan_toy_defaults_are_the_official_code(toy):
    args = toy.build_parser().parse_args([])
    assert (args.loss, args.coding, args.reduction, args.equal_modes) == (
        "ls",
        "0-1",
        "official",
        False,
    )
    assert (args.z_dim, args.width, args.hidden_layers, args.init_gain) == (256, 128, 2, 1.4)
    assert (args.batch_size, args.lr_d, args.lr_g, args.beta1, args.adam_eps) == (
        512,
        1e-4,
        1e-3,
        0.5,
        1e-8,
    )
    assert (args.iters, args.eval_every, args.sample_every) == (35_000, 5000, 5000)
    assert (toy.STD, toy.RADIUS, toy.MODES, toy.MEASURE_SAMPLES) == (0.01, 1.0, 8, 2500)


TINY = ["--device", "cpu", "--batch-size", 8, "--width", 8, "--z-dim", 4, "--log-every", 2]


def test_lsgan_toy_resumes_exactly_and_measuring_leaves_training_alone(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "MEASURE_SAMPLES", 20)  # tiny runs: few samples, coarse densities
    monkeypatch.setattr(toy, "DENSITY_GRID", 12)
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*TINY, "--iters", 6, "--checkpoint-every", 2, "--sample-every", 6]
    assert run_main(toy, *common, "--eval-every", 3, "--out", straight) == 0
    # the split run measures at every step before it stops: G's samples for the measures come from
    # their own random stream, so the training does not change
    assert run_main(toy, *common, "--eval-every", 1, "--max-steps", 4, "--out", split) == 0
    gc.collect()  # the finished run and its metric() hold each other: free it and its folder lock
    assert run_main(toy, "--resume", split, "--max-steps", 6, "--eval-every", 3) == 0
    a, b = load_checkpoint(straight), load_checkpoint(split)
    assert a["step"] == b["step"] == 6
    for name in ("G", "D"):
        for key, value in a[name].items():
            assert torch.equal(value, b[name][key]), (name, key)
    assert torch.equal(a["batches"]["generator"], b["batches"]["generator"])
    for run, steps in ((straight, {"0", "3", "6"}), (split, {"0", "1", "2", "3", "4", "6"})):
        assert (run / "toy.png").exists()
        assert set(json.loads((run / "measures.json").read_text())) == steps
