"""SN-DCGAN/: Table 3's shapes, spectral normalisation (§2.1, Appendix A), the losses of §4, Table 1's
settings, and train.py run as a user runs it."""
import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn.utils import parametrize

from conftest import (ROOT, assert_clean_error, load_checkpoint, load_folder, run_train, scalar_tags,
                      sigterm_then_resume)

sn_dcgan = load_folder("SN-DCGAN")
model, train = sn_dcgan.model, sn_dcgan.train
QUICK = ["--width", 8, "--device", "cpu"]
LAYER_NAMES = ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "conv7", "dense"]


def small_models(channels=1, width=8):
    torch.manual_seed(0)
    return model.Generator(32, channels, width=width), model.Discriminator(32, channels, width=width)


def normalized(D):
    return [layer for _, layer in D.normalized_layers()]


def power_vectors(D):
    return [layer.parametrizations.weight[0]._u.clone() for layer in normalized(D)]


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_at_32px(channels):
    G, D = model.Generator(32, channels), model.Discriminator(32, channels)
    images = G(model.sample_z(5))
    assert images.shape == (5, channels, 32, 32)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (5,)


def test_z_is_128_dimensional_standard_normal():
    z = model.sample_z(20000)
    assert z.shape == (20000, 128)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01 and z.min() < -3


@pytest.mark.parametrize("channels", [1, 3])
def test_table3_layers_and_feature_map_sizes(channels):
    G, D = model.Generator(32, channels), model.Discriminator(32, channels)
    convs = [m for m in D.net if isinstance(m, nn.Conv2d)]
    assert [(m.kernel_size[0], m.stride[0], m.out_channels) for m in convs] == [
        (3, 1, 64), (4, 2, 64), (3, 1, 128), (4, 2, 128), (3, 1, 256), (4, 2, 256), (3, 1, 512)]
    assert convs[0].in_channels == channels
    assert (D.logit.in_features, D.logit.out_features) == (4 * 4 * 512, 1)
    assert G.project[0].in_features == 128 and G.project[0].out_features == 4 * 4 * 512
    ups = [m for m in G.net if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in ups] == [
        (512, 256, 4, 2, 1), (256, 128, 4, 2, 1), (128, 64, 4, 2, 1)]
    assert [type(m) for m in G.net[-2:]] == [nn.Conv2d, nn.Tanh]
    out = G.net[-2]
    assert (out.in_channels, out.out_channels, out.kernel_size[0], out.stride[0]) == (64, channels, 3, 1)
    # every batch-normed layer of G is a deconv followed by BN and ReLU (Table 3: "deconv. BN ... ReLU")
    for i, m in enumerate(G.net):
        if isinstance(m, nn.ConvTranspose2d):
            assert isinstance(G.net[i + 1], nn.BatchNorm2d) and isinstance(G.net[i + 2], nn.ReLU)

    sizes = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(lambda mod, inp, o: sizes.append((mod, inp[0].shape[1:], o.shape[1:])))
    D(G(model.sample_z(2)))
    ups_seen = [(i[-1], o[-1]) for m, i, o in sizes if isinstance(m, nn.ConvTranspose2d)]
    assert ups_seen == [(4, 8), (8, 16), (16, 32)]
    assert [tuple(o) for m, i, o in sizes if m is G.net[-2]] == [(channels, 32, 32)]
    d_outputs = [tuple(o) for m, i, o in sizes if any(m is layer for layer in D.net)]
    assert d_outputs == [(64, 32, 32), (64, 16, 16), (128, 16, 16), (128, 8, 8), (256, 8, 8), (256, 4, 4),
                         (512, 4, 4)]


