"""The validation Parzen log-likelihood against the epoch, from runs' TensorBoard scalars.

    pip install matplotlib
    python assets/plot_parzen.py OUT.png LABEL=RUN [LABEL=RUN ...] \
        [--paper simpleGAN=225 CGAN=132] [--ymin -50]

Each RUN is a run folder trained with --select-every; its metrics/parzen_valid scalar is plotted
against the epoch (steps / 500: train[0:50000] in batches of 100). --paper draws the papers'
Table 1 numbers as dashed lines, for reference only: those are test-set numbers, these are
validation ones.
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

STEPS_PER_EPOCH = 500


def validation_curve(run):
    events = EventAccumulator(run, size_guidance={"scalars": 0})
    events.Reload()
    if "metrics/parzen_valid" not in events.Tags()["scalars"]:
        trained = "was it trained with --select-every?"
        raise SystemExit(f"{run}: no metrics/parzen_valid scalar ({trained})")
    points = events.Scalars("metrics/parzen_valid")
    return [p.step / STEPS_PER_EPOCH for p in points], [p.value for p in points]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("runs", nargs="+", metavar="LABEL=RUN")
    parser.add_argument("--paper", nargs="*", default=[], metavar="LABEL=NATS")
    ymin = "cut the axis here (a collapsed run's -300s)"
    parser.add_argument("--ymin", type=float, default=None, help=ymin)
    args = parser.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for item in args.runs:
        label, run = item.split("=", 1)
        epochs, values = validation_curve(run)
        ax.plot(epochs, values, marker="o", markersize=3, label=label)
    for item in args.paper:
        label, nats = item.split("=", 1)
        ax.axhline(float(nats), linestyle="--", linewidth=1, color="grey")
        text = f"{label}, Table 1 (test set): {nats}"
        on_y = ax.get_yaxis_transform()
        ax.text(0.01, float(nats) + 2, text, transform=on_y, fontsize=8, color="grey")
    if args.ymin is not None:
        ax.set_ylim(bottom=args.ymin)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation log-likelihood (nats)")
    ax.set_title("Parzen-window log-likelihood of train[50000:60000]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out)


if __name__ == "__main__":
    main()
