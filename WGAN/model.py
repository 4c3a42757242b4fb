"""WGAN's networks (Arjovsky, Chintala & Bottou 2017, arXiv 1701.07875, §4 and Fig. 3),
their initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --num 64 --out grid.png      # one grid
    python model.py runs/RUN --num 500 --out samples/ --single   # 500 PNG files
    python model.py runs/RUN --checkpoint best            # the best FID of --eval-every

§4 trains "a standard DCGAN" generator against a critic that is "a DCGAN without the
sigmoid" (Fig. 3). The paper gives no layer sizes; they come from the official code
(models/dcgan.py): 4x4 convolutions with stride 2 and padding 1, no biases, batch
norm in both networks except G's output and the critic's input layer, width 64
(512 channels at 4x4 for 64 px images), and a final 4x4 convolution to one number.

§4.3 trains this critic against worse generators too (train.py --generator): Fig. 6 and 7 below.
"""

import math
import sys

import torch
from torch import nn

import support
from dataset import run_images

FOLDER = "WGAN"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 100  # official code: nz = 100
WIDTH = 64  # official code: ngf = ndf = 64 (G's last and the critic's first hidden layer)
MLP_HIDDEN, MLP_DEPTH = 512, 4  # Fig. 7: the MLP generator's 4 hidden layers of 512 units


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """z ~ N(0, 1)^100 (official code: noise.normal_(0, 1)); the paper only names a prior p(z)."""
    return torch.randn(n, z_dim, device=device)


def up(in_channels, out_channels):
    """A 4x4 transposed convolution, stride 2, padding 1, no bias: exactly doubles height and
    width (official code)."""
    return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)


def down(in_channels, out_channels):
    """A 4x4 convolution, stride 2, padding 1, no bias: exactly halves height and width (official
    code)."""
    return nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)


def stages(image_size):
    """Stride-2 layers between 4x4 and the image: 4 at 64 px (the paper's size), 3 at 32 px."""
    if image_size not in (32, 64, 128, 256):
        raise ValueError(f"image size must be 32, 64, 128 or 256, got {image_size}")
    return int(math.log2(image_size)) - 2


def filters(width, i):
    """Feature maps i stride-2 layers in from the image: doubling up to 8 * width (64 px's
    deepest), then constant."""
    return width * 2 ** min(i, 3)


class Generator(nn.Module):
    """The DCGAN generator of the official code: z -> 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64
    -> 64x64xC."""

    def __init__(self, image_size=64, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        top = filters(width, n - 1)
        # z seen as a 1x1 image, projected to 4x4 by a 4x4 transposed convolution; BN per channel
        project = nn.ConvTranspose2d(z_dim, top, 4, stride=1, padding=0, bias=False)
        layers = [project, nn.BatchNorm2d(top), nn.ReLU()]
        for i in reversed(range(1, n)):
            c, c_out = filters(width, i), filters(width, i - 1)
            layers += [up(c, c_out), nn.BatchNorm2d(c_out), nn.ReLU()]
        # DCGAN: no batch norm on G's output layer, and tanh there
        layers += [up(width, channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(*z.shape, 1, 1))


class NoBatchNormGenerator(nn.Sequential):
    """Fig. 6: G without batch norm, `width` filters in every hidden layer: z -> 4x4xW -> ... ->
    64x64xC. The official DCGAN_G_nobn keeps DCGAN's halving filter counts; this follows the
    caption's constant count."""

    def __init__(self, image_size=64, channels=3, z_dim=Z_DIM, width=WIDTH):
        project = nn.ConvTranspose2d(z_dim, width, 4, stride=1, padding=0, bias=False)
        layers = [nn.Unflatten(1, (z_dim, 1, 1)), project, nn.ReLU()]
        for _ in range(stages(image_size) - 1):
            layers += [up(width, width), nn.ReLU()]
        super().__init__(*layers, up(width, channels), nn.Tanh())


class MLPGenerator(nn.Sequential):
    """Fig. 7: a ReLU MLP, 4 hidden layers of 512 units. As in the official MLP_G, a linear output
    and PyTorch's initialisation; MLP_G has 3 hidden layers of ngf units (512 in its README), the
    paper says 4."""

    def __init__(self, image_size=64, channels=3, z_dim=Z_DIM, hidden=MLP_HIDDEN, depth=MLP_DEPTH):
        sizes = [z_dim] + [hidden] * depth
        layers = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU()]
        super().__init__(
            *layers,
            nn.Linear(hidden, channels * image_size**2),
            nn.Unflatten(1, (channels, image_size, image_size)),
        )


GENERATORS = ("dcgan", "nobn", "mlp")  # §4.3: Fig. 5, 6 and 7


def build_generator(run):
    """G as a run's arguments (train.py's, or a checkpoint's "args") name it (§4.3)."""
    name = run["generator"]
    if name == "mlp":
        return MLPGenerator(run["image_size"], run["channels"], run["z_dim"])
    network = NoBatchNormGenerator if name == "nobn" else Generator
    return network(run["image_size"], run["channels"], run["z_dim"], run["width"])


class Critic(nn.Module):
    """f_w of the paper: the DCGAN discriminator without the sigmoid (Fig. 3), one number per image.

    C -> 64 -> 128 -> 256 -> 512 at 4x4 -> 1 (official code). The output is linear: the
    critic scores, it does not classify, so there is no sigmoid anywhere, not even in the loss.
    """

    def __init__(self, image_size=64, channels=3, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        # DCGAN: no batch norm on the critic's input layer
        layers = [down(channels, width), nn.LeakyReLU(0.2)]
        for i in range(n - 1):
            c, c_out = filters(width, i), filters(width, i + 1)
            layers += [down(c, c_out), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        # official code: a 4x4 convolution without padding turns the 4x4 feature map into a number
        self.score = nn.Conv2d(filters(width, n - 1), 1, 4, stride=1, padding=0, bias=False)

    def forward(self, x):
        return self.score(self.net(x)).flatten()


def init_weights(module):
    """Official code (weights_init): conv weights ~ N(0, 0.02); batch norm gamma ~ N(1, 0.02),
    beta = 0."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
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
    parser = support.sampling_parser("Sample images from a WGAN checkpoint.")
    args, checkpoint = support.read_sampling_flags(parser, argv, FOLDER)
    run = checkpoint["args"]
    G = support.load_weights(parser, build_generator(run), checkpoint["G"], args.run)
    G.to(args.device)
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
