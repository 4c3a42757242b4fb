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
import errno
import math
import os
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


# >>> copied: files and errors >>>
FOLDER = "WGAN"  # per-folder
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
    parser = FlagParser(description="Sample images from a WGAN checkpoint.")
    add_sampling_flags(parser, num_help="how many images (default: 64)")
    args, checkpoint = read_sampling_flags(parser, argv)
    num = args.num or 64
    try:
        G = load_generator(checkpoint, args.device)
    except (KeyError, RuntimeError) as error:  # weights of other networks
        parser.error(f"{args.run}: the checkpoint's G does not fit WGAN's generator "
                     f"({str(error).strip().splitlines()[0]})")

    torch.manual_seed(args.seed)
    images = sample(G, sample_z(num, checkpoint["args"]["z_dim"], args.device)).add(1).div(2)
    write_images(images, args.out, args.single, nrow=int(math.ceil(math.sqrt(num))))
    print(f"wrote {num} samples of step {checkpoint['step']} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
