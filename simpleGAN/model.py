"""The networks of the MNIST experiment of Goodfellow et al. 2014 (arXiv 1406.2661, §5),
their initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --num 100 --out grid.png          # one 10x10 grid
    python model.py runs/RUN --num 500 --out samples/ --single  # 500 PNG files
    python model.py runs/RUN --nearest --out nearest.png       # Fig. 2: beside the nearest digit
    python model.py runs/RUN --interpolate --out walk.png      # Fig. 3: along lines between z

§5: "The generator nets used a mixture of rectifier linear activations and sigmoid
activations, while the discriminator net used maxout activations. Dropout was applied
in training the discriminator net." Noise enters G only at its bottom layer. The
widths, the noise and the initialisation are the official code's (goodfeli/adversarial,
mnist.yaml): the paper does not print them.
"""

import math
import sys

import torch
from torch import nn

import support
from dataset import load_images

FOLDER = "simpleGAN"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 100  # official code, mnist.yaml: G's nvis = 100
G_WIDTH = 1200  # official code, mnist.yaml: G's two RectifiedLinear layers, dim 1200
D_WIDTH = 240  # official code, mnist.yaml: D's two Maxout layers, num_units 240
PIECES = 5  # official code, mnist.yaml: num_pieces 5
PIXELS = 28 * 28


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """z ~ U(-sqrt 3, sqrt 3)^100, zero mean and unit variance (official code: noise 'uniform')."""
    return (torch.rand(n, z_dim, device=device) * 2 - 1) * math.sqrt(3)


class Maxout(nn.Module):
    """Maxout units (Goodfellow et al. 2013): each output is the max of `pieces` linear pieces.

    The pieces of unit j are the consecutive linear outputs j*pieces ... j*pieces + pieces - 1,
    as pylearn2's Maxout layer groups them.
    """

    def __init__(self, in_features, units, pieces=PIECES):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x):
        return self.linear(x).view(-1, self.units, self.pieces).amax(-1)


class Generator(nn.Module):
    """z (100) -> 1200 ReLU -> 1200 ReLU -> 784 sigmoid, reshaped to a 1x28x28 image in [0, 1]."""

    def __init__(self, z_dim=Z_DIM, width=G_WIDTH):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(z_dim, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, PIXELS),
            nn.Sigmoid(),
        )

    def forward(self, z):
        return self.net(z).view(-1, 1, 28, 28)


class Discriminator(nn.Module):
    """x (784) -> maxout 240x5 -> maxout 240x5 -> 1 logit, with dropout on every layer's input (§5).

    Dropout (official code, AdversaryCost2 in mnist.yaml): keep-probability 0.8 on the
    pixels, 0.5 on both hidden layers, with inverted scaling (pylearn2's input_scales
    1.25 and 2). nn.Dropout is inactive in eval mode, so D is deterministic there.
    Returns logits; the sigmoid lives in the loss (BCEWithLogitsLoss).
    """

    def __init__(self, width=D_WIDTH, pieces=PIECES):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(0.2),
            Maxout(PIXELS, width, pieces),
            nn.Dropout(0.5),
            Maxout(width, width, pieces),
            nn.Dropout(0.5),
            nn.Linear(width, 1),
        )

    def forward(self, x):
        return self.net(x.flatten(1)).squeeze(1)


def init_generator(G, pixel_means):
    """Official code, mnist.yaml: weights U(-0.05, 0.05) (irange .05), biases 0, and the output
    bias sigmoid^-1 of the training data's pixel means (init_sigmoid_bias_from_marginals),
    so that the untrained G already draws the average digit. Means are clipped to
    [1e-7, 1 - 1e-7] as pylearn2 does: MNIST's corner pixels are always 0."""
    for m in G.modules():
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.weight, -0.05, 0.05)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        G.net[-2].bias.copy_(torch.logit(pixel_means.flatten().double().clamp(1e-7, 1 - 1e-7)))


def init_discriminator(D):
    """Official code, mnist.yaml: weights U(-0.005, 0.005) (irange .005), biases 0."""
    for m in D.modules():
        if isinstance(m, nn.Linear):
            nn.init.uniform_(m.weight, -0.005, 0.005)
            nn.init.zeros_(m.bias)


@torch.no_grad()
def sample(G, z):
    """G(z) in eval mode, images in [0, 1]; the mode G was in is restored."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def main(argv=None):
    description = "Sample images from a simpleGAN checkpoint."
    parser = support.sampling_parser(description, num_help="how many images (default: 100)")
    args, checkpoint = support.read_sampling_flags(parser, argv, FOLDER)
    num, run = args.num or 100, checkpoint["args"]
    G = Generator(run["z_dim"], run["g_width"])
    G = support.load_weights(parser, G, checkpoint["G"], args.run).to(args.device)
    torch.manual_seed(args.seed)

    def draw(z):
        return sample(G, z)

    def draw_z(n):
        return sample_z(n, run["z_dim"], args.device)

    def images(root, split):
        """The run's "train" (train[0:50000]) or "test" split, uint8, as train.py reads it."""
        return load_images(run["dataset"], root, split, download=False)

    if args.interpolate or args.nearest:
        return support.inspect(args, checkpoint, draw, draw_z, images)
    support.write_images(draw, (draw_z(num),), args.out, args.single, step=checkpoint["step"])


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
