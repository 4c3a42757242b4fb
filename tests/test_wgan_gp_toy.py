"""WGAN-GP's 2-D toy experiments: the toy sets, weight clipping against the penalty, the mode measures, and a toy
run's figure, metrics and exact resume."""
import math

import pytest
import torch

from conftest import assert_same_networks, load_checkpoint, load_folder, load_toy, run_main, scalar_tags


@pytest.mark.parametrize("name, modes, std", [("8gaussians", 8, 0.02 / 1.414), ("25gaussians", 25, 0.05 / 2.828)])
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


@pytest.mark.parametrize("constraint", ["clip", "gp"])
def test_clipping_bounds_every_critic_weight_and_the_penalty_does_not(constraint):
    toy, _ = load_toy("WGAN-GP")
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


def test_the_mode_counter_counts_the_mixtures_modes():
    support, dataset = load_folder("WGAN-GP").support, load_folder("WGAN-GP").dataset
    centres, std = dataset.toy_modes("8gaussians")
    real = dataset.sample_toy("8gaussians", 2500, torch.Generator().manual_seed(0))
    assert support.mode_measures(real, centres, std)[0] == 8
    # a 2-D Gaussian puts 1 - exp(-9/2) = 98.9% of its mass within 3 standard deviations
    assert support.mode_measures(real, centres, std)[1] == pytest.approx(1 - math.exp(-4.5), abs=0.01)
    one_mode = centres[3] + std * torch.randn(2500, 2)
    assert support.mode_measures(one_mode, centres, std)[0] == 1
    far = centres[3] + 10 * std
    assert support.mode_measures(far.expand(10, 2), centres, std) == (0, 0.0)


QUICK_TOY = ["--width", 16, "--batch-size", 32, "--n-critic", 2, "--eval-every", 2, "--sample-every", 2,
             "--log-every", 1, "--checkpoint-every", 2, "--device", "cpu"]


def test_a_toy_run_writes_its_figure_and_logs_the_modes(tmp_path):
    toy, _ = load_toy("WGAN-GP")
    assert run_main(toy, *QUICK_TOY, "--max-steps", 2, "--out", tmp_path / "run") == 0
    assert (tmp_path / "run" / "toy.png").stat().st_size > 1000
    tags = scalar_tags(tmp_path / "run")
    assert "metrics/modes" in tags and "metrics/high_quality" in tags


def test_a_toy_run_resumes_exactly(tmp_path):
    toy, _ = load_toy("WGAN-GP")
    assert run_main(toy, *QUICK_TOY, "--max-steps", 4, "--out", tmp_path / "whole") == 0
    assert run_main(toy, *QUICK_TOY, "--max-steps", 2, "--out", tmp_path / "parts") == 0
    assert run_main(toy, "--resume", tmp_path / "parts", "--max-steps", 4) == 0
    assert_same_networks(load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "parts"))
