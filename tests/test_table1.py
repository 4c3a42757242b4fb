"""simpleGAN/ and CGAN/: Table 1's Parzen window, sigma chosen on the validation split from
logspace(-1, 0, 10), the standard error with ddof 0, seeded samples that leave the training's
streams alone, CGAN's 1,000 per class."""

import math
import random
from argparse import Namespace

import numpy as np
import pytest
import torch
from torch import nn

from conftest import load_folder

gan, cgan = load_folder("simpleGAN"), load_folder("CGAN")
FOLDERS = {"simpleGAN": gan, "CGAN": cgan}
CPU = torch.device("cpu")


class FixedSamples(nn.Module):
    """A stand-in generator whose samples are given images, whatever z (and y) it is asked for."""

    def __init__(self, images, classes=None):
        super().__init__()
        self.images = images
        if classes:  # CGAN's sample() reads the label width from G.y_path[0]
            self.y_path = nn.Sequential(nn.Linear(classes, 1))

    def forward(self, z, y=None, masks=None):
        return self.images[: len(z)]


def points_around(centres, n, sigma):
    return centres[torch.arange(n) % len(centres)] + sigma * torch.randn(n, centres.shape[1])


def estimate(folder, centres, valid, points, parzen_valid):
    """parzen_estimate with G's samples `centres` (CGAN: 100 per class; the images labelled 0, 1,
    ..., 9, 0, ...)."""
    args = Namespace(seed=0, z_dim=100, parzen_samples=len(centres), parzen_valid=parzen_valid)
    args.sampling_dropout = args.parzen_per_class = False
    if folder == "simpleGAN":
        return gan.train.parzen_estimate(FixedSamples(centres), valid, points, args, CPU)
    labelled = [(x, torch.arange(len(x)) % 10) for x in (valid, points)]
    return cgan.train.parzen_estimate(FixedSamples(centres, classes=10), *labelled, args, CPU)


@pytest.mark.parametrize("folder", FOLDERS)
def test_parzen_with_one_sample_is_the_gaussian_density(folder):
    torch.manual_seed(0)
    mu, x, sigma, d = torch.rand(1, 784), torch.rand(6, 784), 0.3, 784
    got = FOLDERS[folder].train.parzen_log_likelihoods(x, mu, [sigma])[0]
    # log N(x; mu, sigma^2 I) = -|x - mu|^2 / (2 sigma^2) - d log(sigma sqrt(2 pi)), written out
    log_norm = d * math.log(sigma * math.sqrt(2 * math.pi))
    expected = -((x - mu) ** 2).sum(1).double() / (2 * sigma**2) - log_norm
    assert torch.allclose(got, expected, rtol=1e-5)
    normal = torch.distributions.Normal(mu.double(), sigma)
    assert torch.allclose(got, normal.log_prob(x.double()).sum(1), rtol=1e-5)


@pytest.mark.parametrize("folder", FOLDERS)
def test_parzen_is_the_log_of_the_mean_of_the_kernels_for_every_sigma_and_chunk(folder):
    torch.manual_seed(0)
    samples, x, sigmas = torch.rand(50, 20), torch.rand(9, 20), [0.1, 0.5, 1.0]
    parzen = FOLDERS[folder].train.parzen_log_likelihoods
    got = parzen(x, samples, sigmas)
    assert got.shape == (3, 9) and got.dtype == torch.float64
    for row, sigma in zip(got, sigmas):
        normal = torch.distributions.Normal(samples.double()[None], sigma)
        kernels = normal.log_prob(x.double()[:, None]).sum(2)
        assert torch.allclose(row, torch.logsumexp(kernels, 1) - math.log(50), rtol=1e-5)
    assert torch.allclose(got, parzen(x, samples, sigmas, chunk=2))
    # a point on the only sample: the kernel's peak, -d log(sigma sqrt(2 pi))
    peak = -20 * math.log(0.1 * math.sqrt(2 * math.pi))
    assert parzen(samples[:1], samples[:1], [0.1]).item() == pytest.approx(peak, rel=1e-9)


def test_the_two_folders_compute_the_same_estimator():
    x, samples = torch.rand(6, 784), torch.rand(9, 784)
    assert gan.train.SIGMAS == cgan.train.SIGMAS
    assert torch.equal(
        gan.train.parzen_log_likelihoods(x, samples, gan.train.SIGMAS),
        cgan.train.parzen_log_likelihoods(x, samples, cgan.train.SIGMAS),
    )
    log_p = torch.randn(7, dtype=torch.float64)
    assert gan.train.mean_and_stderr(log_p) == cgan.train.mean_and_stderr(log_p)


def test_sigma_grid_and_selection_pick_the_width_the_validation_data_was_drawn_with():
    torch.manual_seed(0)
    sigmas = gan.train.SIGMAS
    assert sigmas == pytest.approx(tuple(np.logspace(-1, 0, 10)))  # official code, parzen_ll.py
    # far apart: each validation point is near its own centre only
    centres = torch.rand(200, 784) * 10
    for true in (sigmas[3], sigmas[6]):
        valid = points_around(centres, 300, true)
        log_p = gan.train.parzen_log_likelihoods(valid, centres, sigmas)
        assert gan.train.choose_sigma(log_p) == true


