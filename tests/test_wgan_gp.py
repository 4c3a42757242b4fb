"""WGAN-GP/: Algorithm 1's invariants (the penalty, per-sample eps, whole-sample norm, a critic
without cross-sample coupling), the official CIFAR-10 network's shapes, and train.py run as a
user runs it."""
import json
import math
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import (ROOT, assert_clean_error, load_checkpoint, load_folder, run_train, scalar_tags,
                      sigterm_then_resume)

wgan_gp = load_folder("WGAN-GP")
QUICK = ["--width", 4, "--device", "cpu"]
NORMALISATION = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm)


def small_models(channels=1, width=8):
    torch.manual_seed(0)
    G, D = wgan_gp.model.Generator(32, channels, width=width), wgan_gp.model.Critic(32, channels, width=width)
    G.apply(wgan_gp.model.init_weights)
    D.apply(wgan_gp.model.init_weights)
    return G, D


class LinearCritic(nn.Module):
    """D(x) = w . x for each sample: its input gradient is w everywhere, so the penalty is (||w|| - 1)^2."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        return (x * self.w).flatten(1).sum(1)


def cross_sample_gradient(D, x):
    """The largest |d D(x)_i / d x_j| over i != j, and the smallest max |d D(x)_i / d x_i|, on one batch."""
    x = x.clone().requires_grad_(True)
    scores = D(x)
    off, own = 0.0, math.inf
    for i in range(len(x)):
        (grad,) = torch.autograd.grad(scores[i], x, retain_graph=True)
        others = torch.cat([grad[:i], grad[i + 1:]])
        off = max(off, others.abs().max().item())
        own = min(own, grad[i].abs().max().item())
    return off, own


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(size, channels):
    G = wgan_gp.model.Generator(size, channels, width=8)
    D = wgan_gp.model.Critic(size, channels, width=8)
    images = G(wgan_gp.model.sample_z(5))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (5,)


def test_official_cifar10_network():
    G, D = wgan_gp.model.Generator(32, 3), wgan_gp.model.Critic(32, 3)
    assert G.project[0].in_features == 128 and G.project[0].out_features == 4 * 4 * 4 * 128
    assert isinstance(G.project[1], nn.BatchNorm1d) and isinstance(G.project[2], nn.ReLU)
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (512, 256, (5, 5), (2, 2)), (256, 128, (5, 5), (2, 2)), (128, 3, (5, 5), (2, 2))]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == 2  # none on G's output
    assert isinstance(G.net[-1], nn.Tanh)
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in convs] == [
        (3, 128, (5, 5), (2, 2)), (128, 256, (5, 5), (2, 2)), (256, 512, (5, 5), (2, 2))]
    slopes = [m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.2, 0.2, 0.2]
    assert (D.score.in_features, D.score.out_features) == (4 * 4 * 512, 1)
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())  # a critic's score, not a probability


@pytest.mark.parametrize("size", [32, 64])
def test_every_layer_doubles_or_halves_the_size_exactly(size):
    G, D = wgan_gp.model.Generator(size, 3, width=8), wgan_gp.model.Critic(size, 3, width=8)
    seen = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod), inp[0].shape[-1], out.shape[-1])))
    D(G(wgan_gp.model.sample_z(2)))
    ups = [(i, o) for kind, i, o in seen if kind is nn.ConvTranspose2d]
    downs = [(i, o) for kind, i, o in seen if kind is nn.Conv2d]
    assert ups[0][0] == 4 and ups[-1][1] == size and all(o == 2 * i for i, o in ups)
    assert downs[0][0] == size and downs[-1][1] == 4 and all(2 * o == i for i, o in downs)


def test_no_normalisation_module_in_the_critic():
    for size in (32, 64):
        D = wgan_gp.model.Critic(size, 3, width=8)
        assert not [m for m in D.modules() if isinstance(m, NORMALISATION)]
    assert any(isinstance(m, nn.BatchNorm2d) for m in wgan_gp.model.Generator(32, 3).modules())  # G keeps its BN


def test_critic_has_no_cross_sample_coupling_in_train_mode():
    _, D = small_models(channels=3)
    D.train()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    off, own = cross_sample_gradient(D, x)
    assert off == 0.0 and own > 0
    # the same check sees the coupling that batch norm brings
    coupled = nn.Sequential(nn.Conv2d(3, 4, 5, 2, 2), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 16 * 16, 1),
                            nn.Flatten(0)).train()
    assert cross_sample_gradient(coupled, x)[0] > 0


def test_penalty_of_a_linear_critic_is_analytic_and_trains_the_critic():
    torch.manual_seed(0)
    # per-channel scales make the norm over the whole sample differ from any per-channel norm
    w = torch.randn(3, 8, 8) * torch.tensor([0.02, 0.1, 0.3]).view(3, 1, 1)
    D = LinearCritic(w)
    real, fake = torch.rand(16, 3, 8, 8) * 2 - 1, torch.rand(16, 3, 8, 8) * 2 - 1
    gp = wgan_gp.train.gradient_penalty(D, real, fake)
    norm = w.norm()
    assert torch.allclose(gp, (norm - 1) ** 2, rtol=1e-5)
    per_channel = ((w.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert not torch.allclose(per_channel, gp, rtol=1e-2)  # a per-channel norm would fail the line above

    # create_graph=True: the penalty has a gradient w.r.t. w, 2 (||w|| - 1) w / ||w||
    (grad_w,) = torch.autograd.grad(gp, D.w)
    assert grad_w.abs().max() > 0
    assert torch.allclose(grad_w, 2 * (norm - 1) * w / norm, rtol=1e-4, atol=1e-7)

    # the critic's loss is D(x~) - D(x) + lambda (||w|| - 1)^2, averaged over the batch
    opt = torch.optim.SGD(D.parameters(), lr=0.0)
    loss, estimate, gp_logged = wgan_gp.train.critic_step(lambda z: fake, D, opt, real, torch.zeros(16, 1), 10.0)
    expected_estimate = (real * w).flatten(1).sum(1).mean() - (fake * w).flatten(1).sum(1).mean()
    assert torch.allclose(estimate, expected_estimate, rtol=1e-5, atol=1e-6)
    assert torch.allclose(gp_logged, (norm - 1) ** 2, rtol=1e-5)
    assert torch.allclose(loss, -expected_estimate + 10 * (norm - 1) ** 2, rtol=1e-5, atol=1e-6)
    penalty_grad = 10 * 2 * (norm - 1) * w / norm
    assert torch.allclose(D.w.grad, (fake - real).mean(0) + penalty_grad, rtol=1e-4, atol=1e-6)


def test_eps_is_drawn_per_sample():
    torch.manual_seed(0)
    D = LinearCritic(torch.ones(1, 8, 8))
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
    _, D = small_models()
    real = torch.rand(8, 1, 32, 32) * 2 - 1
    gp = wgan_gp.train.gradient_penalty(D, real, real.clone())
    gp.backward()
    grads = [p.grad for p in D.parameters() if p.grad is not None]  # the last bias does not move the gradient
    assert torch.isfinite(gp) and len(grads) == len(list(D.parameters())) - 1
    assert all(torch.isfinite(g).all() for g in grads)
    # A critic whose input gradient is exactly zero: the penalty is 1, and its weight gradient is finite
    # (d||g||/dg at g = 0 is NaN when the norm is written as sqrt(sum(g^2))).
    D.zero_grad()
    nn.init.zeros_(D.score.weight)
    gp = wgan_gp.train.gradient_penalty(D, real, real.clone())
    gp.backward()
    assert gp.item() == 1.0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in D.parameters())


def test_critic_step_leaves_G_unchanged_and_generator_step_leaves_D_unchanged():
    G, D = small_models()
    opt_G = torch.optim.Adam(G.parameters(), 1e-4, (0.0, 0.9))
    opt_D = torch.optim.Adam(D.parameters(), 1e-4, (0.0, 0.9))
    x = torch.rand(8, 1, 32, 32) * 2 - 1

    def params(net):
        return [p.detach().clone() for p in net.parameters()]

    G_before, D_before = params(G), params(D)
    wgan_gp.train.critic_step(G, D, opt_D, x, wgan_gp.model.sample_z(8), 10.0)
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    moved = [not torch.equal(a, b) for a, b in zip(D_before, params(D))]
    # every critic weight moved except the last bias: D(x~) - D(x) does not change when a constant is added to D
    assert moved == [name != "score.bias" for name, _ in D.named_parameters()]
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before = params(D)
    wgan_gp.train.generator_step(G, D, opt_G, wgan_gp.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # D is trainable again afterwards


def test_each_generator_iteration_runs_n_critic_steps_on_distinct_real_batches(mnist_root, tmp_path, monkeypatch):
    calls = []
    critic_step, generator_step = wgan_gp.train.critic_step, wgan_gp.train.generator_step

    def recording_critic_step(G, D, opt_D, x, z, lambda_gp):
        calls.append(("critic", x.clone(), z.clone()))
        return critic_step(G, D, opt_D, x, z, lambda_gp)

    def recording_generator_step(G, D, opt_G, z):
        calls.append(("generator", None, z.clone()))
        return generator_step(G, D, opt_G, z)

    monkeypatch.setattr(wgan_gp.train, "critic_step", recording_critic_step)
    monkeypatch.setattr(wgan_gp.train, "generator_step", recording_generator_step)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = wgan_gp.train.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--max-steps", "2",
                                   "--n-critic", "3", "--batch-size", "8", "--out", str(tmp_path / "run"),
                                   "--width", "4", "--device", "cpu"])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert code == 0
    assert [kind for kind, _, _ in calls] == ["critic"] * 3 + ["generator"] + ["critic"] * 3 + ["generator"]
    reals = [x for kind, x, _ in calls if kind == "critic"]
    assert all(not torch.equal(a, b) for i, a in enumerate(reals) for b in reals[i + 1:])
    zs = [z for _, _, z in calls]
    assert all(not torch.equal(a, b) for i, a in enumerate(zs) for b in zs[i + 1:])  # fresh z every time


def test_init_follows_the_official_code():
    torch.manual_seed(0)
    G, D = wgan_gp.model.Generator(32, 3), wgan_gp.model.Critic(32, 3)
    G.apply(wgan_gp.model.init_weights)
    D.apply(wgan_gp.model.init_weights)
    conv = [m for m in D.modules() if isinstance(m, nn.Conv2d)][1]  # 128 -> 256, 5x5, stride 2
    deconv = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)][0]  # 512 -> 256
    expected = {conv: math.sqrt(4 / (128 * 25 + 256 * 25 / 4)), deconv: math.sqrt(4 / (512 * 25 / 4 + 256 * 25)),
                D.score: math.sqrt(2 / (8192 + 1)), G.project[0]: math.sqrt(2 / (128 + 8192))}
    for module, std in expected.items():
        assert abs(module.weight.std().item() / std - 1) < 0.03
        assert module.weight.abs().max().item() <= std * math.sqrt(3)  # uniform
        assert torch.all(module.bias == 0)


def test_z_is_standard_normal():
    z = wgan_gp.model.sample_z(20000)
    assert z.shape == (20000, 128)
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.02


def test_smoke_run_then_resume_then_sample(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = run_train("WGAN-GP", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 2,
                       "--batch-size", 4, "--sample-every", 1, "--out", run, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run)
    for tag in ("loss/D", "loss/G", "wasserstein/estimate", "penalty/gp"):
        assert [s for s, _ in tags[tag]] == [2], tag
    assert tags["penalty/gp"][0][1] >= 0
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    assert Image.open(run / "progress.gif").n_frames == 2
    args = json.loads((run / "args.json").read_text())
    assert args["dataset"] == "mnist" and args["batch_size"] == 4 and args["lambda_gp"] == 10
    assert (args["lr"], args["beta1"], args["beta2"], args["n_critic"]) == (1e-4, 0, 0.9, 5)
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)
    assert checkpoint["batches"]["index"] == 2 * 5  # five real batches per generator iteration

    result = run_train("WGAN-GP", "--resume", run, "--max-steps", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 3
    assert json.loads((run / "args.json").read_text())["batch_size"] == 4  # the run's own configuration
    assert torch.equal(load_checkpoint(run)["fixed_z"], checkpoint["fixed_z"])
    assert len(list((run / "samples").iterdir())) == 3
    tags = scalar_tags(run)
    for tag in ("loss/D", "loss/G", "wasserstein/estimate", "penalty/gp"):
        assert [s for s, _ in tags[tag]] == [2, 3], tag  # the first run's step 2 is kept
    assert_clean_error(run_train("WGAN-GP", "--resume", run, "--lambda-gp", "5"), "--lambda-gp")

    sample = [sys.executable, "model.py", str(run), "--num", "10", "--device", "cpu"]
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "WGAN-GP", check=True)
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)  # 4 per row, 2 px padding
    subprocess.run([*sample, "--out", str(tmp_path / "single"), "--single"], cwd=ROOT / "WGAN-GP", check=True)
    assert len(list((tmp_path / "single").glob("*.png"))) == 10


def test_resumed_run_matches_uninterrupted_run(mnist_root, tmp_path):
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 8, *QUICK]
    assert run_train("WGAN-GP", *common, "--max-steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert run_train("WGAN-GP", *common, "--max-steps", 2, "--out", tmp_path / "split").returncode == 0
    assert run_train("WGAN-GP", "--resume", tmp_path / "split", "--max-steps", 4).returncode == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for net in ("G", "D"):
        for name, value in straight[net].items():
            assert torch.equal(value, split[net][name]), (net, name)
    assert straight["batches"] == split["batches"]


def test_sigterm_writes_a_checkpoint_that_resumes(mnist_root, tmp_path):
    sigterm_then_resume("WGAN-GP", tmp_path / "run", "--dataset", "mnist", "--data-root", mnist_root,
                        "--batch-size", 4, "--sample-every", 1, *QUICK)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, monkeypatch,
                                                                          capsys):
    generator_step, calls = wgan_gp.train.generator_step, []

    def poisoned_generator_step(G, D, opt_G, z):
        calls.append(1)
        if len(calls) == 3:  # a critic weight turns NaN during the third generator iteration
            with torch.no_grad():
                D.score.weight[0, 0] = float("nan")
        return generator_step(G, D, opt_G, z)

    monkeypatch.setattr(wgan_gp.train, "generator_step", poisoned_generator_step)
    run = tmp_path / "run"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_:
            wgan_gp.train.main(["--dataset", "mnist", "--data-root", str(mnist_root), "--max-steps", "6",
                                "--batch-size", "4", "--log-every", "1", "--checkpoint-every", "1", "--out", str(run),
                                "--width", "4", "--device", "cpu"])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    assert exit_.value.code == 1
    assert "NaN or Inf at step 3;" in capsys.readouterr().err
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for net in ("G", "D") for v in checkpoint[net].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [
    (["--lambda-gp", "-1"], ["--lambda-gp"]),
    (["--n-critic", "0"], ["--n-critic"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint"]),
])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("WGAN-GP", *flags, "--device", "cpu"), *words)


def test_missing_data_exits_2_naming_the_files(tmp_path):
    result = run_train("WGAN-GP", "--dataset", "cifar10", "--data-root", tmp_path / "empty", "--device", "cpu",
                       "--out", tmp_path / "run")
    assert_clean_error(result, "cifar10", "cifar-10-batches-py", "--data-root")


def test_batches_visit_every_image_once_per_epoch_and_resume_exactly():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    batches = wgan_gp.dataset.Batches(images, 3, "cpu", seed=0)
    epoch = torch.cat([next(batches) for _ in range(3)])
    assert epoch.min() >= -1 and epoch.max() <= 1
    values = ((epoch[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert len(set(values.tolist())) == 9  # 3 batches of 3 distinct images; the 10th is dropped
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    resumed = wgan_gp.dataset.Batches(images, 3, "cpu", seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)
