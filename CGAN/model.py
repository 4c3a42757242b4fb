"""Conditional GAN's networks (Mirza & Osindero 2014, arXiv 1411.1784, §3 and §4.1),
their initialisation, and sampling from a checkpoint.

    python model.py runs/RUN --out grid.png                     # one row per digit, 0 to 9
    python model.py runs/RUN --digit 7 --num 64 --out sevens.png
    python model.py runs/RUN --digit 3 --num 500 --out threes/ --single   # 500 PNG files
    python model.py runs/RUN --no-sampling-dropout --out grid.png  # G's dropout off (eval mode)
    python model.py runs/RUN --interpolate --out walk.png       # row r: digit r mod 10, z walks

§3: "the generator and discriminator are both conditioned on some extra information
y ... by feeding y into both the discriminator and generator as additional input layer".
Here y is the class label of an MNIST digit, one-hot in 10 dimensions (§4.1).
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import support
from dataset import load_labelled

FOLDER = "CGAN"  # the name checkpoints carry; support.py reads only this folder's

Z_DIM = 100  # §4.1: "a noise prior z with dimensionality 100"
CLASSES = 10  # §4.1: MNIST "conditioned on their class labels, encoded as one-hot vectors"
IMAGE_SIZE = 28  # §4.1: "784-dimensional MNIST samples", the only size trained here
# §4.1: "Dropout with probability of 0.5 was applied to both the generator and discriminator"
DROPOUT = 0.5
G_IRANGE = 0.05  # official GAN code, mnist.yaml: G's weights U(-0.05, 0.05) (CGAN gives no init)
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
    """Maxout (Goodfellow et al. 2013): `units` outputs, each the max of `pieces` linear pieces."""

    def __init__(self, in_features, units, pieces):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(in_features, units * pieces)

    def forward(self, x):
        # the pieces of one unit are adjacent, as in pylearn2's Maxout layer
        return self.linear(x).view(-1, self.units, self.pieces).amax(dim=2)


class Generator(nn.Module):
    """§4.1: z -> 200 ReLU and y -> 1000 ReLU, joined -> 1200 ReLU -> 784 sigmoid (28x28).

    Dropout 0.5 on each hidden layer (§4.1), active only in training mode; `masks` (one per
    hidden layer, as dropout_masks draws them) replace its fresh draws with given ones.
    """

    def __init__(self, z_dim=Z_DIM, classes=CLASSES, dropout=DROPOUT):
        super().__init__()
        # §4.1: "Both z and y are mapped to hidden layers with ReLu activation", 200 and 1000 wide
        self.z_path = nn.Sequential(nn.Linear(z_dim, 200), nn.ReLU(), nn.Dropout(dropout))
        self.y_path = nn.Sequential(nn.Linear(classes, 1000), nn.ReLU(), nn.Dropout(dropout))
        # §4.1: "... mapped to second, combined hidden ReLu layer of dimensionality 1200"
        self.joint = nn.Sequential(nn.Linear(200 + 1000, 1200), nn.ReLU(), nn.Dropout(dropout))
        # §4.1: "a final sigmoid unit layer ... generating the 784-dimensional MNIST samples"
        self.out = nn.Linear(1200, IMAGE_SIZE * IMAGE_SIZE)

    def forward(self, z, y, masks=None):
        if masks is None:  # nn.Dropout: a fresh mask for every image in training mode
            h = self.joint(torch.cat([self.z_path(z), self.y_path(y)], dim=1))
        else:  # each hidden layer's ReLU output times its given mask, in place of nn.Dropout
            z_mask, y_mask, joint_mask = masks
            h = torch.cat([self.z_path[:-1](z) * z_mask, self.y_path[:-1](y) * y_mask], dim=1)
            h = self.joint[:-1](h) * joint_mask
        return torch.sigmoid(self.out(h)).view(-1, 1, IMAGE_SIZE, IMAGE_SIZE)


def dropout_masks(G, n, device="cpu"):
    """n draws of G's three dropout masks (z's, y's and the joint hidden layer's), as nn.Dropout
    draws them: each unit kept with probability 1 - p and then scaled by 1 / (1 - p), else 0."""
    masks = []
    for path in (G.z_path, G.y_path, G.joint):
        keep = 1 - path[-1].p
        kept = torch.bernoulli(torch.full((n, path[0].out_features), keep, device=device))
        masks.append(kept / keep)
    return masks


class Discriminator(nn.Module):
    """§4.1: x -> maxout 240 x 5 pieces and y -> maxout 50 x 5, joined -> maxout 240 x 4 -> 1.

    Returns logits; the sigmoid of §4.1's output layer lives in the loss (BCEWithLogits),
    which is numerically stable where sigmoid + log is not. Dropout 0.5 on each hidden layer.
    """

    def __init__(self, classes=CLASSES, dropout=DROPOUT):
        super().__init__()
        # §4.1: x to "a maxout layer with 240 units and 5 pieces", y to one "with 50 units and 5"
        pixels = IMAGE_SIZE * IMAGE_SIZE
        self.x_path = nn.Sequential(Maxout(pixels, 240, 5), nn.Dropout(dropout))
        self.y_path = nn.Sequential(Maxout(classes, 50, 5), nn.Dropout(dropout))
        # §4.1: "a joint maxout layer with 240 units and 4 pieces" before the sigmoid layer
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
def sample(G, z, labels, dropout=False, masks=None):
    """G(z, y) in eval mode (dropout off: the same z and y always give the same image), in [0, 1].

    dropout=True keeps G's dropout on, making its masks a second source of noise besides z;
    `masks` (dropout_masks, one row per image) fix them.
    """
    was_training = G.training
    G.train(dropout)
    images = G(z, one_hot(labels, G.y_path[0].in_features), masks)
    G.train(was_training)
    return images


def walk_draw(G, masks):
    """--interpolate's draw(z, rows): one sampled network per walk. Every image of row r (digit r
    mod 10) is drawn under row r's dropout masks (`masks`, one row per walk, from dropout_masks;
    None: dropout off), so a row changes only with z, and its ends are G's samples of its end
    points under those masks. Different rows have different masks."""

    def draw(z, rows):
        held = None if masks is None else [mask[rows] for mask in masks]
        return sample(G, z, rows % CLASSES, masks is not None, held)

    return draw


DROPOUT_ON = (
    "keep G's dropout on, as in training and in train.py's grids and --evaluate; --interpolate "
    "holds one mask per row (default: on; --no-sampling-dropout: eval mode)"
)


def main(argv=None):
    description = (
        "Sample digits from a conditional GAN checkpoint. With G's dropout on (the default), "
        "--interpolate draws each row under one dropout mask, one sampled network per walk."
    )
    num_help = "images of --digit (default 64), or per row of the per-digit grid (default 10)"
    parser = support.sampling_parser(description, num_help=num_help)
    parser.add_argument("--digit", type=int, help="draw only this class (0-9); default: each")
    parser.add_argument("--sampling-dropout", action=support.ON_OFF, default=True, help=DROPOUT_ON)
    args, checkpoint = support.read_sampling_flags(parser, argv, FOLDER)
    if args.digit is not None and not 0 <= args.digit < CLASSES:
        parser.error(f"--digit must be one of 0 to {CLASSES - 1}, got {args.digit}")
    run = checkpoint["args"]
    G = Generator(run["z_dim"], CLASSES, run["dropout"])
    G = support.load_weights(parser, G, checkpoint["G"], args.run).to(args.device)
    # z and G's dropout masks both come from --seed
    torch.manual_seed(args.seed)

    def draw(z, labels):
        return sample(G, z, labels, args.sampling_dropout)

    def draw_z(n):
        return sample_z(n, run["z_dim"], args.device)

    def images(root, split):
        """The run's training split (without its validation split) or the test set, uint8."""
        return load_labelled(run["dataset"], root, split, run["valid_size"], download=False)[0]

    if args.interpolate:
        # one sampled network per walk: G's dropout masks drawn once per row, held along it; the
        # draw takes each image's row itself (labels=rows), its digit and its masks
        masks = dropout_masks(G, args.rows, args.device) if args.sampling_dropout else None
        walk = walk_draw(G, masks)
        return support.inspect(args, checkpoint, walk, draw_z, images, labels=lambda rows: rows)
    if args.nearest:
        # row r holds digit r mod 10, each sample under its own dropout mask
        return support.inspect(
            args, checkpoint, draw, draw_z, images, labels=lambda rows: rows % CLASSES
        )
    if args.digit is None:
        z, labels = grid_inputs(args.num or 10, run["z_dim"], args.device)
    else:
        num = args.num or 64
        z, labels = draw_z(num), torch.full((num,), args.digit, device=args.device)
    per_row = len(z) // CLASSES if args.digit is None else None  # a row per digit, or a square
    names = [f"{i:05d}_digit{y}.png" for i, y in enumerate(labels.tolist())]
    support.write_images(
        draw, (z, labels), args.out, args.single, per_row, names, checkpoint["step"]
    )


if __name__ == "__main__":
    sys.exit(support.stop_in_one_line(main))
