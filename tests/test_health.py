"""The run's health signs (support.Health): D winning outright, the critic's estimate running away and a collapsed
fixed-noise grid, each said on stderr and as TensorBoard text only when it has held for a stretch of steps."""
import math

import pytest
import torch
import torchvision.utils as vutils

from conftest import QUICK, load_folder, run_main

support = load_folder("DCGAN").support
STRETCH = support.HEALTH_STRETCH


class Texts:
    """A stand-in for the run's SummaryWriter that keeps its text entries."""

    def __init__(self, tmp_path):
        self.log_dir, self.entries = tmp_path, []

    def add_text(self, tag, text, step):
        self.entries.append((tag, step, text))


def feed(health, stream, every=50):
    """Logged means `stream(step)` every `every` steps up to the last step of the stream; the steps warned at."""
    for step in range(every, 5 * STRETCH + 1, every):
        health.scalars(stream(step), step)
    return [step for _, step, _ in health.writer.entries]


def probabilities(d_x, d_g_z):
    return {"loss/D": 0.1, "D/real": d_x, "D/fake": d_g_z}


def test_d_winning_outright_is_said_after_a_stretch_and_again_only_while_it_lasts(tmp_path, capsys):
    d_wins = support.Separated(real=("D/real", 1), fake=("D/fake", 0))
    # D wins from step 1000 to the end: said a stretch later, then once per further stretch
    health = support.Health(Texts(tmp_path), d_wins, None, 64)
    won = feed(health, lambda step: probabilities(0.999, 0.001) if step >= 1000 else probabilities(0.8, 0.2))
    assert won == list(range(1000 + STRETCH, 5 * STRETCH + 1, STRETCH))
    err = capsys.readouterr().err
    assert err.count("warning: step") == len(won) and "D wins outright: D/real 0.999" in err
    assert all(tag == "health" for tag, _, _ in health.writer.entries)

    # D wins in stretches shorter than HEALTH_STRETCH, or only nearly: never said
    for stream in (lambda step: probabilities(0.999, 0.001) if step % STRETCH else probabilities(0.9, 0.1),
                   lambda step: probabilities(0.94, 0.06)):
        health = support.Health(Texts(tmp_path), d_wins, None, 64)
        assert feed(health, stream) == []
    assert capsys.readouterr().err == ""

    # least-squares targets: a = -1 for fakes, b = 1 for real images
    health = support.Health(Texts(tmp_path), support.Separated(real=("D/real", 1), fake=("D/fake", -1)), None, 64)
    assert feed(health, lambda step: probabilities(0.95, -0.95))
    health = support.Health(Texts(tmp_path), support.Separated(real=("D/real", 1), fake=("D/fake", -1)), None, 64)
    assert feed(health, lambda step: probabilities(0.5, -0.5)) == []


def test_a_runaway_critic_estimate_is_said_and_a_settling_one_is_not(tmp_path, capsys):
    def estimate(value):
        return {"wasserstein/estimate": value, "loss/D": -value}

    # growing without bound: exp(step / 500) passes 10 times its value a stretch earlier
    health = support.Health(Texts(tmp_path), support.RunsAway("wasserstein/estimate"), None, 64)
    said = feed(health, lambda step: estimate(math.exp(step / 500)))
    assert said and "runs away" in capsys.readouterr().err
    # non-finite from step 1000 on
    health = support.Health(Texts(tmp_path), support.RunsAway("wasserstein/estimate"), None, 64)
    assert feed(health, lambda step: estimate(float("inf") if step >= 1000 else 2.0))[0] == 1000 + STRETCH
    # a healthy critic: a fast rise to a peak, then a slow decline with noise
    health = support.Health(Texts(tmp_path), support.RunsAway("wasserstein/estimate"), None, 64)
    assert feed(health, lambda step: estimate(20 * min(1, step / 300) * (1 - step / 20000) + (step % 7) / 7)) == []


def test_a_collapsed_fixed_noise_grid_is_said_and_a_varied_one_is_not(tmp_path, capsys):
    real = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    varied = vutils.make_grid(real[-64:].float() / 255, nrow=8)
    same = vutils.make_grid(real[:1].float().expand(64, -1, -1, -1) / 255 + 0.001 * torch.rand(64, 1, 28, 28))
    for grid, said in ((varied, []), (same, [STRETCH, 2 * STRETCH])):
        health = support.Health(Texts(tmp_path), None, real, 64)
        for step in range(0, 2 * STRETCH + 1, 500):
            health.grid(grid, 64, step)
        assert [step for _, step, _ in health.writer.entries] == said
    assert "the fixed-noise grid collapsed" in capsys.readouterr().err


# on the tiny data set, D at --lr 0.5 wins outright from step 80; at the paper's 0.0002 it nears winning from step 160
@pytest.mark.parametrize("lr, warned", [(0.5, True), (2e-4, False)])
def test_a_dcgan_run_made_to_fail_says_so_and_a_healthy_one_does_not(lr, warned, tiny_mnist_root, tmp_path,
                                                                     monkeypatch, capsys):
    gan = load_folder("DCGAN")
    monkeypatch.setattr(gan.support, "HEALTH_STRETCH", 100)  # the tiny data set's run is 200 steps long
    capsys.readouterr()
    assert run_main(gan.train, *QUICK["DCGAN"], "--data-root", tiny_mnist_root, "--out", tmp_path / "run",
                    "--lr", lr, "--max-steps", 200, "--log-every", 10, "--sample-every", 50) == 0
    err = capsys.readouterr().err
    assert ("D wins outright: D/real 1 (target 1), D/fake" in err) == warned, err[-2000:]
    assert ("warning: step" in err) == warned
