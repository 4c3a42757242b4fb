"""SN-DCGAN's networks: the "standard CNN" of Miyato et al. 2018 (arXiv 1802.05957, Table 3)
with spectral normalisation (§2.1, Eq. 8; Appendix A, Algorithm 1) on every layer of D, and
sampling from a checkpoint.

    python model.py runs/RUN --num 64 --out grid.png      # one grid
    python model.py runs/RUN --num 500 --out samples/ --single   # 500 PNG files
    python model.py runs/RUN --checkpoint best            # the best FID of --eval-every

D: every weight W (a convolution's d_out x d_in x h x w kernel read as a d_out x (d_in h w)
matrix, §4) is used as W / sigma(W), with sigma(W) estimated by one round of the power
method per training forward from a persistent vector u (Eq. 20-22). No batch norm in D.
With spectral=False (train.py --no-sn) D is the same network with plain weights, the baseline
of Fig. 3.
G: the DCGAN-style generator of Table 3, with batch norm, and no spectral normalisation.
"""

import sys

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import support
from dataset import run_images

FOLDER = "SN-DCGAN"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 128  # §4: "We set d_z to 128 for all of our experiments"
# Table 3: D's first layers have 64 channels; G's 4x4x512 ends at 64 before the output conv
WIDTH = 64
SLOPE = 0.1  # Table 3: "The slopes of all lReLU functions in the networks are set to 0.1"


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """§4: z ~ N(0, I), 128-dimensional."""
    return torch.randn(n, z_dim, device=device)


def bottom_width(image_size):
    """Table 3: G starts and D ends at M/8 x M/8 (M_g = 4 for 32 px CIFAR-10, 6 for 48 px
    STL-10)."""
    if image_size < 8 or image_size % 8:
        raise ValueError(f"image size must be a multiple of 8, got {image_size}")
    return image_size // 8


def init_weights(module):
    """Official code (chainer-gan-lib common/net.py): weights ~ N(0, 0.02), biases 0; batch norm
    gamma 1, beta 0.

    The paper names no initialisation.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def sn(layer, spectral=True):
    """Eq. 8: W_SN = W / sigma(W), one power iteration per training forward (Alg. 1, Eq. 20-22);
    or W itself.

    u and v are buffers: they persist between forwards (Appendix A's "recycle" of u) and are
    saved with the model. In eval() no power iteration runs and u, v stay as they are.
    The weight is initialised first, so that the 15 warm-up power iterations PyTorch runs when
    it attaches the normalisation start u from the weight that training will use.
    """
    init_weights(layer)
    return spectral_norm(layer, n_power_iterations=1) if spectral else layer


class Generator(nn.Module):
    """Table 3 (a): z -> dense M_g x M_g x 512 -> 4x4 stride-2 deconvs BN ReLU to 256, 128, 64
    -> 3x3 conv, tanh."""

    def __init__(self, image_size=32, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        self.bottom, self.top = bottom_width(image_size), 8 * width
        # Table 3: dense -> M_g x M_g x 512; batch norm and ReLU after it (official code: bn0, relu)
        self.project = nn.Sequential(
            nn.Linear(z_dim, self.top * self.bottom**2, bias=False),
            nn.BatchNorm1d(self.top * self.bottom**2),
            nn.ReLU(),
        )
        layers = []
        for c in (8 * width, 4 * width, 2 * width):
            # Table 3: 4x4, stride=2 deconv. BN ReLU (padding 1 exactly doubles the size; no
            # bias before BN)
            layers += [
                nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c // 2),
                nn.ReLU(),
            ]
        # Table 3: 3x3, stride=1 conv. 3 Tanh (C channels: 1 for MNIST)
        layers += [nn.Conv2d(width, channels, 3, stride=1, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z):
        return self.net(self.project(z).view(-1, self.top, self.bottom, self.bottom))


class Discriminator(nn.Module):
    """Table 3 (b): seven convolutions and a dense layer, lReLU(0.1), spectral norm on all eight,
    no batch norm.

    Returns the logit f(x) (Eq. 1, before the activation A of Eq. 2): the standard loss applies
    the sigmoid inside BCEWithLogitsLoss, the hinge loss uses f(x) itself.
    """

    # Table 3 (b), top to bottom: (kernel, stride, output channels as a multiple of the width 64)
    LAYERS = ((3, 1, 1), (4, 2, 1), (3, 1, 2), (4, 2, 2), (3, 1, 4), (4, 2, 4), (3, 1, 8))

    def __init__(self, image_size=32, channels=3, width=WIDTH, spectral=True):
        super().__init__()
        layers, c = [], channels
        for kernel, stride, multiple in self.LAYERS:
            # padding 1: the 3x3 stride-1 convs keep the size, the 4x4 stride-2 ones halve it
            layers += [
                sn(nn.Conv2d(c, multiple * width, kernel, stride, padding=1), spectral),
                nn.LeakyReLU(SLOPE),
            ]
            c = multiple * width
        self.net = nn.Sequential(*layers)
        # Table 3: dense -> 1, on the flattened M/8 x M/8 x 512 features; normalised like the rest
        self.logit = sn(nn.Linear(c * bottom_width(image_size) ** 2, 1), spectral)

    def forward(self, x):
        return self.logit(self.net(x).flatten(1)).squeeze(1)

    def normalized_layers(self):
        """(name, layer) of the eight layers with weights, normalised unless spectral=False:
        conv1..conv7, dense."""
        convs = [m for m in self.net if isinstance(m, nn.Conv2d)]
        return [*((f"conv{i}", m) for i, m in enumerate(convs, 1)), ("dense", self.logit)]


@torch.no_grad()
def singular_values(D):
    """Each layer's singular values, largest first (Fig. 3), of the weight its forward uses:
    W / sigma(W), or W with spectral=False; a convolution's W read as d_out x (d_in h w) (§4).
    Read in eval mode, so no power iteration runs and u, v stay untouched: logging never changes
    training. Exact, and cheaper than an SVD: the square roots of the eigenvalues of the smaller
    of W W^T and W^T W (computed in float64)."""
    was_training = D.training
    D.eval()
    values = {}
    for name, layer in D.normalized_layers():
        W = layer.weight.flatten(1).double()
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        values[name] = torch.linalg.eigvalsh(gram).flip(0).clamp(min=0).sqrt()
    D.train(was_training)
    return values


def normalized_sigmas(D):
    """The largest singular value of each layer's weight (Appendix C.1, Fig. 9: near 1 for
    W / sigma(W))."""
    return {name: values[0] for name, values in singular_values(D).items()}


@torch.no_grad()
def sample(G, z):
    """G(z) in eval mode (batch norm uses its running statistics and updates none), in [-1, 1]."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


def main(argv=None):
    parser = support.sampling_parser("Sample images from a SN-DCGAN checkpoint.")
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
