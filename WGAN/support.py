"""Everything that is not the paper, the same file in every folder.

model.py, train.py and dataset.py hold the paper and pass in what differs (the folder's name, z's
prior, how its data is prepared); this file runs it and imports none of them. Nothing here changes
what the paper computes: resizing, precision and compilation are done in the trio.

In order: errors and flags; checkpoints; a run's configuration; the training run and its health;
model.py's sampling command; IS, FID and KID; reading data sets; image files decoded once; batches.
"""

import argparse
import contextlib
import errno
import gzip
import io
import json
import math
import os
import pickle
import random
import shlex
import signal
import socket
import sys
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path

import imageio.v3 as imageio
import numpy as np
import torch
import torchvision
import torchvision.utils as vutils
from filelock import FileLock, Timeout
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import summary
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
DATA_ROOT = HERE.parent / "data"  # data sets live beside the folders, shared by all of them
FORMAT = 2  # the layout of the checkpoints train.py writes; a reader refuses any other
GIF_FRAMES = 100  # progress.gif shows at most this many of the fixed-noise grids
CHUNK = 500  # images generated, compared or written at a time, so memory stays flat


# ---- one-line errors and flags ----


def fail(message, code=2):
    """One line on stderr; exit code 2 for a problem the user can fix, 1: diverged, 130: Ctrl-C."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(code)


def reason(error):
    """What went wrong, in one line: the last non-empty line of an error's message."""
    if isinstance(error, OSError) and (error.errno == errno.ENOSPC or error.strerror):
        return "the disk is full" if error.errno == errno.ENOSPC else error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def stop_in_one_line(main):
    """A script's main(); Ctrl-C outside a training loop ends it in one line, exit code 130."""
    try:
        return main()
    except KeyboardInterrupt:
        fail("stopped by Ctrl-C", code=130)


# Flags that existed once, each with what replaces it.
REMOVED = {
    "--data-on": "the set goes to the GPU when it fits, else batches come from host memory",
    "--channels-last": "convolutions run in PyTorch's default memory layout",
    "--path": "--interpolate walks the straight line, as both papers do",
}


