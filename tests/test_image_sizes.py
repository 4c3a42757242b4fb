"""The convolutional folders take --image-size as any power of two from 32 to 256: each doubling
adds one stride-2 layer to G and to D, whose filters double per layer up to the 64 px network's
deepest and then stay constant."""

import pytest
import torch
from torch import nn

from conftest import CONVOLUTIONAL, load_checkpoint, load_folder, quick_run

SIZES = (32, 64, 128, 256)


def networks(folder, size, channels=1, width=4):
    model = load_folder(folder).model
    D = (getattr(model, "Critic", None) or model.Discriminator)(size, channels, width=width)
    return model, model.Generator(size, channels, width=width), D


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_every_size_builds_g_and_d_of_that_size(folder, size):
    model, G, D = networks(folder, size, channels=3)
    G.eval()
    images = G(model.sample_z(2))
    assert images.shape == (2, 3, size, size)
    assert D(images).shape == (2,)


@pytest.mark.parametrize("folder", ("DCGAN", "WGAN", "WGAN-GP"))
def test_a_doubling_adds_one_layer_and_no_wider_one(folder):
    for size in SIZES:
        _, _, D = networks(folder, size, width=4)
        convs = [m.out_channels for m in D.net.modules() if isinstance(m, nn.Conv2d)]
        depth = size.bit_length() - 3  # stride-2 layers from 4x4 up to the image: log2(size) - 2
        assert convs == [4 * 2 ** min(i, 3) for i in range(depth)], (size, convs)


def test_the_papers_sizes_keep_their_networks():
    """32 and 64 px are the networks the papers and official codes name (DCGAN Fig. 1: 1024
    feature maps at 4x4)."""
    model = load_folder("DCGAN").model
    G = model.Generator(64, 3, width=128)
    assert G.top == 1024
    convs = [m.out_channels for m in G.net if isinstance(m, nn.ConvTranspose2d)]
    assert convs == [512, 256, 128, 3]


# Every folder trains at 128 px, the first size beyond the papers'; at 256 px, one folder stands for
# all (the layers are built by the same loop; G and D of every folder at 256 px are run above): a
# run's cost there is its 64-image grid of 256 px images, written as PNG, event and animation.
LARGE = [(folder, 128) for folder in CONVOLUTIONAL] + [("DCGAN", 256)]


@pytest.mark.parametrize("folder, size", LARGE)
def test_a_large_size_trains_a_step_and_samples(folder, size, tiny_mnist_root, tmp_path):
    flags = ["--image-size", size, "--max-steps", 1]
    checkpoint = load_checkpoint(quick_run(folder, tiny_mnist_root, tmp_path / "run", *flags))
    assert checkpoint["step"] == 1 and checkpoint["args"]["image_size"] == size
    model, G, _ = networks(folder, size, width=checkpoint["args"]["width"])
    G.load_state_dict(checkpoint["G"])
    G.eval()
    with torch.no_grad():
        images = model.sample(G, model.sample_z(2, checkpoint["args"]["z_dim"]))
    assert images.shape[-2:] == (size, size)