@pytest.mark.parametrize("size", [16, 48, 64])
def test_other_image_sizes_follow_m_over_8(size):
    G, D = model.Generator(size, 3, width=8), model.Discriminator(size, 3, width=8)
    assert G(model.sample_z(2)).shape == (2, 3, size, size)
    assert D.logit.in_features == 8 * 8 * (size // 8) ** 2
    assert D(torch.zeros(2, 3, size, size)).shape == (2,)


def test_spectral_norm_on_every_D_layer_and_on_no_G_layer():
    G, D = model.Generator(32, 3), model.Discriminator(32, 3)
    d_layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(d_layers) == 8
    assert all(parametrize.is_parametrized(m, "weight") for m in d_layers)
    assert [name for name, _ in D.normalized_layers()] == LAYER_NAMES
    assert not any(parametrize.is_parametrized(m) for m in G.modules())
    assert all(type(m.parametrizations.weight[0]).__name__ == "_SpectralNorm" for m in d_layers)
    assert all(m.parametrizations.weight[0].n_power_iterations == 1 for m in d_layers if m.weight.ndim > 1)


def test_no_batch_norm_in_D_and_leaky_relu_slope_is_0_1():
    D = model.Discriminator(32, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in D.modules())
    slopes = [m.negative_slope for m in D.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 7
    assert not any(isinstance(m, (nn.ReLU, nn.Sigmoid)) for m in D.modules())  # D returns the logit f(x)


def test_normalized_weights_have_largest_singular_value_one_after_training_forwards():
    G, D = small_models(channels=3, width=16)
    opt_D = torch.optim.Adam(D.parameters(), 1e-3, (0.5, 0.9))
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(3):  # the weights move, so u must follow them
        train.discriminator_step(G, D, opt_D, x, model.sample_z(8), "standard")
    with torch.no_grad():
        for _ in range(40):  # one power iteration per training forward (Alg. 1)
            D(x)
    raw = [torch.linalg.matrix_norm(layer.parametrizations.weight.original.flatten(1), ord=2).item()
           for layer in normalized(D)]
    assert max(abs(s - 1) for s in raw) > 0.2  # the unnormalised weights are not near 1 by themselves
    D.eval()  # read W / sigma(W) without running another power iteration
    sigmas = [torch.linalg.matrix_norm(layer.weight.flatten(1), ord=2).item() for layer in normalized(D)]
    assert all(abs(s - 1) < 0.05 for s in sigmas), sigmas
    # the logged values (train.py's sn/sigma_*) are the same quantity
    logged = model.normalized_sigmas(D)
    assert list(logged) == LAYER_NAMES
    assert all(abs(logged[name].item() - s) < 1e-4 for name, s in zip(LAYER_NAMES, sigmas))


def test_power_iteration_vector_is_frozen_in_eval_and_updated_in_train():
    _, D = small_models()
    x = torch.rand(4, 1, 32, 32)
    before = power_vectors(D)
    D.eval()
    first, second = D(x), D(x)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(before, power_vectors(D)))
    D.train()
    D(x)
    after = power_vectors(D)
    # every convolution's u moves; the dense layer's u is a 1-vector (its single row), already exact
    assert all(not torch.equal(a, b) for a, b in zip(before[:7], after[:7]))
    assert "parametrizations.weight.0._u" in "".join(D.state_dict())  # u persists in checkpoints


def test_one_D_update_runs_exactly_one_power_iteration():
    G, D = small_models()
    opt_D = torch.optim.Adam(D.parameters(), 1e-4, (0.5, 0.999))
    reference = copy.deepcopy(D)
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        reference(x)  # one training forward = one power iteration per layer
    train.discriminator_step(G, D, opt_D, x, model.sample_z(4), "standard")
    assert all(torch.equal(a, b) for a, b in zip(power_vectors(reference), power_vectors(D)))


def test_standard_losses_on_known_logits():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])

    def softplus(v):
        return math.log1p(math.exp(v))

    # Eq. 15: -E[log sigmoid(f(x))] - E[log(1 - sigmoid(f(G(z))))]
    expected = (softplus(-2) + softplus(1)) / 2 + (softplus(0.5) + softplus(-3)) / 2
    assert train.discriminator_loss(real, fake, "standard").item() == pytest.approx(expected, rel=1e-6)
    assert train.discriminator_loss(torch.zeros(3), torch.zeros(3), "standard").item() == pytest.approx(
        2 * math.log(2), rel=1e-6)
    # §4: G minimises -E[log D(G(z))]
    assert train.generator_loss(fake, "standard").item() == pytest.approx(
        (softplus(-0.5) + softplus(3)) / 2, rel=1e-6)
    # non-saturating: a confident D (f(G(z)) = -10) still gives G a full-size gradient, about -1 per sample
    logits = torch.full((4,), -10.0, requires_grad=True)
    train.generator_loss(logits, "standard").backward()
    assert torch.allclose(logits.grad, torch.full((4,), -0.25), atol=1e-4)


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # Eq. 16, negated: E[relu(1 - f(x))] + E[relu(1 + f(G(z)))] = mean(0, 0.5, 2) + mean(0, 1, 2)
    assert train.discriminator_loss(real, fake, "hinge").item() == pytest.approx(2.5 / 3 + 1.0)
    assert train.discriminator_loss(torch.ones(2), -torch.ones(2), "hinge").item() == 0  # both margins met
    # Eq. 17: -E[f(G(z))]
    assert train.generator_loss(fake, "hinge").item() == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind", ["standard", "hinge"])
