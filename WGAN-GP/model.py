"""WGAN-GP's networks: the CIFAR-10 generator and critic of the authors' code (Gulrajani et al.
2017, arXiv 1704.00028; official code: gan_cifar.py, the model behind Fig. 3), their
initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --num 64 --out grid.png      # one grid
    python model.py runs/RUN --num 500 --out samples/ --single   # 500 PNG files
    python model.py runs/RUN --checkpoint best            # the best FID of --eval-every

§4, "No critic batch normalization": the penalty is taken per input, so the critic must map
each input to its output on its own. The critic here has no normalisation at all; gan_cifar.py
uses none in its WGAN-GP critic (the paper's layer-norm recommendation is for critics that
would otherwise have batch norm, as in its §5.2 LSUN models).
"""

import math
import sys

import torch
from torch import nn

import support
from dataset import run_images

FOLDER = "WGAN-GP"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 128  # official code: gan_cifar.py, tf.random_normal([n_samples, 128])
WIDTH = 128  # official code: gan_cifar.py, DIM = 128


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """z ~ N(0, I)^128 (official code: tf.random_normal; §2.1 allows "a spherical Gaussian")."""
    return torch.randn(n, z_dim, device=device)


def up(in_channels, out_channels):
    """A 5x5 stride-2 transposed convolution that exactly doubles height and width.

    official code: Deconv2D(..., 5, ...) with 'SAME' padding, output 2H x 2W; in PyTorch that
    needs padding=2 and output_padding=1 (without output_padding, 4 -> 7 instead of 8).
    """
    return nn.ConvTranspose2d(in_channels, out_channels, 5, stride=2, padding=2, output_padding=1)


def down(in_channels, out_channels):
    """A 5x5 stride-2 convolution that exactly halves height and width (official code:
    Conv2D(..., 5, stride=2))."""
    return nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=2)


def stages(image_size):
    """Stride-2 layers between 4x4 and the image: 3 at 32 px (official code), 4 at 64 px."""
    if image_size not in (32, 64, 128, 256):
        raise ValueError(f"image size must be 32, 64, 128 or 256, got {image_size}")
    return int(math.log2(image_size)) - 2


def filters(width, i):
    """Feature maps i stride-2 layers in from the image: doubling up to 8 * width (64 px's
    deepest), then constant."""
    return width * 2 ** min(i, 3)


class Generator(nn.Module):
    """official code (gan_cifar.py): z -> linear -> 4x4x(4*DIM), BN, ReLU -> 8x8x(2*DIM)
    -> 16x16xDIM -> 32x32xC, tanh.

    At 64 px one more doubling is added in front: 4x4x(8*DIM) -> ... -> 64x64xC.
    """

    def __init__(self, image_size=32, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        top = filters(width, n - 1)
        self.top = top
        # official code: Generator.Input (linear), Generator.BN1, ReLU
        self.project = nn.Sequential(
            nn.Linear(z_dim, top * 4 * 4), nn.BatchNorm1d(top * 4 * 4), nn.ReLU()
        )
        layers = []
        for i in reversed(range(1, n)):
            c, c_out = filters(width, i), filters(width, i - 1)
            # official code: Generator.2, Generator.3: transposed conv, batch norm, ReLU
            layers += [up(c, c_out), nn.BatchNorm2d(c_out), nn.ReLU()]
        # official code: Generator.5, no batch norm, tanh
        layers += [up(width, channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.project(z).view(-1, self.top, 4, 4))


class Critic(nn.Module):
    """official code (gan_cifar.py, MODE 'wgan-gp'): C -> DIM -> 2*DIM -> 4*DIM at 4x4,
    lrelu(0.2), linear -> 1.

    §4: no batch norm (and no other normalisation), so D(x)_i depends on x_i alone. The output
    is an unbounded score, not a probability: there is no sigmoid.
    """

    def __init__(self, image_size=32, channels=3, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        layers = []
        for i in range(n):
            c_in = channels if i == 0 else filters(width, i - 1)
            # official code: Discriminator.1, .2, .3: conv, LeakyReLU(0.2); BN only in MODE 'wgan'
            layers += [down(c_in, filters(width, i)), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        # official code: Discriminator.Output, linear 4*4*4*DIM -> 1
        self.score = nn.Linear(filters(width, n - 1) * 4 * 4, 1)

    def forward(self, x):
        return self.score(self.net(x).flatten(1)).squeeze(1)


def init_weights(module):
    """The paper gives no initialisation; this is the official code's (tflib/ops/*.py).

    Weights uniform with standard deviation sqrt(4 / (fan_in + fan_out)) for (transposed)
    convolutions, where a stride-2 layer counts the low-resolution side's fan divided by 4
    (tflib's he_init), and sqrt(2 / (fan_in + fan_out)) for linear layers (tflib's Glorot
    default); biases 0; batch norm scale 1, offset 0.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        k = module.kernel_size[0] * module.kernel_size[1]
        stride2 = module.stride[0] * module.stride[1]
        fan_in, fan_out = module.in_channels * k, module.out_channels * k
        if isinstance(module, nn.Conv2d):
            fan_out /= stride2
        else:
            fan_in /= stride2
        std = math.sqrt(4.0 / (fan_in + fan_out))
    elif isinstance(module, nn.Linear):
        std = math.sqrt(2.0 / (module.in_features + module.out_features))
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
        return
    else:
        return
    # U(-a, a) has standard deviation a / sqrt(3)
    nn.init.uniform_(module.weight, -std * math.sqrt(3), std * math.sqrt(3))
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
    parser = support.sampling_parser("Sample images from a WGAN-GP checkpoint.")
    args, checkpoint = support.read_sampling_flags(parser, argv, FOLDER)
    num, run = args.num or 64, checkpoint["args"]
    G = support.load_weights(
        parser,
        Generator(run["image_size"], run["channels"], run["z_dim"], run["width"]),
        checkpoint["G"],
        args.run,
    ).to(args.device)
    torch.manual_seed(args.seed)

    def draw(z):  # G's images in [0, 1]
        return sample(G, z).add(1).div(2)

    def draw_z(n):
        return sample_z(n, run["z_dim"], args.device)

    if args.interpolate or args.nearest:
        images = run_images(run, download=False)  # (root, split) -> the run's images, as it trained
        return support.inspect(args, checkpoint, draw, draw_z, images)
    support.write_images(draw, (draw_z(num),), args.out, args.single, step=checkpoint["step"])


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
