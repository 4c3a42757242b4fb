"""LSGAN's Gaussian-mixture experiment: its two losses by value."""
import math

import pytest
import torch

from conftest import load_toy


def test_lsgan_losses_are_least_squares_and_sigmoid_cross_entropy_by_value():
    toy, folder = load_toy("LSGAN")
    coding = folder.train.CODINGS["0-1"]
    d_ls, g_ls = toy.losses("ls", coding)
    d_bce, g_bce = toy.losses("bce", coding)
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, -2.0])
    # 1/2 mean((D(x) - 1)^2) + 1/2 mean(D(G(z))^2) = 1/2 * 2 + 1/2 * 2; G: 1/2 mean((D(G(z)) - 1)^2) = 1/2 * 5
    assert d_ls(real, fake).item() == pytest.approx(2.0) and g_ls(fake).item() == pytest.approx(2.5)
    assert d_ls(torch.ones(3), torch.zeros(3)).item() == 0
    # at logits 0, D = 1/2: -log 1/2 for real and for fake; G's -log D(G(z)) = log 2
    zeros = torch.zeros(4)
    assert d_bce(zeros, zeros).item() == pytest.approx(2 * math.log(2))
    assert g_bce(zeros).item() == pytest.approx(math.log(2))
    assert g_bce(torch.tensor([3.0])).item() == pytest.approx(math.log1p(math.exp(-3.0)))
