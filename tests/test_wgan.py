"""WGAN/: the networks, Algorithm 1's invariants (clip after the update, fresh real batches,
the critic schedule, RMSProp without momentum, fakes detached), and train.py run as a user runs it."""
import copy
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT, assert_clean_error, load_checkpoint, load_folder, run_train, scalar_tags

wgan = load_folder("WGAN")
QUICK = ["--image-size", 32, "--width", 8, "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The networks here are tiny: one thread is fastest, and on a busy CPU more threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # for the train.py processes
        yield
    torch.set_num_threads(threads)


def small_models(channels=1):
    torch.manual_seed(0)
    G, D = wgan.model.Generator(32, channels, width=8), wgan.model.Critic(32, channels, width=8)
    G.apply(wgan.model.init_weights)
    D.apply(wgan.model.init_weights)
    return G, D


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def real_batch(n=8):
    return torch.rand(n, 1, 32, 32) * 2 - 1


def main_in_process(*args):
    """train.main in this process (no interpreter start-up), leaving the signal handlers as they were."""
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        return wgan.train.main([str(a) for a in args])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(size, channels):
    G = wgan.model.Generator(size, channels, width=16)
    D = wgan.model.Critic(size, channels, width=16)
    images = G(wgan.model.sample_z(5))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (5,)


def test_official_architecture_at_64px():
    G, D = wgan.model.Generator(64, 3), wgan.model.Critic(64, 3)
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (100, 512, (4, 4), (1, 1)), (512, 256, (4, 4), (2, 2)), (256, 128, (4, 4), (2, 2)),
        (128, 64, (4, 4), (2, 2)), (64, 3, (4, 4), (2, 2))]
    downs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size) for m in downs] == [
        (3, 64, (4, 4)), (64, 128, (4, 4)), (128, 256, (4, 4)), (256, 512, (4, 4)), (512, 1, (4, 4))]
    assert all(m.bias is None for m in [*ups, *downs])
    # batch norm after every critic convolution except the input layer and the score
    layers = list(D.net)
    assert isinstance(layers[1], nn.LeakyReLU) and layers[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in layers) == 3
    assert isinstance(G.net[-1], nn.Tanh) and isinstance(G.net[-2], nn.ConvTranspose2d)


def test_no_sigmoid_in_the_critic_its_output_is_linear():
    _, D = small_models()
    assert not any(isinstance(m, (nn.Sigmoid, nn.Tanh)) for m in D.modules())
    x = real_batch()
    before = D(x).detach()
    with torch.no_grad():
        D.score.weight.mul_(-300)
    after = D(x).detach()
    # a linear last layer: scaling it scales the score, sign and all; a sigmoid would squash it into (0, 1)
    assert torch.allclose(after, -300 * before, rtol=1e-4, atol=1e-6)
    assert after.abs().max() > 1 and (after < 0).any() and (after > 0).any()


def test_critic_step_clips_every_weight_into_the_box_even_from_outside_it():
    G, D = small_models()
    with torch.no_grad():
        for i, w in enumerate(D.parameters()):
            w.fill_(0.5 if i % 2 else -0.7)  # every critic parameter starts outside [-c, c]
    opt_D = wgan.train.rmsprop(D.parameters(), 5e-5)
    wgan.train.critic_step(G, D, opt_D, real_batch(), wgan.model.sample_z(8), clip=0.01)
    for name, w in D.named_parameters():
        assert w.abs().max() <= 0.01, name
    assert any(w.abs().max() == 0.01 for w in D.parameters())


def test_clip_comes_after_the_optimiser_step():
    G, D = small_models()
    reference = copy.deepcopy(D)
    x, z = real_batch(), wgan.model.sample_z(8)
    # lr 1: one RMSProp step moves each weight by up to 10, far outside the box
    opt_D = wgan.train.rmsprop(D.parameters(), 1.0)
    wgan.train.critic_step(G, D, opt_D, x, z, clip=0.01)
    assert all(w.abs().max() <= 0.01 for w in D.parameters())

    # the same step by hand: gradient of -(E[D(x)] - E[D(G(z))]), RMSProp step, then clamp
    opt_reference = torch.optim.RMSprop(reference.parameters(), lr=1.0)
    with torch.no_grad():
        fake = G(z)
    (-(reference(x).mean() - reference(fake).mean())).backward()
    opt_reference.step()
    stepped = params(reference)
    assert any(w.abs().max() > 0.01 for w in stepped)  # unclipped, the step leaves the box
    for w, expected in zip(D.parameters(), stepped):
        assert torch.equal(w.detach(), expected.clamp(-0.01, 0.01))


def test_critic_step_returns_the_wasserstein_estimate_and_its_loss():
    G, D = small_models()
    x, z = real_batch(), wgan.model.sample_z(8)
    with torch.no_grad():
        expected = D(x).mean() - D(G(z)).mean()
    loss, estimate = wgan.train.critic_step(G, D, wgan.train.rmsprop(D.parameters(), 5e-5), x, z, clip=0.01)
    assert torch.allclose(estimate, expected) and torch.equal(loss, -estimate)


