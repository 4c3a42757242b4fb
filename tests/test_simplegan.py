"""simpleGAN/: the networks of §5, Algorithm 1, the official schedules, the Parzen estimator of
Table 1, and train.py run as a user runs it."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import (ROOT, assert_clean_error, load_checkpoint, load_folder, run_train, scalar_tags,
                      sigterm_then_resume)

gan = load_folder("simpleGAN")
QUICK = ["--g-width", 32, "--d-width", 16, "--batch-size", 10, "--device", "cpu"]
PARZEN_LINE = re.compile(r"^Parzen log-likelihood: (-?\d+\.\d+) ± (\d+\.\d+) \(sigma=(\d+\.\d+)\)$", re.M)


def small_models():
    torch.manual_seed(0)
    G, D = gan.model.Generator(width=32), gan.model.Discriminator(width=16)
    gan.model.init_generator(G, torch.rand(1, 28, 28))
    gan.model.init_discriminator(D)
    return G, D


def params(net):
    return [p.detach().clone() for p in net.parameters()]


def test_output_shapes_and_ranges():
    G, D = gan.model.Generator(), gan.model.Discriminator()
    images = G(gan.model.sample_z(5))
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1  # sigmoid output: pixels in [0, 1]
    assert D(images).shape == (5,) and D(images.flatten(1)).shape == (5,)


def test_official_widths_and_dropout_probabilities():
    G, D = gan.model.Generator(), gan.model.Discriminator()
    linears = [m for m in G.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(100, 1200), (1200, 1200), (1200, 784)]
    assert [type(m) for m in G.net] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert not any(isinstance(m, nn.Dropout) for m in G.modules())  # dropout in D only (§5)
    maxouts = [m for m in D.modules() if isinstance(m, gan.model.Maxout)]
    assert [(m.linear.in_features, m.units, m.pieces) for m in maxouts] == [(784, 240, 5), (240, 240, 5)]
    # keep-probability 0.8 on the pixels, 0.5 on both hidden layers
    assert [m.p for m in D.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.5, 0.5]
    assert isinstance(D.net[0], nn.Dropout) and D.net[-1].out_features == 1


def test_maxout_takes_the_max_of_five_consecutive_pieces():
    torch.manual_seed(0)
    layer = gan.model.Maxout(7, 3)
    x = torch.randn(4, 7)
    pieces = x @ layer.linear.weight.T + layer.linear.bias  # (4, 15): unit j owns pieces 5j ... 5j + 4
    expected = torch.stack([pieces[:, 5 * j:5 * j + 5].max(1).values for j in range(3)], 1)
    assert layer.pieces == 5 and layer.linear.out_features == 15
    assert torch.allclose(layer(x), expected)


def test_dropout_is_off_in_eval_mode_and_sampling_is_deterministic():
    G, D = small_models()
    x = torch.rand(8, 1, 28, 28)
    D.eval()
    assert torch.equal(D(x), D(x))
    D.train()
    torch.manual_seed(1)
    assert not torch.equal(D(x), D(x))  # dropout masks differ between training passes
    z = gan.model.sample_z(4)
    assert torch.equal(gan.model.sample(G, z), gan.model.sample(G, z)) and G.training


def test_init_ranges_and_G_output_bias_is_the_logit_of_the_pixel_means(mnist_root):
    torch.manual_seed(0)
    images = gan.dataset.load_images("mnist", mnist_root, "train")
    means = gan.dataset.pixel_means(images)
    assert torch.allclose(means, images.double().mean(0).float() / 255)
    G, D = gan.model.Generator(), gan.model.Discriminator()
    gan.model.init_generator(G, means)
    gan.model.init_discriminator(D)
    bias = G.net[-2].bias
    assert torch.allclose(bias, torch.logit(means.flatten().double().clamp(1e-7, 1 - 1e-7)).float())
    interior = (means > 0.01).flatten()
    assert torch.allclose(torch.sigmoid(bias[interior]), means.flatten()[interior], atol=1e-6)
    for net, bound in ((G, 0.05), (D, 0.005)):
        for m in net.modules():
            if isinstance(m, nn.Linear):
                assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.95 * bound
        hidden_biases = [m.bias for m in net.modules() if isinstance(m, nn.Linear)][:-1 if net is G else None]
        assert all(torch.all(b == 0) for b in hidden_biases)


def test_G_output_bias_clips_pixels_that_are_always_black_or_white():
    G = gan.model.Generator(width=8)
    means = torch.tensor([0.0, 1.0, 0.5] + [0.25] * 781).view(1, 28, 28)
    gan.model.init_generator(G, means)
    bias = G.net[-2].bias[:3]
    assert torch.isfinite(bias).all()
    assert torch.allclose(bias, torch.tensor([math.log(1e-7), -math.log(1e-7), 0.0]), atol=1e-3)


def test_z_is_uniform_with_unit_variance():
    z = gan.model.sample_z(50000)
    bound = math.sqrt(3)
    assert z.shape == (50000, 100) and z.min() >= -bound and z.max() <= bound
    assert z.min() < -0.999 * bound and z.max() > 0.999 * bound
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01


def test_learning_rate_schedule():
    lr = gan.train.learning_rate
    assert lr(0) == 0.1
    assert lr(1) == pytest.approx(0.1 / 1.000004, rel=1e-12)
    assert lr(1000) == pytest.approx(0.1 / 1.000004 ** 1000, rel=1e-12)
    floor = math.ceil(math.log(0.1 / 1e-6) / math.log(1.000004))  # the first minibatch at the floor
    assert lr(floor - 1) > 1e-6 and lr(floor) == 1e-6 and lr(10 * floor) == 1e-6
    assert lr(5, lr=0.2, decay=2.0, lr_min=0.0) == 0.2 / 32


def test_momentum_schedule():
    m = gan.train.momentum_at
    assert m(0) == 0.5
    assert m(125) == pytest.approx(0.6, abs=0.001)
    assert m(249) == pytest.approx(0.7) and m(250) == pytest.approx(0.7) and m(10000) == pytest.approx(0.7)
    values = [m(e) for e in range(260)]
    assert all(a < b for a, b in zip(values[:249], values[1:250]))  # rising every epoch until it saturates
    assert m(3, initial=0.1, final=0.4, saturate=4) == pytest.approx(0.4)


def test_parzen_with_one_sample_is_the_gaussian_density():
    torch.manual_seed(0)
    mu, x, sigma, d = torch.rand(1, 784), torch.rand(6, 784), 0.3, 784
    expected = -((x - mu) ** 2).sum(1).double() / (2 * sigma ** 2) - d * math.log(sigma * math.sqrt(2 * math.pi))
    got = gan.train.parzen_log_likelihoods(x, mu, [sigma])[0]
    assert torch.allclose(got, expected, rtol=1e-5)
    gaussian = torch.distributions.Normal(mu.double(), sigma)
    assert torch.allclose(got, gaussian.log_prob(x.double()).sum(1), rtol=1e-5)


def test_parzen_is_the_log_of_the_mean_of_the_kernels_for_every_sigma_and_chunk():
    torch.manual_seed(0)
    samples, x, sigmas = torch.rand(50, 20), torch.rand(9, 20), [0.1, 0.5, 1.0]
    got = gan.train.parzen_log_likelihoods(x, samples, sigmas)
    assert got.shape == (3, 9)
    for row, sigma in zip(got, sigmas):
        kernels = torch.distributions.Normal(samples.double()[None], sigma).log_prob(x.double()[:, None]).sum(2)
        assert torch.allclose(row, torch.logsumexp(kernels, 1) - math.log(50), rtol=1e-5)
    assert torch.allclose(got, gan.train.parzen_log_likelihoods(x, samples, sigmas, chunk=2))


def test_sigma_selection_picks_the_width_the_validation_data_was_drawn_with():
    torch.manual_seed(0)
    sigmas = gan.train.SIGMAS
    assert len(sigmas) == 10 and sigmas[0] == pytest.approx(0.1) and sigmas[-1] == pytest.approx(1.0)
    centres = torch.rand(200, 784) * 10  # far apart: each validation point is near its own centre only
    for true in (sigmas[3], sigmas[6]):
        valid = centres[torch.arange(300) % 200] + true * torch.randn(300, 784)
        assert gan.train.choose_sigma(gan.train.parzen_log_likelihoods(valid, centres, sigmas)) == true


def test_D_step_leaves_G_unchanged_and_G_step_leaves_D_unchanged():
    G, D = small_models()
    opt_G = torch.optim.SGD(G.parameters(), 0.1, momentum=0.5)
    opt_D = torch.optim.SGD(D.parameters(), 0.1, momentum=0.5)
    x = torch.rand(8, 1, 28, 28)
    G_before, D_before = params(G), params(D)
    gan.train.discriminator_step(G, D, opt_D, x, gan.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert not all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before = params(D)
    gan.train.generator_step(G, D, opt_G, gan.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # D is trainable again afterwards


def test_losses_are_the_papers_objectives():
    G, D = small_models()
    x, z = torch.rand(8, 1, 28, 28), gan.model.sample_z(8)
    D.eval()  # no dropout: both sides see the same D
    torch.manual_seed(0)
    loss_D, _, _ = gan.train.discriminator_step(G, D, torch.optim.SGD(D.parameters(), 0.0), x, z)
    with torch.no_grad():
        d_real, d_fake = torch.sigmoid(D(x)), torch.sigmoid(D(G(z)))
    # D maximises log D(x) + log(1 - D(G(z))); the loss is its negative
    assert loss_D.item() == pytest.approx(-(d_real.log().mean() + (1 - d_fake).log().mean()).item(), rel=1e-5)
    loss_G = gan.train.generator_step(G, D, torch.optim.SGD(G.parameters(), 0.0), z)
    # G maximises log D(G(z)) (§3, non-saturating)
    assert loss_G.item() == pytest.approx(-d_fake.log().mean().item(), rel=1e-5)


def test_validation_split_is_the_last_sixth_of_the_training_file(mnist_root):
    import torchvision

    full = torchvision.datasets.MNIST(mnist_root, train=True).data
    train = gan.dataset.load_images("mnist", mnist_root, "train")
    valid = gan.dataset.load_images("mnist", mnist_root, "valid")
    test = gan.dataset.load_images("mnist", mnist_root, "test")
    assert len(valid) * 6 == len(full) and torch.equal(torch.cat([train, valid])[:, 0], full)
    if len(full) == 60000:
        assert len(train) == 50000 and len(test) == 10000
    batch = next(gan.dataset.Batches(train, 10, "cpu", seed=0))
    assert batch.shape == (10, 1, 28, 28) and batch.min() >= 0 and batch.max() <= 1 and batch.max() > 0.9


def test_batches_visit_every_image_once_per_epoch_and_resume_exactly():
    images = (torch.arange(10, dtype=torch.uint8) * 20).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    batches = gan.dataset.Batches(images, 3, "cpu", seed=0)
    epoch = torch.cat([next(batches) for _ in range(3)])
    assert len(set((epoch[:, 0, 0, 0] * 255).round().long().tolist())) == 9  # the 10th image is dropped
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    resumed = gan.dataset.Batches(images, 3, "cpu", seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)


@pytest.fixture(scope="module")
def smoke_run(mnist_root, tmp_path_factory):
    """Three steps with tiny networks, then --resume to five: the run several tests below read."""
    run = tmp_path_factory.mktemp("simplegan") / "run"
    first = run_train("simpleGAN", "--data-root", mnist_root, "--max-steps", 3, "--sample-every", 1, "--log-every", 1,
                      "--out", run, *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    before = load_checkpoint(run)
    grids = [Image.open(run / "samples" / f"step_000000{i}.png").tobytes() for i in (1, 2, 3)]
    gif_frames = Image.open(run / "progress.gif").n_frames
    tags = scalar_tags(run)
    resumed = run_train("simpleGAN", "--resume", run, "--max-steps", 5, "--evaluate-at-end", "--parzen-samples", 500)
    return {"run": run, "before": before, "grids": grids, "gif_frames": gif_frames, "tags": tags, "resumed": resumed}


def test_smoke_run_writes_every_output(smoke_run):
    run, tags = smoke_run["run"], smoke_run["tags"]
    assert {"loss/D", "loss/G", "D/real", "D/fake", "lr", "momentum"} <= set(tags)
    assert [s for s, _ in tags["loss/G"]] == [1, 2, 3]
    # the value logged at step s is the one its update used: lr_(s-1)
    assert [v for _, v in tags["lr"]] == pytest.approx([gan.train.learning_rate(s) for s in (0, 1, 2)], rel=1e-6)
    assert [v for _, v in tags["momentum"]] == pytest.approx([0.5] * 3)
    assert Image.open(run / "samples" / "step_0000003.png").size == (10 * 30 + 2,) * 2  # 10 x 10 grid
    # one GIF frame per grid (GIF writers merge consecutive identical frames: early grids barely change)
    grids = smoke_run["grids"]
    assert smoke_run["gif_frames"] == 1 + sum(a != b for a, b in zip(grids, grids[1:]))
    checkpoint = smoke_run["before"]
    assert checkpoint["step"] == 3 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)
    assert checkpoint["fixed_z"].shape == (100, 100)
    assert checkpoint["args"]["dataset"] == "mnist" and checkpoint["args"]["lr"] == 0.1


def test_resume_continues_the_run_and_evaluates_at_the_end(smoke_run):
    run, result = smoke_run["run"], smoke_run["resumed"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 5
    args = json.loads((run / "args.json").read_text())
    assert args["batch_size"] == 10 and args["k"] == 1  # the run's own configuration
    assert torch.equal(load_checkpoint(run)["fixed_z"], smoke_run["before"]["fixed_z"])
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_000000{i}.png" for i in range(1, 6)]
    tags = scalar_tags(run)
    assert max(s for s, _ in tags["loss/G"]) == 5 and [s for s, _ in tags["parzen/log_likelihood"]] == [5]
    assert PARZEN_LINE.search(result.stdout), result.stdout[-2000:]


def test_evaluate_prints_the_parzen_line_of_the_estimator(smoke_run, mnist_root):
    run = smoke_run["run"]
    result = run_train("simpleGAN", "--evaluate", run, "--data-root", mnist_root, "--parzen-samples", 300,
                       "--parzen-valid", 200)
    assert result.returncode == 0, result.stderr[-3000:]
    mean, stderr, sigma = map(float, PARZEN_LINE.search(result.stdout).groups())
    assert any(abs(sigma - s) < 1e-4 for s in gan.train.SIGMAS)
    # the same numbers from the estimator called here on the same samples
    G = gan.model.load_generator(gan.model.read_checkpoint(gan.model.checkpoint_path(run)))
    torch.manual_seed(0)
    samples = gan.model.sample(G, gan.model.sample_z(300))
    valid = gan.dataset.to_unit_range(gan.dataset.load_images("mnist", mnist_root, "valid")[:200])
    test = gan.dataset.to_unit_range(gan.dataset.load_images("mnist", mnist_root, "test"))
    chosen = gan.train.choose_sigma(gan.train.parzen_log_likelihoods(valid, samples, gan.train.SIGMAS))
    log_p = gan.train.parzen_log_likelihoods(test, samples, [chosen])[0]
    assert sigma == pytest.approx(chosen, abs=1e-4)
    assert mean == pytest.approx(log_p.mean().item(), abs=0.01)
    assert stderr == pytest.approx(log_p.std(unbiased=False).item() / math.sqrt(len(log_p)), abs=0.01) and stderr > 0
    assert load_checkpoint(run)["step"] == 5  # evaluation trains nothing


def test_sampling_command_writes_a_grid_and_single_images(smoke_run, tmp_path):
    sample = [sys.executable, "model.py", str(smoke_run["run"]), "--num", "10", "--device", "cpu"]
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "simpleGAN", check=True)
    assert Image.open(tmp_path / "grid.png").size == (4 * 30 + 2, 3 * 30 + 2)  # 4 per row, 2 px padding
    subprocess.run([*sample, "--out", str(tmp_path / "single"), "--single"], cwd=ROOT / "simpleGAN", check=True)
    assert len(list((tmp_path / "single").glob("*.png"))) == 10


def test_resumed_run_matches_uninterrupted_run_with_k_fresh_minibatches(mnist_root, tmp_path):
    common = ["--data-root", mnist_root, "--k", 2, *QUICK]
    assert run_train("simpleGAN", *common, "--max-steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert run_train("simpleGAN", *common, "--max-steps", 2, "--out", tmp_path / "split").returncode == 0
    assert run_train("simpleGAN", "--resume", tmp_path / "split", "--max-steps", 4).returncode == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    # Alg. 1: each of the k D steps draws its own real minibatch
    assert straight["step"] == 4 and straight["batches"] == {"epoch": 0, "index": 8} == split["batches"]
    for part in ("G", "D"):
        for name, value in straight[part].items():
            assert torch.equal(value, split[part][name]), (part, name)
    for part in ("opt_G", "opt_D"):
        for index, buffers in straight[part]["state"].items():
            assert torch.equal(buffers["momentum_buffer"], split[part]["state"][index]["momentum_buffer"])


def test_sigterm_writes_a_checkpoint_that_resumes(mnist_root, tmp_path):
    sigterm_then_resume("simpleGAN", tmp_path / "run", "--data-root", mnist_root, "--sample-every", 1, *QUICK)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path):
    run = tmp_path / "run"
    # at lr 1e4 the weights overflow after a few finite steps
    result = run_train("simpleGAN", "--data-root", mnist_root, "--lr", 1e4, "--lr-min", 0, "--max-steps", 50,
                       "--log-every", 1, "--checkpoint-every", 1, "--out", run, *QUICK)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NaN or Inf at step" in result.stderr and "Traceback" not in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    assert bad_step > 1
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in checkpoint["G"].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [(["--lr", "-1"], ["--lr"]), (["--batch-size", "0"], ["--batch-size"])])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("simpleGAN", *flags, "--device", "cpu"), *words)


def test_missing_data_offline_exits_2_naming_the_files(tmp_path):
    result = run_train("simpleGAN", "--dataset", "fashion-mnist", "--data-root", tmp_path / "empty",
                       "--device", "cpu", "--out", tmp_path / "run")
    assert_clean_error(result, "fashion-mnist", "FashionMNIST/raw/train-images-idx3-ubyte", "--data-root")


def exits_2(capsys, *argv):
    """train.main(argv) in this process: exit code 2 and its one-line message (the CLI cases run above)."""
    with pytest.raises(SystemExit) as exit_info:
        gan.train.main([str(a) for a in argv])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and "error:" in message
    return message


def test_more_bad_input_exits_2(smoke_run, mnist_root, tmp_path, capsys):
    assert "--k" in exits_2(capsys, "--k", 0)
    assert "--lr-decay" in exits_2(capsys, "--lr-decay", 0.5)
    assert "cifar10" in exits_2(capsys, "--dataset", "cifar10")
    assert "no checkpoint" in exits_2(capsys, "--resume", tmp_path / "nothing")
    assert "no checkpoint" in exits_2(capsys, "--evaluate", tmp_path / "nothing")
    assert "--batch-size 1000000" in exits_2(capsys, "--data-root", mnist_root, "--batch-size", 10 ** 6,
                                             "--out", tmp_path / "big", "--device", "cpu")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert "--out" in exits_2(capsys, "--out", blocker / "run", "--device", "cpu")
    # --resume and --evaluate use the run's own configuration
    assert "lr" in exits_2(capsys, "--resume", smoke_run["run"], "--lr", 0.5)
    assert "--max-steps" in exits_2(capsys, "--evaluate", smoke_run["run"], "--max-steps", 9)
