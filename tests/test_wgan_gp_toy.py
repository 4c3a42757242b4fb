"""WGAN-GP's 2-D toy experiments (toy.py): the toy sets, the critic's loss with the penalty and with
clipping, the mode measures, the bounds on W1 for a fixed G, Figure 1(b)'s per-layer gradients,
the flags each mode takes, and a toy run's figure, metrics and exact resume."""

import argparse
import json
import math

import pytest
import torch
from torch import nn

from conftest import (
    assert_same_networks,
    load_checkpoint,
    load_folder,
    load_toy,
    run_main,
    scalar_tags,
)


@pytest.fixture(scope="module")
def toy():
    return load_toy("WGAN-GP")[0]


def settings(constraint="gp", lambda_gp=10.0, clip=0.01):
    return argparse.Namespace(constraint=constraint, lambda_gp=lambda_gp, clip=clip)


class Linear(nn.Module):
    """D(x) = w.x + b: its input gradient is w everywhere."""

    def __init__(self, w, b=0.3):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x, activations=None):
        return x @ self.w + self.b


class HalfSquare(nn.Module):
    """D(x) = |x|^2 / 2: its input gradient is x itself."""

    def forward(self, x, activations=None):
        return 0.5 * x.pow(2).sum(1)


# ---- the toy sets ----


@pytest.mark.parametrize(
    "name, modes, std", [("8gaussians", 8, 0.02 / 1.414), ("25gaussians", 25, 0.05 / 2.828)]
)
def test_a_toy_set_has_its_modes_and_spread(name, modes, std):
    dataset = load_folder("WGAN-GP").dataset
    centres, mode_std = dataset.toy_modes(name)
    points = dataset.sample_toy(name, 20_000, torch.Generator().manual_seed(0))
    offsets = points - centres[torch.cdist(points, centres).argmin(1)]
    assert len(centres) == modes and mode_std == pytest.approx(std)
    assert offsets.std().item() == pytest.approx(std, rel=0.05)
    assert len(torch.cdist(points, centres).argmin(1).unique()) == modes


def test_the_swiss_roll_is_scaled_to_about_unit_spread():
    dataset = load_folder("WGAN-GP").dataset
    points = dataset.sample_toy("swissroll", 20_000, torch.Generator().manual_seed(0))
    # t in [1.5 pi, 4.5 pi]: radii t / 7.5 from 0.63 to 1.88, blurred by 0.25 / 7.5
    radii = points.norm(dim=1)
    assert 0.5 < radii.min().item() < 0.7 and 1.8 < radii.max().item() < 2.1


# ---- the critic's loss ----


@pytest.mark.parametrize("lambda_gp", [10.0, 0.1])
def test_the_penalised_loss_of_a_linear_critic_by_value_and_gradient(toy, lambda_gp):
    torch.manual_seed(0)
    x, fake = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64) + 1
    D = Linear([0.6, 1.2])
    loss, estimate = toy.critic_loss(D, x, fake, settings("gp", lambda_gp))
    loss.backward()
    w = torch.tensor([0.6, 1.2], dtype=torch.float64)
    norm = w.norm()
    # the gradient is w at every interpolate, so the penalty is lambda (|w| - 1)^2 exactly
    expected = (fake.mean(0) - x.mean(0)) @ w + lambda_gp * (norm - 1) ** 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    assert estimate.item() == pytest.approx(((x.mean(0) - fake.mean(0)) @ w).item(), rel=1e-12)
    grad_w = fake.mean(0) - x.mean(0) + lambda_gp * 2 * (norm - 1) * w / norm
    torch.testing.assert_close(D.w.grad, grad_w, rtol=1e-12, atol=1e-12)
    assert D.b.grad.item() == pytest.approx(0, abs=1e-12)  # b cancels; the penalty ignores it


def test_the_penalty_is_two_sided_and_taken_per_point_over_its_coordinates(toy):
    torch.manual_seed(0)
    x = torch.randn(32, 2, dtype=torch.float64)
    # fakes equal to the real points put every interpolate at x, where the gradient is x
    penalty = toy.gradient_penalty(HalfSquare(), x, x.clone())
    assert penalty.item() == pytest.approx((x.norm(dim=1) - 1).pow(2).mean().item(), rel=1e-12)
    # below a norm of 1 it is charged too: |w| = 0.5 costs (0.5 - 1)^2
    assert toy.gradient_penalty(Linear([0.3, 0.4]), x, x + 1).item() == pytest.approx(0.25)