def test_critic_step_leaves_G_unchanged_and_G_step_leaves_the_critic_unchanged():
    G, D = small_models()
    opt_G, opt_D = wgan.train.rmsprop(G.parameters(), 5e-5), wgan.train.rmsprop(D.parameters(), 5e-5)
    G_before, D_before = params(G), params(D)
    wgan.train.critic_step(G, D, opt_D, real_batch(), wgan.model.sample_z(8), clip=0.01)
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert not all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before, D_grads = params(D), [p.grad.clone() for p in D.parameters()]
    wgan.train.generator_step(G, D, opt_G, wgan.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(torch.equal(a, p.grad) for a, p in zip(D_grads, D.parameters()))  # no gradient reached the critic
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # the critic is trainable again afterwards


def test_rmsprop_has_no_momentum():
    opt = wgan.train.rmsprop(nn.Linear(3, 1).parameters(), 5e-5)
    assert type(opt) is torch.optim.RMSprop
    group = opt.param_groups[0]
    settings = {k: group[k] for k in ("lr", "momentum", "alpha", "eps", "centered")}
    assert settings == {"lr": 5e-5, "momentum": 0, "alpha": 0.99, "eps": 1e-8, "centered": False}


def test_critic_schedule():
    schedule = wgan.train.critic_iterations
    assert schedule(0, 5, True) == 100 and schedule(24, 5, True) == 100 and schedule(500, 5, True) == 100
    assert schedule(25, 5, True) == 5 and schedule(30, 5, True) == 5 and schedule(501, 5, True) == 5
    assert schedule(1000, 7, True) == 100 and schedule(999, 7, True) == 7
    assert all(schedule(step, 5, False) == 5 for step in range(0, 2001))


def test_default_length_is_25_epochs_of_critic_batches():
    per_epoch = 50000 // 64  # CIFAR-10 at batch 64
    steps = wgan.train.default_iterations(per_epoch, 5, True)
    drawn = [wgan.train.critic_iterations(s, 5, True) for s in range(steps)]
    assert sum(drawn) >= 25 * per_epoch > sum(drawn[:-1])
    assert wgan.train.default_iterations(100, 5, False) == 25 * 100 // 5


def test_z_is_standard_normal():
    z = wgan.model.sample_z(20000)
    assert z.shape == (20000, 100)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


@pytest.mark.parametrize("flags, per_step", [
    (["--n-critic", 3, "--no-critic-warmup", "--max-steps", 3], [3, 3, 3]),
    (["--n-critic", 3, "--max-steps", 2], [100, 100]),  # the official warm-up schedule
])
def test_main_loop_draws_a_fresh_real_batch_for_every_critic_iteration(mnist_root, tmp_path, monkeypatch, flags,
                                                                       per_step):
    events, real = [], []
    critic_step, generator_step = wgan.train.critic_step, wgan.train.generator_step

    def recording_critic_step(G, D, opt_D, x, z, clip):
        events.append("D")
        real.append(x.clone())
        return critic_step(G, D, opt_D, x, z, clip)

    def recording_generator_step(G, D, opt_G, z):
        events.append("G")
        return generator_step(G, D, opt_G, z)

    monkeypatch.setattr(wgan.train, "critic_step", recording_critic_step)
    monkeypatch.setattr(wgan.train, "generator_step", recording_generator_step)
    code = main_in_process("--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 4,
                           "--out", tmp_path / "run", *QUICK, *flags)
    assert code == 0
    assert events == [e for n in per_step for e in ["D"] * n + ["G"]]
    # each critic iteration got the next batch of the data, never one it had seen before
    batches = wgan.dataset.Batches(wgan.dataset.load_images("mnist", mnist_root, 32), 4, "cpu", seed=0)
    assert all(torch.equal(x, next(batches)) for x in real)
    assert len({x.numpy().tobytes() for x in real}) == len(real) == sum(per_step)


def test_smoke_run_then_resume(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = run_train("WGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 2, "--batch-size", 4,
                       "--no-critic-warmup", "--sample-every", 1, "--out", run, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run)
    assert {"wasserstein/estimate", "loss/D", "loss/G"} <= set(tags)
    assert [s for s, _ in tags["wasserstein/estimate"]] == [1, 2]
    for (_, w), (_, loss_D) in zip(tags["wasserstein/estimate"], tags["loss/D"]):
        assert w == pytest.approx(-loss_D)
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    assert Image.open(run / "progress.gif").n_frames == 2
    args = json.loads((run / "args.json").read_text())
    settings = {k: args[k] for k in ("dataset", "batch_size", "lr", "clip", "n_critic")}
    assert settings == {"dataset": "mnist", "batch_size": 4, "lr": 5e-5, "clip": 0.01, "n_critic": 5}
    n_images = len(wgan.dataset.load_images("mnist", mnist_root, 32))  # 60,000, or the tiny stand-in's 600
    assert args["critic_warmup"] is False and args["iters"] == 25 * (n_images // 4) // 5
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)
    assert checkpoint["batches"] == {"epoch": 0, "index": 10}  # 2 steps x 5 critic iterations, one batch each
    assert all(v.abs().max() <= 0.01 for k, v in checkpoint["D"].items() if k.endswith(("weight", "bias")))
    opt_D = checkpoint["opt_D"]
    assert opt_D["param_groups"][0]["momentum"] == 0
    assert all(set(s) == {"step", "square_avg"} for s in opt_D["state"].values())  # no momentum buffer

    result = run_train("WGAN", "--resume", run, "--max-steps", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_checkpoint(run)
    assert resumed["step"] == 3 and resumed["batches"] == {"epoch": 0, "index": 15}
    assert json.loads((run / "args.json").read_text())["critic_warmup"] is False  # the run's own configuration
    assert torch.equal(resumed["fixed_z"], checkpoint["fixed_z"])
    assert len(list((run / "samples").iterdir())) == 3
    assert max(s for s, _ in scalar_tags(run)["wasserstein/estimate"]) == 3

    sample = [sys.executable, "model.py", str(run), "--num", "10", "--device", "cpu"]
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "WGAN", check=True)
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)  # 4 per row, 2 px padding
    assert_clean_error(run_train("WGAN", "--resume", run, "--clip", "0.1"), "clip")  # its own configuration


def test_resumed_run_matches_uninterrupted_run(mnist_root, tmp_path):
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 8, "--n-critic", 3,
              "--no-critic-warmup", *QUICK]
    assert main_in_process(*common, "--max-steps", 4, "--out", tmp_path / "straight") == 0
    assert main_in_process(*common, "--max-steps", 2, "--out", tmp_path / "split") == 0
    assert main_in_process("--resume", tmp_path / "split", "--max-steps", 4) == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for net in ("G", "D"):
        for name, value in straight[net].items():
            assert torch.equal(value, split[net][name]), (net, name)
    assert scalar_tags(tmp_path / "straight")["wasserstein/estimate"] == scalar_tags(tmp_path / "split")[
        "wasserstein/estimate"]