class FlagParser(argparse.ArgumentParser):
    """argparse with every default in --help, and a bad flag said in one line without the usage."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        for arg in sys.argv[1:] if args is None else args:
            if (name := str(arg).split("=")[0]) in REMOVED:
                self.error(f"{name} was removed: {REMOVED[name]}")
        return super().parse_known_args(args, namespace)

    def error(self, message):
        fail(message)


ON_OFF = argparse.BooleanOptionalAction  # a switch with its --no- form: --compile / --no-compile


def flag(name):
    return "--" + name.replace("_", "-")


def require_at_least(parser, args, minimum, *names):
    """Each of the flags `names` (destination names, None when unset) is at least `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            parser.error(f"{flag(name)} must be at least {minimum}, got {value}")


def require_positive(parser, args, *names):
    for name in names:
        if not 0 < getattr(args, name) < math.inf:
            parser.error(f"{flag(name)} must be a positive number, got {getattr(args, name)}")


PRECISION = (
    "fp32: strict float32, the papers' arithmetic (TF32 off); tf32: matrix products and "
    "convolutions on a GPU's TF32 units (inputs rounded to a 10-bit mantissa, float32 sums); "
    "bf16: the steps under bfloat16 autocast, weights and optimiser state float32"
)


def add_run_flags(p, sample_every=500, log_every=50, checkpoint_every=500, sources=None):
    """The flags every training run has; `sources` cites a folder's interval defaults."""
    cited = {name: f" ({source})" for name, source in (sources or {}).items()}
    p.add_argument("--max-steps", type=int, help="stop after this many generator steps in all")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda, cpu")
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"), help=PRECISION)
    p.add_argument("--compile", action=ON_OFF, default=False, help="torch.compile the networks")
    p.add_argument("--seed", type=int, default=0, help="seeds Python, NumPy and torch")
    p.add_argument("--out", help="run folder (default: runs/<date-time>-<process number>)")
    p.add_argument("--resume", help="a run folder or checkpoint to continue exactly")
    for name, default, what in (
        ("sample_every", sample_every, "steps between fixed-noise sample grids"),
        ("log_every", log_every, "steps between scalar logs"),
        ("checkpoint_every", checkpoint_every, "steps between checkpoints"),
    ):
        p.add_argument(flag(name), type=int, default=default, help=what + cited.get(name, ""))


@contextlib.contextmanager
def writing(path):
    """A failed write (a full disk, a read-only folder) ends the run in one line naming the file."""
    try:
        yield
    except OSError as error:
        fail(f"cannot write {path}: {reason(error)}")


def write_atomically(path, data):
    """`data` into a temporary file renamed over `path`: a kill at any moment leaves one whole."""
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
    parent = next(p for p in [Path(folder), *Path(folder).parents] if p.exists())
    if not parent.is_dir():
        return f"{parent} is not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"{parent} is not writable"


def check_device(parser, device, choices=("auto", "cpu", "cuda")):
    if device not in choices and not device.startswith("cuda:"):
        parser.error(f"--device must be {', '.join(choices)}, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}, but no CUDA GPU is visible; use --device cpu")


def pick_device(args):
    """--device auto: CUDA when a GPU is visible, else the CPU."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(auto if args.device == "auto" else args.device)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_untouched(device, seed=None):
    """torch's draws inside come from their own stream, seeded by `seed` when given; the training's
    stream is untouched (nothing here draws from Python's or NumPy's)."""
    cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        yield


# ---- checkpoints ----


class CheckpointError(Exception):
    """A file that is not a usable checkpoint of this folder."""


def checkpoint_path(path, which="last"):
    """A checkpoint file, or a run folder's last.pt, best.pt, or (auto) best.pt when it has one."""
    path = Path(path)
    if not path.is_dir():
        return path
    if which == "auto":
        which = "best" if (path / "checkpoints" / "best.pt").is_file() else "last"
    return path / "checkpoints" / f"{which}.pt"


def read_checkpoint(path, folder):
    """A checkpoint of `folder`'s train.py, loaded with weights_only=True (pickle is refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # random bytes, truncated, not a torch file; or pickled objects
        if isinstance(error, pickle.UnpicklingError) and zipfile.is_zipfile(path):
            raise CheckpointError(f"{path} needs pickle, which could run code: refused") from None
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason(error)})") from None
    writer = checkpoint.get("folder") if isinstance(checkpoint, dict) else None
    if not isinstance(writer, str):
        raise CheckpointError(f"{path} is not a checkpoint of a train.py of this collection")
    if writer != folder:
        raise CheckpointError(f"{path} was written by {writer}/train.py, not {folder}/train.py")
    if checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {checkpoint.get('format')}, not {FORMAT}")
    return checkpoint


def rng_states():
    """Every random stream's state as tensors and plain values, which weights_only loading takes."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(rng):
    random.setstate(rng["python"])
    name, keys, position, has_gauss, gauss = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---- a run's configuration ----

# Where the data is and how fast it runs: any command on a run may change these, never what is
# computed. --resume may change the length and the intervals besides.
WHERE = {"data_root", "cache_dir", "device", "precision", "compile"}
RESUMABLE = {"max_steps", "sample_every", "log_every", "checkpoint_every", "eval_every"}
COMMANDS = ("resume", "evaluate", "evaluate_features", "evaluate_spectra")


def run_config(parser, argv, option, folder, allowed=(), which="auto"):
    """The run that `option` (resume, evaluate, ...) names: its configuration with the flags given
    anew (only WHERE | `allowed` may differ), its checkpoint and path; --out is its folder."""
    args = parser.parse_args(argv)
    path = checkpoint_path(getattr(args, option), which)
    try:
        checkpoint = read_checkpoint(path, folder)
    except CheckpointError as error:
        parser.error(f"{flag(option)}: {error}")
    given = explicit_flags(parser, argv)
    allowed = WHERE | set(allowed) | set(COMMANDS)
    changed = [
        flag(k) for k, v in given.items() if k not in allowed and v != checkpoint["args"].get(k)
    ]
    if changed:
        may = ", ".join(flag(k) for k in sorted(allowed & set(vars(args)) - set(COMMANDS)))
        parser.error(
            f"{flag(option)} uses the run's own configuration; {', '.join(sorted(changed))} "
            f"cannot change (these may: {may})"
        )
    run_folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    commands = {name: getattr(args, name) for name in COMMANDS if hasattr(args, name)}
    merged = {**vars(args), **checkpoint["args"], **given, **commands, "out": str(run_folder)}
    return argparse.Namespace(**merged), checkpoint, path


def parse_args(parser, argv, folder, check, resumable=(), evaluable=()):
    """The run's configuration, and the checkpoint --resume continues or --evaluate scores (see
    run_config); `check(parser, args)` checks the paper's flags."""
    args, checkpoint = parser.parse_args(argv), None
    if args.resume and getattr(args, "evaluate", None):
        parser.error("give --resume or --evaluate, not both")
    if args.resume:
        resumable = RESUMABLE | set(resumable)
        args, checkpoint, _ = run_config(parser, argv, "resume", folder, resumable, "last")
    elif getattr(args, "evaluate", None):
        args, checkpoint, _ = run_config(parser, argv, "evaluate", folder, {"seed", *evaluable})
    require_at_least(parser, args, 1, "sample_every", "log_every", "checkpoint_every", "max_steps")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must lie in [0, 2^32), got {args.seed}")
    check_device(parser, args.device)
    if args.out is not None and checkpoint is None and unwritable(args.out):
        parser.error(f"--out {args.out}: {unwritable(args.out)}")
    check(parser, args)
    return args, checkpoint


def explicit_flags(parser, argv):
    """The flags given on the command line, by destination name, with their values."""
    unset = object()
    names = vars(parser.parse_args(argv))
    given = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))
    return {name: value for name, value in vars(given).items() if value is not unset}


# ---- the training run ----


class Run:
    """One training run: its locked folder, scalars, fixed-noise grids, and checkpoints holding all
    state, so a resume is exact. metric() -> ({name: value}, score) every `eval_every` steps keeps
    best.pt; a NaN stops the run; `d_wins` (Separated or RunsAway) says when D has won."""

    def __init__(
        self,
        args,
        checkpoint,
        nets,
        optimizers,
        batches,
        fixed_z,
        total,
        title,
        grid,
        folder,
        metric=None,
        eval_every=0,
        higher_is_better=True,
        d_wins=None,
    ):
        if args.max_steps is not None:
            total = args.max_steps if total is None else min(total, args.max_steps)
        if checkpoint is not None and total is not None and checkpoint["step"] >= total:
            fail(
                f"{args.out} is at step {checkpoint['step']}, the length asked for ({total}); "
                f"give a larger --max-steps or a longer training length"
            )
        self.args, self.nets, self.optimizers, self.batches = args, nets, optimizers, batches
        self.fixed_z, self.total, self.grid, self.folder = fixed_z, total, grid, folder
        self.metric, self.eval_every, self.higher_is_better = metric, eval_every, higher_is_better
        self.step, self.best, self.stopped_by = 0, None, None
        self.out = Path(args.out) if args.out else new_run_folder(HERE / "runs")
        self.lock = hold(self.out)
        if checkpoint is not None:
            self.restore(checkpoint)
        elif (self.out / "checkpoints" / "last.pt").exists():
            fail(f"{self.out} holds a run; continue it with --resume, or choose another --out")
        elif any((self.out / "samples").glob("*.png")) or any(self.out.glob("events.out.*")):
            fail(
                f"{self.out} holds the grids of a run stopped before its first checkpoint; "
                f"delete the folder to start over there, or choose another --out"
            )
        with writing(self.out):
            (self.out / "samples").mkdir(exist_ok=True)
            (self.out / "checkpoints").mkdir(exist_ok=True)
            write_atomically(self.out / "args.json", json.dumps(vars(args), indent=2).encode())
            # events after the checkpoint's step came from a run that went past it: dropped
            self.events = EventFile(self.out, self.step + 1 if checkpoint is not None else None)
        self.health = Health(self.events, d_wins)
        # Ctrl-C or SIGTERM: finish the step, write the checkpoint, stop; a second Ctrl-C quits now
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        # the first step whose scalars were not finite, kept on the device: no host sync per step
        self.device = fixed_z.device
        self.first_bad_step = torch.tensor(-1, device=self.device)
        self.sums, self.summed, self.started = None, 0, time.perf_counter()
        steps = f"steps {self.step} -> {total or 'until stopped'}"
        print(f"{title} on {self.device}: {steps}; run folder {self.out}", flush=True)
        # the progress bar goes to stdout: stderr is left to warnings and to a one-line error
        self.progress = tqdm(total=total, initial=self.step, unit="step", file=sys.stdout)

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
        """Count the step; log, draw, evaluate and save when their intervals come."""
        self.step += 1
        self.progress.update()
        values = [torch.as_tensor(v, device=self.device).float() for v in scalars.values()]
        values = torch.stack(values).detach()
        bad = (self.first_bad_step < 0) & ~values.isfinite().all()
        self.first_bad_step = torch.where(bad, self.step, self.first_bad_step)
        self.sums = values if self.sums is None else self.sums + values
        self.summed += 1
        if self.due(self.args.log_every):
            self.check_finite()
            means = dict(zip(scalars, (self.sums / self.summed).tolist()))
            self.health.check(means, self.step)
            self.log({**means, **(also_log() if also_log else {})})
            self.sums, self.summed = None, 0
        if self.due(self.args.sample_every):
            grid = self.grid(self.fixed_z).float().cpu()
            path = self.out / "samples" / f"step_{self.step:07d}.png"
            with writing(path):
                vutils.save_image(grid, path)
                self.events.add(summary.image("samples", grid, dataformats="CHW"), self.step)
        if self.eval_every and self.step % self.eval_every == 0:
            self.evaluate()
        if self.step % self.args.checkpoint_every == 0:
            self.check_finite()
            self.save("last.pt")

    def log(self, scalars):
        with writing(self.events.path):
            for name, value in scalars.items():
                self.events.add(summary.scalar(name, value), self.step)
            self.events.file.flush()
        shown = list(scalars.items())[:2]
        self.progress.set_postfix({name.split("/")[-1]: f"{value:.4g}" for name, value in shown})

    def evaluate(self):
        """The metric now; a new best is saved as best.pt, then last.pt at the same step."""
        self.check_finite()
        scalars, score = self.metric()
        self.log(scalars)
        sign = 1 if self.higher_is_better else -1
        if math.isfinite(score) and (self.best is None or sign * (score - self.best["score"]) > 0):
            self.best = {"score": score, "step": self.step}
            self.save("best.pt")  # then last.pt: a kill between the two is replayed by --resume
            self.save("last.pt")

    def check_finite(self):
        """Stop, keeping the last good checkpoint, if a scalar or a weight became NaN or Inf."""
        bad_step = self.first_bad_step.item()
        weights = [t for net in self.nets.values() for t in net.state_dict().values()]
        finite = [t.isfinite().all() for t in weights if t.is_floating_point()]
        if bad_step < 0 and not torch.stack(finite).all():
            bad_step = self.step
        if bad_step >= 0:
            last = self.out / "checkpoints" / "last.pt"
            kept = f"the last good checkpoint is {last}" if last.exists() else "no checkpoint yet"
            fail(f"a loss or weight became NaN or Inf at step {bad_step}; stopped, {kept}", code=1)

    def save(self, name):
        """The whole state, written atomically: a full disk leaves the previous checkpoint whole."""
        state = {
            "folder": self.folder,
            "format": FORMAT,
            "step": self.step,
            "best": self.best,
            "fixed_z": self.fixed_z,
            **{name: net.state_dict() for name, net in self.nets.items()},
            **{name: opt.state_dict() for name, opt in self.optimizers.items()},
            "batches": self.batches.state_dict(),
            "args": vars(self.args),
            "rng": rng_states(),
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        with writing(self.out / "checkpoints" / name):
            write_atomically(self.out / "checkpoints" / name, buffer.getbuffer())

    def restore(self, checkpoint):
        try:
            for name, net in self.nets.items():
                net.load_state_dict(checkpoint[name])
            for name, optimizer in self.optimizers.items():
                optimizer.load_state_dict(checkpoint[name])
            self.batches.load_state_dict(checkpoint["batches"])
            self.fixed_z = checkpoint["fixed_z"].to(self.fixed_z.device)
            self.step, self.best = checkpoint["step"], checkpoint["best"]
            set_rng_states(checkpoint["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as error:  # other networks
            fail(
                f"--resume: the checkpoint does not fit {self.folder}'s networks ({reason(error)})"
            )

    def finish(self):
        """The last checkpoint and progress.gif; the exit code (128 + the signal if stopped)."""
        self.progress.close()
        self.check_finite()
        self.save("last.pt")
        frames = sorted((self.out / "samples").glob("step_*.png"))
        count = min(GIF_FRAMES, len(frames))
        with writing(self.out / "progress.gif"):
            if frames:
                gif = [
                    imageio.imread(frames[round(i)]) for i in np.linspace(0, len(frames) - 1, count)
                ]
                imageio.imwrite(self.out / "progress.gif", gif, duration=250, loop=0)
            self.events.file.close()
        self.lock.release()  # the folder is free for the next run, also in this process
        if self.stopped_by is not None:
            again = f"python {Path(sys.argv[0]).name} --resume {shlex.quote(str(self.out))}"
            name = signal.Signals(self.stopped_by).name
            print(f"stopped by {name} at step {self.step}; continue with: {again}")
            return 128 + self.stopped_by
        minutes = (time.perf_counter() - self.started) / 60
        print(f"done: step {self.step} of {self.total} in {minutes:.1f} min; run folder {self.out}")
        return 0


class EventFile:
    """TensorBoard's event file, written in this thread: a full disk is an OSError in Run.log."""

    def __init__(self, folder, purge_step=None):
        name = f"events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(folder) / name
        self.file = open(self.path, "ab")
        self.records = RecordWriter(self.file)
        self.write(Event(file_version="brain.Event:2"))
        if purge_step is not None:  # TensorBoard drops what an earlier writer logged from here on
            self.write(Event(step=purge_step, session_log=SessionLog(status=SessionLog.START)))

    def write(self, event):
        event.wall_time = time.time()
        self.records.write(event.SerializeToString())

    def add(self, summary_proto, step):
        self.write(Event(summary=summary_proto, step=step))


def new_run_folder(runs):
    """runs/<date-time>-<process number>: two runs started in the same second get two folders."""
    return runs / f"{datetime.now():%Y-%m-%d_%H-%M-%S}-{os.getpid()}"


def hold(folder):
    """The run folder's lock, held until this process ends, even by kill -9: one run a folder."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            fail(f"{folder} is in use by another running train.py; wait, or choose another --out")
    return lock


# ---- the run's health: signs that training is failing, said while it goes on ----
# Healthy MNIST runs pass through phases where D wins: SN-DCGAN's did for 525 steps without a
# break before G caught up. A sign must hold about four times that long before it is said.
HEALTH_STRETCH = 2000  # steps a sign holds before it is said; said again after each further stretch
WIN_MARGIN = 0.05  # healthy runs: D(x) <= 0.961 and D(G(z)) >= 0.048; failing: 0.997+ and 0.002-
RUNAWAY_GROWTH = 10  # the critic's estimate runs away: 10 times the largest it was a stretch ago


class Separated:
    """D wins outright: the scalars `real` and `fake` (D's mean output on real and on fake images,
    each given as (name, target)) lie within WIN_MARGIN of the targets' gap from their targets."""

    def __init__(self, real, fake):
        self.real, self.fake = real, fake

    def __call__(self, scalars, step):
        (real, real_target), (fake, fake_target) = self.real, self.fake
        gap = real_target - fake_target
        at = {name: (scalars[name] - fake_target) / gap for name in (real, fake)}
        if at[real] >= 1 - WIN_MARGIN and at[fake] <= WIN_MARGIN:
            return f"D wins outright: {real} {scalars[real]:.4g}, {fake} {scalars[fake]:.4g}"
        return None


class RunsAway:
    """The critic's estimate `name` is not finite, or RUNAWAY_GROWTH times its old peak."""

    def __init__(self, name):
        self.name, self.recent, self.peak = name, [], None

    def __call__(self, scalars, step):
        value = scalars[self.name]
        self.recent.append((step, abs(value)))
        while self.recent[0][0] <= step - HEALTH_STRETCH:
            self.peak = max(self.peak or 0.0, self.recent.pop(0)[1])
        if not math.isfinite(value) or (self.peak and abs(value) > RUNAWAY_GROWTH * self.peak):
            earlier = f"; at most {self.peak:.4g} a stretch before" if self.peak else ""
            return f"the critic's {self.name} runs away: {value:.4g}{earlier}"
        return None


class Health:
    """Says (on stderr, as TensorBoard text "health") when `sign` held HEALTH_STRETCH steps."""

    def __init__(self, events, sign):
        self.events, self.sign, self.since, self.said = events, sign, None, 0

    def check(self, scalars, step):
        failing = self.sign(scalars, step) if self.sign is not None else None
        if failing is None:
            self.since, self.said = None, 0
            return
        self.since = step if self.since is None else self.since
        held = step - self.since
        if held >= HEALTH_STRETCH * (self.said + 1):
            self.said += 1
            line = f"warning: step {step}: {failing}, for {held} steps; training goes on"
            tqdm.write(line, file=sys.stderr)
            with writing(self.events.path):
                self.events.add(summary.text("health", line), step)


# ---- model.py's sampling command ----

WHICH = "in a run folder: best.pt (by the folder's metric), last.pt, or best.pt if it exists"
INTERPOLATE = (
    "--rows rows of --steps images, decoded from evenly spaced z on straight lines through "
    "--points random z (the GAN paper's Fig. 3 walks between 2; DCGAN's Fig. 4 through 9)"
)
NEAREST = (
    "--rows rows of --pairs samples, each beside its nearest training image (L2 in pixels; GAN "
    "paper Fig. 2), and the median nearest distance of samples and of held-out test images"
)
COMPARE = "--nearest: the medians are over this many samples and as many test images (at most all)"
# Which flags go with what model.py is asked: plain sampling, --interpolate or --nearest.
APPLIES = {
    None: {"num", "single"},
    "interpolate": {"rows", "steps", "points"},
    "nearest": {"rows", "pairs", "compare", "data_root"},
}


def sampling_parser(description, num_help="how many images (default: 64)"):
    """model.py's flags, the same in every folder; a folder may add its own."""
    p = FlagParser(description=description)
    p.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run folder, or a checkpoint file")
    p.add_argument("--checkpoint", default="auto", choices=("auto", "best", "last"), help=WHICH)
    p.add_argument("--num", type=int, help=num_help)
    p.add_argument("--out", default="samples.png", help="the grid's file, or --single's folder")
    p.add_argument("--single", action="store_true", help="one PNG file per image, into --out")
    p.add_argument("--seed", type=int, default=0, help="seed for z")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    inspect = p.add_mutually_exclusive_group()
    inspect.add_argument("--interpolate", action="store_true", help=INTERPOLATE)
    inspect.add_argument("--nearest", action="store_true", help=NEAREST)
    # the papers print no counts for these: this command's choice
    p.add_argument("--rows", type=int, default=8, help="--interpolate, --nearest: rows of the grid")
    p.add_argument("--steps", type=int, default=10, help="--interpolate: images per row")
    p.add_argument("--points", type=int, default=2, help="--interpolate: random z per row")
    p.add_argument("--pairs", type=int, default=5, help="--nearest: sample-neighbour pairs per row")
    p.add_argument("--compare", type=int, default=1000, help=COMPARE)
    p.add_argument("--data-root", help="--nearest: the training data (default: the run's own)")
    return p


def read_sampling_flags(parser, argv, folder):
    """model.py's flags and checkpoint; a flag that does not apply to the command is refused."""
    args = parser.parse_args(argv)
    require_at_least(parser, args, 1, "num", "rows", "pairs", "compare")
    require_at_least(parser, args, 2, "steps", "points")
    asked = "interpolate" if args.interpolate else "nearest" if args.nearest else None
    others = set().union(*APPLIES.values()) - APPLIES[asked]
    stray = sorted(flag(name) for name in explicit_flags(parser, argv) if name in others)
    if stray:
        what = f"--{asked}" if asked else "sampling without --interpolate or --nearest"
        parser.error(f"{', '.join(stray)} does not apply to {what}")
    if not 0 <= args.seed < 2**32:
        parser.error(f"--seed must lie in [0, 2^32), got {args.seed}")
    check_device(parser, args.device, ("cpu", "cuda"))
    out = Path(args.out)
    if args.single and out.exists() and not (out.is_dir() and not any(out.iterdir())):
        parser.error(f"--out {out} exists and is not an empty folder; --single needs a new one")
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
        parser.error(f"{what}: the weights do not fit this folder's networks ({reason(error)})")
    return net


def write_images(generate, inputs, out, single, nrow=None, names=None, step=None):
    """generate(*inputs) (in [0, 1]) as a grid PNG, or with `single` one PNG each, CHUNK at a
    time; each whole or not at all, exclusively: two commands on one --out cannot both succeed."""
    out, num = Path(out), len(inputs[0])
    try:
        with torch.no_grad():
            (out if single else out.parent).mkdir(parents=True, exist_ok=True)
            if not single:
                nrow = nrow or math.ceil(math.sqrt(num))
                write_png(vutils.make_grid(generate(*inputs), nrow=nrow, padding=2), out)
            chunks = zip(*(t.split(CHUNK) for t in inputs)) if single else ()
            for i, image in enumerate(x for chunk in chunks for x in generate(*chunk)):
                write_png(image, out / (names[i] if names else f"{i:05d}.png"))
    except FileExistsError as error:
        fail(f"{error.filename} appeared while writing: another command writes to --out {out}")
    except OSError as error:
        fail(f"cannot write {out}: {reason(error)}")
    except KeyboardInterrupt:
        written = len(list(out.glob("*.png"))) if single else 0
        fail(f"stopped by Ctrl-C after writing {written} of {num} images to {out}", code=130)
    if step is not None:
        print(f"wrote {num} samples of step {step} to {out}")


def write_png(image, path):
    """`image` as a PNG at `path`, whole or not at all, and never over another file."""
    buffer, temporary = io.BytesIO(), path.with_name(path.name + ".tmp")
    vutils.save_image(image, buffer, format="png")
    try:
        temporary.write_bytes(buffer.getbuffer())
        os.link(temporary, path)  # FileExistsError when `path` exists: nothing is overwritten
    finally:
        temporary.unlink(missing_ok=True)


def inspect(args, checkpoint, draw, draw_z, images, labels=None):
    """model.py --interpolate or --nearest. draw(z) -> images in [0, 1] (with `labels`: draw(z,
    labels(rows)), rows the grid row of each z); draw_z(n) -> n z; images(root, split) -> the
    run's "train" or "test" set as its dataset.py prepares it."""
    if args.interpolate:
        return write_interpolation(args, checkpoint, draw, draw_z, labels)
    return write_nearest(args, checkpoint, draw, draw_z, images, labels)


def interpolation_path(z0, z1, steps):
    """`steps` evenly spaced points on the straight line from z0 to z1, both ends exactly."""
    t = torch.linspace(0, 1, steps, device=z0.device)[:, None]
    points = (1 - t) * z0 + t * z1
    points[0], points[-1] = z0, z1
    return points


def walk(ends, steps):
    """`steps` points on the straight lines through the rows of `ends`, each end exactly."""
    cuts = [round(i * (steps - 1) / (len(ends) - 1)) for i in range(len(ends))]
    points = [ends[:1]]
    for i in range(len(ends) - 1):
        points.append(interpolation_path(ends[i], ends[i + 1], cuts[i + 1] - cuts[i] + 1)[1:])
    return torch.cat(points)


def write_interpolation(args, checkpoint, draw, draw_z, labels):
    """--rows rows of --steps images; row r walks through --points fresh z of the prior."""
    if args.steps < args.points:
        fail(f"--steps {args.steps} cannot pass through --points {args.points}; give more steps")
    ends = draw_z(args.rows * args.points).view(args.rows, args.points, -1)
    z = torch.cat([walk(row, args.steps) for row in ends])
    rows = torch.arange(args.rows, device=z.device).repeat_interleave(args.steps)
    generate = draw if labels is None else (lambda z, rows: draw(z, labels(rows)))
    write_images(generate, (z,) if labels is None else (z, rows), args.out, False, args.steps)
    walks = f"{args.rows} rows of {args.steps} images through {args.points} z each"
    print(f"wrote {walks}, of step {checkpoint['step']}, to {args.out}")


def nearest_training(images, training, device, batch=2048):
    """The L2 distance from each of `images` (in [0, 1]) to its nearest of `training` (uint8),
    and that image's index."""
    queries = images.flatten(1).to(device, torch.float32)
    best = torch.full((len(queries),), math.inf, device=device)
    index = torch.zeros(len(queries), dtype=torch.long, device=device)
    for start in tqdm(range(0, len(training), batch), desc="nearest", leave=False, file=sys.stdout):
        chunk = training[start : start + batch].to(device).flatten(1).float().div_(255)
        # |x - y|^2 = |x|^2 + |y|^2 - 2 x.y: one matrix product per batch
        squared = queries.pow(2).sum(1, keepdim=True) + chunk.pow(2).sum(1) - 2 * queries @ chunk.T
        value, where = squared.min(1)
        closer = value < best
        best, index = torch.where(closer, value, best), torch.where(closer, where + start, index)
    index = index.cpu()
    # the distance to the chosen image computed directly, free of the matrix product's rounding
    nearest = training[index].to(device).flatten(1).float().div_(255)
    return (queries - nearest).norm(dim=1).cpu(), index


def write_nearest(args, checkpoint, draw, draw_z, images, labels):
    """GAN paper Fig. 2: --rows rows of --pairs samples, each beside its nearest training image;
    then the median nearest distance of --compare samples and of as many held-out test images."""
    run, root = checkpoint["args"], Path(args.data_root or checkpoint["args"]["data_root"])
    try:
        train_set = images(root, "train")
    except DataError as error:
        fail(error)
    count, shown = max(args.compare, args.rows * args.pairs), args.rows * args.pairs
    z = draw_z(count)
    rows = torch.arange(count, device=z.device) // args.pairs
    with torch.no_grad():
        parts = zip(z.split(CHUNK), rows.split(CHUNK))
        drawn = [draw(p) if labels is None else draw(p, labels(r)) for p, r in parts]
        samples = torch.cat([images.cpu() for images in drawn])
    if samples.shape[1:] != train_set.shape[1:]:
        fail(
            f"G's images are {tuple(samples.shape[1:])}, the training images under {root} "
            f"{tuple(train_set.shape[1:])}: --data-root holds another data set"
        )
    distance, index = nearest_training(samples, train_set, args.device)
    pairs = torch.stack([samples[:shown], train_set[index[:shown]].float() / 255], 1)
    write_images(lambda x: x, (pairs.flatten(0, 1),), args.out, False, 2 * args.pairs)
    print(
        f"wrote {shown} samples of step {checkpoint['step']}, each beside its nearest of "
        f"{len(train_set)} {run['dataset']} training images, to {args.out}"
    )
    median = "median L2 distance (pixels in [0, 1]) to the nearest training image"
    print(f"{median}: {distance.median():.3f} for {count} samples")
    try:
        test = images(root, "test")
    except DataError as error:
        return print(f"no held-out images to compare with: {error}")
    held_out = test[torch.randperm(len(test))[:count]].float() / 255
    distance = nearest_training(held_out, train_set, args.device)[0]
    print(f"{median}: {distance.median():.3f} for {len(held_out)} held-out test images")


# ---- metrics.json ----


def record(folder, path, checkpoint, args, device):
    """How a number was measured: the checkpoint, its step, the data, the seed, the machine."""
    return {
        "folder": folder,
        "checkpoint": str(Path(path).resolve()),
        "step": checkpoint["step"],
        "dataset": args.dataset,
        "image_size": getattr(args, "image_size", None),
        "seed": args.seed,
        "device": str(device),
        "torch": torch.__version__,
    }


def merge_metrics(run, records):
    """`records` written into RUN/metrics.json beside those already there, atomically."""
    path, metrics = Path(run) / "metrics.json", {}
    if path.is_file():
        try:
            metrics = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            fail(f"{path} cannot be read as JSON ({reason(error)}); it is left as it is")
    with writing(path):
        write_atomically(path, json.dumps({**metrics, **records}, indent=2).encode())
    print(f"wrote {path}")


# ---- reading data sets ----


class DataError(Exception):
    """A problem with the data that the user can fix: the scripts say it in one line, exit 2."""


MNIST_CLASSES = {
    "mnist": torchvision.datasets.MNIST,
    "fashion-mnist": torchvision.datasets.FashionMNIST,
}
EXPECTED_FILES = {
    "cifar10": "cifar-10-batches-py/ (or cifar-10-python.tar.gz)",
    "celeba": "celeba/img_align_celeba/*.jpg and celeba/list_eval_partition.txt",
}


def read_split(name, root, train=True, download=True):
    """MNIST's, Fashion-MNIST's or CIFAR-10's training (or test) images as stored, uint8 (N, C, H,
    W), and labels, read in place by torchvision (downloaded when absent and `download`)."""
    root = Path(root)
    if name in MNIST_CLASSES:
        return read_mnist(name, root, train, download)
    if name != "cifar10":
        raise DataError(f"{name} has no {'training' if train else 'test'} split to read here")
    try:
        data = torchvision.datasets.CIFAR10(root, train=train, download=download)
    except Exception as error:  # missing or corrupt files, or a failed download
        raise missing("cifar10", root, error) from None
    images = torch.as_tensor(data.data).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(data.targets)


def read_mnist(name, root, train, download):
    """ROOT/MNIST/raw/*-ubyte(.gz) parsed where they lie (a read-only folder is fine)."""
    folder = root / MNIST_CLASSES[name].__name__ / "raw"
    prefix = "train" if train else "t10k"
    stems = [f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"]
    files = [folder / s if (folder / s).is_file() else folder / f"{s}.gz" for s in stems]
    if not all(file.is_file() for file in files):
        wanted = " and ".join(f"{folder / s}(.gz)" for s in stems)
        if not download:
            raise DataError(f"{name}: {wanted} not found; point --data-root at a folder with it")
        try:
            MNIST_CLASSES[name](root, train=train, download=True)
        except Exception as error:  # offline, blocked, or refused by the server
            raise DataError(
                f"{name}: {wanted} not found, and downloading failed "
                f"({reason(error)}); point --data-root at a folder with it"
            ) from None
        files = [folder / s for s in stems]
    images, labels = (parse_idx(file) for file in files)
    if images.dim() != 3 or len(labels) != len(images) or (len(labels) and labels.max() > 9):
        raise DataError(f"{files[0]} and {files[1]} are not MNIST images and labels; replace them")
    return images[:, None].contiguous(), labels.long()


def parse_idx(path):
    """One IDX file parsed by torchvision, a gzipped one through a scratch copy."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            if path.suffix == ".gz":
                unpacked = Path(scratch) / path.stem
                unpacked.write_bytes(gzip.decompress(path.read_bytes()))
                return torchvision.datasets.mnist.read_sn3_pascalvincent_tensor(str(unpacked))
            return torchvision.datasets.mnist.read_sn3_pascalvincent_tensor(str(path))
        except Exception as error:  # unreadable, not gzip, cut short, or not IDX
            raise DataError(f"{path} is not a readable IDX file ({reason(error)})") from None


def missing(name, root, error):
    return DataError(
        f"{name} is not readable under {root} ({reason(error)}); expected "
        f"{EXPECTED_FILES[name]} there, or point --data-root at it"
    )


# ---- batches ----


class Batches:
    """Endless minibatches of a uint8 image set, scaled by `scale` on `device` (with `labels`: (x,
    y)); epoch e's order is seeded by (seed, e), so a resume draws the same batches. The set goes
    to a GPU that it fills at most half of; else batches come from host memory or its memory map."""

    def __init__(self, images, batch_size, device, seed, scale, labels=None):
        if not 0 < batch_size <= len(images):
            raise DataError(f"--batch-size {batch_size} must lie in [1, {len(images)}] (the set)")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        fits = not cuda or images.nbytes <= torch.cuda.mem_get_info(self.device)[0] / 2
        self.images = images.to(self.device) if fits else images
        self.labels = None if labels is None else labels.to(self.images.device)
        self.placement = f"on {self.device}" if fits else "gathered per batch from host memory"
        self.batch_size, self.seed, self.scale = batch_size, seed, scale
        self.per_epoch = len(images) // batch_size
        self.epoch, self.index, self.order = 0, 0, None

    def __next__(self):
        if self.index == self.per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        if self.order is None or self.order[0] != self.epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(self.images), generator=generator)
            self.order = self.epoch, order.to(self.images.device)  # once an epoch: no sync a step
        start = self.index * self.batch_size
        picked = self.order[1][start : start + self.batch_size]
        self.index += 1
        x = self.scale(self.images[picked].to(self.device, non_blocking=True))
        y = None if self.labels is None else self.labels[picked].to(self.device, non_blocking=True)
        return x if y is None else (x, y)

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index = state["epoch"], state["index"]


# ---- figures ----


def pyplot():
    """matplotlib's pyplot on the Agg backend: figures go to files, never to a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path):
    with writing(path):
        fig.savefig(path, dpi=100, bbox_inches="tight")
    pyplot().close(fig)
