"""CGAN/: §4.1's networks and schedules, the conditioning on y, the Parzen-window metric,
and train.py run as a user runs it."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import ROOT, assert_clean_error, load_checkpoint, load_folder, run_train, scalar_tags

cgan = load_folder("CGAN")
# a validation split small enough for the tiny stand-in MNIST too (the default is the paper's 10,000)
QUICK = ["--valid-size", 100, "--device", "cpu"]
PARZEN_LINE = re.compile(r"^Parzen log-likelihood: (-?\d+\.\d+) ± (\d+\.\d+) \(sigma=([\d.]+)\)$", re.M)


def models(dropout=0.5):
    torch.manual_seed(0)
    G, D = cgan.model.Generator(dropout=dropout), cgan.model.Discriminator(dropout=dropout)
    cgan.model.init_weights(G, cgan.model.G_IRANGE)
    cgan.model.init_weights(D, cgan.model.D_IRANGE)
    return G, D


def labels_of(*digits):
    return cgan.model.one_hot(torch.tensor(digits))


def test_output_shapes_and_ranges():
    G, D = models()
    z = cgan.model.sample_z(5)
    images = G(z, labels_of(0, 1, 2, 3, 9))
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1  # sigmoid output, the data's [0, 1]
    assert D(images, labels_of(0, 1, 2, 3, 9)).shape == (5,)


def test_section_4_1_layer_sizes():
    G, D = models()
    assert [(m.in_features, m.out_features) for m in G.modules() if isinstance(m, nn.Linear)] == [
        (100, 200), (10, 1000), (1200, 1200), (1200, 784)]
    maxouts = [m for m in D.modules() if isinstance(m, cgan.model.Maxout)]
    assert [(m.linear.in_features, m.units, m.pieces) for m in maxouts] == [(784, 240, 5), (10, 50, 5), (290, 240, 4)]
    assert (D.logit.in_features, D.logit.out_features) == (240, 1)
    dropouts = [m.p for net in (G, D) for m in net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.5] * 6  # every hidden layer of both networks


@pytest.mark.parametrize("layer, pieces", [("x_path", 5), ("joint", 4)])
def test_maxout_takes_the_max_over_its_pieces(layer, pieces):
    _, D = models()
    maxout = getattr(D, layer)[0]
    assert maxout.pieces == pieces
    with torch.no_grad():
        maxout.linear.weight.normal_()
        maxout.linear.bias.normal_()
    x = torch.randn(3, maxout.linear.in_features)
    W, b = maxout.linear.weight.detach(), maxout.linear.bias.detach()
    expected = torch.empty(3, maxout.units)
    for n in range(3):
        for unit in range(maxout.units):
            rows = range(unit * pieces, (unit + 1) * pieces)
            expected[n, unit] = max(float(W[r] @ x[n] + b[r]) for r in rows)
    assert torch.allclose(maxout(x), expected, atol=1e-4)


def test_dropout_is_off_in_eval_mode_so_sampling_is_deterministic():
    G, D = models()
    z, labels = cgan.model.sample_z(6), torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.equal(cgan.model.sample(G, z, labels), cgan.model.sample(G, z, labels))
    assert G.training  # the mode it was in is restored
    with_dropout = cgan.model.sample(G, z, labels, dropout=True)  # --sampling-dropout
    assert not torch.equal(with_dropout, cgan.model.sample(G, z, labels, dropout=True))
    y = cgan.model.one_hot(labels)
    assert not torch.equal(G(z, y), G(z, y))  # training mode: dropout draws new masks
    x = torch.rand(6, 1, 28, 28)
    assert not torch.equal(D(x, y), D(x, y))
    D.eval()
    assert torch.equal(D(x, y), D(x, y))


def test_labels_reach_G_and_D():
    G, D = models()
    G.eval(), D.eval()
    z = cgan.model.sample_z(4)
    assert not torch.allclose(G(z, labels_of(0, 1, 2, 3)), G(z, labels_of(7, 7, 7, 7)), atol=1e-6)
    x = torch.rand(4, 1, 28, 28)
    assert not torch.allclose(D(x, labels_of(0, 1, 2, 3)), D(x, labels_of(7, 7, 7, 7)), atol=1e-7)


def test_the_grid_has_one_row_per_digit_with_the_same_z_per_column():
    z, labels = cgan.model.grid_inputs(10)
    assert labels.tolist() == [digit for digit in range(10) for _ in range(10)]
    rows = z.view(10, 10, -1)
    assert all(torch.equal(rows[i], rows[0]) for i in range(10))
    assert len({tuple(v.tolist()) for v in rows[0]}) == 10  # the columns differ


def test_z_is_uniform_in_the_unit_hypercube():
    z = cgan.model.sample_z(20000)
    assert z.shape == (20000, 100) and z.min() >= 0 and z.max() <= 1
    assert abs(z.mean().item() - 0.5) < 0.01 and abs(z.var().item() - 1 / 12) < 0.005


def test_init_is_small_uniform_and_G_starts_at_the_pixel_marginals():
    G, D = models()
    for net, irange in ((G, 0.05), (D, 0.005)):
        for m in net.modules():
            if isinstance(m, nn.Linear):
                assert m.weight.abs().max() <= irange and m.weight.abs().max() > 0.9 * irange
                assert torch.all(m.bias == 0)
    mean = torch.rand(1, 28, 28)
    mean[0, 0, :5] = 0
    cgan.model.init_output_bias(G, mean)
    assert torch.allclose(torch.sigmoid(G.out.bias[5:]), mean.flatten()[5:], atol=1e-5)
    assert torch.all(torch.sigmoid(G.out.bias[:5]) < 1e-6)  # clipped, not -inf


def test_learning_rate_and_momentum_schedules():
    args = cgan.train.build_parser().parse_args([])
    lr = cgan.train.learning_rate
    assert lr(0, args) == 0.1
    assert math.isclose(lr(1, args), 0.1 / 1.00004)
    assert math.isclose(lr(50_000, args), 0.1 * math.exp(-50_000 * math.log(1.00004)))
    assert lr(287_000, args) > 1e-6 and lr(288_000, args) == 1e-6 and lr(10 ** 7, args) == 1e-6
    # the GAN's MomentumAdjustor (saturate 250, counted from epoch 1): 0.7 from the 250th epoch, epoch 249 from 0
    mu = cgan.train.momentum
    assert mu(0, args) == 0.5 and math.isclose(mu(124.5, args), 0.6) and math.isclose(mu(249, args), 0.7)
    assert mu(248, args) < 0.7 and mu(1000, args) == 0.7


def test_parzen_estimator_matches_the_gaussian_density():
    torch.manual_seed(0)
    x, samples, sigmas = torch.randn(7, 5), torch.randn(3, 5), [0.3, 1.0]
    got = cgan.train.parzen_log_likelihoods(x, samples, sigmas, chunk=2)
    for row, sigma in enumerate(sigmas):
        normal = torch.distributions.Normal(samples.double(), sigma)
        densities = normal.log_prob(x.double()[:, None, :]).sum(2).exp().mean(1)  # mean of 3 Gaussians
        assert torch.allclose(got[row], densities.log(), atol=1e-4)
    # a point on the only sample: -d log(sigma sqrt(2 pi))
    at_centre = cgan.train.parzen_log_likelihoods(samples[:1], samples[:1], [0.5])
    assert math.isclose(at_centre.item(), -5 * math.log(0.5 * math.sqrt(2 * math.pi)), rel_tol=1e-6)


def test_one_window_on_all_samples_is_the_default_and_per_class_windows_a_flag():
    samples = torch.cat([torch.zeros(4, 3), torch.full((4, 3), 10.0)])
    sample_labels = torch.tensor([0] * 4 + [1] * 4)
    x, labels = torch.tensor([[0.0, 0, 0], [10.0, 10, 10], [0.0, 0, 0]]), torch.tensor([0, 1, 1])
    on_sample = -3 * math.log(math.sqrt(2 * math.pi))
    # §4.1's reading, log p(x): every point under the window of all 8 samples, half of which sit on it
    pooled = cgan.train.log_likelihoods(x, labels, samples, sample_labels, [1.0], per_class=False)[0]
    assert torch.allclose(pooled, torch.full((3,), on_sample - math.log(2), dtype=torch.float64), atol=1e-5)
    # --parzen-per-class, log p(x|y): the third point sits on the class-0 samples but is judged by class 1's only
    per_class = cgan.train.log_likelihoods(x, labels, samples, sample_labels, [1.0], per_class=True)[0]
    assert math.isclose(per_class[0].item(), on_sample, rel_tol=1e-6)
    assert math.isclose(per_class[1].item(), on_sample, rel_tol=1e-6)
    assert math.isclose(per_class[2].item(), on_sample - 300 / 2, rel_tol=1e-6)
    args = cgan.train.build_parser().parse_args([])
    assert args.parzen_per_class is False and args.sampling_dropout is True and args.select_every == 5


def test_D_step_leaves_G_unchanged_and_G_step_leaves_D_unchanged():
    G, D = models()
    opt_G = torch.optim.SGD(G.parameters(), 0.1, momentum=0.5)
    opt_D = torch.optim.SGD(D.parameters(), 0.1, momentum=0.5)
    x, y = torch.rand(8, 1, 28, 28), labels_of(*range(8))

    def params(net):
        return [p.detach().clone() for p in net.parameters()]

    G_before, D_before = params(G), params(D)
    cgan.train.discriminator_step(G, D, opt_D, x, y, cgan.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert not all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before = params(D)
    cgan.train.generator_step(G, D, opt_G, cgan.model.sample_z(8), y)
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # D is trainable again afterwards


def test_split_and_batches_keep_labels_with_their_images(mnist_root):
    images, labels = cgan.dataset.load_labelled("mnist", mnist_root, 28)
    n_valid = 10_000 if len(images) == 60_000 else 100  # the paper's split on MNIST, a small one on tiny data
    (train_x, train_y), (valid_x, valid_y) = cgan.dataset.split_validation(images, labels, n_valid)
    assert len(valid_x) == n_valid and len(train_x) == len(images) - n_valid
    assert torch.equal(valid_x, images[-n_valid:]) and torch.equal(train_y, labels[:-n_valid])
    batches = cgan.dataset.Batches(train_x, train_y, 50, "cpu", seed=0)
    x, y = next(batches)
    assert x.shape == (50, 1, 28, 28) and x.min() >= 0 and x.max() <= 1
    assert y.shape == (50, 10) and torch.all(y.sum(1) == 1)
    # each image comes with its own label
    lookup = {image.tobytes(): label for image, label in zip(train_x.flatten(1).numpy(), train_y.tolist())}
    for image, onehot in zip((x * 255).round().to(torch.uint8).flatten(1).numpy(), y):
        assert lookup[image.tobytes()] == onehot.argmax().item()


def test_smoke_run_resume_and_evaluate(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = run_train("CGAN", "--data-root", mnist_root, "--max-steps", 30, "--sample-every", 10, "--out", run, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run)
    assert {"loss/D", "loss/G", "D/real", "D/fake", "lr", "momentum"} <= set(tags)
    assert [s for s, _ in tags["loss/G"]] == [30]
    assert math.isclose(tags["lr"][0][1], 0.1 / 1.00004 ** 29, rel_tol=1e-6)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_00000{i}0.png" for i in (1, 2, 3)]
    assert Image.open(run / "samples" / "step_0000030.png").size == (10 * 30 + 2, 10 * 30 + 2)  # 10 x 10 grid
    assert Image.open(run / "progress.gif").n_frames == 3
    args = json.loads((run / "args.json").read_text())
    assert args["batch_size"] == 100 and args["lr"] == 0.1 and args["lr_decay"] == 1.00004
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 30 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)
    # step 30's momentum follows the epoch of its batch (epoch 0 on MNIST, later on the tiny stand-in)
    epoch = checkpoint["batches"]["epoch"]
    assert math.isclose(tags["momentum"][0][1], 0.5 + 0.2 * min(epoch / 249, 1), rel_tol=1e-6)

    result = run_train("CGAN", "--resume", run, "--max-steps", 40, "--evaluate-at-end")
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 40
    assert torch.equal(load_checkpoint(run)["fixed_z"], checkpoint["fixed_z"])
    assert len(list((run / "samples").iterdir())) == 4
    assert max(s for s, _ in scalar_tags(run)["loss/G"]) == 40
    at_end = PARZEN_LINE.search(result.stdout)
    assert at_end and "parzen/log_likelihood" in scalar_tags(run)

    result = subprocess.run([sys.executable, "train.py", "--evaluate", str(run), "--data-root", str(mnist_root)],
                            cwd=ROOT / "CGAN", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = PARZEN_LINE.search(result.stdout)
    assert line and line.groups() == at_end.groups()  # the same samples, the same number
    assert float(line[3]) in [float(f"{s:.4g}") for s in cgan.train.SIGMAS]
    assert float(line[2]) > 0


def test_resumed_run_matches_uninterrupted_run(mnist_root, tmp_path):
    common = ["--data-root", mnist_root, "--batch-size", 20, *QUICK]
    assert run_train("CGAN", *common, "--max-steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert run_train("CGAN", *common, "--max-steps", 2, "--out", tmp_path / "split").returncode == 0
    assert run_train("CGAN", "--resume", tmp_path / "split", "--max-steps", 4).returncode == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for part in ("G", "D"):
        for name, value in straight[part].items():
            assert torch.equal(value, split[part][name]), (part, name)
    for part in ("opt_G", "opt_D"):
        for index, state in straight[part]["state"].items():
            assert torch.equal(state["momentum_buffer"], split[part]["state"][index]["momentum_buffer"])


def test_sampling_command_draws_a_digit_or_the_per_digit_grid(mnist_root, tmp_path):
    run = tmp_path / "run"
    assert run_train("CGAN", "--data-root", mnist_root, "--max-steps", 1, "--out", run, *QUICK).returncode == 0
    sample = [sys.executable, "model.py", str(run), "--device", "cpu"]
    subprocess.run([*sample, "--digit", "7", "--num", "64", "--out", str(tmp_path / "sevens.png")],
                   cwd=ROOT / "CGAN", check=True)
    assert Image.open(tmp_path / "sevens.png").size == (8 * 30 + 2, 8 * 30 + 2)
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "CGAN", check=True)
    assert Image.open(tmp_path / "grid.png").size == (10 * 30 + 2, 10 * 30 + 2)
    subprocess.run([*sample, "--digit", "3", "--num", "5", "--single", "--out", str(tmp_path / "threes")],
                   cwd=ROOT / "CGAN", check=True)
    assert sorted(p.name for p in (tmp_path / "threes").iterdir()) == [f"0000{i}_digit3.png" for i in range(5)]


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path):
    run = tmp_path / "run"
    # SGD moves every weight by lr times its gradient: at lr 1e6 the losses overflow after a few finite steps
    result = run_train("CGAN", "--data-root", mnist_root, "--lr", 1e6, "--lr-decay", 1, "--max-steps", 50,
                       "--log-every", 1, "--checkpoint-every", 1, "--out", run, *QUICK)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NaN or Inf at step" in result.stderr and "Traceback" not in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    assert bad_step > 1
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in checkpoint["G"].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "-1"], ["--lr"]),
    (["--lr-decay", "0.5"], ["--lr-decay"]),
    (["--dataset", "cifar10"], ["cifar10"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint"]),
    (["--evaluate", "/nonexistent/run"], ["no checkpoint"]),
])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("CGAN", *flags, "--device", "cpu"), *words)


def test_missing_data_and_bad_split_exit_2(mnist_root, tmp_path):
    result = run_train("CGAN", "--data-root", tmp_path / "empty", "--out", tmp_path / "run", *QUICK)
    assert_clean_error(result, "mnist", "train-images-idx3-ubyte", "--data-root")
    result = run_train("CGAN", "--data-root", mnist_root, "--out", tmp_path / "run2", *QUICK, "--valid-size", 60000)
    assert_clean_error(result, "--valid-size")


def test_resume_and_evaluate_refuse_to_change_the_configuration(mnist_root, tmp_path):
    run = tmp_path / "run"
    assert run_train("CGAN", "--data-root", mnist_root, "--max-steps", 1, "--out", run, *QUICK).returncode == 0
    assert_clean_error(run_train("CGAN", "--resume", run, "--lr", "0.5"), "lr")
    assert_clean_error(run_train("CGAN", "--evaluate", run, "--dropout", "0.2"), "dropout")
    args, checkpoint = cgan.train.parse_args(["--evaluate", str(run), "--sampling-dropout", "--device", "cpu"])
    assert args.sampling_dropout and args.batch_size == 100 and checkpoint["step"] == 1