def test_the_clipped_loss_has_no_penalty_and_the_step_clips_after_it(toy):
    torch.manual_seed(0)
    x, fake = torch.randn(64, 2, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64) + 1
    D = Linear([0.6, 1.2])
    loss, _ = toy.critic_loss(D, x, fake, settings("clip"))
    loss.backward()
    w = torch.tensor([0.6, 1.2], dtype=torch.float64)
    assert loss.item() == pytest.approx(((fake.mean(0) - x.mean(0)) @ w).item(), rel=1e-12)
    torch.testing.assert_close(D.w.grad, fake.mean(0) - x.mean(0), rtol=1e-12, atol=1e-12)
    D = Linear([0.6, 1.2])
    toy.critic_step(D, torch.optim.SGD(D.parameters(), lr=0.0), x, fake, settings("clip"))
    assert D.w.tolist() == [0.01, 0.01] and D.b.item() == 0.01


@pytest.mark.parametrize("constraint", ["clip", "gp"])
def test_clipping_bounds_every_critic_weight_and_the_penalty_does_not(toy, constraint):
    args = toy.build_parser().parse_args(["--constraint", constraint, "--width", "32"])
    torch.manual_seed(0)
    D = toy.MLP(2, 1, args.width, args.depth)
    opt_D = toy.optimizer(D, args)
    for _ in range(3):
        x = torch.randn(64, 2)
        toy.critic_step(D, opt_D, x, x + torch.randn_like(x), args)
    largest = max(w.abs().max().item() for w in D.parameters())
    if constraint == "clip":
        assert largest <= args.clip
    else:
        assert largest > 10 * args.clip


def test_the_networks_start_as_gan_toy_py_initialises_them(toy):
    torch.manual_seed(0)
    net = toy.MLP(2, 1, width=512, depth=3)
    # He uniform (std sqrt(2 / fan_in)) for the ReLU layers, Glorot (sqrt(2 / (in + out))) last
    assert net.layers[1].weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.01)
    assert net.out.weight.std().item() == pytest.approx(math.sqrt(2 / 513), rel=0.1)
    assert all(layer.bias.abs().max() == 0 for layer in [*net.layers, net.out])
    x = torch.randn(10, 2)
    torch.testing.assert_close(net(3 * x), 3 * net(x))  # zero biases: a cone at the origin


# ---- the measures ----


@pytest.mark.parametrize("name", ["8gaussians", "25gaussians"])
def test_the_mode_measures_on_points_at_known_distances(toy, name):
    centres, std = load_folder("WGAN-GP").dataset.toy_modes(name)
    angles = torch.arange(len(centres)) * 2.0
    directions = torch.stack([angles.cos(), angles.sin()], 1)
    inside, outside = centres + 2.9 * std * directions, centres + 3.1 * std * directions
    assert toy.mode_measures(inside, centres, std) == (len(centres), 1.0)
    assert toy.mode_measures(outside, centres, std) == (0, 0.0)
    mixed = torch.cat([inside[:5], outside[5:]])
    modes, share = toy.mode_measures(mixed, centres, std)
    assert modes == 5 and share == pytest.approx(5 / len(centres))
    many_on_one = inside[3].expand(100, 2)
    assert toy.mode_measures(many_on_one, centres, std) == (1, 1.0)


def test_the_mode_counter_counts_the_mixtures_modes(toy):
    dataset = load_folder("WGAN-GP").dataset
    centres, std = dataset.toy_modes("8gaussians")
    real = dataset.sample_toy("8gaussians", 2500, torch.Generator().manual_seed(0))
    # a 2-D Gaussian puts 1 - exp(-9/2) = 98.9% of its mass within 3 standard deviations
    modes, share = toy.mode_measures(real, centres, std)
    assert modes == 8 and share == pytest.approx(1 - math.exp(-4.5), abs=0.01)


def test_the_nearest_real_distance(toy):
    real = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    samples = torch.tensor([[0.0, 0.3], [1.4, 0.0], [0.5, 0.0]])
    assert toy.nearest_real_distance(samples, real) == pytest.approx((0.3 + 0.4 + 0.5) / 3)


# ---- the bounds on W1 for G = data + N(0, I) ----


def test_the_lower_bound_is_the_distance_critics_estimate(toy):
    centres, _ = toy_centres()
    angles = torch.arange(8) * 0.7
    fake = centres + 0.3 * torch.stack([angles.cos(), angles.sin()], 1)
    # real points on the centres, fakes 0.3 from them (nearer than any other centre): 0.3
    assert toy.lower_bound(centres, fake, "8gaussians") == pytest.approx(0.3, rel=1e-5)
    real, noise = toy.eval_pairs("8gaussians", 4000, torch.device("cpu"))
    distance_critic = lambda p: -toy.distance_to(p, centres)  # noqa: E731  (1-Lipschitz)
    bound = toy.lower_bound(real, real + noise, "8gaussians")
    assert toy.estimate_on(distance_critic, real, real + noise) == pytest.approx(bound, rel=1e-5)


