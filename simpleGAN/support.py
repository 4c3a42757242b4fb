"""Everything that is not the paper, the same file byte for byte in every folder: model.py, train.py and
dataset.py hold the paper and pass in what differs (the folder's name, z's prior, its data sets, ...); this
file runs it and imports none of them. Edit it once and copy it to the six other folders.

In order: errors and flags; checkpoints; --resume and --evaluate; speed; the training run; model.py's sampling
command; IS, FID and KID; MNIST's files; decoding and caching images; where the set is kept, and the batches.
"""
import argparse
import collections
import contextlib
import errno
import fcntl
import gzip
import hashlib
import io
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import PIL
import torch
import torch.nn.functional as F
import torchvision
import torchvision.utils as vutils
from torch.nn.utils import parametrize
from torch.utils.tensorboard import SummaryWriter
from torchvision.datasets.folder import IMG_EXTENSIONS, pil_loader
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE.parent / "data"  # data sets live beside the folders, shared by all of them
FORMAT = 1  # the layout of the checkpoints train.py writes; a reader refuses any other
GIF_FRAMES = 100  # progress.gif shows at most this many of the fixed-noise grids
GRID_MOST = 2500  # model.py: images in one grid at most (50 x 50)
SAMPLE_CHUNK = 500  # model.py --single: images generated and written at a time, so memory stays flat


# ---- one-line errors and flags ----

def fail(message, code=2):
    """A one-line error and exit code 2, for a problem the user can fix (code 1: a training run diverged)."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


def reason(error):
    """What went wrong, in one line: the last non-empty line of an error's message, or its type's name."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "the disk is full"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(error).__name__


