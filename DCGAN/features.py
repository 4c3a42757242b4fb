"""§5.1 of the paper: D as a feature extractor for classification (`python train.py --evaluate-features RUN`).

D's convolutional features from every layer, each max-pooled to a 4x4 grid, are flattened and concatenated into
one vector per image, and a regularised linear L2-SVM (squared hinge loss, scikit-learn's LinearSVC) trained on the
training split's vectors is scored on the test split. The same SVM on a randomly initialised D (same architecture,
§4's init) and on raw pixels gives the baselines. Each set of features is standardised with the per-feature mean
and standard deviation of the SVM's training images (the paper does not say; one C then weighs every feature alike).
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

import support
from dataset import LABELLED, DataError, labelled_split, to_tanh_range
from model import FOLDER, Discriminator, init_weights

GRID = 4  # §5.1: each layer's representation max-pooled to a 4x4 spatial grid
BATCH = 500  # images per forward pass of D; the features do not depend on it (batch norm uses its running statistics)
# What --evaluate-features may give anew; everything else is the run's own configuration.
EVALUABLE = {"evaluate_features", "data_root", "device", "seed", "svm_train_images", "svm_c"}


def layer_features(D, x):
    """§5.1: the output of each of D's convolutional layers (after its LeakyReLU), max-pooled to a 4x4 grid,
    flattened, and concatenated over the layers."""
    pooled = []
    for layer in D.net:
        x = layer(x)
        if isinstance(layer, nn.LeakyReLU):
            pooled.append(F.adaptive_max_pool2d(x, GRID).flatten(1))
    return torch.cat(pooled, 1)


@torch.no_grad()
def d_features(D, images, device):
    """layer_features of uint8 images (scaled to [-1, 1] as in training), D in eval mode, as a float32 CPU tensor."""
    D.to(device).eval()
    return torch.cat([layer_features(D, to_tanh_range(images[start:start + BATCH].to(device))).cpu()
                      for start in range(0, len(images), BATCH)])


def svm_accuracy(train_x, train_y, test_x, test_y, C, seed):
    """§5.1: a regularised linear L2-SVM on standardised features; its accuracy on the test split."""
    from sklearn.preprocessing import StandardScaler  # imported here: training does not need scikit-learn
    from sklearn.svm import LinearSVC
    scaler = StandardScaler().fit(train_x.numpy())
    svm = LinearSVC(C=C, loss="squared_hinge", random_state=seed).fit(scaler.transform(train_x.numpy()),
                                                                      train_y.numpy())
    return float(svm.score(scaler.transform(test_x.numpy()), test_y.numpy()))


def run_configuration(parser, argv, args):
    """The checkpoint of --evaluate-features, its run folder, and args with the run's own configuration; only
    EVALUABLE flags may be given anew, any other that differs is refused in one line."""
    path = support.checkpoint_path(args.evaluate_features, "auto")
    try:
        checkpoint = support.read_checkpoint(path, FOLDER)
    except support.CheckpointError as error:
        parser.error(f"--evaluate-features: {error}")
    given = support.explicit_flags(parser, support.expand_home(argv))
    changed = sorted(support.flag(key) for key, value in given.items()
                     if key not in EVALUABLE and value != checkpoint["args"].get(key))
    if changed:
        parser.error(f"--evaluate-features uses the run's own configuration; {', '.join(changed)} cannot change "
                     f"(allowed: {', '.join(support.flag(key) for key in sorted(EVALUABLE))})")
    vars(args).update({key: value for key, value in checkpoint["args"].items() if key not in given})
    if args.dataset not in LABELLED:
        parser.error(f"--evaluate-features: the run trained on {args.dataset}, which has no labelled test split "
                     f"here (those with one: {', '.join(LABELLED)})")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if support.unwritable(run):
        support.fail(f"cannot write metrics.json into the run folder {run}")
    return checkpoint, path, run


def evaluate(parser, argv, args):
    """--evaluate-features: test accuracy and feature count of the SVM on the trained D, a random D and pixels;
    printed, and merged into the run folder's metrics.json under "feature_svm"."""
    checkpoint, path, run = run_configuration(parser, argv, args)
    try:
        import sklearn  # noqa: F401  (svm_accuracy's; checked before any work)
    except ImportError:
        support.fail("--evaluate-features needs scikit-learn (pip install scikit-learn)")
    device = support.pick_device(args)
    try:
        train_images, train_labels = labelled_split(args.dataset, args.data_root, args.image_size, train=True)
        test_images, test_labels = labelled_split(args.dataset, args.data_root, args.image_size, train=False)
    except DataError as error:
        support.fail(error)
    # the SVM's training images: all of the training split, or --svm-train-images of it drawn with --seed
    split_size = len(train_images)
    chosen = torch.randperm(split_size, generator=torch.Generator().manual_seed(args.seed))
    chosen = chosen[:args.svm_train_images].sort().values
    train_images, train_labels = train_images[chosen], train_labels[chosen]
    trained_D = Discriminator(args.image_size, args.channels, args.width)
    trained_D.load_state_dict(checkpoint["D"])
    torch.manual_seed(args.seed)
    random_D = Discriminator(args.image_size, args.channels, args.width).apply(init_weights)
    extractors = {"trained_D": lambda images: d_features(trained_D, images, device),
                  "random_D": lambda images: d_features(random_D, images, device),
                  "pixels": lambda images: to_tanh_range(images).flatten(1)}
    print(f"{FOLDER}: {path} (step {checkpoint['step']}); L2-SVM (C {args.svm_c}) on {len(train_images)} "
          f"{args.dataset} training images, scored on its {len(test_images)} test images at {args.image_size}px")
    results = {}
    for name, extract in extractors.items():
        cpu_start = time.process_time()
        train_x, test_x = extract(train_images), extract(test_images)
        accuracy = svm_accuracy(train_x, train_labels, test_x, test_labels, args.svm_c, args.seed)
        results[name] = {"test_accuracy": accuracy, "features": train_x.shape[1],
                         "cpu_seconds": round(time.process_time() - cpu_start, 1)}
        print(f"{name:>9}: test accuracy {accuracy:.4f} with {train_x.shape[1]} features "
              f"({results[name]['cpu_seconds']} CPU s)")
    record = {"checkpoint": str(path.resolve()), "step": checkpoint["step"], **results,
              "protocol": {"dataset": args.dataset, "train_split_images": split_size,
                           "svm_train_images": len(train_images), "test_split_images": len(test_images),
                           "image_size": args.image_size, "pooling_grid": GRID, "standardised": True,
                           "svm": "LinearSVC, squared hinge, L2",
                           "svm_c": args.svm_c, "seed": args.seed, "device": str(device)}}
    metrics = run / "metrics.json"
    support.merge_metrics(metrics, {"feature_svm": record})
    print(f"wrote {metrics}")
    return 0
