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
import sys

import torch
import torch.nn.functional as F
from torch import nn

import support
from dataset import load_labelled, split_validation

FOLDER = "CGAN"  # the name checkpoints carry; support.py reads only this folder's

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


def main(argv=None):
    parser = support.sampling_parser("Sample digits from a conditional GAN checkpoint.",
                                     num_help="images of --digit (default 64), or images per row of the per-digit "
                                              "grid (default 10)")
    parser.add_argument("--digit", type=int, default=None,
                        help="draw only this class (0-9); default: one row per digit, 0 to 9")
    parser.add_argument("--sampling-dropout", action=support.ON_OFF, default=True,
                        help="keep G's dropout on, as in training and in train.py's grids and --evaluate "
                             "(default: on; --no-sampling-dropout samples in eval mode)")
    args, checkpoint = support.read_sampling_flags(parser, argv, FOLDER)
    if args.digit is not None and not 0 <= args.digit < CLASSES:
        parser.error(f"--digit must be one of 0 to {CLASSES - 1}, got {args.digit}")
    run = checkpoint["args"]
    G = support.load_weights(parser, Generator(run["z_dim"], CLASSES, run["image_size"], run["dropout"]),
                             checkpoint["G"], args.run).to(args.device)
    # z and G's dropout masks both come from --seed
    torch.manual_seed(args.seed)
    draw = (lambda z, labels: sample(G, z, labels, args.sampling_dropout))
    draw_z = (lambda n: sample_z(n, run["z_dim"], args.device))
    if args.interpolate or args.nearest:
        # row r holds digit r mod 10; the training set is the run's, without its validation split
        return support.inspect(args, checkpoint, draw, draw_z, lambda root: split_validation(*load_labelled(
            run["dataset"], root, run["image_size"], download=False), run["valid_size"])[0][0],
                               labels=lambda rows: rows % CLASSES)
    if args.digit is None:
        z, labels = grid_inputs(args.num or 10, run["z_dim"], args.device)
    else:
        z, labels = draw_z(args.num or 64), torch.full((args.num or 64,), args.digit, device=args.device)
    per_row = len(z) // CLASSES if args.digit is None else None  # one row per digit, or a square grid
    support.write_images(draw, (z, labels), args.out, args.single, per_row, step=checkpoint["step"],
                         names=[f"{i:05d}_digit{y}.png" for i, y in enumerate(labels.tolist())])


if __name__ == "__main__":
    sys.exit(main())
