"""SN-DCGAN's networks: the "standard CNN" of Miyato et al. 2018 (arXiv 1802.05957, Table 3)
with spectral normalisation (§2.1, Eq. 8; Appendix A, Algorithm 1) on every layer of D, and
sampling from a checkpoint.

    python model.py runs/RUN --num 64 --out grid.png      # one grid
    python model.py runs/RUN --num 500 --out samples/ --single   # 500 PNG files
    python model.py runs/RUN --checkpoint best            # the best FID of --eval-every

D: every weight W (a convolution's d_out x d_in x h x w kernel read as a d_out x (d_in h w)
matrix, §4) is used as W / sigma(W), with sigma(W) estimated by one round of the power
method per training forward from a persistent vector u (Eq. 20-22). No batch norm in D.
G: the DCGAN-style generator of Table 3, with batch norm, and no spectral normalisation.
"""
import argparse
import errno
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

Z_DIM = 128  # §4: "We set d_z to 128 for all of our experiments"
WIDTH = 64  # Table 3: D's first layers have 64 channels; G's 4x4x512 ends at 64 before the output conv
SLOPE = 0.1  # Table 3: "The slopes of all lReLU functions in the networks are set to 0.1"


def sample_z(n, z_dim=Z_DIM, device="cpu"):
    """§4: z ~ N(0, I), 128-dimensional."""
    return torch.randn(n, z_dim, device=device)


def bottom_width(image_size):
    """Table 3: G starts and D ends at M/8 x M/8 (M_g = 4 for 32 px CIFAR-10, 6 for 48 px STL-10)."""
    if image_size < 8 or image_size % 8:
        raise ValueError(f"image size must be a multiple of 8, got {image_size}")
    return image_size // 8


def init_weights(module):
    """Official code (chainer-gan-lib common/net.py): weights ~ N(0, 0.02), biases 0; batch norm gamma 1, beta 0.

    The paper names no initialisation.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def sn(layer):
    """Eq. 8: W_SN = W / sigma(W), one power iteration per training forward (Alg. 1, Eq. 20-22).

    u and v are buffers: they persist between forwards (Appendix A's "recycle" of u) and are
    saved with the model. In eval() no power iteration runs and u, v stay as they are.
    The weight is initialised first, so that the 15 warm-up power iterations PyTorch runs when
    it attaches the normalisation start u from the weight that training will use.
    """
    init_weights(layer)
    return spectral_norm(layer, n_power_iterations=1)


class Generator(nn.Module):
    """Table 3 (a): z -> dense M_g x M_g x 512 -> 4x4 stride-2 deconvs BN ReLU to 256, 128, 64 -> 3x3 conv, tanh."""

    def __init__(self, image_size=32, channels=3, z_dim=Z_DIM, width=WIDTH):
        super().__init__()
        self.bottom, self.top = bottom_width(image_size), 8 * width
        # Table 3: dense -> M_g x M_g x 512; batch norm and ReLU after it (official code: bn0, relu)
        self.project = nn.Sequential(nn.Linear(z_dim, self.top * self.bottom ** 2, bias=False),
                                     nn.BatchNorm1d(self.top * self.bottom ** 2), nn.ReLU())
        layers = []
        for c in (8 * width, 4 * width, 2 * width):
            # Table 3: 4x4, stride=2 deconv. BN ReLU (padding 1 exactly doubles the size; no bias before BN)
            layers += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1, bias=False), nn.BatchNorm2d(c // 2),
                       nn.ReLU()]
        # Table 3: 3x3, stride=1 conv. 3 Tanh (C channels: 1 for MNIST)
        layers += [nn.Conv2d(width, channels, 3, stride=1, padding=1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z):
        return self.net(self.project(z).view(-1, self.top, self.bottom, self.bottom))


class Discriminator(nn.Module):
    """Table 3 (b): seven convolutions and a dense layer, lReLU(0.1), spectral norm on all eight, no batch norm.

    Returns the logit f(x) (Eq. 1, before the activation A of Eq. 2): the standard loss applies
    the sigmoid inside BCEWithLogitsLoss, the hinge loss uses f(x) itself.
    """

    # Table 3 (b), top to bottom: (kernel, stride, output channels as a multiple of the width 64)
    LAYERS = ((3, 1, 1), (4, 2, 1), (3, 1, 2), (4, 2, 2), (3, 1, 4), (4, 2, 4), (3, 1, 8))

    def __init__(self, image_size=32, channels=3, width=WIDTH):
        super().__init__()
        layers, c = [], channels
        for kernel, stride, multiple in self.LAYERS:
            # padding 1: the 3x3 stride-1 convs keep the size, the 4x4 stride-2 convs halve it exactly
            layers += [sn(nn.Conv2d(c, multiple * width, kernel, stride=stride, padding=1)), nn.LeakyReLU(SLOPE)]
            c = multiple * width
        self.net = nn.Sequential(*layers)
        # Table 3: dense -> 1, on the flattened M/8 x M/8 x 512 features; normalised like every other layer
        self.logit = sn(nn.Linear(c * bottom_width(image_size) ** 2, 1))

    def forward(self, x):
        return self.logit(self.net(x).flatten(1)).squeeze(1)

    def normalized_layers(self):
        """(name, layer) of the eight spectrally normalised layers, in Table 3's order: conv1..conv7, dense."""
        convs = [m for m in self.net if isinstance(m, nn.Conv2d)]
        return [*((f"conv{i}", m) for i, m in enumerate(convs, 1)), ("dense", self.logit)]


@torch.no_grad()
def normalized_sigmas(D):
    """The largest singular value of each normalised weight W / sigma(W) (Appendix C.1, Fig. 9: near 1).

    Read in eval mode, so no power iteration runs and u, v stay untouched: logging never changes training.
    Exact, and cheaper than an SVD: sigma(W) is the square root of the largest eigenvalue of the
    smaller of W W^T and W^T W (computed in float64).
    """
    was_training = D.training
    D.eval()
    sigmas = {}
    for name, layer in D.normalized_layers():
        W = layer.weight.flatten(1).double()
        gram = W @ W.T if W.shape[0] <= W.shape[1] else W.T @ W
        sigmas[name] = torch.linalg.eigvalsh(gram)[-1].sqrt()
    D.train(was_training)
    return sigmas


@torch.no_grad()
def sample(G, z):
    """G(z) in eval mode (batch norm uses its running statistics and updates none), in [-1, 1]."""
    was_training = G.training
    G.eval()
    images = G(z)
    G.train(was_training)
    return images


# >>> copied: files and errors >>>
FOLDER = "SN-DCGAN"  # per-folder
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
    parser = FlagParser(description="Sample images from a SN-DCGAN checkpoint.")
    add_sampling_flags(parser, num_help="how many images (default: 64)")
    args, checkpoint = read_sampling_flags(parser, argv)
    num = args.num or 64
    try:
        G = load_generator(checkpoint, args.device)
    except (KeyError, RuntimeError) as error:  # weights of other networks
        parser.error(f"{args.run}: the checkpoint's G does not fit SN-DCGAN's generator "
                     f"({str(error).strip().splitlines()[0]})")

    torch.manual_seed(args.seed)
    images = sample(G, sample_z(num, checkpoint["args"]["z_dim"], args.device)).add(1).div(2)
    write_images(images, args.out, args.single, nrow=int(math.ceil(math.sqrt(num))))
    print(f"wrote {num} samples of step {checkpoint['step']} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