class FlagParser(argparse.ArgumentParser):
    """argparse with every default in --help and a bad flag reported in one line, without the usage block."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def error(self, message):
        fail(message)


ON_OFF = argparse.BooleanOptionalAction  # a switch with its --no- form: --compile / --no-compile


def flag(name):
    return "--" + name.replace("_", "-")


def require_at_least(parser, args, minimum, *names):
    """Each of the flags `names` (destination names; None means unset) is at least `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"{flag(name)} must be at least {minimum}, got {value}")


def require_positive(parser, args, *names):
    """Each of the flags `names` is a finite number above 0."""
    for name in names:
        if not 0 < getattr(args, name) < math.inf:
            parser.error(f"{flag(name)} must be a positive number, got {getattr(args, name)}")


def add_run_flags(p, sample_every=500, log_every=50, checkpoint_every=500, sources=None):
    """The flags every training run has; `sources` cites a folder's interval defaults ({"log_every": "..."})."""
    cited = {name: f" ({source})" for name, source in (sources or {}).items()}
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many generator steps in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    add_speed_flags(p)
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", default=None, help="run folder (default: runs/<date-time>)")
    p.add_argument("--resume", default=None, help="a run folder or checkpoint to continue exactly")
    p.add_argument("--sample-every", type=int, default=sample_every,
                   help="steps between fixed-noise sample grids" + cited.get("sample_every", ""))
    p.add_argument("--log-every", type=int, default=log_every,
                   help="steps between scalar logs" + cited.get("log_every", ""))
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                   help="steps between checkpoints" + cited.get("checkpoint_every", ""))


@contextlib.contextmanager
def writing(path):
    """A failed write (a full disk, a folder made read-only) ends the run with one line naming the file."""
    try:
        yield
    except OSError as error:
        fail(f"cannot write {path}: {reason(error)}")


def write_atomically(path, data):
    """`data` (bytes) into a temporary file, flushed to disk and renamed over `path`: a kill at any moment leaves
    the previous file whole; a failed write removes the temporary file and raises OSError."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def unwritable(folder):
    """Why `folder` cannot be created or written to, or None; nothing is created to find out."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "exists and is not a folder"
    parent = next(p for p in [folder, *folder.parents] if p.exists())
    if not parent.is_dir():
        return f"{parent} is not a folder"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable"
    return None


# ---- checkpoints ----

class CheckpointError(Exception):
    """A file that is not a usable checkpoint of this folder; train.py and model.py print it and exit with 2."""


def checkpoint_path(path, which="last"):
    """A checkpoint file, or a run folder's checkpoints/last.pt, best.pt, or (auto) best.pt when it has one."""
    path = Path(path)
    if not path.is_dir():
        return path
    if which == "auto":
        which = "best" if (path / "checkpoints" / "best.pt").is_file() else "last"
    return path / "checkpoints" / f"{which}.pt"


def read_checkpoint(path, folder):
    """A checkpoint written by `folder`'s train.py, loaded on the CPU; anything else raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # truncated, random bytes, not a torch file, unreadable
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason(error)})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("folder"), str):
        raise CheckpointError(f"{path} is not a checkpoint written by a train.py of this collection")
    if checkpoint["folder"] != folder:
        raise CheckpointError(f"{path} was written by {checkpoint['folder']}/train.py, not by {folder}/train.py")
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {checkpoint.get('format')}; this {folder}/train.py "
                              f"reads format {FORMAT}")
    return checkpoint


def save_checkpoint(path, state):
    """Serialised in memory, then written atomically: a full disk is one line, never a half-written file."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    with writing(path):
        write_atomically(path, buffer.getbuffer())


# ---- the run's configuration ----

# Flags defined here that --resume may change: where things are and how fast, never what is computed.
RESUMABLE = {"data_root", "data_on", "cache_dir", "max_steps", "device", "compile", "channels_last", "sample_every",
             "log_every", "checkpoint_every", "eval_every", "inception_weights"}
EVALUABLE = {"data_root", "device", "seed"}


def parse_args(parser, argv, folder, check, resumable=(), evaluable=()):
    """The run's configuration and, with --resume or --evaluate, the checkpoint it continues or scores. A run
    keeps its own configuration: only RESUMABLE | `resumable` (EVALUABLE | `evaluable`) may be given anew.
    `check(parser, args)` checks the paper's flags."""
    argv = expand_home(argv)
    args = parser.parse_args(argv)
    checkpoint = None
    evaluate = getattr(args, "evaluate", None)
    if args.resume and evaluate:
        parser.error("give --resume or --evaluate, not both")
    if args.resume or evaluate:
        name, allowed = ("--resume", RESUMABLE | set(resumable)) if args.resume else \
            ("--evaluate", EVALUABLE | set(evaluable))
        path = checkpoint_path(args.resume or evaluate, "last" if args.resume else "auto")
        run_folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        try:
            checkpoint = read_checkpoint(path, folder)
        except CheckpointError as error:
            parser.error(f"{name}: {error}")
        given = explicit_flags(parser, argv)
        changed = sorted(flag(key) for key, value in given.items()
                         if key not in allowed | {"resume", "evaluate"} and value != checkpoint["args"].get(key))
        if changed:
            parser.error(f"{name} uses the run's own configuration; {', '.join(changed)} cannot change (allowed: "
                         f"{', '.join(flag(key) for key in sorted(allowed & set(vars(args))))})")
        args = argparse.Namespace(**{**vars(args), **checkpoint["args"], **given, "resume": args.resume,
                                     "evaluate": evaluate, "out": str(run_folder)})
    require_at_least(parser, args, 1, "sample_every", "log_every", "checkpoint_every", "max_steps")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2^32), got {args.seed}")
    check_device(parser, args.device)
    if args.out is not None and not evaluate and unwritable(args.out):
        parser.error(f"--out {args.out}: {unwritable(args.out)}")
    check(parser, args)
    return args, checkpoint


def expand_home(argv):
    """`~` at the start of a value, also after `=` where the shell leaves it (--data-root=~/data)."""
    expanded = []
    for arg in sys.argv[1:] if argv is None else argv:
        name, equals, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        expanded.append(name + equals + os.path.expanduser(value) if equals or not name else arg)
    return expanded


def explicit_flags(parser, argv):
    """The flags given on the command line: argparse leaves a name's default out when the namespace has it."""
    unset = object()
    names = vars(parser.parse_args(argv))
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name: value for name, value in vars(given).items() if value is not unset}


def check_device(parser, device, choices=("auto", "cpu", "cuda")):
    if device not in choices and not device.startswith("cuda:"):
        parser.error(f"--device must be {', '.join(choices[:-1])} or {choices[-1]}, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}, but no CUDA GPU is visible; use --device cpu")


def pick_device(args):
    """--device auto: CUDA when a GPU is visible, else the CPU."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_untouched(device, seed=None):
    """Draws inside come from their own stream (seeded by `seed` when given); every random stream of the
    training is as it was afterwards, so an exact resume stays exact."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


# ---- speed ----

def add_speed_flags(p):
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="fp32 as the papers trained; bf16: each forward under bfloat16 autocast, with losses, "
                        "parameters and optimiser state float32. --resume keeps it")
    p.add_argument("--channels-last", action=ON_OFF, default=False,
                   help="convolutions in channels-last memory layout: the same arithmetic and checkpoint, a speed "
                        "that depends on the hardware. --resume may change it")
    p.add_argument("--compile", action=ON_OFF, default=False,
                   help="torch.compile the networks (the checkpoint does not change). --resume may change it; the "
                        "resumed run then matches an uninterrupted one only up to rounding")


def speed_up(networks, precision, compile, device, channels_last=False, compiled=("G", "D")):
    """--precision, --channels-last and --compile, in place; only `compiled` compile (torch.compile cannot take a
    gradient of a gradient, as a penalty on D's input gradient needs). The state_dict keys do not change."""
    for name, net in networks.items():
        if channels_last:
            net.to(memory_format=torch.channels_last)
        if precision == "bf16":
            net.forward = bf16_forward(net, device.type)
        if compile and name in compiled:
            # One graph per input shape (dynamic=False): the sample grid's batch leaves the training graph static.
            net.compile(dynamic=False)
    if compile:
        print(f"--compile: {' and '.join(n for n in networks if n in compiled)} compile during the first steps")


def bf16_forward(net, device_type):
    """net.forward under bfloat16 autocast (bfloat16 copies of the float32 master weights), returning float32.
    Parametrized weights (spectral norm's W / sigma(W)) are computed first, in float32, once per forward."""
    forward = net.forward
    parametrized = [(module, name) for module in net.modules() if parametrize.is_parametrized(module)
                    for name in module.parametrizations]

    def forward_in_bf16(*inputs):
        with parametrize.cached():
            for module, name in parametrized:
                getattr(module, name)
            with torch.autocast(device_type, torch.bfloat16):
                output = forward(*inputs)
        return output.float()

    return forward_in_bf16


# ---- the training run ----

class Run:
    """One training run: its folder, scalars, fixed-noise grids (`grid(z)`), checkpoints (every --checkpoint-every
    steps, at the end, on Ctrl-C or SIGTERM) holding every network, optimiser, RNG state and the batch position,
    so a resume is exact; `metric()` -> ({name: value}, score) every `eval_every` steps picks best.pt; NaN stops.
    `d_wins` (Separated or RunsAway) names the scalars that tell when D has won (see Health)."""

    def __init__(self, args, checkpoint, nets, optimizers, batches, fixed_z, total, title, grid, folder,
                 compiled=("G", "D"), metric=None, eval_every=0, higher_is_better=True, d_wins=None):
        if args.max_steps is not None:
            total = args.max_steps if total is None else min(total, args.max_steps)
        self.args, self.nets, self.optimizers, self.batches, self.fixed_z = args, nets, optimizers, batches, fixed_z
        self.total, self.grid, self.metric, self.eval_every = total, grid, metric, eval_every
        self.folder, self.higher_is_better = folder, higher_is_better
        self.out = Path(args.out) if args.out else new_run_folder(HERE / "runs")
        self.lock = hold(self.out)
        self.step, self.best = 0, None
        if checkpoint is not None:
            self.restore(checkpoint)
            if total is not None and self.step >= total:
                fail(f"{self.out} is at step {self.step}, which already reaches the length asked for ({total} steps); "
                     f"to go on, give a larger --max-steps or a longer training length")
        elif (self.out / "checkpoints" / "last.pt").exists():
            fail(f"{self.out} already holds a run; continue it with --resume {self.out}, or choose another --out")
        elif any((self.out / "samples").glob("*.png")) or any(self.out.glob("events.out.tfevents.*")):
            fail(f"{self.out} holds the grids and logs of a run that stopped before its first checkpoint; to start "
                 f"over there, delete the folder (rm -r {self.out}), or choose another --out")
        for folder in (self.out / "samples", self.out / "checkpoints"):
            with writing(folder):
                folder.mkdir(parents=True, exist_ok=True)
        for stray in (self.out / "checkpoints").glob("*.tmp"):  # left by a run killed while saving
            stray.unlink()
        with writing(self.out / "args.json"):
            write_atomically(self.out / "args.json", json.dumps(vars(args), indent=2).encode())
        # events after the checkpoint's step came from a run that went past it, and are dropped
        with writing(self.out):
            self.writer = SummaryWriter(self.out, purge_step=self.step + 1 if checkpoint is not None else None)
        self.health = Health(self.writer, d_wins, getattr(batches, "images", None), len(fixed_z))
        speed_up(nets, args.precision, args.compile, fixed_z.device, args.channels_last, compiled)
        threading.excepthook = quiet_full_disk
        # Ctrl-C or SIGTERM: finish the step, write the checkpoint, stop (see stop); a second Ctrl-C quits at once
        self.stopped_by = None
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        # the first step whose scalars were not finite, kept on the device: no host sync per step
        self.device = fixed_z.device
        self.first_bad_step = torch.tensor(-1, device=self.device)
        self.sums, self.summed = None, 0
        self.started = time.perf_counter()
        print(f"{title} on {self.device}: steps {self.step} -> {total or 'until stopped'}; "
              f"run folder {self.out}", flush=True)
        # the progress bar goes to stdout: stderr is left to warnings and to a one-line error
        self.progress = tqdm(total=total, initial=self.step, unit="step", dynamic_ncols=True, mininterval=1.0,
                             file=sys.stdout)

    def stop(self, signum, frame):
        if self.stopped_by is not None:
            raise KeyboardInterrupt
        self.stopped_by = signum

    def running(self):
        if (self.total is None or self.step < self.total) and self.stopped_by is None:
            return True
        self.progress.close()
        return False

    def due(self, every):
        return self.step % every == 0 or self.step == self.total

    def end_step(self, scalars, also_log=None):
        """Count the step; log the scalars' means (kept on the device until then) and also_log(), draw, evaluate
        and save when their intervals come."""
        self.step += 1
        self.progress.update()
        values = torch.stack([torch.as_tensor(value, device=self.device).detach().float()
                              for value in scalars.values()])
        self.first_bad_step = torch.where((self.first_bad_step < 0) & ~values.isfinite().all(), self.step,
                                          self.first_bad_step)
        self.sums = values if self.sums is None else self.sums + values
        self.summed += 1
        if self.due(self.args.log_every):
            self.check_finite()
            means = dict(zip(scalars, (self.sums / self.summed).tolist()))
            self.health.scalars(means, self.step)
            self.log({**means, **(also_log() if also_log else {})})
            self.sums, self.summed = None, 0
        if self.due(self.args.sample_every):
            grid = self.grid(self.fixed_z)
            path = self.out / "samples" / f"step_{self.step:07d}.png"
            with writing(path):
                vutils.save_image(grid, path)
                self.writer.add_image("samples", grid, self.step)
            self.health.grid(grid, len(self.fixed_z), self.step)
        if self.eval_every and self.step % self.eval_every == 0:
            self.evaluate()
        if self.step % self.args.checkpoint_every == 0:
            self.check_finite()
            self.save("last.pt")

    def log(self, scalars):
        with writing(self.out):
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, self.step)
        self.progress.set_postfix({name.split("/")[-1]: f"{value:.4g}" for name, value in list(scalars.items())[:2]})

    def evaluate(self):
        """The metric now; a new best is saved as best.pt, with last.pt at the same step."""
        self.check_finite()
        scalars, score = self.metric()
        self.log(scalars)
        higher, best = self.higher_is_better, self.best
        if math.isfinite(score) and (best is None or (score > best["score"] if higher else score < best["score"])):
            self.best = {"score": score, "step": self.step}
            self.save("best.pt")  # then last.pt: a kill between the two is replayed exactly by --resume
            self.save("last.pt")

    def check_finite(self):
        """Stop, keeping the last good checkpoint, if a scalar, a weight or a buffer has become NaN or Inf."""
        bad_step = self.first_bad_step.item()
        tensors = [t for net in self.nets.values() for t in [*net.parameters(), *net.buffers()]
                   if t.is_floating_point()]
        if bad_step < 0 and not torch.stack([t.isfinite().all() for t in tensors]).all():
            bad_step = self.step
        if bad_step >= 0:
            self.writer.close()
            last = self.out / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint had been written yet"
            fail(f"a loss or weight became NaN or Inf at step {bad_step}; stopped there, and {kept}", code=1)

    def state(self):
        return {"folder": self.folder, "format": FORMAT, "step": self.step, "best": self.best, "fixed_z": self.fixed_z,
                **{name: net.state_dict() for name, net in self.nets.items()},
                **{name: optimizer.state_dict() for name, optimizer in self.optimizers.items()},
                "batches": self.batches.state_dict(), "args": vars(self.args),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def save(self, name):
        save_checkpoint(self.out / "checkpoints" / name, self.state())

    def restore(self, checkpoint):
        try:
            for name, net in self.nets.items():
                net.load_state_dict(checkpoint[name])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(checkpoint[name])
            self.batches.load_state_dict(checkpoint["batches"])
            self.fixed_z = checkpoint["fixed_z"].to(self.fixed_z.device)
            self.step, self.best = checkpoint["step"], checkpoint["best"]
            rng = checkpoint["rng"]
            random.setstate(rng["python"])
            np.random.set_state(rng["numpy"])
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:  # a checkpoint of other networks
            fail(f"--resume {self.args.resume}: the checkpoint does not fit {self.folder}'s networks ({reason(error)})")

    def finish(self):
        """The last checkpoint and the progress animation; returns the exit code (128 + signal if stopped)."""
        self.progress.close()
        self.check_finite()
        self.save("last.pt")
        frames = sorted((self.out / "samples").glob("step_*.png"))  # as an animation, GIF_FRAMES evenly spaced
        picked = [frames[round(i)] for i in np.linspace(0, len(frames) - 1, min(GIF_FRAMES, len(frames)))]
        with writing(self.out / "progress.gif"):
            if picked:
                imageio.imwrite(self.out / "progress.gif", [imageio.imread(f) for f in picked], duration=250, loop=0)
        with writing(self.out):
            self.writer.close()
        if self.stopped_by is not None:
            print(f"stopped by {signal.Signals(self.stopped_by).name} at step {self.step}; continue with: "
                  f"python train.py --resume {self.out}")
            return 128 + self.stopped_by
        print(f"done: step {self.step} of {self.total} in {(time.perf_counter() - self.started) / 60:.1f} min; "
              f"samples and checkpoint in {self.out}")
        return 0


# ---- the run's health: signs that training is failing, said while it goes on ----
# The thresholds come from 1,500-step MNIST runs of every folder at its defaults (width 16) and 600-2,100-step runs
# made to fail (--lr 0.05); the top-level README's "When a run is failing" lists the values measured.
# Healthy runs pass through a phase where D wins and the grid is nearly one image: SN-DCGAN's logits sat near
# +27 / -8 (D winning for 525 steps without a break) and its grid under COLLAPSE_FRACTION for 500 steps before G
# caught up; a sign must hold about four times that long before it is said.
HEALTH_STRETCH = 2000  # steps a sign must hold without a break before it is said; said again after each further stretch
WIN_MARGIN = 0.05  # healthy DCGAN, LSGAN, CGAN: D(x) <= 0.961 and D(G(z)) >= 0.048; failing: 0.997+ and 0.002-
RUNAWAY_GROWTH = 10  # the critic's estimate runs away: 10 times the largest it was a stretch earlier
COLLAPSE_FRACTION = 0.05  # collapsed grids measured 0.000-0.005 of the real spread; healthy ones 0.6-1.05 by step 1500
GRID_PADDING = 2  # torchvision's make_grid padding, which every folder's grid uses


class Separated:
    """D wins outright: the scalars named `real` and `fake` (D's mean output on real images and on G's), given
    as (name, target), both lie within WIN_MARGIN of the targets' gap from their targets."""

    def __init__(self, real, fake):
        self.real, self.fake = real, fake

    def __call__(self, scalars, step):
        (real, real_target), (fake, fake_target) = self.real, self.fake
        gap = real_target - fake_target
        if (scalars[real] - fake_target) / gap >= 1 - WIN_MARGIN and (scalars[fake] - fake_target) / gap <= WIN_MARGIN:
            return f"D wins outright: {real} {scalars[real]:.4g} (target {real_target:g}), {fake} " \
                   f"{scalars[fake]:.4g} (target {fake_target:g})"
        return None


class RunsAway:
    """The critic's estimate (the scalar `name`) runs away: non-finite, or over RUNAWAY_GROWTH times the largest
    magnitude it had up to HEALTH_STRETCH steps earlier."""

    def __init__(self, name):
        self.name, self.recent, self.peak = name, collections.deque(), None  # peak: the largest a stretch earlier

    def __call__(self, scalars, step):
        value = scalars[self.name]
        self.recent.append((step, abs(value)))
        while self.recent[0][0] <= step - HEALTH_STRETCH:
            self.peak = max(self.peak or 0.0, self.recent.popleft()[1])
        if not math.isfinite(value) or (self.peak is not None and abs(value) > RUNAWAY_GROWTH * self.peak):
            peak = f"; at most {self.peak:.4g} until step {step - HEALTH_STRETCH}" if self.peak is not None else ""
            return f"the critic's {self.name} runs away: {value:.4g}{peak}"
        return None


class Health:
    """Says, once on stderr and as TensorBoard text "health", when a sign of failure has held for HEALTH_STRETCH
    steps (and again after each further stretch): `d_wins(scalars, step)` on each logged mean (Separated or
    RunsAway), and a fixed-noise grid whose samples have collapsed onto one another."""

    def __init__(self, writer, d_wins, real_images, count):
        self.writer, self.d_wins = writer, d_wins
        self.since, self.said = {}, {}
        self.real_spread = None
        if real_images is not None:  # image data: the first `count` images as the grid shows them, in [0, 1]
            real = torch.as_tensor(real_images[:count]).float() / 255
            self.size = real.shape[-2:]
            self.real_spread = spread(real.expand(-1, 3, -1, -1))

    def scalars(self, scalars, step):
        if self.d_wins is not None:
            self.check("d_wins", self.d_wins(scalars, step), step)

    def grid(self, grid, count, step):
        if self.real_spread is None:
            return
        samples = grid_tiles(grid.float().cpu(), count, *self.size)
        ratio = spread(samples) / self.real_spread
        self.check("collapse", f"the fixed-noise grid collapsed: its samples' mean pairwise distance is "
                               f"{ratio:.3f} of the real images'" if ratio < COLLAPSE_FRACTION else None, step)

    def check(self, sign, failing, step):
        if failing is None:
            self.since.pop(sign, None)
            self.said.pop(sign, None)
            return
        since = self.since.setdefault(sign, step)
        held = step - since
        if held >= HEALTH_STRETCH * (self.said.get(sign, 0) + 1):
            self.said[sign] = self.said.get(sign, 0) + 1
            line = f"warning: step {step}: {failing}, for {held} steps; training goes on"
            tqdm.write(line, file=sys.stderr)
            with writing(self.writer.log_dir):
                self.writer.add_text("health", line, step)


def spread(images):
    """The mean Euclidean distance between two different images of a batch."""
    return torch.pdist(images.flatten(1).double()).mean().item()


def grid_tiles(grid, count, height, width):
    """The first `count` images of a make_grid picture of height x width images."""
    columns = (grid.shape[-1] - GRID_PADDING) // (width + GRID_PADDING)
    top = [GRID_PADDING + (i // columns) * (height + GRID_PADDING) for i in range(count)]
    left = [GRID_PADDING + (i % columns) * (width + GRID_PADDING) for i in range(count)]
    return torch.stack([grid[:, t:t + height, l:l + width] for t, l in zip(top, left)])


def new_run_folder(runs):
    """runs/<date-time>, created now; -2, -3, ... after it when another run started in the same second."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for n in range(1, 1000):
        folder = runs / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            fail(f"cannot create a run folder in {runs}: {reason(error)}")
    fail(f"{runs} already holds 999 runs started at {stamp}")


def quiet_full_disk(hook):
    """The event writer's thread dies on a full disk without a word: the next write reports it (see writing)."""
    if not issubclass(hook.exc_type, OSError):
        threading.__excepthook__(hook)


def hold(folder):
    """The run folder's lock, held until this process ends (the operating system lets go even after kill -9):
    a second run in the same folder is refused, naming the process that holds it."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "a+")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        lock.seek(0)
        fail(f"{folder} is in use by a running train.py (process {lock.read().strip() or 'unknown'}); wait for it to "
             f"end, or choose another --out")
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


# ---- model.py's sampling command ----

def sampling_parser(description, num_help="how many images (default: 64)"):
    """model.py's flags, the same in every folder; a folder may add its own before read_sampling_flags."""
    parser = FlagParser(description=description)
    parser.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder, or a checkpoint file")
    parser.add_argument("--checkpoint", default="auto", choices=("auto", "best", "last"),
                        help="in a run folder: best.pt (by the folder's metric), last.pt, or best.pt if it exists")
    parser.add_argument("--num", type=int, default=None, help=num_help)
    parser.add_argument("--out", default="samples.png", help="the grid's file, or a folder with --single")
    parser.add_argument("--single", action="store_true", help="write the images as separate PNG files into --out")
    parser.add_argument("--seed", type=int, default=0, help="seed for z")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    inspect = parser.add_mutually_exclusive_group()
    inspect.add_argument("--interpolate", action="store_true",
                         help="--rows rows of --steps images, each row decoded from evenly spaced z on a path between "
                              "two random z (GAN paper Fig. 3, DCGAN Fig. 4: both walk the straight line)")
    inspect.add_argument("--nearest", action="store_true",
                         help="--rows rows of --pairs samples, each beside its nearest training image (L2 in pixels; "
                              "GAN paper Fig. 2), and the median nearest distance of samples and of held-out images")
    parser.add_argument("--rows", type=int, default=8,
                        help="--interpolate, --nearest: rows of the grid (this command's choice, as are --steps, "
                             "--pairs and --compare: the papers print no counts)")
    parser.add_argument("--steps", type=int, default=10, help="--interpolate: images per row, both ends included")
    parser.add_argument("--path", default="line", choices=("line", "circle"),
                        help="--interpolate: the straight line (both papers), or, for a Gaussian prior, the great "
                             "circle between the two directions with the radius moving linearly from end to end")
    parser.add_argument("--pairs", type=int, default=5, help="--nearest: sample and neighbour pairs per row")
    parser.add_argument("--compare", type=int, default=1000,
                        help="--nearest: the medians are over this many samples (the grid shows the first) and as "
                             "many held-out images")
    parser.add_argument("--data-root", default=None,
                        help="--nearest: where the training data lives (default: the run's own --data-root)")
    return parser


def read_sampling_flags(parser, argv, folder):
    """model.py's flags and the checkpoint they name, or one line naming the problem; nothing is written."""
    args = parser.parse_args(expand_home(argv))
    require_at_least(parser, args, 1, "num", "rows", "pairs", "compare")
    require_at_least(parser, args, 2, "steps")
    if (args.interpolate or args.nearest) and (args.single or args.num is not None):
        parser.error(f"{'--single' if args.single else '--num'} does not go with "
                     f"{'--interpolate' if args.interpolate else '--nearest'}: its grid is --rows by "
                     f"{'--steps' if args.interpolate else '--pairs'}")
    if not 0 <= args.seed < 2 ** 32:
        parser.error(f"--seed must lie in [0, 2^32), got {args.seed}")
    check_device(parser, args.device, ("cpu", "cuda"))
    out = Path(args.out)
    if args.single and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        parser.error(f"--out {out} exists and is not an empty folder; --single needs a new or empty folder")
    if not args.single and out.exists():
        parser.error(f"--out {out} already exists; choose a new file name for the grid")
    if unwritable(out.parent):
        parser.error(f"--out {out}: {unwritable(out.parent)}")
    try:
        checkpoint = read_checkpoint(checkpoint_path(args.run, args.checkpoint), folder)
    except CheckpointError as error:
        parser.error(str(error))
    return args, checkpoint


def load_weights(parser, net, weights, what):
    """`weights` into `net`, or one line saying that they belong to other networks."""
    try:
        net.load_state_dict(weights)
    except (KeyError, RuntimeError) as error:
        parser.error(f"{what}: the checkpoint's weights do not fit this folder's networks ({reason(error)})")
    return net


def write_images(generate, inputs, out, single, nrow=None, names=None, step=None):
    """G's images for `inputs` (tensors split along their first dimension, generate(*chunk) -> images in [0, 1])
    as one grid PNG of `nrow` images a row (default: as square as it goes), or with `single` one PNG each
    (00000.png, ... unless `names`), SAMPLE_CHUNK at a time; given the checkpoint's `step`, one line saying so."""
    out, num = Path(out), len(inputs[0])
    nrow = nrow or math.ceil(math.sqrt(num))
    if not single and num > GRID_MOST:
        fail(f"--num {num}: a grid of that many images is a picture no one can look at (at most {GRID_MOST}); "
             f"--single writes any number of images one by one")
    with writing(out), torch.no_grad():
        (out if single else out.parent).mkdir(parents=True, exist_ok=True)
        if not single:
            vutils.save_image(generate(*inputs), out, nrow=nrow, padding=2)
        else:
            start = 0
            for chunk in zip(*(tensor.split(SAMPLE_CHUNK) for tensor in inputs)):
                for i, image in enumerate(generate(*chunk), start):
                    vutils.save_image(image, out / (names[i] if names else f"{i:05d}.png"))
                start += len(chunk[0])
    if step is not None:
        print(f"wrote {num} samples of step {step} to {out}")


# ---- model.py's --interpolate and --nearest ----
NEAREST_BATCH = 2048  # --nearest: training images compared at a time, so memory stays flat on any data set


def inspect(args, checkpoint, draw, draw_z, training, gaussian=False, labels=None):
    """model.py --interpolate or --nearest. draw(z) -> G's images in [0, 1] (with `labels`: draw(z, labels(row)),
    row the grid row of each z); draw_z(n) -> n z of the folder's prior, `gaussian` or not; training(root) -> the
    run's training set, uint8 (N, C, H, W), as its dataset.py loads it."""
    generate = (lambda z, rows: draw(z)) if labels is None else (lambda z, rows: draw(z, labels(rows)))
    if args.interpolate:
        return write_interpolation(args, checkpoint, generate, draw_z, gaussian)
    return write_nearest(args, checkpoint, generate, draw_z, training)


def interpolation_path(z0, z1, steps, path="line"):
    """`steps` evenly spaced points from z0 to z1, both ends exactly included: on the straight line, or on the
    great circle between their directions with the radius going linearly from |z0| to |z1|, so that under a
    Gaussian prior no point is as atypically short as the line's middle."""
    t = torch.linspace(0, 1, steps, device=z0.device)[:, None]
    if path == "line":
        points = (1 - t) * z0 + t * z1
    else:
        r0, r1 = z0.norm(), z1.norm()
        angle = torch.arccos((z0 @ z1 / (r0 * r1)).clamp(-1, 1))
        # spherical interpolation of the unit directions, which stays on the unit sphere
        direction = (torch.sin((1 - t) * angle) * z0 / r0 + torch.sin(t * angle) * z1 / r1) / torch.sin(angle)
        points = ((1 - t) * r0 + t * r1) * direction
    points[0], points[-1] = z0, z1
    return points


def write_interpolation(args, checkpoint, generate, draw_z, gaussian):
    """--rows rows of --steps images along --path; row r walks from the (2r)-th to the (2r + 1)-th of
    draw_z(2 * rows), so that its ends are G's samples of those z."""
    if args.path == "circle" and not gaussian:
        fail("--path circle needs a Gaussian prior; this folder's z is uniform in a cube, which the circle leaves; "
             "use --path line")
    ends = draw_z(2 * args.rows)
    z = torch.cat([interpolation_path(a, b, args.steps, args.path) for a, b in zip(ends[0::2], ends[1::2])])
    rows = torch.arange(args.rows, device=z.device).repeat_interleave(args.steps)
    write_images(generate, (z, rows), args.out, False, args.steps)
    print(f"wrote {args.rows} rows of {args.steps} images along the {args.path} between two z, of step "
          f"{checkpoint['step']}, to {args.out}")


def nearest_training(images, training, device, batch=NEAREST_BATCH):
    """The L2 distance in pixel space ([0, 1]) from each of `images` (float in [0, 1]) to its nearest image of
    `training` (uint8), and that image's index; the training set goes to `device` `batch` images at a time."""
    queries = images.flatten(1).to(device, torch.float32)
    best = torch.full((len(queries),), math.inf, device=device)
    index = torch.zeros(len(queries), dtype=torch.long, device=device)
    for start in range(0, len(training), batch):
        chunk = training[start:start + batch].to(device).flatten(1).float().div_(255)
        # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y: one matrix product per batch
        squared = queries.pow(2).sum(1, keepdim=True) + chunk.pow(2).sum(1) - 2 * queries @ chunk.T
        value, where = squared.min(1)
        closer = value < best
        best, index = torch.where(closer, value, best), torch.where(closer, where + start, index)
    index = index.cpu()
    # the distance to the chosen image computed directly, free of the matrix product's rounding
    nearest = training[index].to(device).flatten(1).float().div_(255)
    return (queries - nearest).norm(dim=1).cpu(), index


def held_out_images(name, root, image_size):
    """The test split of `name` (one of TEST_SPLITS) as uint8 (N, C, image_size, image_size), never downloaded."""
    if name in MNIST_CLASSES:
        images = read_mnist(name, root, train=False, download=False)[0][:, None]
    else:
        images = torch.as_tensor(torchvision.datasets.CIFAR10(root, train=False, download=False).data)
        images = images.permute(0, 3, 1, 2)
    return resize(images.contiguous(), image_size)


def write_nearest(args, checkpoint, generate, draw_z, training):
    """GAN paper Fig. 2: --rows rows of --pairs samples, each beside its nearest training image; then the median
    nearest distance of --compare samples beside that of as many held-out images, to show whether G copies."""
    run = checkpoint["args"]
    root = Path(args.data_root or run["data_root"])
    try:
        train_set = training(root)
    except DataError as error:
        fail(error)
    count, shown = max(args.compare, args.rows * args.pairs), args.rows * args.pairs
    z = draw_z(count)
    rows = torch.arange(count, device=z.device) // args.pairs
    with torch.no_grad():
        samples = torch.cat([generate(*chunk).cpu() for chunk in zip(z.split(SAMPLE_CHUNK), rows.split(SAMPLE_CHUNK))])
    if samples.shape[1:] != train_set.shape[1:]:
        fail(f"G's images are {tuple(samples.shape[1:])}, but the training images under {root} are "
             f"{tuple(train_set.shape[1:])}: --data-root holds another data set")
    distance, index = nearest_training(samples, train_set, args.device)
    pairs = torch.stack([samples[:shown], train_set[index[:shown]].float() / 255], 1).flatten(0, 1)
    write_images(lambda images: images, (pairs,), args.out, False, 2 * args.pairs)
    print(f"wrote {shown} samples of step {checkpoint['step']}, each beside its nearest of {len(train_set)} "
          f"{run['dataset']} training images, to {args.out}")
    print(f"median L2 distance (pixels in [0, 1]) to the nearest training image: {distance.median():.3f} for "
          f"{count} samples")
    if run["dataset"] not in TEST_SPLITS:
        return print(f"{run['dataset']} has no test split: no held-out images to compare with")
    try:
        test = held_out_images(run["dataset"], root, train_set.shape[-1])
    except Exception as error:  # missing or damaged files
        return print(f"the {run['dataset']} test split is not readable under {root} ({reason(error)}): "
                     f"no held-out images to compare with")
    held_out = test[torch.randperm(len(test))[:count]].float() / 255
    print(f"median L2 distance (pixels in [0, 1]) to the nearest training image: "
          f"{nearest_training(held_out, train_set, args.device)[0].median():.3f} for {len(held_out)} held-out "
          f"test images")


# ---- IS, FID and KID through torch-fidelity ----
# Inception Score (Salimans et al. 2016), FID (Heusel et al. 2017) and KID (Binkowski et al. 2018), computed by
# torch-fidelity; G's samples and the real images go to it as uint8 tensors, never as files.
ISC_SPLITS = 10  # Salimans et al. 2016 (official code, inception_score.py): the mean and std over 10 splits
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018 (torch-fidelity's defaults): 100 subsets of 1000
EVAL_BATCH = 64  # images per forward pass of G and of the feature extractor (torch-fidelity's default)
METRIC_EVALUABLE = {"eval_samples", "eval_real", "feature_extractor"}
TEST_SPLITS = ("mnist", "fashion-mnist", "cifar10")  # the data sets that --eval-real test can use


def fidelity():
    """torch-fidelity, imported at first use, with z ~ U(-1, 1)^d as a noise source beside its "normal"."""
    import torch_fidelity
    from torch_fidelity.registry import NOISE_SOURCE_REGISTRY

    if "uniform_-1_1" not in NOISE_SOURCE_REGISTRY:
        torch_fidelity.register_noise_source(
            "uniform_-1_1", lambda rng, shape: torch.from_numpy(rng.uniform(-1.0, 1.0, shape)).float())
    return torch_fidelity


def add_metric_flags(p):
    p.add_argument("--evaluate", default=None, metavar="RUN_OR_CHECKPOINT",
                   help="print the Inception Score, FID and KID of a trained G (a run folder's checkpoints/best.pt "
                        "when it kept one, else its last.pt; or a checkpoint file), write metrics.json into its run "
                        "folder, and exit")
    p.add_argument("--eval-samples", type=int, default=50_000,
                   help="samples of G that --evaluate scores; 50,000 in 10 splits is the IS protocol of Salimans "
                        "et al. 2016 (official code) and of the official WGAN-GP code (gan_cifar_resnet.py)")
    p.add_argument("--eval-real", default="train", choices=("train", "test"),
                   help="the real images FID and KID compare against: the training set as train.py prepares it, "
                        "or the test split (mnist, fashion-mnist, cifar10) prepared the same way")
    p.add_argument("--eval-every", type=int, default=None,
                   help="during training, every N steps: IS, FID and KID on --eval-every-samples samples, logged "
                        "as metrics/is, metrics/fid, metrics/kid; the best FID's checkpoint is kept as "
                        "checkpoints/best.pt (default: off)")
    p.add_argument("--eval-every-samples", type=int, default=10_000,
                   help="samples of G for each --eval-every evaluation (FID is higher at fewer samples: compare "
                        "only numbers of the same sample count)")
    p.add_argument("--feature-extractor", default="inception-v3-compat",
                   help="torch-fidelity's feature extractor; inception-v3-compat is its port of the TensorFlow "
                        "Inception-v3 that the IS and FID reference code uses")


def check_metric_args(parser, args):
    require_at_least(parser, args, ISC_SPLITS, "eval_samples", "eval_every_samples")
    require_at_least(parser, args, 1, "eval_every")
    if args.eval_real == "test" and args.dataset not in TEST_SPLITS:
        parser.error(f"--eval-real test: {args.dataset} has no test split here (those with one: "
                     f"{', '.join(TEST_SPLITS)}); use --eval-real train")
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    if args.feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        parser.error(f"--feature-extractor {args.feature_extractor!r} is not one of torch-fidelity's: "
                     f"{', '.join(FEATURE_EXTRACTORS_REGISTRY)}")


def check_feature_extractor(args, device):
    """Create the feature extractor once (torch-fidelity downloads its weights at first use), or exit in one line."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as url
    extractor = FEATURE_EXTRACTORS_REGISTRY[args.feature_extractor]
    try:
        with rng_untouched(device), contextlib.redirect_stderr(sys.stdout):  # the download's progress is no error
            extractor(args.feature_extractor, [extractor.get_default_feature_layer_for_metric("fid")], verbose=False)
    except Exception as error:  # offline at first use, or a damaged weights file
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        fail(f"{args.feature_extractor} cannot be made from its weights in {folder} ({reason(error)}); for "
             f"Inception-v3, copy {Path(url).name} there from {url}, or delete a damaged copy to download it again")


class RealSet(torch.utils.data.Dataset):
    """The real images FID and KID compare against, as torch-fidelity takes them (uint8 (3, H, W)): the training
    set as train.py trains on it, or the test split prepared the same way. Their features are cached under a
    name keyed by data set, split, image size, count and content."""

    def __init__(self, args, training_images):
        try:
            if args.eval_real == "train":
                self.images = torch.as_tensor(training_images(args))
            elif args.dataset in MNIST_CLASSES:  # read where it is: a read-only folder is fine
                self.images = resize(read_mnist(args.dataset, Path(args.data_root), False)[0][:, None], args.image_size)
            else:
                data = torch.as_tensor(torchvision.datasets.CIFAR10(args.data_root, train=False, download=True).data)
                self.images = resize(data.permute(0, 3, 1, 2).contiguous(), args.image_size)
        except DataError as error:
            fail(error)
        except Exception as error:  # missing or corrupt files, or a failed download
            fail(f"the {args.dataset} test split is not readable under {args.data_root} ({reason(error)}); put it "
                 f"there, or use --eval-real train")
        self.description = f"the {len(self)} {args.eval_real} images of {args.dataset} at {args.image_size}px"
        content = hashlib.sha1()
        for start in range(0, len(self), 4096):
            content.update(self.images[start:start + 4096].contiguous().numpy())
        self.cache_name = f"{args.dataset}-{args.eval_real}-{args.image_size}px-{len(self)}-{content.hexdigest()[:12]}"
        candidates = [Path(args.data_root) / ".fidelity-cache", Path(torch.hub.get_dir()).parent / "fidelity_cache"]
        self.cache_root = next((folder for folder in candidates if unwritable(folder) is None), None)
        if self.cache_root != candidates[0]:
            tqdm.write(f"the data root {args.data_root} is not writable; the real set's features are "
                       + (f"cached in {self.cache_root}" if self.cache_root else "computed at every evaluation"))

    def cached(self, extractor):
        return self.cache_root is not None and any(self.cache_root.glob(f"{self.cache_name}-{extractor}-*"))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index].expand(3, -1, -1)

    def __getitems__(self, indices):  # a whole batch at once (the DataLoader's batched fetch)
        return list(self.images[indices].expand(-1, 3, -1, -1))


def sample_metrics(draw, args, device, z_prior, real, num_samples):
    """IS of num_samples samples of G (z from torch-fidelity's seeded noise source `z_prior`, `draw(z)` in
    [-1, 1]); their FID and KID against the real set, whose features are cached."""
    tf = fidelity()
    progress = tqdm(total=num_samples, desc=f"generating and embedding {num_samples} samples", unit="img",
                    leave=False, dynamic_ncols=True)

    class Samples(tf.GenerativeModelBase):
        z_size, z_type, num_classes = args.z_dim, z_prior, 0

        def forward(self, z):
            progress.update(len(z))
            # [-1, 1] back to pixels: the inverse of the data's x / 127.5 - 1
            pixels = draw(z.to(device)).float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)
            return pixels.expand(-1, 3, -1, -1)

    if not real.cached(args.feature_extractor):
        tqdm.write(f"the features of {real.description} are computed once"
                   + (f" and cached in {real.cache_root}" if real.cache_root else ""))
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    kid_subset_size = min(KID_SUBSET_SIZE, num_samples, len(real))
    with rng_untouched(device), on_device:
        scores = tf.calculate_metrics(
            input1=Samples(), input1_model_num_samples=num_samples, input2=real, input2_cache_name=real.cache_name,
            cache=real.cache_root is not None, cache_root=str(real.cache_root), isc=True, fid=True, kid=True,
            isc_splits=ISC_SPLITS, kid_subsets=KID_SUBSETS, kid_subset_size=kid_subset_size,
            feature_extractor=args.feature_extractor, batch_size=EVAL_BATCH, cuda=device.type == "cuda",
            rng_seed=args.seed, save_cpu_ram=True, verbose=False)
    progress.close()
    return {"inception_score": scores[tf.KEY_METRIC_ISC_MEAN], "inception_score_std": scores[tf.KEY_METRIC_ISC_STD],
            "fid": scores[tf.KEY_METRIC_FID], "kid": scores[tf.KEY_METRIC_KID_MEAN],
            "kid_std": scores[tf.KEY_METRIC_KID_STD], "kid_subset_size": kid_subset_size}


def evaluate_checkpoint(args, checkpoint, G, draw, device, folder, z_prior, training_images):
    """--evaluate: IS, FID and KID of G on --eval-samples samples, for a run folder's best.pt and last.pt when it
    kept both (else the one it has, or the checkpoint file given); metrics.json in its run folder holds one record
    per checkpoint, keyed "best" / "last", each number beside how it was measured. `draw(z)` samples G in [-1, 1];
    `training_images(args)` is the training set as uint8."""
    run = Path(args.out)
    if unwritable(run):
        fail(f"cannot write metrics.json into the run folder {run}")
    check_feature_extractor(args, device)
    path = checkpoint_path(args.evaluate, "auto")
    scored = {path.stem: (path, checkpoint)}
    last = checkpoint_path(args.evaluate, "last")
    if last != path and last.is_file():
        try:
            scored["last"] = (last, read_checkpoint(last, folder))
        except CheckpointError as error:
            fail(f"--evaluate: {error}")
    real = RealSet(args, training_images)
    records, by_step = {}, {}
    for name, (path, checkpoint) in scored.items():
        print(f"{folder}: {name} = {path} (step {checkpoint['step']}), {args.eval_samples} samples against "
              f"{real.description}")
        if checkpoint["step"] not in by_step:  # best.pt and last.pt of the same step hold the same G
            G.to(device).load_state_dict(checkpoint["G"])
            by_step[checkpoint["step"]] = sample_metrics(draw, args, device, z_prior, real, args.eval_samples)
        scores = by_step[checkpoint["step"]]
        print(f"{name}: Inception Score: {scores['inception_score']:.3f} ± {scores['inception_score_std']:.3f} "
              f"({ISC_SPLITS} splits); FID: {scores['fid']:.3f}; KID: {scores['kid']:.5f} ± {scores['kid_std']:.5f} "
              f"({KID_SUBSETS} subsets of {scores['kid_subset_size']})")
        records[name] = {"folder": folder, "checkpoint": str(path.resolve()), "step": checkpoint["step"], **scores,
                         "samples": args.eval_samples, "dataset": args.dataset, "image_size": args.image_size,
                         "real_split": args.eval_real, "real_images": len(real), "isc_splits": ISC_SPLITS,
                         "kid_subsets": KID_SUBSETS, "z_prior": z_prior, "seed": args.seed,
                         "feature_extractor": args.feature_extractor,
                         "feature_extractor_weights": extractor_weights(args.feature_extractor),
                         "torch_fidelity": fidelity().__version__, "device": str(device)}
    merge_metrics(run / "metrics.json", records)
    print(f"wrote {run / 'metrics.json'}")
    return 0


def extractor_weights(name):
    """The weights file of torch-fidelity's Inception-v3; for other extractors, those torch-fidelity gives them."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    if name == "inception-v3-compat":
        return Path(URL_INCEPTION_V3).name
    return f"torch-fidelity {fidelity().__version__}'s default weights for {name}"


def merge_metrics(path, records):
    """`records` written into the JSON object of `path` beside the records already there (other evaluations')."""
    metrics = {}
    if Path(path).is_file():
        try:
            metrics = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            fail(f"{path} cannot be read as JSON ({reason(error)}); it is left as it is")
        if not isinstance(metrics, dict):
            fail(f"{path} does not hold a JSON object; it is left as it is")
    with writing(path):
        write_atomically(path, json.dumps({**metrics, **records}, indent=2).encode())


class TrainingMetrics:
    """--eval-every: IS, FID and KID of --eval-every-samples samples of G, logged as metrics/...; the run keeps
    the checkpoint of the lowest FID as checkpoints/best.pt."""

    def __init__(self, draw, args, device, z_prior, training_images):
        self.draw, self.args, self.device, self.z_prior = draw, args, device, z_prior
        self.training_images, self.real = training_images, None

    def __call__(self):
        if self.real is None:
            self.real = RealSet(self.args, self.training_images)
        scores = sample_metrics(self.draw, self.args, self.device, self.z_prior, self.real,
                                self.args.eval_every_samples)
        tqdm.write(f"FID {scores['fid']:.3f}, IS {scores['inception_score']:.3f}, KID {scores['kid']:.5f} "
                   f"({self.args.eval_every_samples} samples)")
        return {"metrics/fid": scores["fid"], "metrics/is": scores["inception_score"], "metrics/kid": scores["kid"]}, \
            scores["fid"]


# ---- MNIST's files ----

class DataError(Exception):
    """A problem with the data that the user can fix: train.py prints it and exits with code 2."""


MNIST_CLASSES = {"mnist": torchvision.datasets.MNIST, "fashion-mnist": torchvision.datasets.FashionMNIST}


def read_mnist(name, root, train=True, download=True):
    """The training (or test) images (N, 28, 28) and labels (N,) of MNIST or Fashion-MNIST: ROOT/MNIST/raw/*-ubyte
    (FashionMNIST/raw/), plain or gzipped, read where they are by torchvision's parsers whatever their checksum,
    or downloaded when absent. Every problem is a DataError naming the file."""
    folder = Path(root) / MNIST_CLASSES[name].__name__ / "raw"
    prefix = "train" if train else "t10k"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    absent = [folder / stem for stem in stems if not idx_file(folder, stem).is_file()]
    if absent:
        wanted = " and ".join(f"{path}(.gz)" for path in absent)
        if not download:
            raise DataError(f"{name}: {wanted} not found; point --data-root at a folder that has it")
        try:
            with no_new_folders_on_failure(folder):
                MNIST_CLASSES[name](root, train=train, download=True)
        except Exception as error:  # offline, blocked, or refused by the server
            raise DataError(f"{name}: {wanted} not found, and downloading it failed ({reason(error)}); download "
                            f"it on a machine with network access, or point --data-root at a folder that has it") \
                from None
    image_file, label_file = (idx_file(folder, stem) for stem in stems)
    images = read_idx(image_file, torchvision.datasets.mnist.read_image_file, "image")
    labels = read_idx(label_file, torchvision.datasets.mnist.read_label_file, "label")
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"{image_file} holds {images.shape[1]}x{images.shape[2]} images, not MNIST's 28x28")
    if len(labels) != len(images):
        raise DataError(f"{image_file} holds {len(images)} images but {label_file} holds {len(labels)} labels; "
                        f"one of the two files is damaged")
    if len(labels) and labels.max() > 9:
        raise DataError(f"{label_file} holds labels above 9: it is not an MNIST label file")
    return images, labels.long()


def idx_file(folder, stem):
    """The IDX file `stem` in `folder`: the plain file when there is one, else the gzipped one."""
    plain = folder / stem
    return plain if plain.is_file() else folder / f"{stem}.gz"


def read_idx(path, parse, kind):
    """One IDX file parsed by torchvision's `parse`; a gzipped one is unpacked into a scratch folder first."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            source = Path(scratch) / path.stem if path.suffix == ".gz" else path
            if source != path:
                source.write_bytes(gzip.decompress(path.read_bytes()))
        except (OSError, EOFError, zlib.error) as error:  # unreadable, not gzip, or cut short
            raise DataError(f"{path} cannot be read ({reason(error)}); replace it") from None
        try:
            return parse(str(source))
        except Exception as error:  # torchvision's parser stops with an assertion, a type or a shape error
            raise DataError(f"{path} is not an MNIST {kind} file in IDX format ({reason(error)}); replace it") from None


@contextlib.contextmanager
def no_new_folders_on_failure(folder):
    """Remove the folders on the way to `folder` that a failed download created (a mistyped --data-root)."""
    folder = Path(folder).absolute()
    new = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        yield
    except BaseException:
        if new:
            import shutil
            shutil.rmtree(new[-1], ignore_errors=True)
        raise


# ---- image data: in memory, or decoded once into a cache ----

CHANNELS = {"cifar10": 3, "mnist": 1, "fashion-mnist": 1, "celeba": 3, "folder": 3, "lsun": 3}
LSUN_SCENES = ("bedroom", "bridge", "church_outdoor", "classroom", "conference_room", "dining_room", "kitchen",
               "living_room", "restaurant", "tower")  # a set is CATEGORY_train or CATEGORY_val
EXPECTED_FILES = {"cifar10": "cifar-10-batches-py/ (or cifar-10-python.tar.gz)",
                  "celeba": "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt"}
DECODE_CHUNK = 256  # images decoded and written at a time: bounds the memory a decode holds
DECODE_WORKERS = 8  # at most this many decoding processes
SAVE_EVERY = 16  # chunks between progress records, from which an interrupted decode continues
ROOMY = 0.5  # --data-on auto: the set fits where it takes at most half of the free memory


def add_image_data_flags(p):
    """--data-root and the flags of decoding and placement (a folder with LSUN adds its own --lsun-classes)."""
    p.add_argument("--data-root", default=str(DATA_ROOT), help="where data sets live (../data)")
    p.add_argument("--data-on", default="auto", choices=("auto", "device", "host", "disk"),
                   help="where the decoded uint8 set is kept: auto = the device when it fits in half its free "
                        "memory, else host memory, else a memory-mapped file; the batches are the same")
    p.add_argument("--cache-dir", default=None,
                   help="where image folders, CelebA and LSUN are cached once decoded (default: beside the data, "
                        "or ~/.cache/gan-papers when that is read-only)")


def load_images(name, root, image_size, prepare, cache_dir=None, lsun_classes=(), download=True):
    """The whole training set of `name` as a uint8 tensor (N, C, image_size, image_size). MNIST, Fashion-MNIST
    and CIFAR-10 are read into memory by torchvision and resized there; image folders, CelebA and LSUN are
    decoded once by `prepare` (PIL image -> uint8 tensor) into a cache file that is memory-mapped."""
    root = Path(root)
    if name in MNIST_CLASSES:
        return resize(read_mnist(name, root, download=download)[0].unsqueeze(1), image_size)
    if name == "cifar10":
        try:
            with no_new_folders_on_failure(root):
                data = torchvision.datasets.CIFAR10(root, train=True, download=download).data
        except Exception as error:  # missing or corrupt files, or a failed download
            raise missing("cifar10", root, error) from None
        return resize(torch.as_tensor(data).permute(0, 3, 1, 2).contiguous(), image_size)
    if name == "folder":
        source = folder_source(root, prepare)
    elif name == "celeba":
        try:
            with no_new_folders_on_failure(root / "celeba"):
                celeba = torchvision.datasets.CelebA(root, split="all", target_type=[], transform=prepare,
                                                     download=download)
        except Exception as error:  # missing or corrupt files, or a failed download
            raise missing("celeba", root, error) from None
        files = [os.path.join(celeba.root, celeba.base_folder, "img_align_celeba", f) for f in celeba.filename]
        source = (f"CelebA in {(root / 'celeba').absolute()}", root / "celeba", files_digest(files), celeba)
    else:
        source = lsun_source(root, lsun_classes, prepare)
    return decode_once(*source, image_size, cache_dir)


def missing(name, root, error):
    return DataError(f"{name} is not readable under {root} ({reason(error)}); expected {EXPECTED_FILES[name]} "
                     f"there. Download it on a machine with network access, or point --data-root at a folder "
                     f"that has it.")


def resize(images, image_size, chunk=4096):
    """A uint8 set (N, C, H, W) resized once to image_size (bilinear, antialiased, rounded), in chunks."""
    if images.shape[-1] == image_size:
        return images
    out = torch.empty((*images.shape[:2], image_size, image_size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        part = F.interpolate(images[start:start + chunk].float(), size=(image_size, image_size), mode="bilinear",
                             antialias=True)
        out[start:start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


class FlatFolder(torch.utils.data.Dataset):
    """The images directly in a folder without class sub-folders (CelebA's img_align_celeba/, say)."""

    def __init__(self, root, transform):
        self.transform = transform
        self.samples = [(os.path.join(root, name), 0) for name in sorted(os.listdir(root))
                        if os.path.splitext(name)[1].lower() in IMG_EXTENSIONS]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.transform(pil_loader(self.samples[index][0])), 0


def folder_source(root, prepare):
    """torchvision's ImageFolder when `root` has class sub-folders, else every image directly in `root`."""
    if not root.is_dir():
        raise DataError(f"--data-root {root} is not a folder; --dataset folder needs a folder of images")
    try:
        if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
            images = torchvision.datasets.ImageFolder(root, transform=prepare, allow_empty=True)
        else:
            images = FlatFolder(root, prepare)
    except OSError as error:
        raise DataError(f"--data-root {root} cannot be read ({reason(error)})") from None
    if not images.samples:
        raise DataError(f"no images ({', '.join(IMG_EXTENSIONS)}) found in {root}")
    return f"the images in {root.absolute()}", root, files_digest(file for file, _ in images.samples), images


def files_digest(paths):
    """A hash of every file's name, size and modification time: what a decoded cache depends on."""
    lines = []
    for path in paths:
        try:
            stat = os.stat(path)
            lines.append(f"{os.path.basename(path)}\t{stat.st_size}\t{stat.st_mtime_ns}")
        except OSError:
            lines.append(f"{os.path.basename(path)}\tunreadable")
    return digest(lines)


class LsunScenes(torchvision.datasets.LSUN):
    """torchvision's LSUN; each decoding process opens the databases afresh (an LMDB handle must not be used
    across a fork), and torchvision's key list goes to a scratch folder, not the user's working folder."""

    def __init__(self, root, classes, transform):
        previous = os.getcwd()
        with tempfile.TemporaryDirectory() as scratch:
            os.chdir(scratch)
            try:
                super().__init__(root, classes=list(classes), transform=transform)
            finally:
                os.chdir(previous)
        self.opened_by = os.getpid()

    def __getitem__(self, index):
        if self.opened_by != os.getpid():
            import lmdb
            for db in self.dbs:
                db.env.close()  # this process's copy of the parent's handle
                db.env = lmdb.open(db.root, max_readers=1, readonly=True, lock=False, readahead=False, meminit=False)
            self.opened_by = os.getpid()
        return super().__getitem__(index)


def lsun_source(root, classes, prepare):
    """LSUN's sets `classes` under ROOT/lsun, as its download script leaves them: CLASS_lmdb/data.mdb."""
    folder = root / "lsun"
    databases = [folder / f"{name}_lmdb" / "data.mdb" for name in classes]
    for name, database in zip(classes, databases):
        category, _, split = name.rpartition("_")
        if category not in LSUN_SCENES or split not in ("train", "val"):
            raise DataError(f"--lsun-classes: {name!r} is not an LSUN scene set; give CATEGORY_train or "
                            f"CATEGORY_val with CATEGORY one of {', '.join(LSUN_SCENES)}")
        if not database.is_file():
            raise DataError(f"lsun: {database} not found; get {name}_lmdb.zip with LSUN's download.py (python3 "
                            f"download.py -c {category} -o {folder}), unzip it there, or point --data-root at the "
                            f"folder that holds lsun/")
    try:
        scenes = LsunScenes(str(folder.absolute()), classes, prepare)
    except Exception as error:  # lmdb.Error: a damaged or truncated database
        raise DataError(f"lsun: {' or '.join(str(d.parent) for d in databases)} is not a readable LMDB database "
                        f"({reason(error)}); download and unzip it again") from None
    if len(scenes) == 0:
        raise DataError(f"lsun: {folder} holds no images of {', '.join(classes)}")
    return f"LSUN {' + '.join(classes)} in {folder.absolute()}", folder, files_digest(databases), scenes


def digest(lines):
    return hashlib.sha1("\n".join(lines).encode()).hexdigest()[:12]


class Decodable(torch.utils.data.Dataset):
    """Each image of `dataset` as (uint8 tensor, None), or as (None, why) when its file does not decode."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index][0], None
        except Exception as error:  # a truncated or corrupt image file: reported, not fatal
            file = self.dataset.samples[index][0] if hasattr(self.dataset, "samples") else f"image {index}"
            why = "not an image file that Pillow reads" if isinstance(error, PIL.UnidentifiedImageError) \
                else reason(error)
            return None, f"{file} ({why})"


def stack_decoded(items):
    """A chunk of Decodable items: the images stacked (or None), the problems, and the number of items. The images
    travel as a numpy array, pickled through the worker's pipe: a tensor would be handed over as a shared file
    descriptor, whose handshake a Ctrl-C can cut, and the main process would print that as a traceback."""
    images = [image.numpy() for image, _ in items if image is not None]
    return (np.stack(images) if images else None), [why for _, why in items if why is not None], len(items)


def decode_once(what, home, identity, dataset, image_size, cache_dir):
    """The images of `dataset` (`what`), decoded once to uint8 (N, 3, S, S) into a cache file and mapped from it.
    The cache's name hashes what it depends on (files' names, sizes and times, the size, the preparation, the
    libraries' versions), so a stale cache is never read; files that do not decode are left out with a warning."""
    folder = Path(cache_dir) if cache_dir is not None else home
    if cache_dir is None and unwritable(home):
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gan-papers"
        print(f"note: {home} is not writable, so the decoded images are cached in {folder} (--cache-dir chooses "
              f"another folder)", file=sys.stderr)
    prefix = f".decoded-{image_size}px-{digest([what])}-"
    recipe = f"{dataset.transform}, Pillow {PIL.__version__}, torchvision {torchvision.__version__}"
    stem = folder / (prefix + digest([identity, str(image_size), recipe]))
    if open_cache(stem) is None:
        decode_into(what, dataset, stem, image_size)
        for stale in folder.glob(prefix + "*"):  # caches of earlier versions of the same files
            if not stale.name.startswith(stem.name + "."):
                stale.unlink(missing_ok=True)
    cached = open_cache(stem)
    if cached is None:
        raise DataError(f"the decoded images in {stem}.u8 cannot be read back; delete that file and run again")
    images, skipped = cached
    if skipped:
        listed = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        print(f"warning: left out {len(skipped)} of {len(images) + len(skipped)} image files that do not decode: "
              f"{listed}", file=sys.stderr)
    return images


def open_cache(stem):
    """The cached images, mapped from disk (not read), and the files left out; None unless the cache is whole."""
    data = Path(f"{stem}.u8")
    try:
        meta = json.loads(Path(f"{stem}.json").read_text())
        shape, skipped = [int(n) for n in meta["shape"]], [str(why) for why in meta["skipped"]]
        if len(shape) != 4 or shape[0] < 1 or data.stat().st_size != math.prod(shape):
            return None
        images = torch.from_file(str(data), shared=False, size=math.prod(shape), dtype=torch.uint8).view(shape)
    except (OSError, RuntimeError, ValueError, KeyError, TypeError):  # absent, partial or damaged
        return None
    images.mapped_from = data
    return images, skipped


def ignore_ctrl_c(worker_id):
    """A decoding process leaves Ctrl-C to the main process, which records how far the decode got."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_into(what, dataset, stem, image_size):
    """Decode every image into STEM.u8 and STEM.json, continuing an interrupted decode of STEM.partial."""
    dataset, row = Decodable(dataset), 3 * image_size * image_size
    total = len(dataset)
    partial, record = Path(f"{stem}.partial"), Path(f"{stem}.progress.json")
    try:
        progress = json.loads(record.read_text())
        if partial.stat().st_size < progress["rows"] * row:
            raise ValueError("the partial file is shorter than its record")
    except (OSError, ValueError, KeyError, TypeError):
        progress = {"done": 0, "rows": 0, "skipped": []}
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "r+b" if progress["done"] else "wb") as file:
            file.truncate(progress["rows"] * row)
            file.seek(progress["rows"] * row)
            remaining = torch.utils.data.Subset(dataset, range(progress["done"], total))
            workers = min(DECODE_WORKERS, os.cpu_count() or 1, math.ceil(len(remaining) / DECODE_CHUNK))
            # its own generator: the workers' seeds are not drawn from the training's seeded stream
            loader = torch.utils.data.DataLoader(remaining, batch_size=DECODE_CHUNK, num_workers=workers,
                                                 collate_fn=stack_decoded, generator=torch.Generator(),
                                                 worker_init_fn=ignore_ctrl_c)
            bar = tqdm(total=total, initial=progress["done"], unit="img", desc=f"decoding {total} images once")
            try:
                for chunk, (images, problems, count) in enumerate(loader, 1):
                    if images is not None:
                        file.write(np.ascontiguousarray(images).data)
                    progress = {"done": progress["done"] + count, "rows": progress["rows"] + count - len(problems),
                                "skipped": progress["skipped"] + problems}
                    bar.update(count)
                    if chunk % SAVE_EVERY == 0:
                        save_progress(file, record, progress)
            except (KeyboardInterrupt, RuntimeError) as stop:  # Ctrl-C, or a decoding process died
                bar.close()
                save_progress(file, record, progress)
                where = f"after {progress['done']} of {total} images; the next start continues from there"
                if isinstance(stop, KeyboardInterrupt):
                    fail(f"decoding {what} stopped by Ctrl-C {where}", code=130)
                raise DataError(f"decoding {what} stopped ({reason(stop)}) {where}") from None
            bar.close()
        if progress["rows"] == 0:
            raise DataError(f"none of the {total} images of {what} decode; the first: {progress['skipped'][0]}")
        meta = {"source": what, "shape": [progress["rows"], 3, image_size, image_size], "skipped": progress["skipped"]}
        write_atomically(Path(f"{stem}.json"), json.dumps(meta, indent=1).encode())
        os.replace(partial, f"{stem}.u8")  # from here on the cache is whole
        record.unlink(missing_ok=True)
    except OSError as error:  # a full disk or an unwritable folder: nothing half-written stays behind
        for path in (partial, record):
            path.unlink(missing_ok=True)
        raise DataError(f"cannot write the decoded images to {partial} ({reason(error)}); free space there, "
                        f"or choose another folder with --cache-dir") from None


def save_progress(file, record, progress):
    """What was written is on disk before the record says so."""
    file.flush()
    os.fsync(file.fileno())
    write_atomically(record, json.dumps(progress).encode())


# ---- where the decoded set is kept, and the batches ----

def size_text(size):
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def host_memory_available():
    """Bytes of host memory available to a new allocation (Linux's MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def choose_place(size, data_on, device):
    """Where Batches keeps a set of `size` bytes, and why: --data-on, or for auto the device when the set
    takes at most half of its free memory, else host memory when it fits there, else disk."""
    if data_on != "auto":
        return data_on, f"--data-on {data_on}"
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else host_memory_available()
    if free is None or size <= ROOMY * free:
        return "device", f"auto: the {size_text(size)} set fits in half of the free memory on {device}"
    too_big = f"auto: the {size_text(size)} set needs more than half of the {size_text(free)} free on {device}"
    host = host_memory_available() if device.type == "cuda" else None
    if device.type == "cuda" and (host is None or size <= ROOMY * host):
        return "host", too_big + "; it fits in host memory"
    return "disk", too_big + ("" if device.type == "cuda" else " (host memory)")


def keep(images, place, device):
    """The uint8 set where Batches keeps it: on the device, in host memory, or mapped from a file."""
    mapped = getattr(images, "mapped_from", None) is not None
    try:
        if place == "device":
            kept = images.to(device)
            return kept.clone() if kept is images and mapped else kept
        if place == "host":
            return images.clone() if mapped else images
        if mapped:
            return images
        with tempfile.NamedTemporaryFile(prefix="decoded-", suffix=".u8") as file:  # deleted; the mapping stays
            images.numpy().tofile(file)
            file.flush()
            spilled = torch.from_file(file.name, shared=False, size=images.numel(), dtype=torch.uint8)
        spilled = spilled.view(images.shape)
        spilled.mapped_from = "a temporary file"
        return spilled
    except (RuntimeError, OSError) as error:  # out of device or host memory, or of disk space
        raise DataError(f"--data-on {place}: the {size_text(images.numel())} data set does not fit there "
                        f"({reason(error)}); try --data-on auto or disk") from None


class Batches:
    """Endless minibatches of a uint8 image set, made the model's input by `scale` on `device` (with `labels`,
    pairs (x, y)). Epoch e's order is drawn from a generator seeded by (seed, e), so a resume draws the same
    batches; an epoch's incomplete last batch is dropped. The set is kept where choose_place says: on the device,
    or in host memory or on disk, gathered a batch ahead in a thread and copied (pinned, with CUDA)."""

    def __init__(self, images, batch_size, device, seed, scale, data_on="device", labels=None):
        if not 0 < batch_size <= len(images):
            raise DataError(f"--batch-size {batch_size} must be between 1 and the data set's {len(images)} images")
        self.device = torch.device(device)
        self.place, why = choose_place(images.numel(), data_on, self.device)
        self.images = keep(images, self.place, self.device)
        self.labels = None if labels is None else labels.to(self.device)
        where = {"device": f"on {self.device}", "host": "in host memory",
                 "disk": f"mapped from {getattr(self.images, 'mapped_from', None)}"}[self.place]
        ahead = "" if self.place == "device" else f", copied to {self.device} a batch ahead"
        self.placement = f"{where}{ahead} ({why})"
        self.batch_size, self.seed, self.scale = batch_size, seed, scale
        self.per_epoch = len(images) // batch_size
        self.epoch, self.index = 0, 0
        self.orders, self.ahead = {}, None
        self.gatherer = ThreadPoolExecutor(max_workers=1) if self.place != "device" else None

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        position = (self.epoch, self.index)
        self.index += 1
        picked = self.picked(*position)
        x = self.scale(self.images[picked] if self.place == "device" else self.fetched(position))
        return x if self.labels is None else (x, self.labels[picked.to(self.device)])

    def picked(self, epoch, index):
        """The indices of batch `index` of `epoch`: a slice of that epoch's permutation."""
        if epoch not in self.orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self.orders = {e: o for e, o in self.orders.items() if e >= epoch - 1}
            self.orders[epoch] = torch.randperm(len(self.images), generator=generator).to(self.images.device)
        return self.orders[epoch][index * self.batch_size:(index + 1) * self.batch_size]

    def fetched(self, position):
        """Batch `position`, gathered on the host while the step before it ran, and sent to the device."""
        if self.ahead is not None and self.ahead[0] == position:
            batch = self.ahead[1].result()
        else:
            batch = self.gather(self.picked(*position))
        epoch, index = position
        following = (epoch, index + 1) if index + 1 < self.per_epoch else (epoch + 1, 0)
        self.ahead = following, self.gatherer.submit(self.gather, self.picked(*following))
        return batch.to(self.device, non_blocking=True)

    def gather(self, picked):
        batch = self.images[picked]
        return batch.pin_memory() if self.device.type == "cuda" else batch

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        if self.ahead is not None:
            self.ahead[1].result()  # let the batch on its way land before it is dropped
            self.ahead = None
        self.epoch, self.index = state["epoch"], state["index"]


# ---- 2-D toy sets: measures and plots ----

class Sampled:
    """Endless batches draw(n, generator) of a set given by its sampler (the 2-D toy sets), fresh every step, from
    a generator seeded by `seed` whose state is in the checkpoint: a resume draws the same batches."""

    def __init__(self, draw, batch_size, device, seed):
        self.draw, self.batch_size, self.device = draw, batch_size, device
        self.generator = torch.Generator().manual_seed(seed)

    def __next__(self):
        return self.draw(self.batch_size, self.generator).to(self.device)

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])


def mode_measures(samples, centres, std):
    """(modes covered, share of high-quality samples): a sample is of high quality within 3 standard deviations of
    its nearest mode centre; a mode is covered when it is the nearest centre of at least one such sample."""
    distance, nearest = torch.cdist(samples.float().cpu(), centres.float()).min(1)
    good = distance <= 3 * std
    return len(nearest[good].unique()), good.float().mean().item()


def nearest_real_distance(samples, real):
    """The mean distance from each sample to its nearest point of `real`."""
    return torch.cdist(samples.float().cpu(), real.float().cpu()).min(1).values.mean().item()


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, never to a screen."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_plane(ax, real=None, fake=None, surface=None, density=None, extent=3.0, n=128):
    """One panel of the plane [-extent, extent]^2: the value surface of surface(points) as contours, a Gaussian
    KDE (Scott's bandwidth) of the samples `density`, real points (orange) and G's samples (green)."""
    xs = torch.linspace(-extent, extent, n)
    points = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    if surface is not None:
        ax.contourf(xs, xs, surface(points).detach().cpu().reshape(n, n), levels=20, cmap="viridis")
    if density is not None:
        density = density.float().cpu()
        h = density.std(0).mean() * len(density) ** (-1 / 6)
        ax.contourf(xs, xs, torch.exp(-torch.cdist(points, density).pow(2) / (2 * h * h)).mean(1).reshape(n, n),
                    levels=20, cmap="Greens")
    for points, colour in ((real, "orange"), (fake, "green")):
        if points is not None:
            ax.scatter(*points.detach().cpu().T, c=colour, marker="+", s=6, linewidths=0.5)
    ax.set(xlim=(-extent, extent), ylim=(-extent, extent), aspect="equal", xticks=[], yticks=[])


def save_figure(fig, path=None):
    """A figure into `path` (PNG); returned as a (3, H, W) tensor in [0, 1] (a sample grid) when no path is given."""
    plt = pyplot()
    if path is None:
        fig.canvas.draw()
        image = torch.from_numpy(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()).permute(2, 0, 1)
        plt.close(fig)
        return image.float() / 255
    with writing(path):
        fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
