"""WGAN-GP §5.6, Fig. 4(b): the Wasserstein estimate on the training subset and on held-out
images, read from the events of a `train.py --train-subset` run, into wgan_gp_overfit.png.

    python assets/plot_wgan_gp_overfit.py RUN_FOLDER       # from the repository root
"""

import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "WGAN-GP"))
import support  # noqa: E402  (WGAN-GP's copy, found through the path above)

# generator iterations before the gap is drawn: the freshly initialised critic's rise dominates them
WARM_UP = 100
SMOOTH = 10  # logged values in the gap's running mean


def curve(events, tag):
    return zip(*[(e.step, e.value) for e in events.Scalars(tag)])


def main(run):
    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    steps, train = curve(events, "wasserstein/estimate")
    valid_steps, valid = curve(events, "wasserstein/estimate_valid")
    # Each training value is the mean over the `log` iterations up to its step; the held-out value
    # is taken at the step. On a falling curve that alone puts the training curve higher, so the
    # gap compares the training value with the held-out curve averaged over the same iterations
    # (linear between two logs: weight (log + 1) / 2 log on the later one), from generator
    # iteration WARM_UP on, raw and as a running mean over SMOOTH logs.
    log, held_out = steps[1] - steps[0], dict(zip(valid_steps, valid))
    later = (log + 1) / (2 * log)
    gap = [
        (s, t - later * held_out[s] - (1 - later) * held_out[s - log])
        for s, t in zip(steps, train)
        if s >= WARM_UP
    ]
    windows = (gap[i - SMOOTH + 1 : i + 1] for i in range(SMOOTH - 1, len(gap)))
    smooth = [sum(g for _, g in window) / SMOOTH for window in windows]
    plt = support.pyplot()
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    top.plot(steps, train, label="training subset (wasserstein/estimate)", lw=1)
    top.plot(valid_steps, valid, label="held-out images (wasserstein/estimate_valid)", lw=1)
    top.set(ylabel="E[D(x)] - E[D(G(z))]", yscale="log")
    top.legend()
    bottom.plot(*zip(*gap), color="lightgrey", lw=1)
    mean = f"running mean over {SMOOTH} logs"
    bottom.plot([s for s, _ in gap[SMOOTH - 1 :]], smooth, color="black", lw=1.2, label=mean)
    bottom.legend()
    bottom.axhline(0, color="grey", lw=0.5)
    bottom.set(xlabel="generator iteration", ylabel="training - held-out\n(same iterations)")
    support.save_figure(fig, HERE / "wgan_gp_overfit.png")


if __name__ == "__main__":
    main(sys.argv[1])
