"""DCGAN/: Fig. 1's shapes, the §3 and §4 invariants, the losses of Alg. 1 by value and gradient,
the data's resize, Fig. 4's walk through 9 z (model.py --interpolate), and §5.1's D features in a
linear SVM (--evaluate-features)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from conftest import (
    FixedG,
    PixelSumD,
    bce,
    exits_2,
    load_checkpoint,
    load_folder,
    quick_run,
    run_main,
    sigmoid,
    small_networks,
)

dcgan = load_folder("DCGAN")


def test_fig1_generator_widths_at_64px():
    G = dcgan.model.Generator(64, 3)
    assert G.project[0].out_features == 4 * 4 * 1024
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (1024, 512, (5, 5), (2, 2)),
        (512, 256, (5, 5), (2, 2)),
        (256, 128, (5, 5), (2, 2)),
        (128, 3, (5, 5), (2, 2)),
    ]
    convs = [m for m in dcgan.model.Discriminator(64, 3).modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [128, 256, 512, 1024]


def test_no_batch_norm_on_G_output_or_D_input_and_no_bias_anywhere():
    G, D = dcgan.model.Generator(64, 3), dcgan.model.Discriminator(64, 3)
    assert isinstance(G.net[-2], nn.ConvTranspose2d) and isinstance(G.net[-1], nn.Tanh)
    assert isinstance(D.net[0], nn.Conv2d) and isinstance(D.net[1], nn.LeakyReLU)
    assert D.net[1].negative_slope == 0.2
    # every other stride-2 layer is followed by batch norm (§3)
    for net in (G.net, D.net):
        layers = list(net)
        convs = [i for i, m in enumerate(layers) if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
        normed = [
            i for i in convs if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d)
        ]
        assert len(normed) == len(convs) - 1
    assert isinstance(G.project[1], nn.BatchNorm1d)
    # official code (faces/train_uncond_dcgan.py): no layer has a bias, G's output layer and D's
    # input and output layers included, which have no batch norm either
    layers = [
        m
        for m in [*G.modules(), *D.modules()]
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))
    ]
    assert len(layers) == 10 and all(m.bias is None for m in layers)


def test_init_statistics():
    G, D = small_networks("DCGAN", 3, 64, dcgan.model.WIDTH)
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            assert abs(m.weight.std().item() - 0.02) < 0.002 and abs(m.weight.mean().item()) < 0.002
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.num_features >= 256:
            assert (
                abs(m.weight.mean().item() - 1) < 0.005
                and abs(m.weight.std().item() - 0.02) < 0.005
            )
            assert torch.all(m.bias == 0)


def test_D_step_leaves_G_unchanged_and_G_step_leaves_D_unchanged():
    G, D = small_networks("DCGAN")
    opt_G = torch.optim.Adam(G.parameters(), 2e-4, (0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), 2e-4, (0.5, 0.999))
    x = torch.rand(8, 1, 32, 32) * 2 - 1

    def params(net):
        return [p.detach().clone() for p in net.parameters()]

    G_before, D_before = params(G), params(D)
    dcgan.train.discriminator_step(G, D, opt_D, x, dcgan.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert not all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before = params(D)
    dcgan.train.generator_step(G, D, opt_G, dcgan.model.sample_z(8))
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # D is trainable again afterwards


def test_pixels_are_scaled_to_tanh_range():
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
    assert dcgan.dataset.to_tanh_range(images).flatten().tolist() == pytest.approx(
        [-1, 51 / 127.5 - 1, 1]
    )


# --- the losses at known logits -----------------------------------------------------------------

LOGITS = torch.tensor([-2.0, -0.5, 0.0, 1.5])


class KnownLogits(nn.Module):
    """D(x) = one learnable logit per sample: `real` for the real images (ones), `fake` for G's
    (zeros)."""

    def __init__(self, real, fake):
        super().__init__()
        self.real, self.fake = nn.Parameter(real.clone()), nn.Parameter(fake.clone())

    def forward(self, x):
        return torch.where(x.flatten(1)[:, 0] > 0, self.real, self.fake)


def test_D_loss_and_its_gradient_at_known_logits():
    """Alg. 1: D descends -log D(x) - log(1 - D(G(z))), each term a mean over the minibatch: with
    logits l, the value is mean log(1 + e^-l_real) + mean log(1 + e^l_fake), the gradient
    (sigmoid(l) - target) / m."""
    real, fake = LOGITS, LOGITS.flip(0)
    D, G = KnownLogits(real, fake), FixedG(torch.zeros(4, 1, 1, 1))
    loss, D_x, D_G_z = dcgan.train.discriminator_step(
        G, D, torch.optim.SGD(D.parameters(), lr=1.0), torch.ones(4, 1, 1, 1), torch.zeros(4, 1)
    )
    m = len(real)
    assert loss.item() == pytest.approx(bce(real.tolist(), 1) + bce(fake.tolist(), 0))
    assert D_x.item() == pytest.approx(sum(map(sigmoid, real.tolist())) / m)
    assert D_G_z.item() == pytest.approx(sum(map(sigmoid, fake.tolist())) / m)
    # one SGD step of size 1 moves each logit by minus its gradient
    assert (real - D.real.detach()).tolist() == pytest.approx(
        [(sigmoid(logit) - 1) / m for logit in real.tolist()], abs=1e-6
    )
    assert (fake - D.fake.detach()).tolist() == pytest.approx(
        [sigmoid(logit) / m for logit in fake.tolist()], abs=1e-6
    )


def test_G_loss_and_its_gradient_at_known_logits():
    """The non-saturating G loss, -log D(G(z)) as a mean: value mean log(1 + e^-l), gradient
    (sigmoid(l) - 1) / m (the saturating log(1 - D(G(z))) would have the gradient sigmoid(l) / m
    instead)."""
    G = FixedG(LOGITS.view(4, 1, 1, 1))  # one-pixel images, which PixelSumD returns as its logits
    loss = dcgan.train.generator_step(
        G, PixelSumD(), torch.optim.SGD(G.parameters(), lr=1.0), torch.zeros(4, 1)
    )
    assert loss.item() == pytest.approx(bce(LOGITS.tolist(), 1))
    assert (LOGITS - G.images.detach().flatten()).tolist() == pytest.approx(
        [(sigmoid(logit) - 1) / len(LOGITS) for logit in LOGITS.tolist()], abs=1e-6
    )


# --- §5.1: D as a feature extractor (train.py --evaluate-features, features.py) -----------------


@pytest.mark.parametrize("size, channels", [(32, 1), (64, 3)])
def test_feature_vector_has_the_size_the_layer_shapes_give(size, channels):
    """Every conv layer's C x H x W output max-pooled to C x 4 x 4: 16 features per channel,
    whatever H and W."""
    torch.manual_seed(0)
    D = dcgan.model.Discriminator(size, channels, width=8).apply(dcgan.model.init_weights).eval()
    features = dcgan.train.features
    x = torch.rand(3, channels, size, size) * 2 - 1
    # 8, 16, 32 (at 32 px), 64 (at 64 px)
    layer_channels = [8 * 2**i for i in range(size.bit_length() - 3)]
    with torch.no_grad():
        vector = features.layer_features(D, x)
        first, last = D.net[:2](x), D.net(x)
    assert vector.shape == (3, sum(layer_channels) * 4 * 4)
    # the first layer (size/2 square) pooled in 4x4 blocks of (size/8)^2; the last is 4x4 already
    block = size // 8
    pooled = first.view(3, 8, 4, block, 4, block).amax(dim=(3, 5)).flatten(1)
    assert torch.equal(vector[:, : 8 * 16], pooled)
    assert torch.equal(vector[:, -layer_channels[-1] * 16 :], last.flatten(1))


def quadrant_images(n, seed):
    """4 classes: class k is a bright 8x8 square in quadrant k of a 32x32 image of noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, 32, 32), generator=generator, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        row, col = 16 * (k // 2) + 4, 16 * (k % 2) + 4
        images[i, :, row : row + 8, col : col + 8] = 255
    return images, labels


def test_svm_on_features_that_separate_the_classes_scores_high():
    features = dcgan.train.features
    torch.manual_seed(0)
    D = dcgan.model.Discriminator(32, 1, width=8).apply(dcgan.model.init_weights)
    (train_x, train_y), (test_x, test_y) = quadrant_images(200, 1), quadrant_images(200, 2)
    train_f, test_f = features.d_features(D, train_x, "cpu"), features.d_features(D, test_x, "cpu")
    assert features.svm_accuracy(train_f, train_y, test_f, test_y, 0.01, 0) > 0.95
    # the same SVM learns nothing from labels that carry no class: near chance (0.25)
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert features.svm_accuracy(train_f, shuffled, test_f, test_y, 0.01, 0) < 0.5


def test_evaluate_features_writes_three_accuracies_beside_an_evaluate_record(
    mnist_root, tmp_path, capsys
):
    run = quick_run("DCGAN", mnist_root, tmp_path / "run", "--max-steps", 1)
    (run / "metrics.json").write_text(json.dumps({"fid": 12.5}))
    flags = ["--svm-train-images", 300, "--device", "cpu"]  # both may differ from the run's
    assert run_main(dcgan.train, "--evaluate-features", run, *flags) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fid"] == 12.5  # the --evaluate record is kept
    record = metrics["feature_svm"]
    # width 8 at 32 px: (8 + 16 + 32) channels x 4 x 4; the pixels: 32 x 32
    names = ("trained_D", "random_D", "pixels")
    assert {name: record[name]["features"] for name in names} == {
        "trained_D": 896,
        "random_D": 896,
        "pixels": 1024,
    }
    assert all(0.3 < record[name]["test_accuracy"] <= 1 for name in names)
    assert record["protocol"]["svm_train_images"] == 300
    assert (record["dataset"], record["image_size"], record["step"]) == ("mnist", 32, 1)
    assert "test accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value", [("--width", 16), ("--image-size", 64), ("--lr", 0.1)])
