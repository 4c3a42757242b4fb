"""simpleGAN/ and CGAN/: Table 1's protocol (the Parzen window, sigma chosen on the validation split, the
standard error, the samples of the CGAN), the CGAN's conditioning, and the official code's update of simpleGAN."""
import math
from argparse import Namespace

import pytest
import torch
from torch import nn

from conftest import load_folder

gan, cgan = load_folder("simpleGAN"), load_folder("CGAN")
CPU = torch.device("cpu")


class FixedSamples(nn.Module):
    """A stand-in generator whose samples are given images, whatever z (and y) it is asked for."""

    def __init__(self, images, classes=None):
        super().__init__()
        self.images = images
        if classes:  # CGAN's sample() reads the label width from G.y_path[0]
            self.y_path = nn.Sequential(nn.Linear(classes, 1))

    def forward(self, z, y=None):
        return self.images[:len(z)]


def points_around(centres, n, sigma):
    return centres[torch.arange(n) % len(centres)] + sigma * torch.randn(n, centres.shape[1])


@pytest.mark.parametrize("folder", ["simpleGAN", "CGAN"])
def test_sigma_is_chosen_on_the_validation_images_and_the_test_images_are_scored_with_it(folder):
    torch.manual_seed(0)
    sigmas = gan.train.SIGMAS
    centres = torch.rand(1000, 784) * 10  # far apart: each point is near its own centre only
    valid, test = points_around(centres, 300, sigmas[3]), points_around(centres, 400, sigmas[7])
    if folder == "simpleGAN":
        args = Namespace(seed=0, z_dim=100, parzen_samples=1000, parzen_valid=300)
        mean, stderr, sigma = gan.train.parzen_estimate(FixedSamples(centres), valid, test, args, CPU)
    else:
        args = Namespace(seed=0, z_dim=100, parzen_valid=300, sampling_dropout=False, parzen_per_class=False)
        labels = torch.arange(10).repeat_interleave(100)
        mean, stderr, sigma = cgan.train.parzen_estimate(FixedSamples(centres, classes=10), (valid, labels[:300]),
                                                         (test, labels[:400]), args, CPU)
    # the validation images were drawn with sigmas[3], the test images with sigmas[7]
    assert sigma == sigmas[3]
    log_p = gan.train.parzen_log_likelihoods(test, centres, [sigmas[3]])[0]
    assert mean == pytest.approx(log_p.mean().item(), rel=1e-9)
    # official code, parzen_ll.py: numpy's std (ddof 0) over sqrt(n)
    assert stderr == pytest.approx(log_p.std(unbiased=False).item() / math.sqrt(400), rel=1e-9)


def test_sigma_is_chosen_on_the_first_parzen_valid_validation_images_only():
    torch.manual_seed(0)
    sigmas = gan.train.SIGMAS
    centres = torch.rand(100, 784) * 10
    valid = torch.cat([points_around(centres, 50, sigmas[2]), points_around(centres, 500, sigmas[8])])
    args = Namespace(seed=0, z_dim=100, parzen_samples=100, parzen_valid=50)
    assert gan.train.parzen_estimate(FixedSamples(centres), valid, valid, args, CPU)[2] == sigmas[2]


def test_the_two_folders_share_the_parzen_estimator():
    x, samples = torch.rand(6, 784), torch.rand(9, 784)
    assert torch.equal(gan.train.parzen_log_likelihoods(x, samples, gan.train.SIGMAS),
                       cgan.train.parzen_log_likelihoods(x, samples, cgan.train.SIGMAS))


def test_cgan_draws_1000_samples_per_class_with_G_dropout_on_by_default():
    torch.manual_seed(0)
    G = cgan.model.Generator()
    modes = []
    G.register_forward_hook(lambda module, inputs, output: modes.append((module.training, inputs[1].argmax(1))))
    args = cgan.train.build_parser().parse_args([])
    samples, labels = cgan.train.draw_samples(G, args, CPU)
    assert samples.shape == (10_000, 1, 28, 28) and torch.equal(labels.bincount(), torch.full((10,), 1000))
    training, y = modes[-1]
    assert training and torch.equal(y, labels)  # dropout on; each sample drawn for its own label
    again, _ = cgan.train.draw_samples(G, args, CPU)
    assert torch.equal(samples, again)  # z and the masks come from --seed
    args.sampling_dropout = False
    cgan.train.draw_samples(G, args, CPU)
    assert not modes[-1][0]


