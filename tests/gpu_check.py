"""Every CUDA path of the seven folders, checked on one GPU in one go: not a test (pytest collects test_*.py only).

Every run goes through a folder's own command line: `python train.py ...` or `python model.py ...` in the folder,
or its `train.main(argv)` in a fresh Python process (this file with --worker), which adds the measurements that
only the process itself can take. The parts:
  1. Every folder at its paper size (its train.py's defaults: image size, width, batch size) on MNIST, for a few
     hundred generator steps, in fp32, in bf16 and in bf16 with --compile: exit code 0, every logged scalar
     finite, the checkpoint at the last step, peak GPU memory, steps/s after a warm-up, and no host sync in the
     loop (torch.cuda.set_sync_debug_mode("warn") after the warm-up; syncs of the steps that log, draw or save
     are theirs by design and counted apart).
  2. DCGAN with --data-on device, host and disk: the first batches, built as train.py builds them, hashed under
     each placement (they must be equal), and the steps/s of a short run with each.
  3. kill -9 in the middle of a DCGAN run, then --resume: it continues from the last checkpoint's step and ends
     with exit code 0.
  4. --eval-every with tests/test_metrics.py's stand-in feature extractor (no download), and model.py sampling
     a grid from each checkpoint the GPU runs wrote.
  5. tests/benchmark.py at paper size, one folder at a time: ms per generator iteration, images/s, the share of
     the GPU's peak (--peak-tflops), and DCGAN against pytorch/examples' DataLoader feed.
Each part has a time limit and a step count; what did not fit is recorded as skipped, never run over time. A part
that fails records the command, its exit code and the end of its output, and the next part runs. The table is
printed as it goes; everything lands in OUT/gpu_check.json and OUT/gpu_check.md. The exit code is 1 if
anything failed.

On a GPU (about 7.5 minutes; MNIST's raw files under DATA, as DATA/MNIST/raw/* or DATA/*; torch-fidelity, which
every convolutional train.py imports, must be installed):

    timeout 500 python tests/gpu_check.py --data-root DATA --out /tmp/gpu_check

The dry run, on a CPU, everything shrunk (a tiny MNIST, tiny networks, a few steps) in about a minute; what needs
CUDA (peak GPU memory, sync debug mode) is recorded as n/a on cpu. tests/test_gpu_check.py runs it:

    python tests/gpu_check.py --device cpu --tiny --out /tmp/gpu_check
"""
import argparse
import collections
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import (FOLDERS, QUICK, ROOT, load_checkpoint, load_folder, run_main, scalar_tags,  # noqa: E402
                      tiny_mnist, write_idx)

# Seconds each part may take on one GPU, plus what the parts before it left unused; together (440 s) they leave
# room for start-up inside 8 minutes.
PART_LIMITS_S = {1: 200, 2: 45, 3: 40, 4: 45, 5: 110}
PART_TITLES = {1: "every folder at paper size: fp32, bf16, bf16 + --compile",
               2: "DCGAN --data-on device, host, disk",
               3: "kill -9, then --resume",
               4: "--eval-every with the stand-in extractor; model.py grids",
               5: "tests/benchmark.py at paper size"}
RUN_TIMEOUT_S = 150  # one command; a compiled run at paper size compiles G and D in its first steps
START_MIN_S = 5  # a command is not started with less of its part's time left
POLL_S = 0.05  # how often running commands are looked at
# The sizes of the parts: (on a GPU, with --tiny)
SIZES = {
    "steps": (200, 3),  # part 1: generator steps of each run ("a few hundred")
    "warmup": (20, 1),  # steps before the timing and sync debug mode start (compilation, cuDNN's choice)
    "data_on_steps": (100, 3),  # part 2: steps of each --data-on run
    "hashed_batches": (8, 3),  # part 2: batches hashed under each placement
    "checkpoint_every": (50, 2),  # part 3: the killed run's checkpoint interval ...
    "steps_past": (10, 1),  # ... and how many steps past a checkpoint it gets before SIGKILL
    "resume_steps": (20, 2),  # part 3: steps of the resumed run
    "eval_every": (50, 2),  # part 4: steps between evaluations ...
    "eval_samples": (1000, 20),  # ... of this many samples (at least torch-fidelity's 10 IS splits) ...
    "eval_steps": (100, 4),  # ... in a run of this many steps
    "bench_iters": (30, 2),  # part 5: timed generator iterations of each configuration ...
    "bench_warmup": (5, 1),  # ... after these
}
NEVER_ENDING = 10 ** 6  # part 3: --max-steps of the run that only SIGKILL ends
# --tiny: each folder's tiny flags from tests/conftest.py (tiny networks and batches), on the CPU's 2 cores
TINY_FLAGS = {folder: [str(a) for a in flags[:flags.index("--device")] + flags[flags.index("--device") + 2:]]
              for folder, flags in QUICK.items()}