def test_D_step_leaves_G_unchanged_and_G_step_leaves_D_unchanged(kind):
    G, D = small_models()
    opt_G = torch.optim.Adam(G.parameters(), 1e-4, (0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), 1e-4, (0.5, 0.999))
    x = torch.rand(8, 1, 32, 32) * 2 - 1

    def params(net):
        return [p.detach().clone() for p in net.parameters()]

    G_before, D_before = params(G), params(D)
    train.discriminator_step(G, D, opt_D, x, model.sample_z(8), kind)
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert not all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before = params(D)
    train.generator_step(G, D, opt_G, model.sample_z(8), kind)
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # D is trainable again afterwards


def test_table1_settings_default_and_overrides():
    assert train.SETTINGS == {"A": (1e-4, 0.5, 0.9, 5), "B": (1e-4, 0.5, 0.999, 1), "C": (2e-4, 0.5, 0.999, 1),
                              "D": (1e-3, 0.5, 0.9, 5), "E": (1e-3, 0.5, 0.999, 5), "F": (1e-3, 0.9, 0.999, 5)}
    args, _ = train.parse_args([])
    assert (args.setting, args.lr, args.beta1, args.beta2, args.n_dis) == ("B", 1e-4, 0.5, 0.999, 1)
    assert (args.loss, args.z_dim, args.width, args.iters, args.batch_size, args.image_size) == (
        "standard", 128, 64, 100_000, 64, 32)
    for setting, values in train.SETTINGS.items():
        args, _ = train.parse_args(["--setting", setting])
        assert (args.lr, args.beta1, args.beta2, args.n_dis) == values
    args, _ = train.parse_args(["--setting", "F", "--lr", "3e-4", "--n-dis", "2"])
    assert (args.lr, args.beta1, args.beta2, args.n_dis) == (3e-4, 0.9, 0.999, 2)
    help_text = " ".join(train.build_parser().format_help().split())
    assert "setting B, n_dis = 1" in help_text and "100K" in help_text


