"""model.py's --interpolate and --nearest: the paths between two z end at G's samples of them, the great circle
keeps a Gaussian z's length and is refused for a uniform prior, the nearest training image of a training image is
itself, and every folder writes both grids from a tiny run."""
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
    return torch.as_tensor(np.array(grid))[top:top + size, left:left + size].permute(2, 0, 1)


def test_both_paths_start_and_end_at_the_drawn_z_and_the_circle_keeps_its_length():
    z0, z1 = torch.randn(2, 100, generator=torch.Generator().manual_seed(0))
    line, circle = (support.interpolation_path(z0, z1, 9, path) for path in ("line", "circle"))
    for points in (line, circle):
        assert torch.equal(points[0], z0) and torch.equal(points[-1], z1)
    assert torch.allclose(line[1:] - line[:-1], (z1 - z0) / 8, atol=1e-6)  # evenly spaced
    # the circle's radius goes linearly from |z0| to |z1|, so it stays within their band; the line's middle does not
    assert torch.allclose(circle.norm(dim=1), torch.linspace(z0.norm(), z1.norm(), 9), atol=1e-4)
    assert line[4].norm() < 0.8 * min(z0.norm(), z1.norm())
    angles = torch.arccos(torch.nn.functional.cosine_similarity(circle[1:], circle[:-1]).clamp(-1, 1))
    assert torch.allclose(angles, angles.mean(), atol=1e-4)  # evenly spaced along the circle


def test_the_nearest_training_image_of_a_training_image_is_itself():
    training = torch.randint(0, 256, (50, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    picked = torch.tensor([3, 17, 42])
    distance, index = support.nearest_training(training[picked].float() / 255, training, "cpu", batch=8)
    assert torch.equal(index, picked) and torch.equal(distance, torch.zeros(3))
    others = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    distance, index = support.nearest_training(others, training, "cpu", batch=8)
    brute = torch.cdist(others.flatten(1), training.flatten(1).float() / 255)
    assert torch.equal(index, brute.argmin(1)) and torch.allclose(distance, brute.min(1).values)


@pytest.fixture(scope="module", params=FOLDERS)
def tiny(request, tiny_mnist_root, tmp_path_factory):
    """A run of one step of each folder on the tiny MNIST."""
    folder = request.param
    run = quick_run(folder, tiny_mnist_root, tmp_path_factory.mktemp(folder) / "run", "--max-steps", 1)
    return folder, load_folder(folder).model, run


def test_every_folder_writes_both_grids(tiny, tmp_path, capsys):
    folder, model, run = tiny
    size = IMAGE_SIZE.get(folder, 32) + 2
    assert run_main(model, run, "--interpolate", "--rows", 3, "--steps", 4, "--out", tmp_path / "walk.png",
                    "--device", "cpu") == 0
    assert Image.open(tmp_path / "walk.png").size == (4 * size + 2, 3 * size + 2)
    assert run_main(model, run, "--nearest", "--rows", 2, "--pairs", 3, "--compare", 20, "--out",
                    tmp_path / "nearest.png", "--device", "cpu") == 0
    assert Image.open(tmp_path / "nearest.png").size == (6 * size + 2, 2 * size + 2)
    out = capsys.readouterr().out
    assert "for 20 samples" in out and "for 20 held-out test images" in out, out


def test_the_interpolation_ends_are_Gs_samples_of_the_end_z(tmp_path, tiny_mnist_root):
    dcgan = load_folder("DCGAN")
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    checkpoint = load_checkpoint(run)
    for weights in checkpoint["G"].values():  # after one step G's images barely depend on z; now they do
        weights.mul_(20 if weights.dim() > 1 else 1)
    torch.save(checkpoint, run / "checkpoints" / "last.pt")
    assert run_main(dcgan.model, run, "--interpolate", "--rows", 2, "--steps", 5, "--seed", 7, "--out",
                    tmp_path / "walk.png", "--device", "cpu") == 0
    G = dcgan.model.Generator(32, 1, checkpoint["args"]["z_dim"], checkpoint["args"]["width"])
    G.load_state_dict(checkpoint["G"])
    torch.manual_seed(7)
    ends = dcgan.model.sample(G, dcgan.model.sample_z(4, checkpoint["args"]["z_dim"])).add(1).div(2)
    ends = ends.mul(255).add(0.5).clamp(0, 255).to(torch.uint8)  # as the PNG stores them
    assert (ends[0].int() - ends[1].int()).abs().max() > 50
    grid = Image.open(tmp_path / "walk.png").convert("RGB")
    for row in range(2):  # row r walks from the (2r)-th to the (2r + 1)-th z
        for column, end in ((0, ends[2 * row]), (4, ends[2 * row + 1])):
            difference = (cell(grid, row, column, 32)[:1].int() - end.int()).abs().max()
            assert difference <= 1, (row, column, difference)


def test_the_circle_is_refused_for_a_uniform_prior_and_the_neighbours_are_training_images(tmp_path, capsys,
                                                                                            tiny_mnist_root):
    dcgan, wgan = load_folder("DCGAN"), load_folder("WGAN")
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 1)
    assert "--path circle" in exits_2(capsys, dcgan.model, run, "--interpolate", "--path", "circle", "--out",
                                      tmp_path / "circle.png")
    assert not (tmp_path / "circle.png").exists()
    gaussian = quick_run("WGAN", tiny_mnist_root, tmp_path / "wgan", "--max-steps", 1)
    assert run_main(wgan.model, gaussian, "--interpolate", "--path", "circle", "--out", tmp_path / "circle.png",
                    "--device", "cpu") == 0
    assert "--num" in exits_2(capsys, dcgan.model, run, "--nearest", "--num", 4, "--out", tmp_path / "n.png")
    assert "--data-root" in exits_2(capsys, dcgan.model, run, "--nearest", "--data-root", tmp_path / "nowhere",
                                    "--out", tmp_path / "n.png")
    assert run_main(dcgan.model, run, "--nearest", "--rows", 2, "--pairs", 2, "--compare", 4, "--device", "cpu",
                    "--out", tmp_path / "nearest.png") == 0
    training = dcgan.dataset.load_images("mnist", tiny_mnist_root, 32)
    grid = Image.open(tmp_path / "nearest.png").convert("RGB")
    for row in range(2):
        for column in (1, 3):  # each sample's right-hand neighbour is a training image, pixel for pixel
            image = cell(grid, row, column, 32)[:1]
            assert (training == image).flatten(1).all(1).any(), (row, column)
