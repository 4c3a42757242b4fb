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
import argparse
import errno
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

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
    """A 5x5 stride-2 convolution that exactly halves height and width (official code: Conv2D(..., 5, stride=2))."""
    return nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=2)


def stages(image_size):
    """Stride-2 layers between 4x4 and the image: 3 at 32 px (official code), 4 at 64 px."""
    if image_size not in (32, 64):
        raise ValueError(f"image size must be 32 or 64, got {image_size}")
    return int(math.log2(image_size)) - 2


class Generator(nn.Module):
    """official code (gan_cifar.py): z -> linear -> 4x4x(4*DIM), BN, ReLU -> 8x8x(2*DIM) -> 16x16xDIM -> 32x32xC, tanh.

    At 64 px one more doubling is added in front: 4x4x(8*DIM) -> ... -> 64x64xC.
    """

    def __init__(self, image_size=32, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        top = width * 2 ** (n - 1)
        self.top = top
        # official code: Generator.Input (linear), Generator.BN1, ReLU
        self.project = nn.Sequential(nn.Linear(z_dim, top * 4 * 4), nn.BatchNorm1d(top * 4 * 4), nn.ReLU())
        layers = []
        for i in range(n - 1):
            c = top // 2 ** i
            # official code: Generator.2, Generator.3: transposed conv, batch norm, ReLU
            layers += [up(c, c // 2), nn.BatchNorm2d(c // 2), nn.ReLU()]
        # official code: Generator.5, no batch norm, tanh
        layers += [up(width, channels), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(self.project(z).view(-1, self.top, 4, 4))


class Critic(nn.Module):
    """official code (gan_cifar.py, MODE 'wgan-gp'): C -> DIM -> 2*DIM -> 4*DIM at 4x4, lrelu(0.2), linear -> 1.

    §4: no batch norm (and no other normalisation), so D(x)_i depends on x_i alone. The output
    is an unbounded score, not a probability: there is no sigmoid.
    """

    def __init__(self, image_size=32, channels=3, width=WIDTH):
        super().__init__()
        n = stages(image_size)
        layers = []
        for i in range(n):
            c_in = channels if i == 0 else width * 2 ** (i - 1)
            # official code: Discriminator.1, .2, .3: conv, LeakyReLU(0.2); BN only in MODE 'wgan'
            layers += [down(c_in, width * 2 ** i), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        # official code: Discriminator.Output, linear 4*4*4*DIM -> 1
        self.score = nn.Linear(width * 2 ** (n - 1) * 4 * 4, 1)

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


# >>> copied: files and errors >>>
FOLDER = "WGAN-GP"  # per-folder
FORMAT = 1  # the layout of the checkpoints train.py writes; a reader refuses any other


def fail(message, code=2):
    """A one-line error and exit code 2, for a problem the user can fix (code 1: a training run diverged)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


class FlagParser(argparse.ArgumentParser):
    """argparse with a bad flag reported in one line, without the usage block; the message names the flag."""

    def error(self, message):
        fail(message)


class CheckpointError(Exception):
    """A file that is not a usable checkpoint of this folder; train.py and model.py print it and exit with 2."""


def checkpoint_path(path, which="last"):
    """A checkpoint file, or the run folder that holds it: its checkpoints/last.pt or best.pt (the best by the
    folder's metric), or with which="auto" best.pt when the run kept one, else last.pt."""
    path = Path(path)
    if not path.is_dir():
        return path
    if which == "auto":
        which = "best" if (path / "checkpoints" / "best.pt").is_file() else "last"
    return path / "checkpoints" / f"{which}.pt"


def read_checkpoint(path):
    """A checkpoint written by this folder's train.py, loaded on the CPU; anything else raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, random bytes, not a torch file, unreadable
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("folder"), str):
        raise CheckpointError(f"{path} is not a checkpoint written by a train.py of this collection")
    if checkpoint["folder"] != FOLDER:
        raise CheckpointError(f"{path} was written by {checkpoint['folder']}/train.py, not by {FOLDER}/train.py")
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('format')}; this {FOLDER}/train.py "
                              f"reads format {FORMAT}")
    return checkpoint


def check_output(parser, out, single):
    """model.py's --out: a new file for the grid, or a new or empty folder for --single; nothing is overwritten
    and nothing is created before every input is known to be good."""
    out = Path(out)
    if single and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        parser.error(f"--out {out} exists and is not an empty folder; --single needs a new or empty folder")
    if not single and out.exists():
        parser.error(f"--out {out} already exists; choose a new file name for the grid")
    parent = next(p for p in out.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: {parent} is not a writable folder")


def add_sampling_flags(parser, num_help):
    """model.py's flags, the same in every folder."""
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder, or a checkpoint file")
    parser.add_argument("--checkpoint", default="auto", choices=("auto", "best", "last"),
                        help="in a run folder: best.pt (the best checkpoint by the folder's metric, when train.py "
                             "kept one), last.pt, or auto: best.pt when the run kept one, else last.pt")
    parser.add_argument("--num", type=int, default=None, help=num_help)
    parser.add_argument("--out", default="samples.png", help="the grid's file, or a folder with --single")
    parser.add_argument("--single", action="store_true", help="write the images as separate PNG files into --out")
    parser.add_argument("--seed", type=int, default=0, help="seed for z (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")


def read_sampling_flags(parser, argv):
    """model.py's flags and the checkpoint they name, or one line naming the problem; nothing is written."""
    args = parser.parse_args(argv)
    if args.num is not None and args.num < 1:
        parser.error(f"--num must be at least 1, got {args.num}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2^32), got {args.seed}")
    if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but no CUDA GPU is visible; use --device cpu")
    check_output(parser, args.out, args.single)
    try:
        checkpoint = read_checkpoint(checkpoint_path(args.run, args.checkpoint))
    except CheckpointError as error:
        parser.error(str(error))
    return args, checkpoint


def write_images(images, out, single, nrow, names=None):
    """The grid as one PNG file, or with `single` one PNG file per image (00000.png, ... unless `names` are
    given); a failed write is one line."""
    import torchvision.utils as vutils

    out = Path(out)
    try:
        if single:
            out.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                vutils.save_image(image, out / (names[i] if names else f"{i:05d}.png"))
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            vutils.save_image(images, out, nrow=nrow, padding=2)
    except OSError as error:
        fail(f"cannot write {out}: {'the disk is full' if error.errno == errno.ENOSPC else error.strerror or error}")
# <<< copied: files and errors <<<

def load_generator(checkpoint, device="cpu"):
    """The generator of a checkpoint (as read_checkpoint returns it), in eval mode on `device`."""
    args = checkpoint["args"]
    G = Generator(args["image_size"], args["channels"], args["z_dim"], args["width"])
    G.load_state_dict(checkpoint["G"])
    return G.to(device).eval()


def main(argv=None):
    parser = FlagParser(description="Sample images from a WGAN-GP checkpoint.")
    add_sampling_flags(parser, num_help="how many images (default: 64)")
    args, checkpoint = read_sampling_flags(parser, argv)
    num = args.num or 64
    try:
        G = load_generator(checkpoint, args.device)
    except (KeyError, RuntimeError) as error:  # weights of other networks
        parser.error(f"{args.run}: the checkpoint's G does not fit WGAN-GP's generator "
                     f"({str(error).strip().splitlines()[0]})")

    torch.manual_seed(args.seed)
    images = sample(G, sample_z(num, checkpoint["args"]["z_dim"], args.device)).add(1).div(2)
    write_images(images, args.out, args.single, nrow=int(math.ceil(math.sqrt(num))))
    print(f"wrote {num} samples of step {checkpoint['step']} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
