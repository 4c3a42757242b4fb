"""The networks of the MNIST experiment of Goodfellow et al. 2014 (arXiv 1406.2661, §5),
their initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --num 100 --out grid.png          # one 10x10 grid
    python model.py runs/RUN --num 500 --out samples/ --single  # 500 PNG files

§5: "The generator nets used a mixture of rectifier linear activations and sigmoid
activations, while the discriminator net used maxout activations. Dropout was applied
in training the discriminator net." Noise enters G only at its bottom layer. The
widths, the noise and the initialisation are the official code's (goodfeli/adversarial,
mnist.yaml): the paper does not print them.
"""
import argparse
import errno
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

Z_DIM = 100  # official code, mnist.yaml: G's nvis = 100
G_WIDTH = 1200  # official code, mnist.yaml: G's two RectifiedLinear layers, dim 1200
D_WIDTH = 240  # official code, mnist.yaml: D's two Maxout layers, num_units 240
PIECES = 5  # official code, mnist.yaml: num_pieces 5
PIXELS = 28 * 28


def sample_z(n, z_dim=Z_DIM, device="cpu", generator=None):
    """z ~ U(-sqrt 3, sqrt 3)^100: zero mean, unit variance (official code: noise 'uniform' in mnist.yaml)."""
    return (torch.rand(n, z_dim, device=device, generator=generator) * 2 - 1) * math.sqrt(3)


class Maxout(nn.Module):
    """Maxout units (Goodfellow et al. 2013): each of `units` outputs is the max of `pieces` linear pieces.

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
            nn.Linear(z_dim, width), nn.ReLU(),
            nn.Linear(width, width), nn.ReLU(),
            nn.Linear(width, PIXELS), nn.Sigmoid())

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
            nn.Dropout(0.2), Maxout(PIXELS, width, pieces),
            nn.Dropout(0.5), Maxout(width, width, pieces),
            nn.Dropout(0.5), nn.Linear(width, 1))

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


# >>> copied: files and errors >>>
FOLDER = "simpleGAN"  # per-folder
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
    G = Generator(args["z_dim"], args["g_width"])
    G.load_state_dict(checkpoint["G"])
    return G.to(device).eval()


def main(argv=None):
    parser = FlagParser(description="Sample images from a simpleGAN checkpoint.")
    add_sampling_flags(parser, num_help="how many images (default: 100)")
    args, checkpoint = read_sampling_flags(parser, argv)
    num = args.num or 100
    try:
        G = load_generator(checkpoint, args.device)
    except (KeyError, RuntimeError) as error:  # weights of other networks
        parser.error(f"{args.run}: the checkpoint's G does not fit simpleGAN's generator "
                     f"({str(error).strip().splitlines()[0]})")

    torch.manual_seed(args.seed)
    images = sample(G, sample_z(num, checkpoint["args"]["z_dim"], device=args.device))
    write_images(images, args.out, args.single, nrow=int(math.ceil(math.sqrt(num))))
    print(f"wrote {num} samples of step {checkpoint['step']} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
