"""Conditional GAN's networks (Mirza & Osindero 2014, arXiv 1411.1784, §3 and §4.1),
their initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --out grid.png                     # one row per digit, 0 to 9
    python model.py runs/RUN --digit 7 --num 64 --out sevens.png
    python model.py runs/RUN --digit 3 --num 500 --out threes/ --single   # 500 PNG files
    python model.py runs/RUN --sampling-dropout --out grid.png  # G's dropout kept on while sampling

§3: "the generator and discriminator are both conditioned on some extra information
y ... by feeding y into both the discriminator and generator as additional input layer".
Here y is the class label of an MNIST digit, one-hot in 10 dimensions (§4.1).
"""
import argparse
import errno
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

Z_DIM = 100  # §4.1: "a noise prior z with dimensionality 100"
CLASSES = 10  # §4.1: MNIST "conditioned on their class labels, encoded as one-hot vectors"
IMAGE_SIZE = 28  # §4.1: "784-dimensional MNIST samples"
DROPOUT = 0.5  # §4.1: "Dropout with probability of 0.5 was applied to both the generator and discriminator"
G_IRANGE = 0.05  # official GAN code, mnist.yaml: G's weights U(-0.05, 0.05) (the CGAN paper gives no init)
D_IRANGE = 0.005  # official GAN code, mnist.yaml: D's weights U(-0.005, 0.005)


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """§4.1: z "drawn from a uniform distribution within the unit hypercube", U[0, 1]^100."""
    return torch.rand(n, z_dim, device=device)


def one_hot(labels, classes=CLASSES):
    """§4.1: class labels "encoded as one-hot vectors", as floats for the first linear layers."""
    return F.one_hot(labels, classes).float()


def grid_inputs(per_row, z_dim=Z_DIM, device="cpu"):
    """z and labels of the per-digit grid: row i holds digit i, and every column shares one z."""
    z = sample_z(per_row, z_dim, device).repeat(CLASSES, 1)
    labels = torch.arange(CLASSES, device=device).repeat_interleave(per_row)
    return z, labels


class Maxout(nn.Module):
    """A maxout layer (Goodfellow et al. 2013): `units` outputs, each the max of `pieces` linear pieces."""

    def __init__(self, in_features, units, pieces):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x):
        # the pieces of one unit are adjacent, as in pylearn2's Maxout layer
        return self.linear(x).view(-1, self.units, self.pieces).amax(dim=2)


class Generator(nn.Module):
    """§4.1: z -> 200 ReLU and y -> 1000 ReLU, joined -> 1200 ReLU -> 784 sigmoid.

    Dropout 0.5 on each hidden layer (§4.1); it is active only in training mode.
    """

    def __init__(self, z_dim=Z_DIM, classes=CLASSES, image_size=IMAGE_SIZE, dropout=DROPOUT):
        super().__init__()
        self.image_size = image_size
        # §4.1: "Both z and y are mapped to hidden layers with ReLu activation, with layer sizes 200 and 1000"
        self.z_path = nn.Sequential(nn.Linear(z_dim, 200), nn.ReLU(), nn.Dropout(dropout))
        self.y_path = nn.Sequential(nn.Linear(classes, 1000), nn.ReLU(), nn.Dropout(dropout))
        # §4.1: "... before both being mapped to second, combined hidden ReLu layer of dimensionality 1200"
        self.joint = nn.Sequential(nn.Linear(200 + 1000, 1200), nn.ReLU(), nn.Dropout(dropout))
        # §4.1: "a final sigmoid unit layer as our output for generating the 784-dimensional MNIST samples"
        self.out = nn.Linear(1200, image_size * image_size)

    def forward(self, z, y):
        h = self.joint(torch.cat([self.z_path(z), self.y_path(y)], dim=1))
        return torch.sigmoid(self.out(h)).view(-1, 1, self.image_size, self.image_size)


