"""simpleGAN/: §5's networks and their initialisation, Algorithm 1's losses by value and gradient
(--d-loss-scale, the official simultaneous step), the schedules, the data split, a run, and
--evaluate's metrics.json (the Parzen estimator itself: test_table1.py)."""

import json
import math
import re
import shutil

import pytest
import torch
from torch import nn

from conftest import (
    QUICK,
    FixedG,
    PixelSumD,
    bce,
    exits_2,
    load_checkpoint,
    load_folder,
    pixel_images,
    quick_run,
    run_main,
    scalar_tags,
)

gan = load_folder("simpleGAN")
PARZEN_LINE = re.compile(
    r"^Parzen log-likelihood: (-?\d+\.\d+) ± (\d+\.\d+) \(sigma=(\d+\.\d+)\)$", re.M
)


def sigmoids(values):
    return torch.sigmoid(torch.tensor(values))


REAL, FAKE = (0.0, 2.0, -1.0), (1.0, -3.0, 0.5)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_D_loss_by_value_and_gradient(scale):
    G, D = FixedG(pixel_images(*FAKE)), PixelSumD()
    opt_D, x, z = torch.optim.SGD(D.parameters(), 0.0), pixel_images(*REAL), gan.model.sample_z(3)
    loss, D_x, D_G_z = gan.train.discriminator_step(G, D, opt_D, x, z, scale)
    # minus D's objective log D(x) + log(1 - D(G(z))), each term a minibatch mean, times the scale
    expected = scale * (bce(REAL, 1) + bce(FAKE, 0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    real_logits, fake_logits = D.outputs
    # d loss / d logit = scale * (sigmoid(l) - target) / m
    assert torch.allclose(real_logits.grad, scale * (sigmoids(REAL) - 1) / 3)
    assert torch.allclose(fake_logits.grad, scale * sigmoids(FAKE) / 3)
    both = real_logits.grad.sum().item() + fake_logits.grad.sum().item()
    assert D.offset.grad.item() == pytest.approx(both)
    assert G.images.grad is None  # the fakes were detached: G is held fixed
    # the logged D/real and D/fake: mean D(x) and mean D(G(z))
    means = sigmoids(REAL).mean().item(), sigmoids(FAKE).mean().item()
    assert (D_x.item(), D_G_z.item()) == pytest.approx(means)


def test_G_loss_is_the_non_saturating_one_by_value_and_gradient():
    # the last: D is sure it is fake, where log(1 - D(G(z))) would saturate
    fake = (1.0, -3.0, -12.0)
    G, D = FixedG(pixel_images(*fake)), PixelSumD()
    opt_G = torch.optim.SGD(G.parameters(), 0.0)
    loss = gan.train.generator_step(G, D, opt_G, gan.model.sample_z(3))
    # §3: G ascends log D(G(z)); the loss is -mean log D(G(z))
    assert loss.item() == pytest.approx(bce(fake, 1), rel=1e-6)
    (logits,) = D.outputs
    assert torch.allclose(logits.grad, (sigmoids(fake) - 1) / 3)
    # strong where the saturating loss is flat
    assert logits.grad[2].item() == pytest.approx(-1 / 3, rel=1e-4)
    assert torch.allclose(G.images.grad[:, 0, 0, 0], logits.grad)  # d logit / d pixel = 1
    # D held fixed, and trainable again afterwards
    assert D.offset.grad is None and D.offset.requires_grad


def test_simultaneous_step_takes_both_gradients_at_the_old_weights():
    G, D = FixedG(pixel_images(*FAKE)), PixelSumD()
    opt_G, opt_D = torch.optim.SGD(G.parameters(), 1.0), torch.optim.SGD(D.parameters(), 1.0)
    loss_D, _, _, loss_G = gan.train.simultaneous_step(
        G, D, opt_G, opt_D, pixel_images(*REAL), gan.model.sample_z(3), scale=0.5
    )
    assert len(D.outputs) == 2  # one forward pass: D(G(z)) serves both objectives
    assert loss_D.item() == pytest.approx(0.5 * (bce(REAL, 1) + bce(FAKE, 0)))
    assert loss_G.item() == pytest.approx(bce(FAKE, 1))
    # one SGD step (lr 1) of each player along its own objective's gradient, both at the old weights
    d_offset = 0.5 * ((sigmoids(REAL) - 1).sum() + sigmoids(FAKE).sum()) / 3
    assert D.offset.item() == pytest.approx(-d_offset.item(), rel=1e-5)
    assert torch.allclose(G.images[:, 0, 0, 0], torch.tensor(FAKE) - (sigmoids(FAKE) - 1) / 3)


def test_output_shapes_and_ranges():
    G, D = gan.model.Generator(), gan.model.Discriminator()
    images = G(gan.model.sample_z(5))
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1  # sigmoid output: pixels in [0, 1]
    assert D(images).shape == (5,) and D(images.flatten(1)).shape == (5,)


def test_official_widths_and_dropout_probabilities():
    G, D = gan.model.Generator(), gan.model.Discriminator()
    linears = [m for m in G.modules() if isinstance(m, nn.Linear)]
    sizes = [(m.in_features, m.out_features) for m in linears]
    assert sizes == [(100, 1200), (1200, 1200), (1200, 784)]
    layers = [type(m) for m in G.net]
    assert layers == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Sigmoid]
    assert not any(isinstance(m, nn.Dropout) for m in G.modules())  # dropout in D only (§5)
    maxouts = [m for m in D.modules() if isinstance(m, gan.model.Maxout)]
    shapes = [(m.linear.in_features, m.units, m.pieces) for m in maxouts]
    assert shapes == [(784, 240, 5), (240, 240, 5)]
    # keep-probability 0.8 on the pixels, 0.5 on both hidden layers
    assert [m.p for m in D.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.5, 0.5]
    assert isinstance(D.net[0], nn.Dropout) and D.net[-1].out_features == 1


def test_maxout_takes_the_max_of_five_consecutive_pieces():
    torch.manual_seed(0)
    layer = gan.model.Maxout(7, 3)
    x = torch.randn(4, 7)
    # (4, 15): unit j owns pieces 5j ... 5j + 4
    pieces = x @ layer.linear.weight.T + layer.linear.bias
    expected = torch.stack([pieces[:, 5 * j : 5 * j + 5].max(1).values for j in range(3)], 1)
    assert layer.pieces == 5 and layer.linear.out_features == 15
    assert torch.allclose(layer(x), expected)


def test_dropout_is_off_in_eval_mode_and_sampling_is_deterministic():
    torch.manual_seed(0)
    G, D = gan.model.Generator(width=32), gan.model.Discriminator(width=16)
    x = torch.rand(8, 1, 28, 28)
    D.eval()
    assert torch.equal(D(x), D(x))
    D.train()
    assert not torch.equal(D(x), D(x))  # dropout masks differ between training passes
    z = gan.model.sample_z(4)
    assert torch.equal(gan.model.sample(G, z), gan.model.sample(G, z)) and G.training


def test_init_ranges_and_G_output_bias_is_the_clipped_logit_of_the_pixel_means(mnist_root):
    torch.manual_seed(0)
    images = gan.dataset.load_images("mnist", mnist_root, "train")
    means = gan.dataset.pixel_means(images)
    assert torch.allclose(means, images.double().mean(0).float() / 255)
    G, D = gan.model.Generator(), gan.model.Discriminator()
    gan.model.init_generator(G, means)
    gan.model.init_discriminator(D)
    bias = G.net[-2].bias
    assert torch.allclose(bias, torch.logit(means.flatten().double().clamp(1e-7, 1 - 1e-7)).float())
    for net, bound in ((G, 0.05), (D, 0.005)):
        for m in net.modules():
            if isinstance(m, nn.Linear):
                assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.95 * bound
        biases = [m.bias for m in net.modules() if isinstance(m, nn.Linear)]
        hidden_biases = biases[:-1] if net is G else biases
        assert all(torch.all(b == 0) for b in hidden_biases)
    # pixels that are always black or always white get a finite bias, pylearn2's clip at 1e-7
    gan.model.init_generator(G, torch.tensor([0.0, 1.0, 0.5] + [0.25] * 781).view(1, 28, 28))
    clipped = torch.tensor([math.log(1e-7), -math.log(1e-7), 0.0])
    assert torch.allclose(G.net[-2].bias[:3], clipped, atol=1e-3)


def test_learning_rate_and_momentum_schedules():
    lr = gan.train.learning_rate
    assert lr(0) == 0.1 and lr(1000) == pytest.approx(0.1 / 1.000004**1000, rel=1e-12)
    floor = math.ceil(math.log(0.1 / 1e-6) / math.log(1.000004))  # the first minibatch at the floor
    assert lr(floor - 1) > 1e-6 and lr(floor) == 1e-6 and lr(10 * floor) == 1e-6
    assert lr(5, lr=0.2, decay=2.0, lr_min=0.0) == 0.2 / 32
    m = gan.train.momentum_at
    assert m(0) == 0.5 and m(125) == pytest.approx(0.6, abs=0.001)
    assert [m(249), m(250), m(10000)] == pytest.approx([0.7] * 3)
    values = [m(e) for e in range(260)]
    # rising every epoch until it saturates
    assert all(a < b for a, b in zip(values[:249], values[1:250]))
    assert m(3, initial=0.1, final=0.4, saturate=4) == pytest.approx(0.4)


def test_validation_split_is_the_last_sixth_and_batches_are_pixels_over_255(mnist_root):
    full = gan.support.read_split("mnist", mnist_root)[0]
    train, valid = (gan.dataset.load_images("mnist", mnist_root, s) for s in ("train", "valid"))
    assert len(valid) * 6 == len(full) and torch.equal(torch.cat([train, valid]), full)
    assert train.shape[1:] == (1, 28, 28)  # as stored: nothing is resized
    if len(full) == 60000:
        test = gan.dataset.load_images("mnist", mnist_root, "test")
        assert len(train) == 50000 and len(test) == 10000
    images = torch.arange(0, 250, 10, dtype=torch.uint8).view(25, 1, 1, 1)
    batch = next(gan.dataset.batches(images, 25, "cpu", seed=0))
    assert sorted(batch.flatten().tolist()) == pytest.approx([v / 255 for v in range(0, 250, 10)])


def test_a_run_follows_the_schedules_draws_k_minibatches_and_evaluates_the_test_set(
    mnist_root, tmp_path, capsys
):
    run = tmp_path / "run"
    parzen = ["--parzen-samples", 300, "--parzen-valid", 200]
    flags = [*QUICK["simpleGAN"], "--data-root", mnist_root, "--k", 2, "--max-steps", 3]
    flags += ["--log-every", 1, "--evaluate-at-end", *parzen, "--out", run]
    assert run_main(gan.train, *flags) == 0
    at_end = PARZEN_LINE.search(capsys.readouterr().out)
    tags, checkpoint = scalar_tags(run), load_checkpoint(run)
    # the value logged at step s is the one its update used: lr_(s-1); epoch 0's momentum
    lrs = [gan.train.learning_rate(s) for s in (0, 1, 2)]
    assert [v for _, v in tags["lr"]] == pytest.approx(lrs, rel=1e-6)
    assert [v for _, v in tags["momentum"]] == pytest.approx([0.5] * 3)
    # Alg. 1: each of the k = 2 D steps draws its own real minibatch
    assert checkpoint["batches"] == {"epoch": 0, "index": 6}
    assert [s for s, _ in tags["parzen/log_likelihood"]] == [3] and at_end
    assert not (run / "metrics.json").exists()  # only --evaluate writes it
    # --evaluate prints the same line: the same G, the same seeded samples
    assert run_main(gan.train, "--evaluate", run, "--data-root", mnist_root, *parzen) == 0
    line = PARZEN_LINE.search(capsys.readouterr().out)
    assert line and line.groups() == at_end.groups()
    assert any(abs(float(line[3]) - s) < 1e-4 for s in gan.train.SIGMAS) and float(line[2]) > 0
    assert load_checkpoint(run)["step"] == 3  # evaluation trains nothing
    # ... and writes it into the run folder's metrics.json, under the checkpoint's name
    last = json.loads((run / "metrics.json").read_text())["last"]
    mean, stderr, sigma = last["parzen_log_likelihood"], last["stderr"], last["sigma"]
    assert f"{mean:.2f} ± {stderr:.2f} (sigma={sigma:.4f})" in line[0]
    assert last["checkpoint"] == str((run / "checkpoints" / "last.pt").resolve())
    how = last["folder"], last["step"], last["dataset"], last["seed"], last["image_size"]
    assert how == ("simpleGAN", 3, "mnist", 0, 28)
    assert (last["parzen_samples"], last["parzen_valid"]) == (300, 200)


def test_evaluate_keeps_one_record_per_checkpoint_in_metrics_json(
    tiny_mnist_root, tmp_path, capsys
):
    run = quick_run("simpleGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 2)
    parzen = ["--parzen-samples", 50, "--parzen-valid", 20]
    shutil.copy(run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt")
    # a run folder means its best.pt when it has one: the record "best"
    assert run_main(gan.train, "--evaluate", run, *parzen) == 0
    assert list(json.loads((run / "metrics.json").read_text())) == ["best"]
    # a checkpoint file is recorded under its own name, beside the records already there
    last = run / "checkpoints" / "last.pt"
    assert run_main(gan.train, "--evaluate", last, *parzen, "--seed", 1) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == ["best", "last"]
    assert (metrics["best"]["seed"], metrics["last"]["seed"]) == (0, 1)
    assert metrics["best"]["checkpoint"] == str((run / "checkpoints" / "best.pt").resolve())
    assert metrics["last"]["checkpoint"] == str(last.resolve())
    # the seed draws G's samples: another window, another number
    assert metrics["best"]["parzen_log_likelihood"] != metrics["last"]["parzen_log_likelihood"]
    assert f"wrote {run / 'metrics.json'}" in capsys.readouterr().out


def test_the_papers_flags_are_checked(capsys):
    for flags, words in [
        (["--k", 0], "--k"),
        (["--lr-decay", 0.5], "--lr-decay"),
        (["--lr-min", 1], "--lr-min"),
        (["--simultaneous", "--k", 2], "--k 2"),
        (["--select-every", -1], "--select-every"),
        (["--d-loss-scale", 0], "--d-loss-scale"),
        (["--final-momentum", 1], "--final-momentum"),
    ]:
        assert words in exits_2(capsys, gan.train, "--device", "cpu", *flags), flags
