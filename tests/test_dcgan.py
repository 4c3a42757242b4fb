"""DCGAN/: Fig. 1's shapes, the §3 and §4 invariants, and train.py run as a user runs it."""
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from torch import nn

from conftest import (ROOT, assert_clean_error, load_checkpoint, load_folder, main_with_poisoned_loss, run_train,
                      scalar_tags, sigterm_then_resume)

dcgan = load_folder("DCGAN")
QUICK = ["--image-size", 32, "--width", 8, "--device", "cpu"]


def small_models(channels=1):
    torch.manual_seed(0)
    G, D = dcgan.model.Generator(32, channels, width=8), dcgan.model.Discriminator(32, channels, width=8)
    G.apply(dcgan.model.init_weights)
    D.apply(dcgan.model.init_weights)
    return G, D


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes(size, channels):
    G = dcgan.model.Generator(size, channels, width=16)
    D = dcgan.model.Discriminator(size, channels, width=16)
    images = G(dcgan.model.sample_z(5))
    assert images.shape == (5, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh output
    assert D(images).shape == (5,)


def test_fig1_generator_widths_at_64px():
    G = dcgan.model.Generator(64, 3)
    assert G.project[0].out_features == 4 * 4 * 1024
    ups = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.stride) for m in ups] == [
        (1024, 512, (5, 5), (2, 2)), (512, 256, (5, 5), (2, 2)), (256, 128, (5, 5), (2, 2)), (128, 3, (5, 5), (2, 2))]
    convs = [m for m in dcgan.model.Discriminator(64, 3).modules() if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in convs] == [128, 256, 512, 1024]


@pytest.mark.parametrize("size", [32, 64])
def test_every_layer_doubles_or_halves_the_size_exactly(size):
    G, D = dcgan.model.Generator(size, 3, width=8), dcgan.model.Discriminator(size, 3, width=8)
    seen = []
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.ConvTranspose2d, nn.Conv2d)):
            m.register_forward_hook(lambda mod, inp, out: seen.append((type(mod), inp[0].shape[-1], out.shape[-1])))
    D(G(dcgan.model.sample_z(2)))
    ups = [(i, o) for kind, i, o in seen if kind is nn.ConvTranspose2d]
    downs = [(i, o) for kind, i, o in seen if kind is nn.Conv2d]
    assert ups[0][0] == 4 and ups[-1][1] == size and all(o == 2 * i for i, o in ups)
    assert downs[0][0] == size and downs[-1][1] == 4 and all(2 * o == i for i, o in downs)


def test_no_batch_norm_on_G_output_or_D_input():
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


def test_init_statistics():
    torch.manual_seed(0)
    G, D = dcgan.model.Generator(64, 3), dcgan.model.Discriminator(64, 3)
    G.apply(dcgan.model.init_weights)
    D.apply(dcgan.model.init_weights)
    for m in [*G.modules(), *D.modules()]:
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            assert abs(m.weight.std().item() - 0.02) < 0.002 and abs(m.weight.mean().item()) < 0.002
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.num_features >= 256:
            assert abs(m.weight.mean().item() - 1) < 0.005 and abs(m.weight.std().item() - 0.02) < 0.005
            assert torch.all(m.bias == 0)


def test_D_step_leaves_G_unchanged_and_G_step_leaves_D_unchanged():
    G, D = small_models()
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


def test_sampling_changes_no_batch_norm_buffer_and_is_deterministic():
    G, _ = small_models()
    G(dcgan.model.sample_z(16))  # a training forward gives the running statistics non-default values
    buffers = {k: v.clone() for k, v in G.state_dict().items()}
    z = dcgan.model.sample_z(4)
    first, second = dcgan.model.sample(G, z), dcgan.model.sample(G, z)
    assert torch.equal(first, second)
    assert all(torch.equal(buffers[k], v) for k, v in G.state_dict().items())
    assert G.training  # the mode it was in is restored


def test_z_is_uniform_on_minus_one_one():
    z = dcgan.model.sample_z(20000)
    assert z.shape == (20000, 100) and z.min() >= -1 and z.max() <= 1
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1 / 3) < 0.01


def test_batches_visit_every_image_once_per_epoch_and_resume_exactly():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    batches = dcgan.dataset.Batches(images, 3, "cpu", seed=0)
    epoch = torch.cat([next(batches) for _ in range(3)])
    assert epoch.min() >= -1 and epoch.max() <= 1
    values = ((epoch[:, 0, 0, 0] + 1) * 127.5).round().long()
    assert len(set(values.tolist())) == 9  # 3 batches of 3 distinct images; the 10th is dropped
    state = batches.state_dict()
    expected = [next(batches) for _ in range(4)]
    resumed = dcgan.dataset.Batches(images, 3, "cpu", seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed)) for a in expected)


