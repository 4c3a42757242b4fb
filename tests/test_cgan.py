"""CGAN/: §4.1's networks, their initialisation and the conditioning on y, the conditioned losses
by value and gradient, the schedules, the labelled 28x28 batches, --interpolate's held dropout
masks, and a run with --evaluate's metrics.json (Table 1's Parzen estimator: test_table1.py)."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
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
    run_main,
    scalar_tags,
)

cgan = load_folder("CGAN")
PARZEN_LINE = re.compile(
    r"^Parzen log-likelihood: (-?\d+\.\d+) ± (\d+\.\d+) \(sigma=([\d.]+)\)$", re.M
)


def models():
    torch.manual_seed(0)
    G, D = cgan.model.Generator(), cgan.model.Discriminator()
    cgan.model.init_weights(G, cgan.model.G_IRANGE)
    cgan.model.init_weights(D, cgan.model.D_IRANGE)
    return G, D


def labels_of(*digits):
    return cgan.model.one_hot(torch.tensor(digits))


def test_conditioned_losses_by_value_and_gradient():
    digits, x = (0, 1, 2), pixel_images(0.5, -20.0, -18.0)
    y = labels_of(*digits)
    real = [0.5, -10.0, 2.0]  # sum + 10 k: the real images judged under their own labels
    fake = [-k / 10 + 10 * k for k in digits]  # G drew class k, and D judges it under k
    # G(z|y) = the image of y's class: image k is all zeros but its first pixel, -k / 10;
    # D(x|y) adds 10 times y's digit
    G, D = FixedG(pixel_images(*(-k / 10 for k in range(10)))), PixelSumD()
    opt_D, z = torch.optim.SGD(D.parameters(), 0.0), cgan.model.sample_z(3)
    loss, _, _ = cgan.train.discriminator_step(G, D, opt_D, x, y, z)
    # Eq. 2: D ascends log D(x|y) + log(1 - D(G(z|y)|y)); the loss is its negative, each term a
    # minibatch mean
    assert loss.item() == pytest.approx(bce(real, 1) + bce(fake, 0), rel=1e-6)
    real_logits, fake_logits = D.outputs
    assert torch.allclose(real_logits, torch.tensor(real))
    assert torch.allclose(fake_logits, torch.tensor(fake))
    # d loss / d logit = (sigmoid(l) - target) / m
    assert torch.allclose(real_logits.grad, (torch.sigmoid(real_logits) - 1).detach() / 3)
    assert torch.allclose(fake_logits.grad, torch.sigmoid(fake_logits).detach() / 3)
    assert G.images.grad is None  # the fakes were detached: G is held fixed

    D_grad = D.offset.grad.clone()
    opt_G = torch.optim.SGD(G.parameters(), 0.0)
    loss = cgan.train.generator_step(G, D, opt_G, cgan.model.sample_z(3), y)
    # GAN §3, non-saturating and conditioned: G ascends log D(G(z|y)|y)
    assert loss.item() == pytest.approx(bce(fake, 1), rel=1e-6)
    logits = D.outputs[-1]
    assert torch.allclose(logits.grad, (torch.sigmoid(logits) - 1).detach() / 3)
    # each class's image gets the gradient of the fake drawn for it; the others get none
    assert torch.allclose(G.images.grad[:3, 0, 0, 0], logits.grad)
    assert torch.all(G.images.grad[3:] == 0)
    # D held fixed, trainable afterwards
    assert torch.equal(D.offset.grad, D_grad) and D.offset.requires_grad


def test_output_shapes_and_ranges():
    G, D = models()
    images = G(cgan.model.sample_z(5), labels_of(0, 1, 2, 3, 9))
    assert images.shape == (5, 1, 28, 28)
    assert images.min() >= 0 and images.max() <= 1  # sigmoid output, the data's [0, 1]
    assert D(images, labels_of(0, 1, 2, 3, 9)).shape == (5,)


def test_section_4_1_layer_sizes():
    G, D = models()
    linears = [m for m in G.modules() if isinstance(m, nn.Linear)]
    sizes = [(m.in_features, m.out_features) for m in linears]
    assert sizes == [(100, 200), (10, 1000), (1200, 1200), (1200, 784)]
    maxouts = [m for m in D.modules() if isinstance(m, cgan.model.Maxout)]
    shapes = [(m.linear.in_features, m.units, m.pieces) for m in maxouts]
    assert shapes == [(784, 240, 5), (10, 50, 5), (290, 240, 4)]
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
    # unit j owns pieces j*p ... j*p + p-1
    pieces_out = (x @ maxout.linear.weight.T + maxout.linear.bias).detach()
    expected = pieces_out.view(3, maxout.units, pieces).max(2).values
    assert torch.allclose(maxout(x), expected, atol=1e-5)


def test_dropout_is_off_in_eval_mode_so_sampling_is_deterministic():
    G, D = models()
    z, labels = cgan.model.sample_z(6), torch.tensor([0, 1, 2, 3, 4, 5])
    assert torch.equal(cgan.model.sample(G, z, labels), cgan.model.sample(G, z, labels))
    assert G.training  # the mode it was in is restored
    with_dropout = cgan.model.sample(G, z, labels, dropout=True)  # --sampling-dropout
    assert not torch.equal(with_dropout, cgan.model.sample(G, z, labels, dropout=True))
    y = cgan.model.one_hot(labels)
    x = torch.rand(6, 1, 28, 28)
    assert not torch.equal(D(x, y), D(x, y))  # training mode: dropout draws new masks
    D.eval()
    assert torch.equal(D(x, y), D(x, y))


def test_y_is_one_hot_and_reaches_G_and_D():
    assert torch.equal(labels_of(3, 0), torch.eye(10)[[3, 0]])
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
    assert lr(287_000, args) > 1e-6 and lr(288_000, args) == 1e-6 and lr(10**7, args) == 1e-6
    # the GAN's MomentumAdjustor (saturate 250, counted from epoch 1): 0.7 from the 250th epoch,
    # epoch 249 counted from 0
    mu = cgan.train.momentum
    assert mu(0, args) == 0.5 and math.isclose(mu(124.5, args), 0.6)
    assert math.isclose(mu(249, args), 0.7)
    assert mu(248, args) < 0.7 and mu(1000, args) == 0.7


def test_split_and_batches_keep_labels_with_their_images(mnist_root):
    images, labels = cgan.support.read_split("mnist", mnist_root)
    # the paper's split; a small one on tiny data
    n_valid = 10_000 if len(images) == 60_000 else 100
    load = cgan.dataset.load_labelled
    train_x, train_y = load("mnist", mnist_root, "train", n_valid)
    valid_x, valid_y = load("mnist", mnist_root, "valid", n_valid)
    assert len(valid_x) == n_valid and len(train_x) == len(images) - n_valid
    assert torch.equal(valid_x, images[-n_valid:]) and torch.equal(train_y, labels[:-n_valid])
    assert torch.equal(valid_y, labels[-n_valid:]) and torch.equal(train_x, images[:-n_valid])
    assert train_x.shape[1:] == (1, 28, 28)  # §4.1's 784-dimensional samples: nothing is resized
    x, y = next(cgan.dataset.batches(train_x, train_y, 50, "cpu", seed=0))
    assert x.shape == (50, 1, 28, 28) and x.min() >= 0 and x.max() <= 1 and y.shape == (50,)
    # each image comes with its own label, and its pixels are divided by 255
    pairs = zip(train_x.flatten(1).numpy(), train_y.tolist())
    lookup = {image.tobytes(): label for image, label in pairs}
    for image, label in zip((x * 255).round().to(torch.uint8).flatten(1).numpy(), y.tolist()):
        assert lookup[image.tobytes()] == label


def test_only_28x28_is_trained(tmp_path, capsys):
    """§4.1: the networks are for 784-dimensional MNIST; no other size is accepted."""
    for size in (32, 64):
        line = exits_2(capsys, cgan.train, "--image-size", size, "--out", tmp_path / "run")
        assert "--image-size" in line and "28" in line
    args = cgan.train.build_parser().parse_args(["--image-size", "28"])
    assert args.image_size == cgan.model.IMAGE_SIZE == 28
    assert not (tmp_path / "run").exists()


def scaled_up(G, factor=20):
    """G's weights times `factor`: after a few steps (or at init) G's images barely depend on its
    dropout masks; now they do."""
    with torch.no_grad():
        for weights in G.parameters():
            weights.mul_(factor if weights.dim() > 1 else 1)
    return G


def test_a_walk_holds_one_dropout_mask_per_row():
    G = scaled_up(models()[0])
    masks = cgan.model.dropout_masks(G, 2)
    # inverted dropout, p = 0.5: each unit kept (times 2) or dropped, the three hidden layers
    assert [m.shape for m in masks] == [(2, 200), (2, 1000), (2, 1200)]
    assert all(set(m.unique().tolist()) == {0.0, 2.0} for m in masks)
    assert not all(torch.equal(m[0], m[1]) for m in masks)  # rows may differ
    draw = cgan.model.walk_draw(G, masks)
    z0, z1 = cgan.model.sample_z(2)
    # two rows (digits 0 and 1), each with the same z at adjacent steps
    z, rows = torch.stack([z0, z0, z1, z1, z1]), torch.tensor([0, 0, 1, 1, 1])
    images = draw(z, rows)
    # equal up to rounding (a threaded matrix product may round rows at other batch positions apart,
    # and the scaled weights amplify it)
    assert torch.allclose(images[0], images[1], atol=1e-3)
    assert torch.allclose(images[2], images[4], atol=1e-3)
    # ... where fresh masks, drawn per image, would make them differ
    fresh = cgan.model.sample(G, z, rows % 10, dropout=True)
    assert (fresh[0] - fresh[1]).abs().max() > 0.1 and (fresh[2] - fresh[3]).abs().max() > 0.1
    # each image is G's sample of its z under its row's masks
    for i, row in enumerate(rows.tolist()):
        held = [m[row : row + 1] for m in masks]
        alone = cgan.model.sample(G, z[i : i + 1], rows[i : i + 1] % 10, True, held)
        assert torch.allclose(images[i : i + 1], alone, atol=1e-4)  # rounding aside
    # all-ones masks are no dropout at all: eval mode
    ones = [torch.ones(5, m.shape[1]) for m in masks]
    assert torch.allclose(G(z, cgan.model.one_hot(rows), ones), cgan.model.sample(G, z, rows))
    # --no-sampling-dropout walks in eval mode
    assert torch.equal(cgan.model.walk_draw(G, None)(z, rows), cgan.model.sample(G, z, rows))


def test_the_interpolation_rows_change_only_with_z(run, tmp_path, monkeypatch):
    """model.py --interpolate: with every z the same, each row is one image repeated; the rows are
    digits 0, 1, 2 under their own masks."""
    checkpoint = load_checkpoint(run)
    G = cgan.model.Generator()
    G.load_state_dict(checkpoint["G"])
    checkpoint["G"] = scaled_up(G).state_dict()
    (tmp_path / "loud" / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, tmp_path / "loud" / "checkpoints" / "last.pt")
    # every z the same
    monkeypatch.setattr(cgan.model, "sample_z", lambda n, dim, device: torch.full((n, dim), 0.5))
    out = tmp_path / "walk.png"
    flags = ["--interpolate", "--rows", 3, "--steps", 4, "--device", "cpu", "--out", out]
    assert run_main(cgan.model, tmp_path / "loud", *flags) == 0
    pixels = torch.tensor(np.array(Image.open(out).convert("L")))
    # the grid: 3 rows of 4 tiles of 28 px, each after 2 px of padding
    tiles = pixels[2:, 2:].reshape(3, 30, 4, 30)[:, :28, :, :28].transpose(1, 2)
    assert all(torch.equal(tile, row[0]) for row in tiles for tile in row)
    assert not torch.equal(tiles[0][0], tiles[1][0]) and not torch.equal(tiles[1][0], tiles[2][0])
    # G's dropout does change this G's images: fresh masks per image would break the rows
    z, digits = torch.full((4, 100), 0.5), torch.zeros(4, dtype=torch.long)
    fresh = (cgan.model.sample(G, z, digits, dropout=True) * 255).round()
    assert len({tuple(image.flatten().tolist()) for image in fresh}) > 1


@pytest.fixture(scope="module")
def run(tiny_mnist_root, tmp_path_factory):
    """12 steps of 5 per epoch (100 training, 500 validation images), selected every epoch, the
    test at the end."""
    run = tmp_path_factory.mktemp("cgan") / "run"
    flags = [*QUICK["CGAN"], "--data-root", tiny_mnist_root, "--valid-size", 500]
    flags += ["--parzen-valid", 100, "--max-steps", 12, "--log-every", 1, "--select-every", 1]
    assert run_main(cgan.train, *flags, "--evaluate-at-end", "--out", run) == 0
    return run


def test_a_run_follows_the_schedules_and_keeps_the_validation_best(run):
    tags, checkpoint = scalar_tags(run), load_checkpoint(run)
    lrs = [0.1 / 1.00004**s for s in range(12)]
    assert [v for _, v in tags["lr"]] == pytest.approx(lrs, rel=1e-6)
    # momentum follows the epoch of the step's batch: 5 steps per epoch
    momenta = [0.5 + 0.2 * (s // 5) / 249 for s in range(12)]
    assert [v for _, v in tags["momentum"]] == pytest.approx(momenta)
    # §4.1's stopping point: the validation estimate every epoch, the best weights as best.pt
    scores, best = dict(tags["metrics/parzen_valid"]), checkpoint["best"]
    assert sorted(scores) == [5, 10]
    assert scores[best["step"]] == pytest.approx(max(scores.values()), abs=1e-3)
    assert load_checkpoint(run, "best.pt")["step"] == best["step"]
    assert [s for s, _ in tags["parzen/log_likelihood"]] == [12]


def test_evaluate_prints_the_test_estimate_of_the_selected_checkpoint(run, tiny_mnist_root, capsys):
    assert run_main(cgan.train, "--evaluate", run, "--data-root", tiny_mnist_root) == 0
    out = capsys.readouterr().out
    line = PARZEN_LINE.search(out)
    tags = scalar_tags(run)
    # the end of training scored best.pt with the same seeded samples: the same number
    assert float(line[1]) == pytest.approx(tags["parzen/log_likelihood"][0][1], abs=0.006)
    assert float(line[3]) == pytest.approx(tags["parzen/sigma"][0][1], rel=1e-3)
    assert float(line[2]) > 0 and "best.pt: step" in out and "selected on validation" in out
    assert "G's dropout on, one window" in out
    # ... and writes it into the run folder's metrics.json as "best"
    best = json.loads((run / "metrics.json").read_text())["best"]
    assert f"{best['parzen_log_likelihood']:.2f} ± {best['stderr']:.2f}" in line[0]
    assert best["checkpoint"] == str((run / "checkpoints" / "best.pt").resolve())
    assert best["step"] == load_checkpoint(run, "best.pt")["step"] and best["image_size"] == 28
    protocol = best["samples_per_class"], best["sampling_dropout"], best["parzen_per_class"]
    assert protocol == (1000, True, False)
    # only the evaluation protocol's flags may be given next to --evaluate, not the networks'
    last = run / "checkpoints" / "last.pt"
    other = ["--no-sampling-dropout", "--parzen-per-class"]
    assert run_main(cgan.train, "--evaluate", last, "--data-root", tiny_mnist_root, *other) == 0
    assert "G's dropout off, one window per class" in capsys.readouterr().out
    line = exits_2(capsys, cgan.train, "--evaluate", run, "--dropout", 0.2)
    assert "--dropout cannot change" in line
    # a checkpoint file is recorded under its own name, beside the record already there
    metrics = json.loads((run / "metrics.json").read_text())
    assert sorted(metrics) == ["best", "last"] and metrics["best"] == best
    assert metrics["last"]["step"] == 12 and metrics["last"]["checkpoint"] == str(last.resolve())
    assert (metrics["last"]["sampling_dropout"], metrics["last"]["parzen_per_class"]) == (
        False,
        True,
    )


def test_sampling_command_draws_a_digit_or_the_per_digit_grid(run, tmp_path):
    sample = [run, "--device", "cpu"]
    sevens = ["--digit", 7, "--num", 64, "--out", tmp_path / "sevens.png"]
    assert run_main(cgan.model, *sample, *sevens) == 0
    assert Image.open(tmp_path / "sevens.png").size == (8 * 30 + 2, 8 * 30 + 2)
    assert run_main(cgan.model, *sample, "--out", tmp_path / "grid.png") == 0
    # one row per digit
    assert Image.open(tmp_path / "grid.png").size == (10 * 30 + 2, 10 * 30 + 2)
    threes = ["--digit", 3, "--num", 5, "--single", "--out", tmp_path / "threes"]
    assert run_main(cgan.model, *sample, *threes) == 0
    names = sorted(p.name for p in (tmp_path / "threes").iterdir())
    assert names == [f"0000{i}_digit3.png" for i in range(5)]


def test_the_papers_flags_are_checked(run, tiny_mnist_root, tmp_path, capsys):
    for flags, words in [
        (["--lr-decay", 0.5], "--lr-decay"),
        (["--min-lr", 1], "--min-lr"),
        (["--dropout", 1], "--dropout"),
        (["--select-every", -1], "--select-every"),
        (["--data-root", tiny_mnist_root, "--valid-size", 600], "--valid-size"),
    ]:
        line = exits_2(capsys, cgan.train, "--device", "cpu", "--out", tmp_path / "run", *flags)
        assert words in line, flags
    line = exits_2(capsys, cgan.model, run, "--digit", 10, "--out", tmp_path / "grid.png")
    assert "--digit" in line