TINY_MNIST = (600, 200)  # --tiny: training and test images (the first of the real MNIST, or made up)
GPU_JOBS = 6  # part 1 and part 4's grids: commands at a time on one GPU (16 cores compile and feed them)
TINY_JOBS = 2  # --tiny: commands at a time, on 2 cores
TINY_BENCH = ["--folders", "DCGAN", "--threads", "2", "--width", "8", "--image-size", "32", "--batch-size", "8",
              "--precision", "fp32"]  # --tiny: DCGAN's two feeds only, small
# The H100 SXM data sheet's dense peaks, TFLOP/s (the H200 is the same chip): fp32 runs as TF32 on CUDA (train.py)
PEAK_TFLOPS = ["fp32=495", "bf16=989"]
STAND_IN_EXTRACTOR = "test-pixels"  # tests/test_metrics.py registers it with torch-fidelity when imported
SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s message
NEEDED = ("tensorboard", "imageio", "torchvision", "torch_fidelity", "PIL", "tqdm", "pytest")
DEFAULT_DATA_ROOT = str(ROOT.parent / "shared" / "data")  # where tests/conftest.py finds the real MNIST


# --- one command, with a time limit, its output in a log file --------------------------------------------------

class Job:
    """A command in a folder, started in its own process group so that a time limit ends all of it."""

    def __init__(self, name, command, cwd, log, info=None, env=None, timeout=RUN_TIMEOUT_S):
        self.name, self.command, self.cwd, self.log, self.timeout = name, [str(c) for c in command], cwd, log, timeout
        self.info, self.env, self.code, self.process, self.seconds = info or {}, env, None, None, None

    def start(self):
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(self.command, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env, start_new_session=True)

    def poll(self):
        self.code = self.process.poll()
        self.seconds = time.monotonic() - self.started
        return self.code

    def kill(self):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it has just ended by itself
            pass
        self.process.wait()
        self.seconds = time.monotonic() - self.started

    def output(self, lines=15):
        """The last lines of its output (progress bars' carriage returns as line ends)."""
        text = Path(self.log).read_text(errors="replace").replace("\r", "\n") if Path(self.log).exists() else ""
        return "\n".join([line for line in text.split("\n") if line.strip()][-lines:])

    def result(self):
        """What a --worker process printed last, after RESULT."""
        text = Path(self.log).read_text(errors="replace")
        found = [line for line in text.splitlines() if line.startswith("RESULT ")]
        return json.loads(found[-1][len("RESULT "):]) if found else None

    def shell(self):
        return f"(cd {shlex.quote(str(self.cwd))} && {shlex.join(self.command)})"