def test_standard_error_is_numpy_std_over_sqrt_n():
    log_p = torch.tensor([1.0, 2.0, 4.0, 9.0], dtype=torch.float64)
    mean, stderr = gan.train.mean_and_stderr(log_p)
    # official code, parzen_ll.py: ll.mean(), ll.std() / numpy.sqrt(n), numpy's std with ddof 0
    assert mean == 4.0 and stderr == pytest.approx(np.std([1.0, 2.0, 4.0, 9.0]) / 2, rel=1e-12)


@pytest.mark.parametrize("folder", FOLDERS)
def test_sigma_is_chosen_on_the_validation_images_and_the_test_images_are_scored_with_it(folder):
    torch.manual_seed(0)
    sigmas = gan.train.SIGMAS
    centres = torch.rand(1000, 784) * 10  # far apart: each point is near its own centre only
    valid, test = points_around(centres, 300, sigmas[3]), points_around(centres, 400, sigmas[7])
    mean, stderr, sigma = estimate(folder, centres, valid, test, parzen_valid=300)
    # the validation images were drawn with sigmas[3], the test images with sigmas[7]
    assert sigma == sigmas[3]
    log_p = gan.train.parzen_log_likelihoods(test, centres, [sigmas[3]])[0]
    assert mean == pytest.approx(log_p.mean().item(), rel=1e-9)
    assert stderr == pytest.approx(log_p.std(unbiased=False).item() / math.sqrt(400), rel=1e-9)


@pytest.mark.parametrize("folder", FOLDERS)
def test_sigma_is_chosen_on_the_first_parzen_valid_validation_images_only(folder):
    torch.manual_seed(0)
    sigmas = gan.train.SIGMAS
    centres = torch.rand(1000, 784) * 10
    first, rest = points_around(centres, 50, sigmas[2]), points_around(centres, 500, sigmas[8])
    valid = torch.cat([first, rest])
    assert estimate(folder, centres, valid, valid, parzen_valid=50)[2] == sigmas[2]


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_samples_are_seeded_and_leave_the_training_random_streams_untouched(folder):
    """--select-every scores G during training: its draws must not move the run's streams (exact
    resume)."""
    torch.manual_seed(0)
    valid = torch.rand(20, 1, 28, 28)
    # CGAN's G with dropout on: its masks come from the seeded stream too
    args = Namespace(seed=3, z_dim=100, parzen_samples=50, parzen_valid=20)
    args.sampling_dropout, args.parzen_per_class = True, False
    if folder == "simpleGAN":
        G, data = gan.model.Generator(width=16), valid
    else:
        G, data = cgan.model.Generator(), (valid, torch.arange(20) % 10)
    gan.support.seed_everything(1)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    first = FOLDERS[folder].train.parzen_estimate(G, data, data, args, CPU)
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    torch.manual_seed(2)
    # from --seed alone
    assert FOLDERS[folder].train.parzen_estimate(G, data, data, args, CPU) == first


def test_cgan_draws_1000_samples_per_class_with_G_dropout_on_by_default():
    torch.manual_seed(0)
    G = cgan.model.Generator()
    modes = []
    G.register_forward_hook(lambda G, inputs, _: modes.append((G.training, inputs[1].argmax(1))))
    args = cgan.train.build_parser().parse_args([])
    assert args.parzen_per_class is False and args.sampling_dropout is True
    assert args.select_every == 5
    samples, labels = cgan.train.draw_samples(G, args, CPU)
    assert samples.shape == (10_000, 1, 28, 28)
    assert torch.equal(labels.bincount(), torch.full((10,), 1000))
    training, y = modes[-1]
    assert training and torch.equal(y, labels)  # dropout on; each sample drawn for its own label
    args.sampling_dropout = False
    cgan.train.draw_samples(G, args, CPU)
    assert not modes[-1][0]


def test_cgan_fits_one_window_to_all_samples_and_per_class_windows_on_request():
    samples = torch.cat([torch.zeros(4, 3), torch.full((4, 3), 10.0)])
    sample_labels = torch.tensor([0] * 4 + [1] * 4)
    x, labels = torch.tensor([[0.0, 0, 0], [10.0, 10, 10], [0.0, 0, 0]]), torch.tensor([0, 1, 1])
    on_sample = -3 * math.log(math.sqrt(2 * math.pi))
    log_likelihoods = cgan.train.log_likelihoods
    # §4.1's reading, log p(x): every point under the window of all 8 samples, half of which sit
    # on it
    pooled = log_likelihoods(x, labels, samples, sample_labels, [1.0], per_class=False)[0]
    half = torch.full((3,), on_sample - math.log(2), dtype=torch.float64)
    assert torch.allclose(pooled, half, atol=1e-5)
    # --parzen-per-class, log p(x|y): the third point sits on the class-0 samples but is judged by
    # class 1's only
    per_class = log_likelihoods(x, labels, samples, sample_labels, [1.0], per_class=True)[0]
    expected = [on_sample, on_sample, on_sample - 300 / 2]
    assert per_class.tolist() == pytest.approx(expected, rel=1e-6)