def test_smoke_run_then_resume_and_sample(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = run_train("SN-DCGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 2,
                       "--batch-size", 4, "--sample-every", 1, "--device", "cpu", "--out", run)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run)
    assert [s for s, _ in tags["loss/D"]] == [2] and [s for s, _ in tags["loss/G"]] == [2]
    assert {"D/real", "D/fake"} <= set(tags)
    for name in LAYER_NAMES:  # Fig. 9's quantity, near 1 from the start
        assert abs(tags[f"sn/sigma_{name}"][0][1] - 1) < 0.05
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    assert Image.open(run / "progress.gif").n_frames == 2
    args = json.loads((run / "args.json").read_text())
    assert (args["setting"], args["lr"], args["n_dis"], args["loss"], args["batch_size"]) == (
        "B", 1e-4, 1, "standard", 4)
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)
    assert any(k.endswith("._u") for k in checkpoint["D"])

    result = run_train("SN-DCGAN", "--resume", run, "--max-steps", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 3
    assert json.loads((run / "args.json").read_text())["batch_size"] == 4  # the run's own configuration
    assert torch.equal(load_checkpoint(run)["fixed_z"], checkpoint["fixed_z"])
    assert len(list((run / "samples").iterdir())) == 3
    assert max(s for s, _ in scalar_tags(run)["loss/G"]) == 3
    assert_clean_error(run_train("SN-DCGAN", "--resume", run, "--setting", "C"), "setting")

    sample = [sys.executable, "model.py", str(run), "--num", "10", "--device", "cpu"]
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "SN-DCGAN", check=True)
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)  # 4 per row, 2 px padding
    subprocess.run([*sample, "--out", str(tmp_path / "single"), "--single"], cwd=ROOT / "SN-DCGAN", check=True)
    assert len(list((tmp_path / "single").glob("*.png"))) == 10


def test_resumed_run_matches_uninterrupted_run(mnist_root, tmp_path):
    # setting A (n_dis = 5) and the hinge loss: several D updates per step, resumed mid-run
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 8, "--setting", "A",
              "--loss", "hinge", "--log-every", 1, *QUICK]
    assert run_train("SN-DCGAN", *common, "--max-steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert run_train("SN-DCGAN", *common, "--max-steps", 2, "--out", tmp_path / "split").returncode == 0
    assert run_train("SN-DCGAN", "--resume", tmp_path / "split", "--max-steps", 4).returncode == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for net in ("G", "D"):  # D's state holds the power-iteration vectors u, v too
        for name, value in straight[net].items():
            assert torch.equal(value, split[net][name]), (net, name)
    assert straight["batches"] == split["batches"] == {"epoch": 0, "index": 4 * 5}
    assert scalar_tags(tmp_path / "straight")["loss/D"] == scalar_tags(tmp_path / "split")["loss/D"]


def test_sigterm_writes_a_checkpoint_that_resumes(mnist_root, tmp_path):
    sigterm_then_resume("SN-DCGAN", tmp_path / "run", "--dataset", "mnist", "--data-root", mnist_root,
                        "--batch-size", 4, "--sample-every", 1, *QUICK)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path):
    run = tmp_path / "run"
    # Adam moves every weight by about lr per step: at lr 1e17 G's batch norm overflows after a few finite steps
    result = run_train("SN-DCGAN", "--dataset", "mnist", "--data-root", mnist_root, "--lr", 1e17, "--max-steps", 50,
                       "--batch-size", 4, "--log-every", 1, "--checkpoint-every", 1, "--out", run, *QUICK)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NaN or Inf at step" in result.stderr and "Traceback" not in result.stderr
    bad_step = int(result.stderr.split("at step ")[1].split(";")[0])
    assert bad_step > 1
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for net in ("G", "D") for v in checkpoint[net].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [
    (["--dataset", "nosuchset"], ["nosuchset"]),
    (["--setting", "Z"], ["--setting", "Z"]),
    (["--image-size", "30"], ["--image-size"]),
    (["--lr", "-1"], ["--lr"]),
    (["--n-dis", "0"], ["--n-dis"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint"]),
])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("SN-DCGAN", *flags, "--device", "cpu"), *words)


def test_missing_data_offline_exits_2_naming_the_files(tmp_path):
    result = run_train("SN-DCGAN", "--data-root", tmp_path / "empty", "--device", "cpu", "--out", tmp_path / "run")
    assert_clean_error(result, "cifar10", "cifar-10-batches-py", "--data-root")
