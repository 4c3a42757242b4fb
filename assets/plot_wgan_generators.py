"""WGAN/README.md's figure of §4.3: the critic's Wasserstein estimate of three runs, one per
--generator.

    cd WGAN && PYTHONPATH=. python ../assets/plot_wgan_generators.py RUNS_FOLDER \
        ../assets/wgan_generators_estimate.png

RUNS_FOLDER holds the run folders dcgan, nobn and mlp (train.py --generator NAME --out
RUNS_FOLDER/NAME).
"""

import sys
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import support

# running median, as the official README smooths its curves (101 points there, over longer runs)
WINDOW = 51
# each run folder's name, its curve's label, its colour
RUNS = [
    ("dcgan", "DCGAN G (Fig. 5)", "C0"),
    ("nobn", "no batch norm, constant width (Fig. 6)", "C1"),
    ("mlp", "ReLU MLP, 4 x 512 (Fig. 7)", "C2"),
]


def estimates(run):
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Scalars("wasserstein/estimate")
    return np.array([s.step for s in scalars]), np.array([s.value for s in scalars])


def running_median(values, window=WINDOW):
    half = window // 2
    windows = (values[max(0, i - half) : i + half + 1] for i in range(len(values)))
    return np.array([np.median(window) for window in windows])


def main(runs, out):
    plt = support.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
    for name, label, color in RUNS:
        steps, values = estimates(Path(runs) / name)
        ax.plot(steps, values, color=color, alpha=0.2, linewidth=0.6)
        ax.plot(steps, running_median(values), color=color, label=label)
    ax.set_xlabel("generator iterations")
    ax.set_ylabel("Wasserstein estimate")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    support.save_figure(fig, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
