"""§5.1 of the paper: D as a feature extractor for classification
(`python train.py --evaluate-features RUN`).

D's convolutional features from every layer, each max-pooled to a 4x4 grid, are flattened and
concatenated into one vector per image, and a regularised linear L2-SVM (squared hinge loss,
scikit-learn's LinearSVC) trained on the training split's vectors is scored on the test split. The
same SVM on a randomly initialised D (same architecture, §4's init) and on raw pixels gives the
baselines. Each set of features is standardised with the per-feature mean and standard deviation
of the SVM's training images (the paper does not say; one C then weighs every feature alike).
"""

import time

import torch
import torch.nn.functional as F
from torch import nn

import support
from dataset import LABELLED, DataError, read_labelled, to_tanh_range
from model import FOLDER, Discriminator, init_weights

GRID = 4  # §5.1: each layer's representation max-pooled to a 4x4 spatial grid
BATCH = 500  # images per pass of D; the features do not depend on it (BN's running statistics)
# What --evaluate-features may give anew besides where the data is and how fast it runs
# (support.WHERE); any other flag is the run's own.
ALLOWED = {"svm_train_images", "svm_c", "seed"}

EVALUATE = (
    "§5.1: test accuracy of a linear L2-SVM on the run's D features (every layer max-pooled to "
    "4x4), on a random D's and on pixels; writes them into its metrics.json, and exits"
)
TRAIN_IMAGES = (
    "training images the SVM of --evaluate-features learns from, drawn with --seed; None: all of "
    "them, as §5.1"
)
C = (
    "the SVM's C; §5.1 gives none: chosen on MNIST by accuracy on a validation split of the "
    "training set (README)"
)


def layer_features(D, x):
    """§5.1: the output of each of D's convolutional layers (after its LeakyReLU), max-pooled to a
    4x4 grid, flattened, and concatenated over the layers."""
    pooled = []
    for layer in D.net:
        x = layer(x)
        if isinstance(layer, nn.LeakyReLU):
            pooled.append(F.adaptive_max_pool2d(x, GRID).flatten(1))
    return torch.cat(pooled, 1)


@torch.no_grad()
def d_features(D, images, device):
    """layer_features of uint8 images (scaled to [-1, 1] as in training), D in eval mode, as a
    float32 CPU tensor."""
    D.to(device).eval()
    return torch.cat(
        [
            layer_features(D, to_tanh_range(images[start : start + BATCH].to(device))).cpu()
            for start in range(0, len(images), BATCH)
        ]
    )


def svm_accuracy(train_x, train_y, test_x, test_y, C, seed):
    """§5.1: a regularised linear L2-SVM on standardised features; its test split accuracy."""
    from sklearn.preprocessing import (
        StandardScaler,
    )  # imported here: training does not need scikit-learn
    from sklearn.svm import LinearSVC

    scaler = StandardScaler().fit(train_x.numpy())
    svm = LinearSVC(C=C, loss="squared_hinge", random_state=seed).fit(
        scaler.transform(train_x.numpy()), train_y.numpy()
    )
    return float(svm.score(scaler.transform(test_x.numpy()), test_y.numpy()))


def evaluate(parser, argv):
    """--evaluate-features: test accuracy and feature count of the SVM on the trained D, a random D
    and pixels; printed, and merged into the run folder's metrics.json under "feature_svm"."""
    args, checkpoint, path = support.run_config(
        parser, argv, "evaluate_features", FOLDER, allowed=ALLOWED
    )
    if args.dataset not in LABELLED:
        parser.error(
            f"--evaluate-features: the run trained on {args.dataset}, which has no labelled test "
            f"split here (those with one: {', '.join(LABELLED)})"
        )
    if support.unwritable(args.out):
        support.fail(f"cannot write metrics.json into {args.out}: {support.unwritable(args.out)}")
    try:
        import sklearn  # noqa: F401  (svm_accuracy's; checked before any work)
    except ImportError:
        support.fail("--evaluate-features needs scikit-learn (pip install scikit-learn)")
    device = support.pick_device(args)
    try:
        train = read_labelled(args.dataset, args.data_root, args.image_size, "train")
        test_images, test_labels = read_labelled(
            args.dataset, args.data_root, args.image_size, "test"
        )
    except DataError as error:
        support.fail(error)
    # the SVM's training images: all of the training split, or --svm-train-images drawn with --seed
    split_size = len(train[0])
    chosen = torch.randperm(split_size, generator=torch.Generator().manual_seed(args.seed))
    chosen = chosen[: args.svm_train_images].sort().values
    train_images, train_labels = train[0][chosen], train[1][chosen]
    trained_D = Discriminator(args.image_size, args.channels, args.width)
    trained_D.load_state_dict(checkpoint["D"])
    torch.manual_seed(args.seed)
    random_D = Discriminator(args.image_size, args.channels, args.width).apply(init_weights)
    extractors = {
        "trained_D": lambda images: d_features(trained_D, images, device),
        "random_D": lambda images: d_features(random_D, images, device),
        "pixels": lambda images: to_tanh_range(images).flatten(1),
    }
    print(
        f"{FOLDER}: {path} (step {checkpoint['step']}); L2-SVM (C {args.svm_c}) on "
        f"{len(train_images)} {args.dataset} training images, scored on its {len(test_images)} "
        f"test images at {args.image_size}px"
    )
    results = {}
    for name, extract in extractors.items():
        cpu_start = time.process_time()
        train_x, test_x = extract(train_images), extract(test_images)
        accuracy = svm_accuracy(train_x, train_labels, test_x, test_labels, args.svm_c, args.seed)
        seconds = round(time.process_time() - cpu_start, 1)
        results[name] = {
            "test_accuracy": accuracy,
            "features": train_x.shape[1],
            "cpu_seconds": seconds,
        }
        print(
            f"{name:>9}: test accuracy {accuracy:.4f} with {train_x.shape[1]} features "
            f"({seconds} CPU s)"
        )
    protocol = {
        "train_split_images": split_size,
        "svm_train_images": len(train_images),
        "test_split_images": len(test_images),
        "pooling_grid": GRID,
        "standardised": True,
        "svm": "LinearSVC, squared hinge, L2",
        "svm_c": args.svm_c,
    }
    record = support.record(FOLDER, path, checkpoint, args, device)
    record = {**record, **results, "protocol": protocol}
    support.merge_metrics(args.out, {"feature_svm": record})
    return 0