def test_cgan_fakes_are_judged_under_the_labels_G_drew_them_for():
    torch.manual_seed(0)
    G, D = cgan.model.Generator(), cgan.model.Discriminator()
    made, judged = [], []
    G.register_forward_hook(lambda module, inputs, output: made.append((output.detach(), inputs[1])))
    D.register_forward_hook(lambda module, inputs, output: judged.append((inputs[0].detach(), inputs[1])))
    opt_G, opt_D = (torch.optim.SGD(net.parameters(), 0.1) for net in (G, D))
    x, y = torch.rand(8, 1, 28, 28), cgan.model.one_hot(torch.arange(8))
    cgan.train.discriminator_step(G, D, opt_D, x, y, cgan.model.sample_z(8))
    cgan.train.generator_step(G, D, opt_G, cgan.model.sample_z(8), y)
    assert len(made) == 2
    for fake, label in made:
        scored = [y_D for x_D, y_D in judged if torch.equal(x_D, fake)]
        assert len(scored) == 1 and torch.equal(scored[0], label)
    # and the real images are judged under their own labels
    assert any(torch.equal(x_D, x) and torch.equal(y_D, y) for x_D, y_D in judged)


def test_simplegan_d_loss_scale_scales_D_objective():
    torch.manual_seed(0)
    G, D = gan.model.Generator(width=16), gan.model.Discriminator(width=8)
    D.eval()  # no dropout: the two calls see the same D
    x, z = torch.rand(6, 1, 28, 28), gan.model.sample_z(6)
    full = gan.train.discriminator_step(G, D, torch.optim.SGD(D.parameters(), 0.0), x, z)[0]
    half = gan.train.discriminator_step(G, D, torch.optim.SGD(D.parameters(), 0.0), x, z, scale=0.5)[0]
    assert half.item() == pytest.approx(full.item() / 2)
    assert gan.train.build_parser().parse_args([]).d_loss_scale == 1.0  # Alg. 1 ascends the objective unscaled


def test_simplegan_simultaneous_step_takes_both_gradients_from_one_pass_at_the_old_weights():
    torch.manual_seed(0)
    G, D = gan.model.Generator(width=16), gan.model.Discriminator(width=8)
    D.eval()  # deterministic D, so the expected gradients can be recomputed
    x, z = torch.rand(6, 1, 28, 28), gan.model.sample_z(6)
    G_old = [p.detach().clone() for p in G.parameters()]
    D_old = [p.detach().clone() for p in D.parameters()]
    # the gradients of each objective with respect to its own player's weights, both at the old weights
    fake = G(z)
    real_logits, fake_logits = D(x), D(fake)
    ce = nn.functional.binary_cross_entropy_with_logits
    loss_D = 0.5 * (ce(real_logits, torch.ones(6)) + ce(fake_logits, torch.zeros(6)))
    loss_G = ce(fake_logits, torch.ones(6))
    grads_D = torch.autograd.grad(loss_D, list(D.parameters()), retain_graph=True)
    grads_G = torch.autograd.grad(loss_G, list(G.parameters()))
    opt_G, opt_D = torch.optim.SGD(G.parameters(), 0.1), torch.optim.SGD(D.parameters(), 0.1)
    gan.train.simultaneous_step(G, D, opt_G, opt_D, x, z, scale=0.5)
    for new, old, grad in [*zip(G.parameters(), G_old, grads_G), *zip(D.parameters(), D_old, grads_D)]:
        assert torch.allclose(new, old - 0.1 * grad, atol=1e-6)


def test_simultaneous_update_needs_k_1(capsys):
    with pytest.raises(SystemExit) as stopped:
        gan.train.parse_args(["--simultaneous", "--k", "2"])
    assert stopped.value.code == 2 and "--k" in capsys.readouterr().err
