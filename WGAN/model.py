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
"""
import argparse
import math
import sys
from pathlib import Path

import torch
from torch import nn

Z_DIM = 100  # official code: nz = 100
WIDTH = 64  # official code: ngf = ndf = 64 (G's last and the critic's first hidden layer)


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """z ~ N(0, 1)^100 (official code: noise.normal_(0, 1)); the paper only names a prior p(z)."""
    return torch.randn(n, z_dim, device=device)


def up(in_channels, out_channels):
    """A 4x4 transposed convolution, stride 2, padding 1, no bias: exactly doubles height and width (official code)."""
    return nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)


def down(in_channels, out_channels):
    """A 4x4 convolution, stride 2, padding 1, no bias: exactly halves height and width (official code)."""
    return nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False)


def stages(image_size):
    """Stride-2 layers between 4x4 and the image: 4 at 64 px (the paper's size), 3 at 32 px."""
    if image_size not in (32, 64):
        raise ValueError(f"image size must be 32 or 64, got {image_size}")
    return int(math.log2(image_size)) - 2


class Generator(nn.Module):
    """The DCGAN generator of the official code: z -> 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 64x64xC."""

    def __init__(self, image_size=64, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        top = width * 2 ** (n - 1)
        # z seen as a 1x1 image, projected to 4x4 by a 4x4 transposed convolution; batch norm per channel
        layers = [nn.ConvTranspose2d(z_dim, top, 4, stride=1, padding=0, bias=False), nn.BatchNorm2d(top), nn.ReLU()]
        for i in range(n - 1):
            c = top // 2 ** i
            layers += [up(c, c // 2), nn.BatchNorm2d(c // 2), nn.ReLU()]
        # DCGAN: no batch norm on G's output layer, and tanh there
        layers += [up(width, channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(*z.shape, 1, 1))


class Critic(nn.Module):
    """f_w of the paper: the DCGAN discriminator without the sigmoid (Fig. 3), one real number per image.

    C -> 64 -> 128 -> 256 -> 512 at 4x4 -> 1 (official code). The output is linear: the
    critic scores, it does not classify, so there is no sigmoid anywhere, not even in the loss.
    """

    def __init__(self, image_size=64, channels=3, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        # DCGAN: no batch norm on the critic's input layer
        layers = [down(channels, width), nn.LeakyReLU(0.2)]
        for i in range(n - 1):
            c = width * 2 ** i
            layers += [down(c, 2 * c), nn.BatchNorm2d(2 * c), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        # official code: a 4x4 convolution without padding turns the 4x4 feature map into one number
        self.score = nn.Conv2d(width * 2 ** (n - 1), 1, 4, stride=1, padding=0, bias=False)

    def forward(self, x):
        return self.score(self.net(x)).flatten()


def init_weights(module):
    """Official code (weights_init): conv weights ~ N(0, 0.02); batch norm gamma ~ N(1, 0.02), beta = 0."""
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


def checkpoint_path(path, which="last"):
    """A checkpoint file, or the run folder that holds checkpoints/last.pt (or best.pt, kept by --eval-every)."""
    path = Path(path)
    return path / "checkpoints" / f"{which}.pt" if path.is_dir() else path


def load_generator(path, device="cpu"):
    """The generator of a checkpoint written by train.py, and its z dimension; G in eval mode."""
    checkpoint = torch.load(checkpoint_path(path), map_location=device, weights_only=False)
    args = checkpoint["args"]
    G = Generator(args["image_size"], args["channels"], args["z_dim"], args["width"]).to(device)
    G.load_state_dict(checkpoint["G"])
    return G.eval(), args["z_dim"]


def main(argv=None):
    import torchvision.utils as vutils

    parser = argparse.ArgumentParser(description="Sample images from a WGAN checkpoint.")
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder, or a checkpoint file")
    parser.add_argument("--checkpoint", default="last", choices=("last", "best"),
                        help="which checkpoint of a run folder: last.pt, or best.pt (the best FID of "
                             "--eval-every)")
    parser.add_argument("--num", type=int, default=64, help="how many images (default: 64)")
    parser.add_argument("--out", default="samples.png", help="the grid's file, or a folder with --single")
    parser.add_argument("--single", action="store_true", help="write NUM separate PNG files into --out")
    parser.add_argument("--seed", type=int, default=0, help="seed for z (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be at least 1")
    path = checkpoint_path(args.run, args.checkpoint)
    if not path.is_file():
        parser.error(f"no checkpoint at {path}")
    try:
        G, z_dim = load_generator(path, args.device)
    except Exception as error:  # unreadable, or written by another folder's train.py
        parser.error(f"{path} is not a WGAN checkpoint ({str(error).strip().splitlines()[0]})")

    torch.manual_seed(args.seed)
    images = sample(G, sample_z(args.num, z_dim, args.device)).add(1).div(2)
    out = Path(args.out)
    if args.single:
        out.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            vutils.save_image(image, out / f"{i:05d}.png")
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        vutils.save_image(images, out, nrow=int(math.ceil(math.sqrt(args.num))), padding=2)
    print(f"wrote {args.num} samples to {out}")


if __name__ == "__main__":
    sys.exit(main())
