"""DCGAN/: Fig. 1's shapes, the §3 and §4 invariants, the losses of Alg. 1 by value and gradient, and §5.1's
D features in a linear SVM (--evaluate-features)."""
import json

import pytest
import torch
from torch import nn

from conftest import FixedG, PixelSumD, bce, exits_2, load_folder, quick_run, run_main, sigmoid, small_networks

dcgan = load_folder("DCGAN")


def test_fig1_generator_widths_at_64px():
    G = dcgan.model.Generator(64, 3)
    assert G.project[0].out_features == 4 * 4 * 1024
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (1024, 512, (5, 5), (2, 2)), (512, 256, (5, 5), (2, 2)), (256, 128, (5, 5), (2, 2)), (128, 3, (5, 5), (2, 2))]
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
        normed = [i for i in convs if i + 1 < len(layers) and isinstance(layers[i + 1], nn.BatchNorm2d)]
        assert len(normed) == len(convs) - 1
    assert isinstance(G.project[1], nn.BatchNorm1d)
    # official code (faces/train_uncond_dcgan.py): no layer has a bias, G's output layer and D's input and
    # output layers included, which have no batch norm either
    layers = [m for m in [*G.modules(), *D.modules()] if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    assert len(layers) == 10 and all(m.bias is None for m in layers)


def test_init_statistics():
    G, D = small_networks("DCGAN", 3, 64, dcgan.model.WIDTH)
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            assert abs(m.weight.std().item() - 0.02) < 0.002 and abs(m.weight.mean().item()) < 0.002
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.num_features >= 256:
            assert abs(m.weight.mean().item() - 1) < 0.005 and abs(m.weight.std().item() - 0.02) < 0.005
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
    assert dcgan.dataset.to_tanh_range(images).flatten().tolist() == pytest.approx([-1, 51 / 127.5 - 1, 1])


# --- the losses at known logits ---------------------------------------------------------------------

LOGITS = torch.tensor([-2.0, -0.5, 0.0, 1.5])


class KnownLogits(nn.Module):
    """D(x) = one learnable logit per sample: `real` for the real images (ones), `fake` for G's (zeros)."""

    def __init__(self, real, fake):
        super().__init__()
        self.real, self.fake = nn.Parameter(real.clone()), nn.Parameter(fake.clone())

    def forward(self, x):
        return torch.where(x.flatten(1)[:, 0] > 0, self.real, self.fake)


def test_D_loss_and_its_gradient_at_known_logits():
    """Alg. 1: D descends -log D(x) - log(1 - D(G(z))), each term a mean over the minibatch: with logits l, the
    value is mean log(1 + e^-l_real) + mean log(1 + e^l_fake), the gradient (sigmoid(l) - target) / m."""
    real, fake = LOGITS, LOGITS.flip(0)
    D, G = KnownLogits(real, fake), FixedG(torch.zeros(4, 1, 1, 1))
    loss, D_x, D_G_z = dcgan.train.discriminator_step(G, D, torch.optim.SGD(D.parameters(), lr=1.0),
                                                      torch.ones(4, 1, 1, 1), torch.zeros(4, 1))
    m = len(real)
    assert loss.item() == pytest.approx(bce(real.tolist(), 1) + bce(fake.tolist(), 0))
    assert D_x.item() == pytest.approx(sum(map(sigmoid, real.tolist())) / m)
    assert D_G_z.item() == pytest.approx(sum(map(sigmoid, fake.tolist())) / m)
    # one SGD step of size 1 moves each logit by minus its gradient
    assert (real - D.real.detach()).tolist() == pytest.approx([(sigmoid(l) - 1) / m for l in real.tolist()], abs=1e-6)
    assert (fake - D.fake.detach()).tolist() == pytest.approx([sigmoid(l) / m for l in fake.tolist()], abs=1e-6)


def test_G_loss_and_its_gradient_at_known_logits():
    """The non-saturating G loss, -log D(G(z)) as a mean: value mean log(1 + e^-l), gradient (sigmoid(l) - 1) / m
    (the saturating log(1 - D(G(z))) would have the gradient sigmoid(l) / m instead)."""
    G = FixedG(LOGITS.view(4, 1, 1, 1))  # one-pixel images, which PixelSumD returns as its logits
    loss = dcgan.train.generator_step(G, PixelSumD(), torch.optim.SGD(G.parameters(), lr=1.0), torch.zeros(4, 1))
    assert loss.item() == pytest.approx(bce(LOGITS.tolist(), 1))
    assert (LOGITS - G.images.detach().flatten()).tolist() == pytest.approx(
        [(sigmoid(l) - 1) / len(LOGITS) for l in LOGITS.tolist()], abs=1e-6)


# --- §5.1: D as a feature extractor (train.py --evaluate-features, features.py) ---------------------------


@pytest.mark.parametrize("size, channels", [(32, 1), (64, 3)])
def test_feature_vector_has_the_size_the_layer_shapes_give(size, channels):
    """Every conv layer's C x H x W output max-pooled to C x 4 x 4: 16 features per channel, whatever H and W."""
    torch.manual_seed(0)
    D, features = dcgan.model.Discriminator(size, channels, width=8).apply(dcgan.model.init_weights).eval(), \
        dcgan.train.features
    x = torch.rand(3, channels, size, size) * 2 - 1
    layer_channels = [8 * 2 ** i for i in range(size.bit_length() - 3)]  # 8, 16, 32 (at 32 px), 64 (at 64 px)
    with torch.no_grad():
        vector = features.layer_features(D, x)
        first, last = D.net[:2](x), D.net(x)
    assert vector.shape == (3, sum(layer_channels) * 4 * 4)
    # the first layer (size/2 square) pooled in 4x4 blocks of (size/8)^2; the last layer is 4x4 already
    block = size // 8
    pooled = first.view(3, 8, 4, block, 4, block).amax(dim=(3, 5)).flatten(1)
    assert torch.equal(vector[:, :8 * 16], pooled)
    assert torch.equal(vector[:, -layer_channels[-1] * 16:], last.flatten(1))


def quadrant_images(n, seed):
    """4 classes: class k is a bright 8x8 square in quadrant k of a 32x32 image of noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = torch.randint(0, 60, (n, 1, 32, 32), generator=generator, dtype=torch.uint8)
    for i, k in enumerate(labels.tolist()):
        row, col = 16 * (k // 2) + 4, 16 * (k % 2) + 4
        images[i, :, row:row + 8, col:col + 8] = 255
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


def test_evaluate_features_writes_three_accuracies_beside_an_evaluate_record(mnist_root, tmp_path, capsys):
    run = quick_run("DCGAN", mnist_root, tmp_path / "run", "--max-steps", 1)
    (run / "metrics.json").write_text(json.dumps({"fid": 12.5}))
    assert run_main(dcgan.train, "--evaluate-features", run, "--svm-train-images", 300) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fid"] == 12.5  # the --evaluate record is kept
    record = metrics["feature_svm"]
    # width 8 at 32 px: (8 + 16 + 32) channels x 4 x 4; the pixels: 32 x 32
    assert {name: record[name]["features"] for name in ("trained_D", "random_D", "pixels")} == \
        {"trained_D": 896, "random_D": 896, "pixels": 1024}
    assert all(0.3 < record[name]["test_accuracy"] <= 1 for name in ("trained_D", "random_D", "pixels"))
    assert record["protocol"]["svm_train_images"] == 300 and record["protocol"]["dataset"] == "mnist"
    assert "test accuracy" in capsys.readouterr().out
    line = exits_2(capsys, dcgan.train, "--evaluate-features", run, "--width", 16)
    assert "--width cannot change" in line
