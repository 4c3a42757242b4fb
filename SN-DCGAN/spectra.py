"""train.py --evaluate-spectra RUN: the singular values of each layer of a run's D, drawn the way Miyato et al. 2018
draw them in §4.1.1's Fig. 3 (squared, scaled so that the largest is 1, index of the singular value along x), with
the largest value and how spread the spectrum is (the share of squared, scaled values above 0.1) printed and merged
into the run's metrics.json.

The singular values themselves are the paper's quantity and come from model.singular_values; this file only reads
the checkpoint, draws and writes.
"""

import support
from model import FOLDER, Discriminator, singular_values

FIGURE = "spectra.png"  # written into the run folder
SHARE_ABOVE = 0.1  # the spread: the share of squared singular values above this fraction of the largest one


def evaluate_spectra(path, parser, argv):
    """Read D from a run (its best.pt when it kept one, else last.pt) or a checkpoint file, as its run built it
    (--no-sn or not); draw FIGURE into its run folder; print and merge the numbers into metrics.json."""
    given = sorted(set(support.explicit_flags(parser, support.expand_home(argv))) - {"evaluate_spectra"})
    if given:
        parser.error(f"--evaluate-spectra reads everything from the run; drop {', '.join(map(support.flag, given))}")
    checkpoint_file = support.checkpoint_path(path, "auto")
    try:
        checkpoint = support.read_checkpoint(checkpoint_file, FOLDER)
    except support.CheckpointError as error:
        parser.error(f"--evaluate-spectra: {error}")
    run = checkpoint_file.parent.parent if checkpoint_file.parent.name == "checkpoints" else checkpoint_file.parent
    if support.unwritable(run):
        parser.error(f"--evaluate-spectra: cannot write into the run folder {run}")
    config = checkpoint["args"]
    spectral = not config.get("no_sn", False)
    D = Discriminator(config["image_size"], config["channels"], config["width"], spectral)
    support.load_weights(parser, D, checkpoint["D"], checkpoint_file)
    values = singular_values(D)
    method = "spectral normalisation, W / sigma(W)" if spectral else "no normalisation (--no-sn), W"
    title = f"{FOLDER} D, {method}, step {checkpoint['step']} ({config['dataset']})"
    layers = {name: {"shape": list(layer.weight.flatten(1).shape), "largest": s[0].item(),
                     "share_squared_above": ((s / s[0]).square() > SHARE_ABOVE).double().mean().item(), "count": len(s)}
              for (name, layer), s in zip(D.normalized_layers(), values.values())}
    print(title)
    print(f"{'layer':<7}{'matrix':>12}{'largest':>10}  share of (sigma_i / sigma_1)^2 above {SHARE_ABOVE}")
    for name, record in layers.items():
        share = record["share_squared_above"]
        print(f"{name:<7}{'x'.join(map(str, record['shape'])):>12}{record['largest']:>10.4f}  {share:.3f} "
              f"({round(share * record['count'])} of {record['count']})")
    draw(values, title, run / FIGURE)
    support.merge_metrics(run / "metrics.json", {"spectra": {"checkpoint": str(checkpoint_file.resolve()),
                                                     "step": checkpoint["step"], "spectral_norm": spectral,
                                                     "figure": FIGURE, "share_threshold": SHARE_ABOVE,
                                                     "layers": layers}})
    print(f"wrote {run / FIGURE} and the 'spectra' record of {run / 'metrics.json'}")
    return 0


def draw(values, title, path):
    """One panel per layer, Fig. 3's form: (sigma_i / sigma_1)^2 against i, the index of the singular value."""
    plt = support.pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(13, 5.6))
    for ax, (name, s) in zip(axes.flat, values.items()):
        scaled = (s / s[0]).square().cpu()
        ax.plot(range(1, len(s) + 1), scaled, marker="." if len(s) < 40 else None, color="tab:blue")
        ax.axhline(SHARE_ABOVE, color="grey", linewidth=0.6, linestyle="--")  # the spread's threshold
        ax.set(title=name, xlabel="index of singular value", ylim=(-0.03, 1.05), xlim=(0, len(s) + 1))
    for ax in axes[:, 0]:
        ax.set_ylabel("squared singular value")
    fig.suptitle(title)
    fig.tight_layout()
    support.save_figure(fig, path)