def test_evaluate_features_refuses_a_flag_that_changes_what_is_computed(
    tiny_mnist_root, tmp_path, capsys, flag, value
):
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    line = exits_2(capsys, dcgan.train, "--evaluate-features", run, flag, value)
    assert f"{flag} cannot change" in line
    assert not (run / "metrics.json").exists()


# --- the data: in-memory sets resized by dataset.resize, and their test split -------------------


def test_resize_is_antialiased_bilinear_rounded_to_uint8():
    # 2x2 -> 1x1: the mean 1.75 rounds to 2 (a truncation would give 1)
    x = torch.tensor([[1, 2], [2, 2]], dtype=torch.uint8).view(1, 1, 2, 2)
    assert dcgan.dataset.resize(x, 1).flatten().tolist() == [2]
    # 4x4 -> 2x2 with antialiasing weighs every pixel (plain bilinear: 25, 45, 105, 125)
    x = (torch.arange(16) * 10).to(torch.uint8).view(1, 1, 4, 4)
    resized = dcgan.dataset.resize(x, 2)
    assert resized.dtype == torch.uint8 and resized.flatten().tolist() == [36, 51, 99, 114]


def test_resize_is_the_same_in_chunks_and_a_no_op_at_the_stored_size(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8, generator=generator)
    whole = dcgan.dataset.resize(x, 64)
    monkeypatch.setattr(dcgan.dataset, "RESIZE_CHUNK", 3)  # 4 chunks, the last one short
    assert whole.shape == (10, 3, 64, 64) and torch.equal(dcgan.dataset.resize(x, 64), whole)
    assert dcgan.dataset.resize(x, 32) is x