def test_sigterm_writes_a_checkpoint_that_resumes(mnist_root, tmp_path, monkeypatch):
    run = tmp_path / "run"
    generator_step = wgan.train.generator_step

    def terminated_at_step_2(G, D, opt_G, z):
        loss = generator_step(G, D, opt_G, z)
        if opt_G.state[next(iter(G.parameters()))]["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of generator step 2
        return loss

    monkeypatch.setattr(wgan.train, "generator_step", terminated_at_step_2)
    code = main_in_process("--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 4, "--n-critic", 2,
                           "--no-critic-warmup", "--out", run, *QUICK)
    assert code == 128 + signal.SIGTERM
    assert load_checkpoint(run)["step"] == 2
    monkeypatch.setattr(wgan.train, "generator_step", generator_step)
    assert main_in_process("--resume", run, "--max-steps", 3) == 0 and load_checkpoint(run)["step"] == 3


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    # RMSProp moves every weight by about 10 lr in the first step: at lr 1e30, G's activations overflow
    with pytest.raises(SystemExit) as stopped:
        main_in_process("--dataset", "mnist", "--data-root", mnist_root, "--lr", 1e30, "--max-steps", 20,
                        "--batch-size", 4, "--no-critic-warmup", "--checkpoint-every", 1, "--out", run, *QUICK)
    message = capsys.readouterr().err
    assert stopped.value.code == 1 and "NaN or Inf at step" in message
    bad_step = int(message.split("at step ")[1].split(";")[0])
    checkpoint = load_checkpoint(run)
    assert bad_step > 1 and checkpoint["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for net in ("G", "D") for v in checkpoint[net].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [
    (["--clip", "-0.01"], ["--clip"]),
    (["--n-critic", "0"], ["--n-critic"]),
])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("WGAN", *flags, "--device", "cpu"), *words)


@pytest.mark.parametrize("flags, words", [
    (["--clip", "0"], ["--clip"]),
    (["--lr", "-1"], ["--lr"]),
    (["--iters", "0"], ["--iters"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint"]),
    (["--dataset", "cifar10", "--data-root", "EMPTY"], ["cifar10", "cifar-10-batches-py", "--data-root"]),
])
def test_bad_input_exits_2_naming_the_problem(flags, words, tmp_path, capsys):
    flags = [str(tmp_path / "empty") if flag == "EMPTY" else flag for flag in flags]
    with pytest.raises(SystemExit) as stopped:
        main_in_process(*flags, "--device", "cpu", "--out", tmp_path / "run")
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "error:" in message and all(word in message for word in words), message