class Part:
    """One part of the check: its rows, printed as they come, and its time limit."""

    def __init__(self, number, check, note=None):
        self.number, self.title, self.note, self.check = number, PART_TITLES[number], note, check
        self.limit_s = round(PART_LIMITS_S[number] + check.spare_s)
        self.rows, self.started, self.seconds = [], time.monotonic(), None
        self.deadline = self.started + self.limit_s
        print(f"\n== part {number}: {self.title} (at most {self.limit_s} s)", flush=True)

    def left(self):
        return self.deadline - time.monotonic()

    def add(self, status, name, **fields):
        row = {"name": name, "status": status, **fields}
        self.rows.append(row)
        shown = "  ".join(f"{k}={v}" for k, v in fields.items() if k in SHOWN and v is not None)
        print(f"[{self.number}] {name:<28} {status:<7} {shown}", flush=True)
        if status == "failed":
            print(f"    {row.get('command', '')}\n    " + row.get("output", "").replace("\n", "\n    "), flush=True)
        return row

    def failed(self, name, job, why, **fields):
        return self.add("failed", name, why=why, command=job.shell(), exit_code=job.code, output=job.output(),
                        **fields)

    def run(self, jobs, done, parallel=1):
        """Each job's command, at most `parallel` at a time, inside the part's time limit; done(job) judges each
        that ended by itself. A job that outlives its own limit failed; one that the part's limit stopped, or that
        did not start for lack of time, is recorded as skipped."""
        waiting, running = list(jobs), []
        try:
            while waiting or running:
                while waiting and len(running) < parallel and self.left() > START_MIN_S:
                    job = waiting.pop(0)
                    job.start()
                    running.append(job)
                if not running:
                    break
                time.sleep(POLL_S)
                for job in list(running):
                    if job.poll() is not None:
                        running.remove(job)
                        done(job)
                    elif job.seconds > job.timeout or self.left() <= 0:
                        job.kill()
                        running.remove(job)
                        if job.seconds > job.timeout:
                            self.failed(job.name, job, f"took longer than its {job.timeout} s limit", **job.info)
                        else:
                            self.add("skipped", job.name, why=f"stopped after {job.seconds:.0f} s: the part's "
                                                              f"{self.limit_s} s were spent", **job.info)
        finally:
            for job in running:
                job.kill()
        for job in waiting:
            self.add("skipped", job.name, why=f"not started: the part's {self.limit_s} s were spent", **job.info)

    def run_one(self, job):
        """One job; the job if it ended by itself, else None (recorded as failed or skipped)."""
        ended = []
        self.run([job], ended.append)
        return ended[0] if ended else None

    def end(self):
        self.seconds = round(time.monotonic() - self.started, 1)
        self.check.spare_s = max(0.0, self.deadline - time.monotonic())  # for the parts after it
        return self

    def record(self):
        return {"title": self.title, "note": self.note, "limit_s": self.limit_s, "seconds": self.seconds,
                "ok": all(row["status"] != "failed" for row in self.rows),
                "skipped": sum(row["status"] == "skipped" for row in self.rows), "rows": self.rows}


# the fields the printed table and the Markdown summary show, in order
SHOWN = ("precision", "compile", "placement", "steps", "wall_s", "steps_per_s", "peak_mb", "syncs_in_loop",
         "syncs_when_logging", "syncs_printed", "loss_D", "loss_G", "batches_sha256", "same_batches", "killed_at",
         "resumed_from", "ended_at", "fid", "grid", "feed", "ms_per_iter", "images_per_s", "tflops", "share_of_peak",
         "feed_ratio", "why")


# --- the in-process side: train.main in a fresh process, watched (--worker) --------------------------------------

def due(run, step):
    """Run.end_step logs, draws, evaluates or saves at this step, and so waits for the device on purpose."""
    a = run.args
    return step == run.total or any(every and step % every == 0
                                    for every in (a.log_every, a.sample_every, a.checkpoint_every, run.eval_every))


class LoopProbe:
    """support.Run.end_step, wrapped: the steps after the warm-up are timed and, on CUDA, run under
    torch.cuda.set_sync_debug_mode("warn"), whose warnings are sorted into the end-of-step bookkeeping of a step
    that logs, draws, evaluates or saves (by design) and everything else (the loop)."""

    def __init__(self, support, device, warmup):
        self.support, self.cuda, self.warmup = support, device.type == "cuda", warmup
        self.in_bookkeeping, self.in_loop, self.at_bookkeeping = False, [], []
        self.steps, self.opened, self.closed = 0, None, None

    def __enter__(self):
        real_end_step, probe = self.support.Run.end_step, self

        def end_step(run, scalars, also_log=None):
            step = run.step + 1
            if step == run.total and probe.opened is not None:
                probe.close(step)  # the last step's updates are done; its bookkeeping is outside the window
            probe.in_bookkeeping = due(run, step)
            try:
                return real_end_step(run, scalars, also_log)
            finally:
                probe.in_bookkeeping, probe.steps = False, step
                if step == probe.warmup and step < run.total:
                    probe.open(step)

        self.real_end_step, self.support.Run.end_step = real_end_step, end_step
        self.catcher = warnings.catch_warnings()
        self.catcher.__enter__()
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")
        self.show, warnings.showwarning = warnings.showwarning, self.warned
        return self

    def warned(self, message, category, filename, lineno, file=None, line=None):
        if SYNC_WARNING not in str(message):
            return self.show(message, category, filename, lineno, file, line)
        place = f"{Path(filename).parent.name}/{Path(filename).name}:{lineno}"
        (self.at_bookkeeping if self.in_bookkeeping else self.in_loop).append(place)

    def open(self, step):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        self.opened, self.opened_at = time.perf_counter(), step

    def close(self, step):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        self.closed, self.closed_at = time.perf_counter(), step

    def __exit__(self, *error):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
        self.support.Run.end_step = self.real_end_step
        self.catcher.__exit__(*error)

    def result(self):
        timed = self.closed is not None and self.closed > self.opened
        where = collections.Counter(self.in_loop).most_common(5)
        return {"steps": self.steps,
                "steps_per_s": (self.closed_at - self.opened_at) / (self.closed - self.opened) if timed else None,
                "syncs_in_loop": len(self.in_loop) if self.cuda else "n/a on cpu",
                "syncs_in_loop_where": [f"{place} x{count}" for place, count in where],
                "syncs_when_logging": len(self.at_bookkeeping) if self.cuda else "n/a on cpu"}


