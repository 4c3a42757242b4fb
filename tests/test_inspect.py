"""model.py's --interpolate and --nearest: a walk passes through its drawn z (DCGAN's through 9 of
them by default, its Fig. 4) and shows G's samples of them there, the nearest training image of a
training image is itself, a flag that does not apply is refused, and every folder writes both
grids from a tiny run."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FOLDERS, exits_2, load_checkpoint, load_folder, quick_run, run_main

support = load_folder("DCGAN").support
IMAGE_SIZE = {"simpleGAN": 28, "CGAN": 28}  # the others are 32 px under QUICK


def cell(grid, row, column, size):
    """One image of a grid PNG (2 px padding), as uint8 (C, size, size)."""
    top, left = 2 + row * (size + 2), 2 + column * (size + 2)
    return torch.as_tensor(np.array(grid))[top : top + size, left : left + size].permute(2, 0, 1)


def test_a_walk_passes_through_each_drawn_z_evenly_spaced_between_them():
    ends = torch.randn(3, 100, generator=torch.Generator().manual_seed(0))
    points = support.walk(ends, 9)
    assert len(points) == 9
    for index, end in zip((0, 4, 8), ends):
        assert torch.equal(points[index], end)
    for segment in (points[:5], points[4:]):
        steps = segment[1:] - segment[:-1]
        assert torch.allclose(steps, steps[0].expand_as(steps), atol=1e-5)
    line = support.interpolation_path(ends[0], ends[1], 5)
    assert torch.allclose(line[2], (ends[0] + ends[1]) / 2, atol=1e-6)


def test_the_nearest_training_image_of_a_training_image_is_itself():
    seeded = torch.Generator().manual_seed(1)
    training = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=seeded)
    picked = torch.tensor([3, 17, 42])
    queries = training[picked].float() / 255
    distance, index = support.nearest_training(queries, training, "cpu", batch=8)
    assert torch.equal(index, picked) and torch.equal(distance, torch.zeros(3))
    others = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    distance, index = support.nearest_training(others, training, "cpu", batch=8)
    brute = torch.cdist(others.flatten(1), training.flatten(1).float() / 255)
    assert torch.equal(index, brute.argmin(1)) and torch.allclose(distance, brute.min(1).values)


@pytest.fixture(scope="module", params=FOLDERS)
def tiny(request, tiny_mnist_root, tmp_path_factory):
    """A run of one step of each folder on the tiny MNIST."""
    folder = request.param
    run = tmp_path_factory.mktemp(folder) / "run"
    return (
        folder,
        load_folder(folder).model,
        quick_run(folder, tiny_mnist_root, run, "--max-steps", 1),
    )


def test_every_folder_writes_both_grids(tiny, tmp_path, capsys):
    folder, model, run = tiny
    size = IMAGE_SIZE.get(folder, 32) + 2
    walk = ["--interpolate", "--rows", 3, "--steps", 4, "--points", 2]
    assert run_main(model, run, *walk, "--out", tmp_path / "walk.png", "--device", "cpu") == 0
    assert Image.open(tmp_path / "walk.png").size == (4 * size + 2, 3 * size + 2)
    nearest = ["--nearest", "--rows", 2, "--pairs", 3, "--compare", 20]
    assert run_main(model, run, *nearest, "--out", tmp_path / "near.png", "--device", "cpu") == 0
    assert Image.open(tmp_path / "near.png").size == (6 * size + 2, 2 * size + 2)
    out = capsys.readouterr().out
    assert "for 20 samples" in out and "for 20 held-out test images" in out, out


@pytest.fixture(scope="module")
def dcgan_run(tiny_mnist_root, tmp_path_factory):
    """A one-step DCGAN run, left unchanged by the tests that use it."""
    return quick_run(
        "DCGAN", tiny_mnist_root, tmp_path_factory.mktemp("dcgan") / "run", "--max-steps", 1
    )


def test_dcgans_walk_passes_through_9_z_as_its_figure_4_and_shows_g_of_them_there(
    dcgan_run, tmp_path, capsys
):
    dcgan, run = load_folder("DCGAN"), tmp_path / "run"
    checkpoint = load_checkpoint(dcgan_run)
    # after one step G's images barely depend on z; now they do
    for weights in checkpoint["G"].values():
        weights.mul_(20 if weights.dim() > 1 else 1)
    (run / "checkpoints").mkdir(parents=True)
    torch.save(checkpoint, run / "checkpoints" / "last.pt")
    # the defaults: 9 z a row, 4 steps from one to the next, 33 images a row
    short = ["--interpolate", "--steps", 4, "--out", tmp_path / "short.png"]
    assert "--points 9" in exits_2(capsys, dcgan.model, run, *short)
    assert not (tmp_path / "short.png").exists()
    walk = ["--interpolate", "--rows", 2, "--seed", 7, "--device", "cpu"]
    assert run_main(dcgan.model, run, *walk, "--out", tmp_path / "walk.png") == 0
    grid = Image.open(tmp_path / "walk.png").convert("RGB")
    assert grid.size == (33 * 34 + 2, 2 * 34 + 2)
    z_dim = checkpoint["args"]["z_dim"]
    G = dcgan.model.Generator(32, 1, z_dim, checkpoint["args"]["width"])
    G.load_state_dict(checkpoint["G"])
    torch.manual_seed(7)
    ends = dcgan.model.sample(G, dcgan.model.sample_z(2 * 9, z_dim)).add(1).div(2)
    ends = ends.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)  # as the PNG stores them
    assert (ends[0].int() - ends[1].int()).abs().max() > 50
    # row r passes through the z drawn (9 r) to (9 r + 8), at every 4th image
    for row in range(2):
        for k in range(9):
            shown = cell(grid, row, 4 * k, 32)[:1].int()
            difference = (shown - ends[9 * row + k].int()).abs().max()
            assert difference <= 1, (row, k, difference)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--nearest", "--steps", 4], "--steps"),
        (["--nearest", "--num", 4], "--num"),
        (["--interpolate", "--pairs", 2], "--pairs"),
        (["--interpolate", "--compare", 9], "--compare"),
        (["--rows", 2], "--rows"),
        (["--interpolate", "--steps", 1], "--steps"),
        (["--interpolate", "--points", 1], "--points"),
        # removed: the walk is the straight line (support.REMOVED)
        (["--interpolate", "--path", "circle"], "--path was removed"),
    ],
)
def test_a_flag_that_does_not_apply_is_refused_in_one_line(
    flags, named, dcgan_run, tmp_path, capsys
):
    dcgan = load_folder("DCGAN")
    assert named in exits_2(capsys, dcgan.model, dcgan_run, *flags, "--out", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_neighbours_are_training_images(dcgan_run, tmp_path, tiny_mnist_root):
    dcgan = load_folder("DCGAN")
    nearest = ["--nearest", "--rows", 2, "--pairs", 2, "--compare", 4, "--device", "cpu"]
    assert run_main(dcgan.model, dcgan_run, *nearest, "--out", tmp_path / "nearest.png") == 0
    training = dcgan.dataset.load_images("mnist", tiny_mnist_root, 32)
    grid = Image.open(tmp_path / "nearest.png").convert("RGB")
    for row in range(2):
        # each sample's right-hand neighbour is a training image, pixel for pixel
        for column in (1, 3):
            image = cell(grid, row, column, 32)[:1]
            assert (training == image).flatten(1).all(1).any(), (row, column)