def test_the_upper_bound_and_the_check(toy):
    assert toy.NOISE_BOUND == pytest.approx(1.2533141, rel=1e-7)
    noise = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    assert noise.norm(dim=1).mean().item() == pytest.approx(toy.NOISE_BOUND, abs=0.01)
    real, noise = toy.eval_pairs("8gaussians", 4000, torch.device("cpu"))
    bounds = toy.noise_bounds(real, noise, "8gaussians")
    assert bounds["upper_bound"] == toy.NOISE_BOUND
    assert bounds["pairs_mean_noise"] == pytest.approx(noise.norm(dim=1).mean().item())
    assert 0.8 < bounds["lower_bound"] < 0.86  # E d(x + n, centres), about 0.83
    assert toy.check(1.3, bounds) == "not 1-Lipschitz"
    assert toy.check(1.0, bounds) == "within the bounds"
    assert toy.check(-0.2, bounds) == "below the lower bound"
    # three times the distance critic is 3-Lipschitz, and its estimate says so
    centres, _ = toy_centres()
    steep = 3 * toy.estimate_on(lambda p: -toy.distance_to(p, centres), real, real + noise)
    assert toy.check(steep, bounds) == "not 1-Lipschitz"
    # no 1-Lipschitz critic beats the pairs' own mean |noise|: the paired estimate of x -> w.x
    unit = lambda p: p @ torch.tensor([0.6, 0.8])  # noqa: E731
    assert toy.estimate_on(unit, real, real + noise) <= bounds["pairs_mean_noise"]


def toy_centres():
    return load_folder("WGAN-GP").dataset.toy_modes("8gaussians")


def test_the_bowl_measure_tells_a_bowl_from_a_tent(toy):
    centres, _ = toy_centres()
    real, noise = toy.eval_pairs("8gaussians", 4000, torch.device("cpu"))
    assert toy.bowl(lambda p: toy.distance_to(p, centres), real + noise, "8gaussians") == (
        pytest.approx(1.0)
    )
    assert toy.bowl(lambda p: -toy.distance_to(p, centres), real + noise, "8gaussians") == (
        pytest.approx(-1.0)
    )
    assert toy.bowl(lambda p: p.norm(dim=1), real + noise, "8gaussians") > 0.3  # a cone