def train_worker(spec):
    """FOLDER's train.main(ARGV) in this process, watched by a LoopProbe; peak GPU memory afterwards."""
    gan, device = load_folder(spec["folder"]), torch.device(spec["device"])
    if spec.get("stand_in_extractor"):
        import test_metrics  # noqa: F401  (registers the stand-in feature extractor with torch-fidelity)
    with LoopProbe(gan.support, device, spec["warmup"]) as probe:
        code = run_main(gan.train, *spec["argv"])
    cuda = device.type == "cuda"
    return {"exit_code": code, **probe.result(),
            "peak_mb": round(torch.cuda.max_memory_allocated() / 2 ** 20) if cuda else "n/a on cpu",
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()}


def hash_worker(spec):
    """DCGAN's batches, built as its train.py builds them, under each --data-on: a hash of each of the first few
    scaled batches, and the placement's own description."""
    gan = load_folder("DCGAN")
    hashes = {}
    for place in spec["placements"]:
        args = gan.train.build_parser().parse_args([*spec["argv"], "--data-on", place])
        device = gan.support.pick_device(args)
        images = gan.train.training_images(args)
        data = gan.dataset.batches(images, args.batch_size, device, args.seed, args.data_on)
        digests = [hashlib.sha256(next(data).cpu().numpy().tobytes()).hexdigest()[:16]
                   for _ in range(spec["batches"])]
        hashes[place] = {"digests": digests, "placement": data.placement}
    return hashes


