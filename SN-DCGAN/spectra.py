"""train.py --evaluate-spectra RUN: the singular values of each layer of a run's D, drawn the way
Miyato et al. 2018 draw them in §4.1.1's Fig. 3 (squared, scaled so that the largest is 1, index
of the singular value along x), with the largest value and how spread the spectrum is (the share
of squared, scaled values above 0.1) printed and merged into the run's metrics.json.

The singular values themselves are the paper's quantity and come from model.singular_values; this
file only reads the checkpoint, draws and writes.
"""

from pathlib import Path

import support
from model import FOLDER, Discriminator, singular_values

FIGURE = "spectra.png"  # written into the run folder
SHARE_ABOVE = 0.1  # the spread: the share of squared singular values above this of the largest


def evaluate_spectra(parser, argv):
    """Read D from the run --evaluate-spectra names (its best.pt when it kept one, else last.pt)
    or a checkpoint file, as its run built it (--no-sn or not); draw FIGURE into its run folder;
    print and merge the numbers into metrics.json. Flags that say where the data is or how fast
    to run may be given; any other that differs from the run's is refused in one line."""
    config, checkpoint, path = support.run_config(parser, argv, "evaluate_spectra", FOLDER)
    run = Path(config.out)
    if support.unwritable(run):
        parser.error(f"--evaluate-spectra: cannot write into the run folder {run}")
    spectral = not config.no_sn
    D = Discriminator(config.image_size, config.channels, config.width, spectral)
    support.load_weights(parser, D, checkpoint["D"], path)
    values = singular_values(D)
    method = "spectral normalisation, W / sigma(W)" if spectral else "no normalisation (--no-sn), W"
    title = f"{FOLDER} D, {method}, step {checkpoint['step']} ({config.dataset})"
    layers = {}
    for (name, layer), s in zip(D.normalized_layers(), values.values()):
        layers[name] = {
            "shape": list(layer.weight.flatten(1).shape),
            "largest": s[0].item(),
            "share_squared_above": ((s / s[0]).square() > SHARE_ABOVE).double().mean().item(),
            "count": len(s),
        }
    print(title)
    heading = f"share of (sigma_i / sigma_1)^2 above {SHARE_ABOVE}"
    print(f"{'layer':<7}{'matrix':>12}{'largest':>10}  {heading}")
    for name, record in layers.items():
        share, count = record["share_squared_above"], record["count"]
        matrix = "x".join(map(str, record["shape"]))
        print(
            f"{name:<7}{matrix:>12}{record['largest']:>10.4f}  {share:.3f} "
            f"({round(share * count)} of {count})"
        )
    draw(values, title, run / FIGURE)
    spectra = {
        "checkpoint": str(path.resolve()),
        "step": checkpoint["step"],
        "spectral_norm": spectral,
        "figure": FIGURE,
        "share_threshold": SHARE_ABOVE,
        "layers": layers,
    }
    support.merge_metrics(run, {"spectra": spectra})
    print(f"wrote {run / FIGURE}")
    return 0


def draw(values, title, path):
    """One panel per layer, Fig. 3's form: (sigma_i / sigma_1)^2 against i, the index of the
    singular value."""
    plt = support.pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.6))
    for ax, (name, s) in zip(axes.flat, values.items()):
        scaled = (s / s[0]).square().cpu()
        ax.plot(range(1, len(s) + 1), scaled, marker="." if len(s) < 40 else None, color="tab:blue")
        ax.axhline(SHARE_ABOVE, color="grey", linewidth=0.6, linestyle="--")  # the threshold
        ax.set(
            title=name, xlabel="index of singular value", ylim=(-0.03, 1.05), xlim=(0, len(s) + 1)
        )
    for ax in axes[:, 0]:
        ax.set_ylabel("squared singular value")
    fig.suptitle(title)
    fig.tight_layout()
    support.save_figure(fig, path)
