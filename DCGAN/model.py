"""DCGAN's networks (Radford, Metz & Chintala 2015, arXiv 1511.06434, §3 and Fig. 1),
their initialisation (§4), and sampling from a checkpoint.

    python model.py runs/RUN --num 64 --out grid.png      # one grid
    python model.py runs/RUN --num 500 --out samples/ --single   # 500 PNG files
    python model.py runs/RUN --checkpoint best            # the best FID of --eval-every
    python model.py runs/RUN --interpolate                # Fig. 4: each row walks through 9 z

The §3 guidelines, each visible below: strided convolutions instead of pooling,
batch norm in both networks except G's output and D's input layer, no hidden
fully connected layers, ReLU in G with tanh at the output, LeakyReLU in D.
"""

import math
import sys

import torch
from torch import nn

import support
from dataset import run_images

FOLDER = "DCGAN"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 100  # Fig. 1: "a 100 dimensional uniform distribution Z"
WIDTH = 128  # Fig. 1: G's last hidden layer has 128 channels (1024 at 4x4 for 64 px)


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """Fig. 1: z ~ U(-1, 1)^100 (official code: np_rng.uniform(-1., 1.))."""
    return torch.rand(n, z_dim, device=device) * 2 - 1


def up(in_channels, out_channels):
    """Fig. 1: a 5x5 fractionally-strided convolution that exactly doubles height and width.

    No bias, as in the official code, which gives no layer one: where batch norm follows, its shift
    takes the bias's place; G's output layer has neither.
    """
    return nn.ConvTranspose2d(
        in_channels, out_channels, 5, stride=2, padding=2, output_padding=1, bias=False
    )


def down(in_channels, out_channels):
    """§3: a 5x5 stride-2 convolution in place of pooling; it exactly halves height and width.

    No bias, as in the official code: D's input layer has neither a bias nor batch norm.
    """
    return nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=2, bias=False)


def stages(image_size):
    """Stride-2 layers between 4x4 and the image: 4 at 64 px (Fig. 1), 3 at 32 px."""
    if image_size not in (32, 64, 128, 256):
        raise ValueError(f"image size must be 32, 64, 128 or 256, got {image_size}")
    return int(math.log2(image_size)) - 2


def filters(width, i):
    """Feature maps i stride-2 layers in from the image: doubling up to 8 * width (64 px's
    deepest), then constant."""
    return width * 2 ** min(i, 3)


class Generator(nn.Module):
    """Fig. 1: z -> project and reshape to 4x4x1024 -> 8x8x512 -> 16x16x256 -> 32x32x128
    -> 64x64xC."""

    def __init__(self, image_size=64, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        top = filters(width, n - 1)
        self.top = top
        # Fig. 1 "project and reshape"; batch norm on the projected vector (official code)
        self.project = nn.Sequential(
            nn.Linear(z_dim, top * 4 * 4, bias=False), nn.BatchNorm1d(top * 4 * 4), nn.ReLU()
        )
        layers = []
        for i in reversed(range(1, n)):
            c, c_out = filters(width, i), filters(width, i - 1)
            layers += [up(c, c_out), nn.BatchNorm2d(c_out), nn.ReLU()]
        # §3: no batch norm on G's output layer, and tanh there
        layers += [up(width, channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.project(z).view(-1, self.top, 4, 4))


class Discriminator(nn.Module):
    """Official code (the paper gives no widths): C -> 128 -> 256 -> 512 -> 1024 at 4x4 -> 1 logit.

    Returns logits; the sigmoid lives in the loss (BCEWithLogitsLoss), which is
    numerically stable where sigmoid + log is not.
    """

    def __init__(self, image_size=64, channels=3, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        # §3: no batch norm on D's input layer
        layers = [down(channels, width), nn.LeakyReLU(0.2)]
        for i in range(n - 1):
            c, c_out = filters(width, i), filters(width, i + 1)
            layers += [down(c, c_out), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        # §3: no hidden fully connected layer; the last conv features are flattened into one logit
        self.logit = nn.Linear(filters(width, n - 1) * 4 * 4, 1, bias=False)

    def forward(self, x):
        return self.logit(self.net(x).flatten(1)).squeeze(1)


def init_weights(module):
    """§4: weights ~ N(0, 0.02); batch norm gamma ~ N(1, 0.02), beta = 0 (official code)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def sample(G, z):
    """G(z) in eval mode (batch norm uses its running statistics and updates none), in [-1, 1]."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def main(argv=None):
    parser = support.sampling_parser("Sample images from a DCGAN checkpoint.")
    # Fig. 4: each row walks through a series of 9 random z, 4 steps from one to the next
    parser.set_defaults(points=9, steps=33)
    args, checkpoint = support.read_sampling_flags(parser, argv, FOLDER)
    run = checkpoint["args"]
    G = Generator(run["image_size"], run["channels"], run["z_dim"], run["width"])
    G = support.load_weights(parser, G, checkpoint["G"], args.run).to(args.device)
    torch.manual_seed(args.seed)

    def draw(z):
        return sample(G, z).add(1).div(2)

    def draw_z(n):
        return sample_z(n, run["z_dim"], args.device)

    if args.interpolate or args.nearest:
        data_set = run_images(run, download=False)  # the run's own data, where it is
        return support.inspect(args, checkpoint, draw, draw_z, data_set)
    num = args.num or 64
    support.write_images(draw, (draw_z(num),), args.out, args.single, step=checkpoint["step"])


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
