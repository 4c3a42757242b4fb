"""LSGAN/: the least squares losses, a D without sigmoid, the figure's shapes, and train.py run as a user runs it."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import (ROOT, assert_clean_error, load_checkpoint, load_folder, main_with_poisoned_loss, run_train,
                      scalar_tags, sigterm_then_resume)

lsgan = load_folder("LSGAN")
QUICK = ["--image-size", 32, "--width", 8, "--device", "cpu"]
CODINGS = lsgan.train.CODINGS


def small_models(channels=1, size=32):
    torch.manual_seed(0)
    G = lsgan.model.Generator(size, channels, width=8)
    D = lsgan.model.Discriminator(size, channels, width=8)
    G.apply(lsgan.model.init_weights)
    D.apply(lsgan.model.init_weights)
    return G, D


# --- the losses (§3.2) -------------------------------------------------------------------------

def test_the_two_codings_are_the_papers():
    assert CODINGS["0-1"] == (0.0, 1.0, 1.0)
    a, b, c = CODINGS["pearson"]
    assert (a, b, c) == (-1.0, 1.0, 0.0) and b - c == 1 and b - a == 2  # §3.2.2's Pearson chi^2 conditions
    assert lsgan.train.build_parser().get_default("coding") == "0-1"


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_losses_are_exactly_zero_when_D_outputs_its_targets(name):
    a, b, c = CODINGS[name]
    assert lsgan.train.discriminator_loss(torch.full((16,), b), torch.full((16,), a), a, b).item() == 0.0
    assert lsgan.train.generator_loss(torch.full((16,), c), c).item() == 0.0
    # and strictly positive as soon as one output misses its target
    assert lsgan.train.discriminator_loss(torch.full((16,), a), torch.full((16,), a), a, b).item() > 0
    assert lsgan.train.generator_loss(torch.full((16,), a), c).item() > 0


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_losses_are_means_of_squares_not_squares_of_means(name):
    a, b, c = CODINGS[name]
    spread = torch.tensor([-1.0, 1.0])  # the batch mean hits the target, every single output misses it by 1
    # mean of squares: 1/2 * mean(1, 1) = 0.5; the square of the mean would give 0
    assert lsgan.train.discriminator_loss(b + spread, torch.full((2,), a), a, b).item() == 0.5
    assert lsgan.train.discriminator_loss(torch.full((2,), b), a + spread, a, b).item() == 0.5
    assert lsgan.train.generator_loss(c + spread, c).item() == 0.5
    torch.manual_seed(0)
    real, fake = torch.randn(32), torch.randn(32)
    expected_D = 0.5 * F.mse_loss(real, torch.full_like(real, b)) + 0.5 * F.mse_loss(fake, torch.full_like(fake, a))
    assert torch.allclose(lsgan.train.discriminator_loss(real, fake, a, b), expected_D)
    assert torch.allclose(lsgan.train.generator_loss(fake, c), 0.5 * F.mse_loss(fake, torch.full_like(fake, c)))


# --- D has a linear output ----------------------------------------------------------------------

BOUNDED = (nn.Sigmoid, nn.LogSigmoid, nn.Hardsigmoid, nn.Tanh, nn.Hardtanh, nn.Softmax, nn.LogSoftmax, nn.Softsign)


@pytest.mark.parametrize("size", [32, 112])
def test_no_sigmoid_anywhere_in_D_and_its_output_is_unbounded(size):
    _, D = small_models(3, size)
    D.eval()  # batch norm at its initial statistics (mean 0, variance 1): D's answer depends on x alone
    assert not [m for m in D.modules() if isinstance(m, BOUNDED)]
    x = torch.rand(8, 3, size, size) * 2 - 1
    # D's answer is exactly its last linear layer's output: nothing squashes it afterwards
    seen = {}
    D.fc.register_forward_hook(lambda module, inputs, output: seen.update(fc=output))
    out = D(x)
    assert torch.equal(out, seen["fc"].squeeze(1))
    # with all biases 0 and batch norm at its initial statistics, D is positively homogeneous:
    # scaling the input scales the answer, without bound
    assert torch.allclose(D(1e6 * x), 1e6 * D(x), rtol=1e-3)
    assert D(1e6 * x).abs().min() > 1
    # with suitable weights D says more than 1, or less than 0
    with torch.no_grad():
        D.fc.weight.zero_()
        D.fc.bias.fill_(10.0)
        assert torch.all(D(x) == 10.0)
        D.fc.bias.fill_(-10.0)
        assert torch.all(D(x) == -10.0)


@pytest.mark.parametrize("name", sorted(CODINGS))
def test_D_steps_regress_D_to_its_codes(name):
    a, b, _ = CODINGS[name]
    G, D = small_models()
    opt_D = torch.optim.Adam(D.parameters(), 1e-3, (0.5, 0.999))
    x, z = torch.rand(16, 1, 32, 32) * 2 - 1, lsgan.model.sample_z(16)
    losses = [lsgan.train.discriminator_step(G, D, opt_D, x, z, CODINGS[name]) for _ in range(25)]
    loss, real, fake = losses[-1]
    assert loss < losses[0][0] / 10
    assert abs(real - b) < 0.2 and abs(fake - a) < 0.2, (real, fake)


# --- shapes (the figure and its adaptation to other sizes) -------------------------------------

@pytest.mark.parametrize("size", [32, 64, 112])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(size, channels):
    G = lsgan.model.Generator(size, channels, width=8)
    D = lsgan.model.Discriminator(size, channels, width=8)
    images = G(lsgan.model.sample_z(3))
    assert images.shape == (3, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (3,)


def test_figure_layers_at_112px():
    G, D = lsgan.model.Generator(112, 3), lsgan.model.Discriminator(112, 3)
    assert G.project[0].in_features == 1024 and G.project[0].out_features == 7 * 7 * 256
    deconvs = [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in G.modules()
               if isinstance(m, nn.ConvTranspose2d)]
    assert deconvs == [(256, 256, (3, 3), (2, 2)), (256, 256, (3, 3), (1, 1)), (256, 256, (3, 3), (2, 2)),
                       (256, 256, (3, 3), (1, 1)), (256, 128, (3, 3), (2, 2)), (128, 64, (3, 3), (2, 2)),
                       (64, 3, (3, 3), (1, 1))]
    convs = [(m.out_channels, m.kernel_size, m.stride) for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [(64, (5, 5), (2, 2)), (128, (5, 5), (2, 2)), (256, (5, 5), (2, 2)), (512, (5, 5), (2, 2))]
    assert D.fc.in_features == 7 * 7 * 512 and D.fc.out_features == 1
    assert isinstance(G.net[-1], nn.Tanh) and not isinstance(G.net[-2], nn.BatchNorm2d)
    assert isinstance(D.net[1], nn.LeakyReLU) and D.net[1].negative_slope == 0.2  # no batch norm on D's input


@pytest.mark.parametrize("size", [32, 48, 112])
def test_every_layer_doubles_keeps_or_halves_the_size_exactly(size):
    G, D = lsgan.model.Generator(size, 1, width=8), lsgan.model.Discriminator(size, 1, width=8)
    seen = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0].shape[-1], out.shape[-1])))
    D(G(lsgan.model.sample_z(2)))
    ups = [(m.stride[0], i, o) for m, i, o in seen if isinstance(m, nn.ConvTranspose2d)]
    downs = [(i, o) for m, i, o in seen if isinstance(m, nn.Conv2d)]
    assert ups[0][1] == size // 16 and ups[-1][2] == size
    assert all(o == s * i for s, i, o in ups)
    assert downs[0][0] == size and downs[-1][1] == size // 16 and all(2 * o == i for i, o in downs)


@pytest.mark.parametrize("size", [16, 28, 50])
def test_unsupported_sizes_are_refused(size):
    with pytest.raises(ValueError, match="multiple of 16"):
        lsgan.model.Generator(size, 1, width=8)


def test_init_statistics():
    torch.manual_seed(0)
    G, D = lsgan.model.Generator(64, 3), lsgan.model.Discriminator(64, 3)
    G.apply(lsgan.model.init_weights)
    D.apply(lsgan.model.init_weights)
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.weight.numel() > 10000:
            expected = 0.02 * 0.88 if isinstance(m, nn.Conv2d) else 0.02  # a normal truncated at 2 sigma
            assert abs(m.weight.std().item() - expected) < 0.001 and abs(m.weight.mean().item()) < 0.001
        if isinstance(m, nn.Conv2d):
            assert m.weight.abs().max() <= 0.04
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if getattr(m, "bias", None) is not None:
            assert torch.all(m.bias == 0)


def test_z_is_1024_dimensional_uniform_on_minus_one_one():
    z = lsgan.model.sample_z(20000)
    assert z.shape == (20000, 1024) and z.min() >= -1 and z.max() <= 1
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1 / 3) < 0.01


# --- the two updates ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CODINGS))
def test_D_step_leaves_G_unchanged_and_G_step_leaves_D_unchanged(name):
    G, D = small_models()
    opt_G = torch.optim.Adam(G.parameters(), 1e-3, (0.5, 0.999))
    opt_D = torch.optim.Adam(D.parameters(), 1e-3, (0.5, 0.999))
    x = torch.rand(8, 1, 32, 32) * 2 - 1

    def params(net):
        return [p.detach().clone() for p in net.parameters()]

    G_before, D_before = params(G), params(D)
    lsgan.train.discriminator_step(G, D, opt_D, x, lsgan.model.sample_z(8), CODINGS[name])
    assert all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert not all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(p.grad is None for p in G.parameters())  # the fakes were detached

    D_before, D_grads = params(D), [p.grad.clone() for p in D.parameters()]
    lsgan.train.generator_step(G, D, opt_G, lsgan.model.sample_z(8), CODINGS[name])
    assert all(torch.equal(a, b) for a, b in zip(D_before, params(D)))
    assert all(torch.equal(a, p.grad) for a, p in zip(D_grads, D.parameters()))  # no gradient reached D
    assert not all(torch.equal(a, b) for a, b in zip(G_before, params(G)))
    assert all(p.requires_grad for p in D.parameters())  # D is trainable again afterwards


def test_sampling_changes_no_batch_norm_buffer_and_is_deterministic():
    G, _ = small_models()
    G(lsgan.model.sample_z(16))  # a training forward gives the running statistics non-default values
    buffers = {k: v.clone() for k, v in G.state_dict().items()}
    z = lsgan.model.sample_z(4)
    assert torch.equal(lsgan.model.sample(G, z), lsgan.model.sample(G, z))
    assert all(torch.equal(buffers[k], v) for k, v in G.state_dict().items())
    assert G.training


# --- train.py as a user runs it -------------------------------------------------------------------

def test_smoke_run_then_resume(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = run_train("LSGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 3,
                       "--batch-size", 4, "--sample-every", 1, "--coding", "pearson", "--out", run, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run)
    assert [s for s, _ in tags["loss/D"]] == [3] and [s for s, _ in tags["loss/G"]] == [3]
    assert {"D/real", "D/fake"} <= set(tags)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_000000{i}.png" for i in (1, 2, 3)]
    assert Image.open(run / "samples" / "step_0000001.png").size == (8 * 34 + 2, 8 * 34 + 2)
    # the gif holds every grid; the writer merges identical neighbours (the first grids of a new run can be
    # uniform grey: G in eval mode uses running statistics that have seen only a few batches)
    grids = [Image.open(path).convert("L").tobytes() for path in sorted((run / "samples").iterdir())]
    assert Image.open(run / "progress.gif").n_frames == 1 + sum(a != b for a, b in zip(grids, grids[1:]))
    args = json.loads((run / "args.json").read_text())
    assert args["dataset"] == "mnist" and args["batch_size"] == 4 and args["coding"] == "pearson"
    assert args["lr"] == 1e-3 and args["z_dim"] == 1024 and args["channels"] == 1
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 3 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)
    assert checkpoint["fixed_z"].shape == (64, 1024)

    result = run_train("LSGAN", "--resume", run, "--max-steps", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 5
    assert json.loads((run / "args.json").read_text())["coding"] == "pearson"  # the run's own configuration
    assert torch.equal(load_checkpoint(run)["fixed_z"], checkpoint["fixed_z"])
    assert len(list((run / "samples").iterdir())) == 5
    assert max(s for s, _ in scalar_tags(run)["loss/G"]) == 5


def test_resumed_run_matches_uninterrupted_run(mnist_root, tmp_path):
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 8, *QUICK]
    assert run_train("LSGAN", *common, "--max-steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert run_train("LSGAN", *common, "--max-steps", 2, "--out", tmp_path / "split").returncode == 0
    assert run_train("LSGAN", "--resume", tmp_path / "split", "--max-steps", 4).returncode == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for part in ("G", "D"):
        for name, value in straight[part].items():
            assert torch.equal(value, split[part][name]), (part, name)
    assert torch.equal(straight["opt_G"]["state"][0]["exp_avg"], split["opt_G"]["state"][0]["exp_avg"])


def test_sampling_command_writes_a_grid_and_single_images(mnist_root, tmp_path):
    run = tmp_path / "run"
    assert run_train("LSGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 1,
                     "--batch-size", 4, "--out", run, *QUICK).returncode == 0
    sample = [sys.executable, "model.py", str(run), "--num", "10", "--device", "cpu"]
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "LSGAN", check=True)
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)  # 4 per row, 2 px padding
    subprocess.run([*sample, "--out", str(tmp_path / "single"), "--single"], cwd=ROOT / "LSGAN", check=True)
    assert len(list((tmp_path / "single").glob("*.png"))) == 10
    assert_clean_error(run_train("LSGAN", "--resume", run, "--coding", "pearson"), "coding")


def test_sigterm_writes_a_checkpoint_that_resumes(mnist_root, tmp_path):
    sigterm_then_resume("LSGAN", tmp_path / "run", "--dataset", "mnist", "--data-root", mnist_root,
                        "--batch-size", 4, "--sample-every", 1, *QUICK)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    code = main_with_poisoned_loss(lsgan.train, "generator_step", 3, "--dataset", "mnist", "--data-root", mnist_root,
                                   "--max-steps", 10, "--batch-size", 4, "--log-every", 1, "--checkpoint-every", 1,
                                   "--out", run, *QUICK)
    stderr = capsys.readouterr().err
    assert code == 1
    assert "NaN or Inf at step 3" in stderr and "Traceback" not in stderr
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for part in ("G", "D") for v in checkpoint[part].values()
               if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [
    (["--dataset", "nosuchset"], ["nosuchset"]),
    (["--lr", "-1"], ["--lr"]),
])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("LSGAN", *flags, "--device", "cpu"), *words)


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], ["--batch-size"]),
    (["--image-size", "50"], ["--image-size", "multiple of 16"]),
    (["--coding", "0-2"], ["--coding"]),
    (["--beta1", "1"], ["--beta1"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint"]),
])
def test_more_bad_flags_are_refused_by_the_parser(flags, words, capsys):
    with pytest.raises(SystemExit) as refused:
        lsgan.train.parse_args([*flags, "--device", "cpu"])
    stderr = capsys.readouterr().err
    assert refused.value.code == 2 and "error:" in stderr and "Traceback" not in stderr
    assert all(word in stderr for word in words), stderr


def test_missing_data_offline_exits_2_naming_the_files(tmp_path):
    result = run_train("LSGAN", "--dataset", "cifar10", "--data-root", tmp_path / "empty", "--device", "cpu",
                       "--out", tmp_path / "run")
    assert_clean_error(result, "cifar10", "cifar-10-batches-py", "--data-root")


def test_batch_larger_than_the_data_and_unwritable_out_exit_2(image_folder, tmp_path):
    result = run_train("LSGAN", "--dataset", "folder", "--data-root", image_folder, "--batch-size", 41,
                       "--out", tmp_path / "run", *QUICK)
    assert_clean_error(result, "--batch-size 41")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_error(run_train("LSGAN", "--out", blocker / "run", "--device", "cpu"), "--out")