def test_settling_is_read_over_the_window(toy):
    rising = [(t, min(t, 1500) / 1500) for t in range(0, 4001, 100)]  # flat from 1,500
    assert toy.settled_at(rising) == 2500
    assert toy.settled_at([(t, t / 1000) for t in range(0, 4001, 100)]) is None
    assert toy.settled_at([(t, 0.5) for t in range(0, 901, 100)]) is None  # shorter than 1,000
    wobble = [(t, 0.01 * (t // 100 % 2)) for t in range(0, 3001, 100)]  # within 0.02
    assert toy.settled_at(wobble) == 1000


def test_the_estimate_turns_positive_for_good(toy):
    assert toy.positive_from([(0, -0.4), (100, 0.1), (200, -0.1), (300, 0.2), (400, 0.5)]) == 300
    assert toy.positive_from([(0, 0.3), (100, 0.5)]) == 0
    assert toy.positive_from([(0, 0.3), (100, -0.2)]) is None


# ---- Figure 1(a) ----


def test_a_fixed_generator_critic_is_its_seeds_and_reads_its_bounds(toy):
    flags = ["--width", "8", "--critic-iters", "200", "--batch-size", "64"]
    args = toy.build_parser().parse_args(flags)
    _, first = toy.fixed_generator_critic("8gaussians", "gp", 1, args, torch.device("cpu"))
    torch.rand(5)  # draws between two critics change nothing
    _, again = toy.fixed_generator_critic("8gaussians", "gp", 1, args, torch.device("cpu"))
    _, other = toy.fixed_generator_critic("8gaussians", "gp", 2, args, torch.device("cpu"))
    assert first["end_estimate"] == again["end_estimate"] != other["end_estimate"]
    assert [t for t, _ in first["trace"]] == [0, 100, 200] and first["settled_at"] is None
    assert first["stalled"] == (first["end_estimate"] <= 0)
    assert first["positive_from"] == toy.positive_from(first["trace"])
    assert first["check"] == toy.check(first["end_estimate"], first)
    assert first["upper_bound"] == toy.NOISE_BOUND and 0.8 < first["lower_bound"] < 0.86


def test_figure_1a_writes_its_figure_and_seed_table(toy, tmp_path, capsys):
    flags = ["--figure", "1a", "--width", "8", "--critic-iters", "100", "--batch-size", "64"]
    flags += ["--seeds", "0-1"]
    assert run_main(toy, *flags, "--sets", "8gaussians", "--out", tmp_path) == 0
    assert (tmp_path / "figure_1a.png").stat().st_size > 10_000
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    kinds = [(r["constraint"], r["seed"]) for r in metrics["critics"]]
    assert kinds == [("gp", 0), ("gp", 1), ("clip", 0)] and len(metrics["table"]) == 4
    assert "lower" in capsys.readouterr().out


# ---- Figure 1(b) ----


def test_figure_1b_takes_the_gradient_of_the_whole_loss_at_each_layer(toy):
    torch.manual_seed(0)
    D = toy.MLP(2, 1, width=3, depth=2).double()
    with torch.no_grad():
        for layer in [*D.layers, D.out]:
            layer.bias.normal_()
    x, fake = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    activations = {"real": [], "fake": [], "penalty": []}
    loss, _ = toy.critic_loss(D, x, fake, settings("gp", 10.0), activations)
    measured = toy.layer_gradients(loss, activations)

    def by_hand(points, sign):
        # d(sign E[D]) / d h2 = sign w_out / m on every row; back through the second ReLU to h1
        W1, b1, W2, b2 = D.layers[0].weight, D.layers[0].bias, D.layers[1].weight, D.layers[1].bias
        pre2 = torch.relu(points @ W1.T + b1) @ W2.T + b2
        at_h2 = sign * D.out.weight.expand(len(points), 3) / len(points)
        at_h1 = (at_h2 * (pre2 > 0)) @ W2
        return torch.stack([at_h1.norm(), at_h2.norm()]).detach()

    real, fakes = by_hand(x, -1.0), by_hand(fake, 1.0)
    torch.testing.assert_close(measured["real"], real)
    torch.testing.assert_close(measured["fake"], fakes)
    torch.testing.assert_close(measured["whole"], (real**2 + fakes**2).sqrt())
    assert measured["penalty"].abs().max() == 0  # a ReLU critic: only through the masks


def test_figure_1b_records_each_term(toy, tmp_path):
    flags = ["--figure", "1b", "--width", "8", "--depth", "3", "--iters", "2", "--n-critic", "1"]
    assert run_main(toy, *flags, "--out", tmp_path) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    penalty = metrics["gradient penalty"]
    assert set(penalty) >= {"whole", "real", "fake", "penalty"} and len(penalty["whole"]) == 3
    assert penalty["penalty: largest norm at any layer"] == 0
    assert all(w >= r for w, r in zip(penalty["whole"], penalty["real"]))
    assert (tmp_path / "figure_1b.png").exists()


# ---- the flags ----


@pytest.mark.parametrize(
    "flags, stray",
    [
        (["--figure", "1a", "--constraint", "clip"], "--constraint"),
        (["--figure", "1a", "--dataset", "swissroll"], "--dataset"),
        (["--figure", "1a", "--resume", "somewhere"], "--resume"),
        (["--figure", "1b", "--clip", "0.1"], "--clip"),
        (["--figure", "1b", "--critic-iters", "5"], "--critic-iters"),
        (["--critic-iters", "5"], "--critic-iters"),
        (["--seeds", "0-3"], "--seeds"),
    ],
)
def test_a_flag_that_does_not_apply_is_refused_in_one_line(toy, tmp_path, capsys, flags, stray):
    # an --out that cannot be written: were the flag let through, the command would stop there
    (tmp_path / "a_file").write_text("")
    assert run_main(toy, *flags, "--out", tmp_path / "a_file") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{stray} does not apply" in err


# ---- a toy GAN ----

QUICK_TOY = ["--width", 16, "--batch-size", 32, "--n-critic", 2, "--eval-every", 2]
QUICK_TOY += ["--sample-every", 2, "--log-every", 1, "--checkpoint-every", 2, "--device", "cpu"]


def test_a_toy_run_writes_its_figure_and_logs_the_modes(toy, tmp_path):
    assert run_main(toy, *QUICK_TOY, "--max-steps", 2, "--out", tmp_path / "run") == 0
    assert (tmp_path / "run" / "toy.png").stat().st_size > 1000
    tags = scalar_tags(tmp_path / "run")
    assert "metrics/modes" in tags and "metrics/high_quality" in tags
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"critic/start_bowl", "wasserstein/estimate_end", "wasserstein/lower_bound"} <= set(
        metrics
    )


def test_a_toy_run_resumes_exactly(toy, tmp_path):
    assert run_main(toy, *QUICK_TOY, "--max-steps", 4, "--out", tmp_path / "whole") == 0
    assert run_main(toy, *QUICK_TOY, "--max-steps", 2, "--out", tmp_path / "parts") == 0
    assert run_main(toy, "--resume", tmp_path / "parts", "--max-steps", 4) == 0
    assert_same_networks(load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "parts"))