class Discriminator(nn.Module):
    """§4.1: x -> maxout 240 x 5 pieces and y -> maxout 50 x 5, joined -> maxout 240 x 4 -> 1.

    Returns logits; the sigmoid of §4.1's output layer lives in the loss (BCEWithLogits),
    which is numerically stable where sigmoid + log is not. Dropout 0.5 on each hidden layer.
    """

    def __init__(self, classes=CLASSES, image_size=IMAGE_SIZE, dropout=DROPOUT):
        super().__init__()
        # §4.1: "maps x to a maxout layer with 240 units and 5 pieces, and y to a maxout layer with 50 units
        # and 5 pieces"
        self.x_path = nn.Sequential(Maxout(image_size * image_size, 240, 5), nn.Dropout(dropout))
        self.y_path = nn.Sequential(Maxout(classes, 50, 5), nn.Dropout(dropout))
        # §4.1: "a joint maxout layer with 240 units and 4 pieces before being fed to the sigmoid layer"
        self.joint = nn.Sequential(Maxout(240 + 50, 240, 4), nn.Dropout(dropout))
        self.logit = nn.Linear(240, 1)

    def forward(self, x, y):
        h = self.joint(torch.cat([self.x_path(x.flatten(1)), self.y_path(y)], dim=1))
        return self.logit(h).squeeze(1)


def init_weights(net, irange):
    """Official GAN code (pylearn2 `irange`): every weight U(-irange, irange), every bias 0."""
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.uniform_(module.weight, -irange, irange)
            nn.init.zeros_(module.bias)


@torch.no_grad()
def init_output_bias(G, pixel_mean):
    """Official GAN code, mnist.yaml (init_sigmoid_bias_from_marginals): G's output bias is the
    logit of each pixel's mean over the training set (clipped to [1e-7, 1 - 1e-7]), so that the
    untrained G already draws the average digit."""
    G.out.bias.copy_(torch.logit(pixel_mean.flatten().clamp(1e-7, 1 - 1e-7)))


@torch.no_grad()
def sample(G, z, labels, dropout=False):
    """G(z, y) in eval mode (dropout off: the same z and y always give the same image), in [0, 1].

    dropout=True keeps G's dropout on, making its masks a second source of noise besides z.
    """
    was_training = G.training
    G.train(dropout)
    images = G(z, one_hot(labels, G.y_path[0].in_features))
    G.train(was_training)
    return images


# >>> copied: files and errors >>>
FOLDER = "CGAN"  # per-folder
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
    G = Generator(args["z_dim"], CLASSES, args["image_size"], args["dropout"])
    G.load_state_dict(checkpoint["G"])
    return G.to(device).eval()


def main(argv=None):
    parser = FlagParser(description="Sample digits from a conditional GAN checkpoint.")
    add_sampling_flags(parser, num_help="images of --digit (default 64), or images per row of the per-digit grid "
                                        "(default 10)")
    parser.add_argument("--digit", type=int, default=None,
                        help="draw only this class (0-9); default: one row per digit, 0 to 9")
    parser.add_argument("--sampling-dropout", action=argparse.BooleanOptionalAction, default=True,
                        help="keep G's dropout on, as in training and in train.py's grids and --evaluate "
                             "(default: on; --no-sampling-dropout samples in eval mode)")
    args, checkpoint = read_sampling_flags(parser, argv)
    if args.digit is not None and not 0 <= args.digit < CLASSES:
        parser.error(f"--digit must be one of 0 to {CLASSES - 1}, got {args.digit}")
    try:
        G = load_generator(checkpoint, args.device)
    except (KeyError, RuntimeError) as error:  # weights of other networks
        parser.error(f"{args.run}: the checkpoint's G does not fit CGAN's generator "
                     f"({str(error).strip().splitlines()[0]})")

    # z and G's dropout masks both come from --seed
    torch.manual_seed(args.seed)
    z_dim = checkpoint["args"]["z_dim"]
    if args.digit is None:
        per_row = args.num or 10
        z, labels = grid_inputs(per_row, z_dim, args.device)
    else:
        per_row = int(math.ceil(math.sqrt(args.num or 64)))
        z = sample_z(args.num or 64, z_dim, args.device)
        labels = torch.full((len(z),), args.digit, device=args.device)
    images = sample(G, z, labels, args.sampling_dropout)
    write_images(images, args.out, args.single, per_row,
                 names=[f"{i:05d}_digit{label}.png" for i, label in enumerate(labels.tolist())])
    print(f"wrote {len(images)} samples of step {checkpoint['step']} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