def worker(spec_json):
    spec = json.loads(spec_json)
    result = {"train": train_worker, "hash": hash_worker}[spec["task"]](spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- the parts ----------------------------------------------------------------------------------------------

class Check:
    """What every part needs: the flags, the sizes, the data, the folders for runs and logs."""

    def __init__(self, args):
        self.args, self.device, self.tiny = args, args.device, args.tiny
        self.size = {name: sizes[args.tiny] for name, sizes in SIZES.items()}
        self.out = Path(args.out).resolve()
        self.runs, self.logs, self.data = self.out / "runs", self.out / "logs", self.out / "data"
        self.grids, self.bench = self.out / "grids", self.out / "bench"
        for folder in (self.runs, self.logs, self.data, self.grids, self.bench):
            shutil.rmtree(folder, ignore_errors=True)  # the check's own folders, from an earlier check
            folder.mkdir(parents=True)
        self.jobs = args.jobs or (TINY_JOBS if args.tiny else GPU_JOBS)
        self.spare_s = 0.0  # seconds the parts so far left unused
        # on a CPU, the cores are shared among the jobs that run at once: more threads would only wait for each other
        threads = max(1, (os.cpu_count() or 1) // self.jobs)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if args.device == "cpu" else None

    def flags(self, folder):
        """A folder's flags on MNIST: its paper's sizes (its defaults), or with --tiny its tiny ones."""
        sizes = TINY_FLAGS[folder] if self.tiny else []
        return ["--dataset", "mnist", *sizes, "--data-root", str(self.data), "--device", self.device]

    def job(self, name, cwd, *command, info=None):
        """`python COMMAND` in CWD, its output in logs/NAME.log."""
        return Job(name, [sys.executable, *command], cwd, self.logs / f"{name}.log", info, self.env)

    def worker_job(self, name, folder, spec, info=None):
        """This file's --worker SPEC in FOLDER: one in-process task (train_worker, hash_worker) in a fresh process."""
        return self.job(name, ROOT / folder, Path(__file__).resolve(), "--worker", json.dumps(spec), info=info)

    def train_job(self, name, folder, argv, info=None, warmup=1, stand_in_extractor=False):
        """FOLDER's train.main(ARGV), watched by train_worker."""
        spec = {"task": "train", "folder": folder, "argv": [str(a) for a in argv], "device": self.device,
                "warmup": warmup, "stand_in_extractor": stand_in_extractor}
        return self.worker_job(name, folder, spec, info)


def copy_mnist(check):
    """MNIST's raw files from --data-root, copied into the check's own data root; with --tiny only its first
    images are kept, or a made-up tiny MNIST is made when the default data root has none."""
    names = [f"{prefix}-{kind}-ubyte" for prefix in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]
    root = Path(check.args.data_root)
    source = next((folder for folder in (root / "MNIST" / "raw", root)
                   if all((folder / name).exists() or (folder / f"{name}.gz").exists() for name in names)), None)
    raw = check.data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if source is None and check.tiny and check.args.data_root == DEFAULT_DATA_ROOT:
        tiny_mnist(raw, *TINY_MNIST)
        return "a made-up tiny MNIST (tests/conftest.py)"
    if source is None:
        raise FileNotFoundError(f"--data-root {root}: no MNIST (expected {', '.join(names)}, plain or .gz, in "
                                f"{root / 'MNIST' / 'raw'} or in {root})")
    for path in (source / f"{name}{suffix}" for name in names for suffix in ("", ".gz")):
        if path.exists():
            shutil.copyfile(path, raw / path.name)
    if not check.tiny:
        return f"the MNIST in {source}"
    read_mnist = load_folder("DCGAN").support.read_mnist
    subsets = {prefix: [part[:count].numpy() for part in read_mnist("mnist", check.data, train=prefix == "train",
                                                                     download=False)]
               for prefix, count in zip(("train", "t10k"), TINY_MNIST)}
    for path in raw.iterdir():
        path.unlink()
    for prefix, (images, labels) in subsets.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return f"the first {TINY_MNIST[0]} training and {TINY_MNIST[1]} test images of the MNIST in {source}"


def training_problems(job, run, steps):
    """What is wrong with a finished training run: its exit code, its last checkpoint's step, a logged scalar
    that is not finite; and its last loss/D and loss/G."""
    problems, losses = [], {}
    if job.code != 0:
        return [f"exit code {job.code}"], losses
    try:
        step = load_checkpoint(run)["step"]
        if step != steps:
            problems.append(f"the last checkpoint is at step {step}, not {steps}")
        scalars = scalar_tags(run)
        bad = [tag for tag, points in scalars.items() if not all(math.isfinite(v) for _, v in points)]
        problems += [f"{tag} is not finite" for tag in bad]
        for tag in ("loss/D", "loss/G"):
            if not scalars.get(tag):
                problems.append(f"no {tag} was logged")
            else:
                losses[tag.replace("/", "_")] = round(scalars[tag][-1][1], 4)
    except Exception as error:  # a missing or unreadable checkpoint or event file
        problems.append(f"{type(error).__name__}: {error}")
    return problems, losses


def watched_run_row(part, job, run, steps, **fields):
    """A row for a --worker training run: the run's own problems, then its measurements; host syncs in the loop
    count as a problem."""
    result = job.result() or {}
    problems, losses = training_problems(job, run, steps)
    if isinstance(result.get("syncs_in_loop"), int) and result["syncs_in_loop"]:
        problems.append(f"{result['syncs_in_loop']} host syncs in the loop, at "
                        f"{', '.join(result['syncs_in_loop_where'])}")
    per_s = result.get("steps_per_s")
    measured = {"steps": result.get("steps"), "wall_s": round(job.seconds, 1),
                "steps_per_s": round(per_s, 1) if per_s else None, "peak_mb": result.get("peak_mb"),
                "syncs_in_loop": result.get("syncs_in_loop"), "syncs_when_logging": result.get("syncs_when_logging"),
                # sync warnings that reached the output instead of Python's warnings (none expected)
                "syncs_printed": Path(job.log).read_text(errors="replace").count(SYNC_WARNING),
                **losses, "device_name": result.get("device_name"), **fields}
    if problems:
        return part.failed(job.name, job, "; ".join(problems), **measured)
    return part.add("ok", job.name, **measured)


def paper_size_runs(check):
    """Part 1: every folder at paper size, fp32, bf16, bf16 with --compile; the compiled runs start first, as
    they take longest. With --tiny on a CPU, compiling is left out (minutes per folder on 2 cores)."""
    part, jobs = Part(1, check, f"{check.jobs} runs at a time share the device: steps/s here are not clean timings "
                               f"(part 5's are)"), []
    steps = check.size["steps"]
    for compile_, precision in ((True, "bf16"), (False, "fp32"), (False, "bf16")):
        for folder in FOLDERS:
            name = f"{folder}-{precision}{'-compile' if compile_ else ''}"
            info = {"folder": folder, "precision": precision, "compile": compile_}
            if compile_ and check.tiny:
                part.add("skipped", name, why="--tiny: torch.compile takes minutes per folder on a CPU", **info)
                continue
            argv = [*check.flags(folder), "--precision", precision, *(["--compile"] if compile_ else []),
                    "--max-steps", steps, "--out", check.runs / name]
            jobs.append(check.train_job(name, folder, argv, info, check.size["warmup"]))
    part.run(jobs, lambda job: watched_run_row(part, job, check.runs / job.name, steps, **job.info),
             parallel=check.jobs)
    return part


def data_placements(check):
    """Part 2: DCGAN's first batches hashed under --data-on device, host and disk, then a short run with each."""
    part, placements = Part(2, check), ("device", "host", "disk")
    spec = {"task": "hash", "argv": check.flags("DCGAN"), "placements": placements,
            "batches": check.size["hashed_batches"]}
    job = part.run_one(check.worker_job("hash-batches", "DCGAN", spec))
    if job is not None:
        hashes = job.result()
        if job.code != 0 or hashes is None:
            part.failed("hashes", job, f"exit code {job.code}")
        else:
            reference = hashes[placements[0]]["digests"]
            for place in placements:
                same = hashes[place]["digests"] == reference
                part.add("ok" if same else "failed", f"hashes {place}", placement=hashes[place]["placement"],
                         batches_sha256=hashes[place]["digests"], same_batches=same,
                         why=None if same else f"its batches differ from --data-on {placements[0]}'s")
    steps, jobs = check.size["data_on_steps"], []
    for place in placements:
        name = f"DCGAN-data-on-{place}"
        argv = [*check.flags("DCGAN"), "--data-on", place, "--max-steps", steps, "--out", check.runs / name]
        jobs.append(check.train_job(name, "DCGAN", argv, {"placement": place}, check.size["warmup"]))
    # one at a time, for their step times; with --tiny, whose times mean nothing, side by side
    part.run(jobs, lambda job: watched_run_row(part, job, check.runs / job.name, steps, **job.info),
             parallel=check.jobs if check.tiny else 1)
    return part


def kill_and_resume(check):
    """Part 3: `python train.py` (DCGAN) killed with SIGKILL some steps after a checkpoint, then --resume."""
    part, run = Part(3, check), check.runs / "DCGAN-killed"
    every, past = check.size["checkpoint_every"], check.size["steps_past"]
    job = check.job("DCGAN-killed", ROOT / "DCGAN", "train.py", *check.flags("DCGAN"), "--max-steps", NEVER_ENDING,
                    "--checkpoint-every", every, "--sample-every", 1, "--out", run)
    job.start()
    marker = run / "samples" / f"step_{every + past:07d}.png"  # its grid: the run has gone past the checkpoint
    while not marker.exists() and job.poll() is None and job.seconds < min(job.timeout, part.left()):
        time.sleep(POLL_S)
    if job.poll() is not None or not marker.exists():
        if job.code is None:
            job.kill()
        part.failed("kill -9", job, f"the run ended or ran out of time before step {every + past}")
        return part
    os.kill(job.process.pid, signal.SIGKILL)
    job.process.wait()
    job.code = job.process.returncode
    try:
        killed_at = load_checkpoint(run)["step"]
    except Exception as error:
        part.failed("kill -9", job, f"the last checkpoint is not readable after SIGKILL: {error}")
        return part
    whole = killed_at >= every and killed_at % every == 0
    part.add("ok" if whole else "failed", "kill -9", killed_at=killed_at,
             why=None if whole else f"the checkpoint's step {killed_at} is no multiple of --checkpoint-every {every}")
    end = killed_at + check.size["resume_steps"]
    resumed = part.run_one(check.job("DCGAN-resumed", ROOT / "DCGAN", "train.py", "--resume", run,
                                             "--max-steps", end))
    if resumed is None:
        return part
    started = re.search(r"steps (\d+) -> (\d+)", Path(resumed.log).read_text())
    resumed_from = int(started.group(1)) if started else None
    problems, _ = training_problems(resumed, run, end)
    if resumed_from != killed_at:
        problems.append(f"it started at step {resumed_from}, not at the checkpoint's {killed_at}")
    fields = {"resumed_from": resumed_from, "ended_at": end, "wall_s": round(resumed.seconds, 1)}
    if problems:
        part.failed("--resume", resumed, "; ".join(problems), **fields)
    else:
        part.add("ok", "--resume", **fields)
    return part


def evaluation_and_sampling(check):
    """Part 4: model.py's grid from each checkpoint part 1 wrote (fp32), then DCGAN with --eval-every (the
    stand-in extractor, in process) and model.py's grid from its best.pt. With --tiny, the eval run only: on a
    CPU, each model.py costs seconds of start-up."""
    part, name = Part(4, check), "DCGAN-eval-every"

    def grid_job(run_name, folder):
        return check.job(f"grid-{run_name}", ROOT / folder, "model.py", check.runs / run_name, "--device",
                         check.device, "--out", check.grids / f"{run_name}.png", info={"run": run_name})

    def judge_grid(job):
        grid = check.grids / f"{job.info['run']}.png"
        if job.code != 0 or not grid.exists():
            part.failed(job.name, job, f"exit code {job.code}; grid written: {grid.exists()}")
            return
        with Image.open(grid) as image:
            part.add("ok", job.name, grid=f"{grid.name} {image.width}x{image.height}", wall_s=round(job.seconds, 1))

    trained = [folder for folder in FOLDERS if (check.runs / f"{folder}-fp32" / "checkpoints" / "last.pt").exists()]
    part.run([grid_job(f"{folder}-fp32", folder) for folder in trained if not check.tiny], judge_grid, check.jobs)
    run, steps, every = check.runs / name, check.size["eval_steps"], check.size["eval_every"]
    argv = [*check.flags("DCGAN"), "--max-steps", steps, "--eval-every", every, "--eval-every-samples",
            check.size["eval_samples"], "--feature-extractor", STAND_IN_EXTRACTOR, "--out", run]
    job = part.run_one(check.train_job(name, "DCGAN", argv, stand_in_extractor=True))
    if job is None:
        return part
    problems, _ = training_problems(job, run, steps)
    fid = []
    if not problems:
        fid = [round(v, 3) for _, v in scalar_tags(run).get("metrics/fid", [])]
        if len(fid) != steps // every:
            problems.append(f"{len(fid)} FIDs logged, not {steps // every}")
        if not (run / "checkpoints" / "best.pt").exists():
            problems.append("no checkpoints/best.pt")
    if problems:
        part.failed(name, job, "; ".join(problems), fid=fid)
        return part
    part.add("ok", name, fid=fid, wall_s=round(job.seconds, 1))
    part.run([grid_job(name, "DCGAN")], judge_grid)
    return part


def benchmark(check):
    """Part 5: tests/benchmark.py, one folder at a time (a folder cut off by the time limit loses only its own
    numbers), fp32 and bf16, eager; its JSON folded in, with DCGAN's two feeds' ratio."""
    part = Part(5, check)
    sizes = ["--iters", check.size["bench_iters"], "--warmup", check.size["bench_warmup"], "--compile", "off",
             "--data-root", check.data, "--device", check.device, "--peak-tflops", *check.args.peak_tflops]
    folders = ["DCGAN"] if check.tiny else FOLDERS
    for folder in folders:
        flags = [*TINY_BENCH] if check.tiny else ["--folders", folder, "--precision", "fp32", "bf16"]
        json_path = check.bench / f"{folder}.json"
        job = part.run_one(check.job(f"benchmark-{folder}", ROOT, "tests/benchmark.py", *flags, *sizes,
                                     "--json", json_path))
        if job is None:
            continue
        if job.code != 0 or not json_path.exists():
            part.failed(f"benchmark-{folder}", job, f"exit code {job.code}")
            continue
        measured = json.loads(json_path.read_text())
        results, peak = measured["results"], measured["peak_tflops"]
        for r in results:
            ours = next((o for o in results if o["feed"] == "batches" and o["precision"] == r["precision"]
                         and "median_ms" in o), None)
            share = (f"{r['tflops'] / peak[r['precision']]:.1%}" if r.get("tflops") and check.device == "cuda"
                     else "n/a on cpu" if check.device == "cpu" else None)
            fields = {"feed": r["feed"], "precision": r["precision"],
                      "ms_per_iter": round(r["median_ms"], 2) if "median_ms" in r else None,
                      "images_per_s": round(r["images_per_s"]) if "images_per_s" in r else None,
                      "tflops": round(r["tflops"], 2) if r.get("tflops") else None, "share_of_peak": share,
                      "peak_mb": round(r["peak_memory_mb"]) if "peak_memory_mb" in r else None,
                      "feed_ratio": round(r["median_ms"] / ours["median_ms"], 2)
                      if r["feed"] == "dataloader" and ours and "median_ms" in r else None}
            label = f"{folder} {r['feed']} {r['precision']}"
            if "error" in r:
                part.failed(label, job, r["error"], **fields)
            else:
                part.add("ok", label, **fields)
    return part


PARTS = {1: paper_size_runs, 2: data_placements, 3: kill_and_resume, 4: evaluation_and_sampling, 5: benchmark}


# --- the report ---------------------------------------------------------------------------------------------

def markdown(report):
    lines = [f"# GPU check, {report['started']}", "", f"`{' '.join(report['command'])}`", "",
             f"Device: {report['device_name']}; torch {report['torch']}; data: {report['data']}; "
             f"{report['seconds']:.0f} s in all. Result: **{'ok' if report['ok'] else 'FAILED'}**."]
    for number, part in report["parts"].items():
        status = "ok" if part["ok"] else "FAILED"
        lines += ["", f"## Part {number}: {part['title']}: {status}", "",
                  f"{part['seconds']:.0f} s of its {part['limit_s']} s; {part['skipped']} skipped. "
                  f"{part['note'] or ''}"]
        columns = [c for c in SHOWN if any(row.get(c) is not None for row in part["rows"])]
        lines += ["", "| run | status | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
        for row in part["rows"]:
            cells = [str(row.get(c, "")).replace("|", "/") if row.get(c) is not None else "" for c in columns]
            lines.append(f"| {row['name']} | {row['status']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(check, parts, started, data):
    names = [row.get("device_name") for part in parts for row in part.rows if row.get("device_name")]
    report = {"started": started.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
              "device": check.device, "device_name": names[0] if names else check.device,
              "torch": torch.__version__, "python": platform.python_version(), "tiny": check.tiny, "data": data,
              "seconds": (datetime.now() - started).total_seconds(), "sizes": check.size,
              "ok": all(part.record()["ok"] for part in parts),
              "parts": {str(part.number): part.record() for part in parts}}
    (check.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (check.out / "gpu_check.md").write_text(markdown(report))
    return report


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the runs, logs, gpu_check.json and gpu_check.md")
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT,
                   help="where MNIST's raw files are (DIR/MNIST/raw/* or DIR/*); they are copied into OUT/data. "
                        "With --tiny and no MNIST at the default, a made-up tiny one")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="everything shrunk: the dry run of every part on a CPU")
    p.add_argument("--parts", nargs="+", type=int, default=list(PARTS), choices=list(PARTS),
                   help="; ".join(f"{n}: {t}" for n, t in PART_TITLES.items()))
    p.add_argument("--jobs", type=int, default=None,
                   help=f"part 1 and part 4's grids: commands at a time (None: {GPU_JOBS}; {TINY_JOBS} with --tiny); "
                        "part 1's steps/s are measured with that many runs sharing the device")
    p.add_argument("--peak-tflops", nargs="+", default=PEAK_TFLOPS, metavar="PRECISION=TFLOPS",
                   help="the GPU's peak for tests/benchmark.py's share of it (default: H100 SXM, dense; TF32 for fp32)")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one in-process run, in a child process
    return p


def main(argv=None):
    parser = build_parser()
    if argv is None and "--worker" in sys.argv:
        return worker(sys.argv[sys.argv.index("--worker") + 1])
    args = parser.parse_args(argv)
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"not installed: {', '.join(missing)} (see requirements.txt)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; the dry run is --device cpu --tiny")
    # a resumed run's event files hold events it purged (part 3): TensorBoard's reader need not say so
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    started, check = datetime.now(), Check(args)
    try:
        data = copy_mnist(check)
    except FileNotFoundError as error:
        parser.error(str(error))
    print(f"gpu_check on {args.device}{' (tiny)' if args.tiny else ''}; data: {data}; out: {check.out}", flush=True)
    parts = []
    for number in sorted(set(args.parts)):
        parts.append(PARTS[number](check).end())
        report = write_report(check, parts, started, data)
    print(f"\n{'ok' if report['ok'] else 'FAILED'} in {report['seconds']:.0f} s: "
          + ", ".join(f"part {p.number} {'ok' if p.record()['ok'] else 'FAILED'}"
                      + (f" ({p.record()['skipped']} skipped)" if p.record()["skipped"] else "") for p in parts)
          + f"\nwrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