def test_smoke_run_then_resume(mnist_root, tmp_path):
    run = tmp_path / "run"
    result = run_train("DCGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 3,
                       "--batch-size", 4, "--sample-every", 1, "--out", run, *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    tags = scalar_tags(run)
    assert [s for s, _ in tags["loss/D"]] == [3] and [s for s, _ in tags["loss/G"]] == [3]
    assert {"D/real", "D/fake"} <= set(tags)
    assert sorted(p.name for p in (run / "samples").iterdir()) == [f"step_000000{i}.png" for i in (1, 2, 3)]
    assert Image.open(run / "progress.gif").n_frames == 3
    args = json.loads((run / "args.json").read_text())
    assert args["dataset"] == "mnist" and args["batch_size"] == 4 and args["lr"] == 2e-4
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 3 and {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches"} <= set(checkpoint)

    result = run_train("DCGAN", "--resume", run, "--max-steps", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 5
    assert json.loads((run / "args.json").read_text())["batch_size"] == 4  # the run's own configuration
    assert torch.equal(load_checkpoint(run)["fixed_z"], checkpoint["fixed_z"])
    assert len(list((run / "samples").iterdir())) == 5
    # the scalars logged before the checkpoint survive the resume; later ones follow them
    assert [s for s, _ in scalar_tags(run)["loss/G"]] == [3, 5]


def test_resumed_run_matches_uninterrupted_run(mnist_root, tmp_path):
    common = ["--dataset", "mnist", "--data-root", mnist_root, "--batch-size", 8, *QUICK]
    assert run_train("DCGAN", *common, "--max-steps", 4, "--out", tmp_path / "straight").returncode == 0
    assert run_train("DCGAN", *common, "--max-steps", 2, "--out", tmp_path / "split").returncode == 0
    assert run_train("DCGAN", "--resume", tmp_path / "split", "--max-steps", 4).returncode == 0
    straight, split = load_checkpoint(tmp_path / "straight"), load_checkpoint(tmp_path / "split")
    for net in ("G", "D"):
        for name, value in straight[net].items():
            assert torch.equal(value, split[net][name]), (net, name)


def test_image_folder_is_decoded_once_and_cached(image_folder, tmp_path):
    args = ["--dataset", "folder", "--data-root", image_folder, "--max-steps", 2, "--batch-size", 8, *QUICK]
    assert run_train("DCGAN", *args, "--out", tmp_path / "a").returncode == 0
    caches = list(image_folder.glob(".decoded-32px-*.u8"))
    assert len(caches) == 1 and caches[0].stat().st_size == 40 * 3 * 32 * 32
    assert run_train("DCGAN", *args, "--out", tmp_path / "b").returncode == 0


def test_sampling_command_writes_a_grid_and_single_images(mnist_root, tmp_path):
    run = tmp_path / "run"
    assert run_train("DCGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 1,
                     "--batch-size", 4, "--out", run, *QUICK).returncode == 0
    sample = [sys.executable, "model.py", str(run), "--num", "10", "--device", "cpu"]
    subprocess.run([*sample, "--out", str(tmp_path / "grid.png")], cwd=ROOT / "DCGAN", check=True)
    assert Image.open(tmp_path / "grid.png").size == (4 * 34 + 2, 3 * 34 + 2)  # 4 per row, 2 px padding
    subprocess.run([*sample, "--out", str(tmp_path / "single"), "--single"], cwd=ROOT / "DCGAN", check=True)
    assert len(list((tmp_path / "single").glob("*.png"))) == 10


def test_sigterm_writes_a_checkpoint_that_resumes(mnist_root, tmp_path):
    sigterm_then_resume("DCGAN", tmp_path / "run", "--dataset", "mnist", "--data-root", mnist_root,
                        "--batch-size", 4, "--sample-every", 1, *QUICK)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    code = main_with_poisoned_loss(dcgan.train, "generator_step", 3, "--dataset", "mnist", "--data-root", mnist_root,
                                   "--max-steps", 10, "--batch-size", 4, "--log-every", 1, "--checkpoint-every", 1,
                                   "--out", run, *QUICK)
    stderr = capsys.readouterr().err
    assert code == 1
    assert "NaN or Inf at step 3" in stderr and "Traceback" not in stderr
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2
    assert all(torch.isfinite(v).all() for net in ("G", "D") for v in checkpoint[net].values() if v.is_floating_point())


@pytest.mark.parametrize("flags, words", [
    (["--lr", "-1"], ["--lr"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--dataset", "nosuchset"], ["nosuchset"]),
    (["--image-size", "48"], ["--image-size"]),
    (["--resume", "/nonexistent/run"], ["no checkpoint"]),
])
def test_bad_flags_exit_2_without_traceback(flags, words):
    assert_clean_error(run_train("DCGAN", *flags, "--device", "cpu"), *words)


def test_missing_data_offline_exits_2_naming_the_files(tmp_path):
    result = run_train("DCGAN", "--dataset", "cifar10", "--data-root", tmp_path / "empty", "--device", "cpu",
                       "--out", tmp_path / "run")
    assert_clean_error(result, "cifar10", "cifar-10-batches-py", "--data-root")


def test_batch_larger_than_the_data_and_unwritable_out_exit_2(image_folder, tmp_path):
    result = run_train("DCGAN", "--dataset", "folder", "--data-root", image_folder, "--batch-size", 41,
                       "--out", tmp_path / "run", *QUICK)
    assert_clean_error(result, "--batch-size 41")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_clean_error(run_train("DCGAN", "--out", blocker / "run", "--device", "cpu"), "--out")


def test_resume_refuses_to_change_the_configuration(mnist_root, tmp_path):
    run = tmp_path / "run"
    assert run_train("DCGAN", "--dataset", "mnist", "--data-root", mnist_root, "--max-steps", 1,
                     "--batch-size", 4, "--out", run, *QUICK).returncode == 0
    assert_clean_error(run_train("DCGAN", "--resume", run, "--lr", "0.1"), "lr")