def test_the_train_and_test_splits_are_read_and_resized_alike(tiny_mnist_root):
    data = dcgan.dataset
    for split, count in (("train", 600), ("test", 200)):  # tiny MNIST's sizes
        stored, labels = dcgan.support.read_split("mnist", tiny_mnist_root, split == "train")
        images = data.load_images("mnist", tiny_mnist_root, 32, split)
        assert images.shape == (count, 1, 32, 32) and stored.shape == (count, 1, 28, 28)
        assert torch.equal(images, data.resize(stored, 32))
        # §5.1's labelled split is the same images, with their labels
        labelled, same_labels = data.read_labelled("mnist", tiny_mnist_root, 32, split)
        assert torch.equal(labelled, images) and torch.equal(same_labels, labels)


def test_sets_of_image_files_have_no_test_split(tmp_path):
    with pytest.raises(dcgan.dataset.DataError, match="has no test split"):
        dcgan.dataset.load_images("folder", tmp_path, 32, "test")


# --- Fig. 4: model.py --interpolate walks through 9 z in each row -------------------------------


def cell(grid, row, column, size):
    """The image in cell (row, column) of a PNG grid that torchvision's make_grid drew."""
    top, left = 2 + row * (size + 2), 2 + column * (size + 2)
    pixels = np.asarray(grid.crop((left, top, left + size, top + size)))
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def test_interpolate_walks_each_row_through_9_z_each_one_of_its_images(tiny_mnist_root, tmp_path):
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    checkpoint = load_checkpoint(run)
    for weights in checkpoint["G"].values():  # after one step G's images barely depend on z
        weights.mul_(20 if weights.dim() > 1 else 1)
    torch.save(checkpoint, run / "checkpoints" / "last.pt")
    rows, steps, size = 2, 17, 32  # 9 points: one every 2 steps
    flags = ["--rows", rows, "--steps", steps, "--seed", 3, "--device", "cpu"]
    assert run_main(dcgan.model, run, "--interpolate", *flags, "--out", tmp_path / "walk.png") == 0

    G = dcgan.model.Generator(size, 1, checkpoint["args"]["z_dim"], checkpoint["args"]["width"])
    G.load_state_dict(checkpoint["G"])
    torch.manual_seed(3)
    points = dcgan.model.sample_z(rows * 9, checkpoint["args"]["z_dim"])  # as model.py draws them
    images = dcgan.model.sample(G, points).add(1).div(2)
    images = images.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)  # as the PNG stores them
    grid = Image.open(tmp_path / "walk.png").convert("RGB")
    assert grid.size == (steps * (size + 2) + 2, rows * (size + 2) + 2)
    for row in range(rows):
        for k in range(9):  # the k-th of the row's 9 z is the image in column 2k
            shown = cell(grid, row, 2 * k, size)[:1].int()
            assert (shown - images[9 * row + k].int()).abs().max() <= 1, (row, k)
            if k:  # and the walk passed between two different images
                assert (images[9 * row + k].int() - images[9 * row + k - 1].int()).abs().max() > 50
