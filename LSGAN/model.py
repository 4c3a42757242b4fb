"""LSGAN's networks (Mao et al. 2017, arXiv 1611.04076, ICCV version, §3.3 and its figure of
the 112x112 scene model), their initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --num 64 --out grid.png      # one grid
    python model.py runs/RUN --num 500 --out samples/ --single   # 500 PNG files
    python model.py runs/RUN --checkpoint best            # the best FID of --eval-every

§3.3: G follows DCGAN with two extra stride-1 deconvolutions after its top two deconvolutions
(motivated by VGG); D is DCGAN's discriminator with the least squares loss in place of the
sigmoid cross entropy, so D ends in a plain linear unit: no sigmoid anywhere in D. ReLU in G,
LeakyReLU(0.2) in D, batch norm in both except D's input layer and G's output layer.

At 112x112 (the figure; width 64):
    G: z (1024) -> fc 7x7x256 -> deconv 3x3/2 256 -> deconv 3x3/1 256 -> deconv 3x3/2 256
       -> deconv 3x3/1 256 -> deconv 3x3/2 128 -> deconv 3x3/2 64 -> deconv 3x3/1 C, tanh
    D: conv 5x5/2 64 -> conv 5x5/2 128 -> conv 5x5/2 256 -> conv 5x5/2 512 -> fc 1 (linear)
The same layers serve any size divisible by 16: G starts at size/16 (2x2 at 32 px, 4x4 at
64 px, 7x7 at 112 px) and D's four stride-2 convolutions end there.
"""

import sys

import torch
from torch import nn

import support
from dataset import run_images

FOLDER = "LSGAN"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 1024  # figure: z is 1024-dimensional (official code: z_dim 1024, np.random.uniform(-1, 1))
# official code: gf_dim = df_dim = 64; G's widths 256-256-256-256-128-64, D's 64-128-256-512
WIDTH = 64


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """z ~ U(-1, 1)^1024 (official code: np.random.uniform(-1, 1, [batch_size, z_dim]))."""
    return torch.rand(n, z_dim, device=device) * 2 - 1


def deconv(in_channels, out_channels, stride, bias=False):
    """The figure's 3x3 deconvolution: stride 2 exactly doubles height and width, stride 1
    keeps them.

    No bias where batch norm follows: its shift replaces the bias.
    """
    return nn.ConvTranspose2d(
        in_channels, out_channels, 3, stride=stride, padding=1, output_padding=stride - 1, bias=bias
    )


def conv(in_channels, out_channels, bias=False):
    """The figure's 5x5 stride-2 convolution (DCGAN's D); it exactly halves height and width."""
    return nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=2, bias=bias)


def check_image_size(image_size):
    """G starts at image_size/16 and D's four stride-2 convolutions end there: 32, 48, 64, 96,
    112, ..."""
    if image_size < 32 or image_size % 16:
        raise ValueError(
            f"image size must be a multiple of 16 and at least 32 (112 in the paper), "
            f"got {image_size}"
        )
    return image_size // 16


class Generator(nn.Module):
    """Figure (a): z -> fc s/16 x s/16 x 4w -> (deconv/2, deconv/1) x 2 at 4w -> deconv/2 2w
    -> deconv/2 w -> deconv/1 C."""

    def __init__(self, image_size=32, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        self.start = check_image_size(image_size)
        self.top = 4 * width
        # figure: fc to s/16 x s/16 x 256, batch norm, ReLU. Batch norm per channel after the
        # reshape, as in the official code (vgg.py: g_bn0 on the reshaped map); the paper does
        # not say which.
        self.project = nn.Sequential(
            nn.Linear(z_dim, self.top * self.start**2, bias=False),
            nn.Unflatten(1, (self.top, self.start, self.start)),
            nn.BatchNorm2d(self.top),
            nn.ReLU(),
        )
        layers = []
        # §3.3: each of the top two stride-2 deconvolutions is followed by an extra stride-1 one
        for stride in (2, 1, 2, 1):
            layers += [deconv(4 * width, 4 * width, stride), nn.BatchNorm2d(4 * width), nn.ReLU()]
        layers += [deconv(4 * width, 2 * width, 2), nn.BatchNorm2d(2 * width), nn.ReLU()]
        layers += [deconv(2 * width, width, 2), nn.BatchNorm2d(width), nn.ReLU()]
        # figure: the output deconvolution (stride 1, no batch norm) and tanh
        layers += [deconv(width, channels, 1, bias=True), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.project(z))


class Discriminator(nn.Module):
    """Figure (b): C -> 64 -> 128 -> 256 -> 512 (at s/16) -> fc 1, a linear output with no sigmoid.

    D(x) is an unbounded real number that the least squares loss pulls towards the codes
    a (fake) and b (real).
    """

    def __init__(self, image_size=32, channels=3, width=WIDTH):
        super().__init__()
        end = check_image_size(image_size)
        # DCGAN: no batch norm on D's input layer
        layers = [conv(channels, width, bias=True), nn.LeakyReLU(0.2)]
        for c in (width, 2 * width, 4 * width):
            layers += [conv(c, 2 * c), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        # figure: fc -> 1, fed straight into the least squares loss
        self.fc = nn.Linear(8 * width * end * end, 1)

    def forward(self, x):
        return self.fc(self.net(x).flatten(1)).squeeze(1)


def init_weights(module):
    """Official code (the paper follows DCGAN): weights N(0, 0.02), D's convolutions truncated
    at 2 sigma; biases 0; batch norm gamma 1, beta 0 (tf.contrib batch_norm defaults)."""
    if isinstance(module, nn.Conv2d):
        nn.init.trunc_normal_(module.weight, 0.0, 0.02, -0.04, 0.04)
    elif isinstance(module, (nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
    if (
        isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.BatchNorm2d))
        and module.bias is not None
    ):
        nn.init.zeros_(module.bias)


@torch.no_grad()
def sample(G, z):
    """G(z) in eval mode (batch norm uses its running statistics and updates none), in [-1, 1].

    The official code's sampler does the same (batch norm with train=False).
    """
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def main(argv=None):
    parser = support.sampling_parser("Sample images from a LSGAN checkpoint.")
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
