"""The CUDA paths of the seven folders, checked on one GPU in one go: not a test.

Runs go through each folder's own code: its train.main(argv) and model.main(argv) in a fresh
worker process (this file with --worker, which takes what only the process can measure), or
`python train.py` in the folder. The parts:
  1. Every folder at its paper size (its defaults) on MNIST for a few hundred generator steps in
     fp32, tf32, bf16 and bf16 with --compile: exit code 0, every logged scalar finite, the last
     checkpoint at the last step, steps/s after a warm-up, peak GPU memory, and no host sync in
     the loop (torch.cuda.set_sync_debug_mode("warn") after the warm-up; the syncs of steps that
     log, draw, evaluate or save are theirs by design and counted apart).
  2. After train.main returns, torch.backends.cuda.matmul.allow_tf32 and
     torch.backends.cudnn.allow_tf32 are True for --precision tf32 and False otherwise (each run
     starts with them set the other way).
  3. kill -9 in the middle of a DCGAN run, then --resume: it continues from the last checkpoint's
     step and ends with exit code 0.
  4. model.py draws a grid from each folder's fp32 run; DCGAN with --eval-every (the stand-in
     feature extractor of tests/test_metrics.py: Inception's weights need a download) logs its
     FIDs and keeps best.pt, from which model.py draws a grid.
A failure records the command, its exit code and the end of its output; the rest goes on. Rows
print as they are judged, then one line per part and a summary; OUT/gpu_check.json and
OUT/gpu_check.md hold everything. The exit code is 1 if anything failed.

On a GPU (at most --time-limit, 7 minutes; MNIST's raw files in DATA/MNIST/raw/ or DATA/):

    timeout 500 python tests/gpu_check.py --data-root DATA --out /tmp/gpu_check

The dry run on a CPU is shrunk (a tiny MNIST, tiny networks, a few steps, two workers): part 1
trains in fp32 and bf16 only (TF32 and the sync debug mode act on CUDA only, and compiling takes
minutes on a CPU); part 2 reads the flags after a 1-step tf32 run. tests/test_gpu_check.py runs
it (about 30 s on 2 idle cores):

    python tests/gpu_check.py --device cpu --tiny --out /tmp/gpu_check
"""

import argparse
import collections
import gc
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
import traceback
import warnings
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import (  # noqa: E402
    FOLDERS,
    QUICK,
    ROOT,
    load_folder,
    run_main,
    scalar_tags,
    tiny_mnist,
    write_idx,
)

PART_TITLES = {
    1: "every folder trains in every precision",
    2: "--precision sets TF32: on for tf32, off for fp32 and bf16",
    3: "kill -9, then --resume",
    4: "model.py grids; --eval-every scores a run",
}
# (on a GPU, with --tiny)
SIZES = {
    "steps": (200, 3),  # part 1: generator steps of each run
    "warmup": (25, 1),  # steps before the timing (compilation, cuDNN's choice, WGAN's warm-up)
    "checkpoint_every": (50, 2),  # part 3: the killed run's checkpoint interval ...
    "steps_past": (10, 1),  # ... and how many steps past a checkpoint it gets before SIGKILL
    "resume_steps": (20, 2),  # part 3: steps of the resumed run
    "eval_every": (50, 2),  # part 4: steps between evaluations ...
    "eval_samples": (1000, 20),  # ... of this many samples (at least the 10 IS splits) ...
    "eval_steps": (100, 4),  # ... in a run of this many steps
}
# part 1's runs: (precision, --compile); --tiny trains the first two only
RUNS = (("fp32", False), ("bf16", False), ("tf32", False), ("bf16", True))
TINY_LEFT_OUT = {
    ("tf32", False): "--tiny: TF32 acts on CUDA only (part 2 reads its flags after one step)",
    ("bf16", True): "--tiny: compiling takes minutes per folder on a CPU",
}
JOB_TIMEOUT_S = 330  # one worker (a folder's four runs, compiled ones included) or command
TIME_LIMIT_S = 420  # the whole check: what is still running then is stopped, reported skipped
POLL_S = 0.05
TINY_WORKERS = 2  # --tiny: the runs shared among this many workers, one per core
NEVER_ENDING = 10**6  # part 3: --max-steps of the run that only SIGKILL ends
# --tiny: each folder's tiny flags from tests/conftest.py, without its --device
TINY_FLAGS = {
    folder: [str(a) for a in flags if a not in ("--device", "cpu")]
    for folder, flags in QUICK.items()
}
TINY_MNIST = (600, 200)  # --tiny: training and test images (the first of the real MNIST)
STAND_IN_EXTRACTOR = "test-pixels"  # tests/test_metrics.py registers it when imported
SYNC_WARNING = "called a synchronizing CUDA operation"  # set_sync_debug_mode("warn")'s message
NEEDED = ("tensorboard", "imageio", "torchvision", "torch_fidelity", "PIL", "filelock", "pytest")
DEFAULT_DATA_ROOT = str(ROOT.parent / "shared" / "data")  # where tests/conftest.py finds MNIST
MNIST_FILES = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]


def checkpoint_step(run, name="last.pt"):
    """The step of a run's checkpoint, read as every script reads it: weights_only=True."""
    path = Path(run) / "checkpoints" / name
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


# --- the worker: tasks in this process, each a RESULT line (--worker TASKS.json) ---------------


def due(run, step):
    """Run.end_step logs, draws, evaluates or saves at this step: it waits for the device."""
    a = run.args
    intervals = (a.log_every, a.sample_every, a.checkpoint_every, run.eval_every)
    return step == run.total or any(every and step % every == 0 for every in intervals)


class LoopProbe:
    """support.Run.end_step, wrapped: the steps after the warm-up are timed and, on CUDA, run under
    torch.cuda.set_sync_debug_mode("warn"); its warnings are sorted into those of a step's
    bookkeeping when it logs, draws, evaluates or saves (by design) and all others (the loop)."""

    def __init__(self, support, device, warmup):
        self.support, self.cuda, self.warmup = support, device.type == "cuda", warmup
        self.in_bookkeeping, self.in_loop, self.at_bookkeeping = False, [], []
        self.steps, self.opened, self.closed = 0, None, None

    def __enter__(self):
        real_end_step, probe = self.support.Run.end_step, self

        def end_step(run, scalars, also_log=None):
            step = run.step + 1
            if step == run.total and probe.opened is not None:
                probe.close(step)  # the last step's updates are done; not its bookkeeping
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
        per_s = (self.closed_at - self.opened_at) / (self.closed - self.opened) if timed else None
        where = collections.Counter(self.in_loop).most_common(5)
        return {
            "steps": self.steps,
            "steps_per_s": per_s,
            "syncs_in_loop": len(self.in_loop) if self.cuda else "n/a on cpu",
            "syncs_in_loop_where": [f"{place} x{count}" for place, count in where],
            "syncs_when_logging": len(self.at_bookkeeping) if self.cuda else "n/a on cpu",
        }


def tf32_flags():
    return [torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32]


def train_task(task, device):
    """FOLDER's train.main(ARGV), watched by a LoopProbe, the TF32 flags set the other way before
    it and read after it, peak GPU memory."""
    gan = load_folder(task["folder"])
    if task.get("stand_in_extractor"):
        import test_metrics  # noqa: F401  (registers the stand-in extractor with torch-fidelity)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    unexpected = task["precision"] != "tf32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = unexpected
    with LoopProbe(gan.support, device, task["warmup"]) as probe:
        code = run_main(gan.train, *task["argv"])
    return {
        "exit_code": code,
        "tf32": tf32_flags(),
        **probe.result(),
        "peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else "n/a on cpu",
    }


def grid_task(task, device):
    """FOLDER's model.main(ARGV): a grid from a run's checkpoint."""
    return {"exit_code": run_main(load_folder(task["folder"]).model, *task["argv"])}


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{models[0] if models else platform.machine()} ({os.cpu_count()} CPUs)"


def worker(tasks_path):
    """Every task in the file, in order, each result printed as it comes (a worker stopped by a
    time limit still leaves the results of the tasks before)."""
    tasks = json.loads(Path(tasks_path).read_text())
    device = torch.device(tasks[0]["device"])
    name = torch.cuda.get_device_name() if device.type == "cuda" else cpu_name()
    for task in tasks:
        print(f"TASK {task['name']}", flush=True)
        started = time.perf_counter()
        try:
            result = {"train": train_task, "grid": grid_task}[task["task"]](task, device)
        except Exception:  # a bug in a folder: its traceback in the log; the next task runs
            traceback.print_exc()
            result = {"exit_code": None}
        if task.get("compile"):
            torch._dynamo.reset()  # the next run compiles afresh
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        seconds = round(time.perf_counter() - started, 1)
        result.update(name=task["name"], device_name=name, wall_s=seconds)
        print("RESULT " + json.dumps(result), flush=True)
    return 0


# --- a command, with a time limit, its output in a log file ----------------------------------


class Job:
    """A command in a folder, in its own process group so that a time limit ends all of it."""

    def __init__(self, name, command, cwd, log, env=None, timeout=JOB_TIMEOUT_S, tasks=()):
        self.name, self.command, self.cwd, self.log = name, [str(c) for c in command], cwd, log
        self.env, self.timeout, self.tasks = env, timeout, list(tasks)
        self.code, self.process, self.seconds, self.why_stopped = None, None, None, None

    def start(self):
        self.started = time.monotonic()
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )

    def poll(self):
        self.code = self.process.poll()
        self.seconds = time.monotonic() - self.started
        return self.code

    def kill(self, why=None):
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:  # it has just ended by itself
            pass
        self.process.wait()
        self.code, self.why_stopped = self.process.returncode, why
        self.seconds = time.monotonic() - self.started

    def text(self):
        path = Path(self.log)
        return path.read_text(errors="replace") if path.exists() else ""

    def output(self, task=None, lines=15):
        """The last lines of its output, or of a worker's TASK (progress bars' carriage returns
        as line ends)."""
        text = self.text().replace("\r", "\n")
        if task is not None and f"TASK {task}\n" in text:
            text = text.split(f"TASK {task}\n", 1)[1].split("\nTASK ", 1)[0]
        kept = [line for line in text.split("\n") if line.strip() and not line.startswith("RESULT")]
        return "\n".join(kept[-lines:])

    def results(self):
        """What a worker printed, by task name."""
        found = [json.loads(line[7:]) for line in self.text().splitlines() if line[:7] == "RESULT "]
        return {result["name"]: result for result in found}

    def shell(self):
        return f"(cd {shlex.quote(str(self.cwd))} && {shlex.join(self.command)})"


# the fields the printed rows and the Markdown tables show, in order; a row's name says NAMED
NAMED = ("folder", "precision", "compile")
SHOWN = (
    *NAMED,
    *("steps", "wall_s", "steps_per_s", "peak_mb", "syncs_in_loop", "syncs_when_logging"),
    *("loss_D", "loss_G", "tf32", "killed_at", "resumed_from", "ended_at", "fid", "grid", "why"),
)


class Check:
    """The flags, sizes, folders and rows of one check."""

    def __init__(self, args):
        self.args, self.device, self.tiny = args, args.device, args.tiny
        self.size = {name: sizes[args.tiny] for name, sizes in SIZES.items()}
        self.out = Path(args.out).resolve()
        self.runs, self.logs, self.data = self.out / "runs", self.out / "logs", self.out / "data"
        self.grids = self.out / "grids"
        for folder in (self.runs, self.logs, self.data, self.grids):
            shutil.rmtree(folder, ignore_errors=True)  # the check's own, from an earlier check
            folder.mkdir(parents=True)
        self.rows = {number: [] for number in PART_TITLES}
        self.deadline = time.monotonic() + args.time_limit
        # on a CPU the jobs that run at once share the cores: more threads would only wait
        threads = max(1, (os.cpu_count() or 1) // 2)
        self.env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if self.device == "cpu" else None

    def flags(self, folder):
        """A folder's flags on MNIST: its paper's sizes (its defaults), or its tiny ones."""
        sizes = TINY_FLAGS[folder] if self.tiny else []
        where = ["--data-root", str(self.data), "--device", self.device]
        return ["--dataset", "mnist", *sizes, *where]

    def add(self, part, status, name, quiet=False, **fields):
        row = {"name": name, "status": status, **fields}
        self.rows[part].append(row)
        if quiet:
            return row
        printed = [k for k in SHOWN if k not in NAMED and fields.get(k) is not None]
        shown = "  ".join(f"{k}={fields[k]}" for k in printed)
        print(f"[{part}] {name:<24} {status:<7} {shown}", flush=True)
        if status == "failed" and row.get("command"):
            output = row.get("output", "").replace("\n", "\n    ")
            print(f"    {row['command']}\n    {output}", flush=True)
        return row

    def failed(self, part, name, job, why, **fields):
        output = job.output(name if job.tasks else None)
        return self.add(part, "failed", name, why=why, command=job.shell(), output=output, **fields)

    def job(self, name, cwd, *command, timeout=JOB_TIMEOUT_S):
        """`python COMMAND` in CWD, its output in logs/NAME.log."""
        log = self.logs / f"{name}.log"
        return Job(name, [sys.executable, *command], cwd, log, self.env, timeout)

    def worker_job(self, name, tasks):
        """This file's --worker on TASKS, each {"task": "train" or "grid", "name", "folder",
        "argv", ...}, with the judge of its result."""
        path = self.logs / f"{name}.tasks.json"
        specs = [{k: v for k, v in t.items() if k != "judge"} for t in tasks]
        path.write_text(json.dumps([{**s, "device": self.device} for s in specs], indent=1))
        job = self.job(name, ROOT, Path(__file__).resolve(), "--worker", path)
        job.tasks = tasks
        return job

    def run(self, job):
        """One command to its end, within its own and the check's time limit; the job, ended."""
        job.start()
        while job.poll() is None:
            if job.seconds > job.timeout or time.monotonic() > self.deadline:
                job.kill(self.stop_reason(job))
                break
            time.sleep(POLL_S)
        return job

    def stop_reason(self, job):
        if time.monotonic() > self.deadline:
            return f"skipped: stopped after {job.seconds:.0f} s, the check's time being spent"
        return f"took longer than its {job.timeout} s limit"


# --- the parts -------------------------------------------------------------------------------


def training_problems(code, run, steps):
    """What is wrong with a finished training run: its exit code, its last checkpoint's step, a
    logged scalar that is not finite; and its last loss/D and loss/G."""
    problems, losses = [], {}
    if code != 0:  # None: the worker caught an exception, whose traceback is in its log
        return [f"exit code {code}"], losses
    try:
        step = checkpoint_step(run)
        if step != steps:
            problems.append(f"the last checkpoint is at step {step}, not {steps}")
        scalars = scalar_tags(run)
        bad = [
            tag for tag, points in scalars.items() if not all(math.isfinite(v) for _, v in points)
        ]
        problems += [f"{tag} is not finite" for tag in bad]
        for tag in ("loss/D", "loss/G"):
            if not scalars.get(tag):
                problems.append(f"no {tag} was logged")
            else:
                losses[tag.replace("/", "_")] = round(scalars[tag][-1][1], 4)
    except Exception as error:  # a missing or unreadable checkpoint or event file
        problems.append(f"{type(error).__name__}: {error}")
    return problems, losses


def judge_training(check, job, task, result):
    """Part 1's row of a training run (none for part 2's flag-only runs), then part 2's."""
    info = {"folder": task["folder"], "precision": task["precision"], "compile": task["compile"]}
    if not task.get("flags_only"):
        problems, losses = training_problems(result["exit_code"], task["run"], task["steps"])
        if isinstance(result.get("syncs_in_loop"), int) and result["syncs_in_loop"]:
            where = ", ".join(result["syncs_in_loop_where"])
            problems.append(f"{result['syncs_in_loop']} host syncs in the loop, at {where}")
        per_s = result.get("steps_per_s")
        measured = {
            **info,
            "steps": result.get("steps"),
            "wall_s": result.get("wall_s"),
            "steps_per_s": round(per_s, 1) if per_s else None,
            "peak_mb": result.get("peak_mb"),
            "syncs_in_loop": result.get("syncs_in_loop"),
            "syncs_when_logging": result.get("syncs_when_logging"),
            **losses,
            "device_name": result.get("device_name"),
        }
        if problems:
            check.failed(1, task["name"], job, "; ".join(problems), **measured)
        else:
            check.add(1, "ok", task["name"], **measured)
    expected = [task["precision"] == "tf32"] * 2
    flags = f"matmul {result['tf32'][0]}, cudnn {result['tf32'][1]}" if "tf32" in result else None
    if result["exit_code"] != 0 and not task.get("flags_only"):  # its output is in part 1
        check.add(2, "failed", task["name"], **info, why=f"exit code {result['exit_code']}")
    elif result["exit_code"] != 0:
        check.failed(2, task["name"], job, f"exit code {result['exit_code']}", **info)
    elif result["tf32"] != expected:
        why = f"after --precision {task['precision']} the TF32 flags are {result['tf32']}"
        check.add(2, "failed", task["name"], **info, tf32=flags, why=why + f", not {expected}")
    else:
        check.add(2, "ok", task["name"], **info, tf32=flags)


def judge_grid(check, job, task, result):
    grid = Path(task["grid"])
    if result["exit_code"] != 0 or not grid.exists():
        why = f"exit code {result['exit_code']}; grid written: {grid.exists()}"
        check.failed(4, task["name"], job, why)
        return
    with Image.open(grid) as image:
        size = f"{grid.name} {image.width}x{image.height}"
    check.add(4, "ok", task["name"], grid=size, wall_s=result.get("wall_s"))


def judge_eval(check, job, task, result):
    """Part 4: the --eval-every run logged one FID per interval and kept best.pt."""
    run, steps, every = Path(task["run"]), task["steps"], task["eval_every"]
    problems, _ = training_problems(result["exit_code"], run, steps)
    fid = []
    if not problems:
        fid = [round(v, 3) for _, v in scalar_tags(run).get("metrics/fid", [])]
        if len(fid) != steps // every:
            problems.append(f"{len(fid)} FIDs logged, not {steps // every}")
        if not (run / "checkpoints" / "best.pt").exists():
            problems.append("no checkpoints/best.pt")
    if problems:
        check.failed(4, task["name"], job, "; ".join(problems), fid=fid)
    else:
        check.add(4, "ok", task["name"], fid=fid, wall_s=result.get("wall_s"))


def training_tasks(check, folder):
    """Part 1 and 2's runs of a folder, and part 4's grid from its fp32 run."""
    tasks = []
    for precision, compiled in RUNS:
        name = f"{folder}-{precision}{'-compile' if compiled else ''}"
        flags_only = check.tiny and (precision, compiled) == ("tf32", False)
        if check.tiny and (precision, compiled) in TINY_LEFT_OUT:
            info = {"folder": folder, "precision": precision, "compile": compiled}
            check.add(1, "skipped", name, True, **info, why=TINY_LEFT_OUT[precision, compiled])
            if not flags_only:
                continue
        steps = 1 if flags_only else check.size["steps"]
        run = check.runs / name
        argv = [*check.flags(folder), "--precision", precision, "--max-steps", steps]
        argv += [*(["--compile"] if compiled else []), "--out", run]
        task = {"task": "train", "name": name, "folder": folder, "precision": precision}
        task.update(compile=compiled, flags_only=flags_only, run=str(run), steps=steps)
        task.update(argv=[str(a) for a in argv], warmup=check.size["warmup"], judge=judge_training)
        tasks.append(task)
        if (precision, compiled) == ("fp32", False):
            grid = check.grids / f"{name}.png"
            argv = [run, "--device", check.device, "--out", grid]
            grid_task = {"task": "grid", "name": f"grid-{name}", "folder": folder}
            grid_task.update(grid=str(grid), argv=[str(a) for a in argv], judge=judge_grid)
            tasks.append(grid_task)
    return tasks


def eval_tasks(check):
    """Part 4: DCGAN with --eval-every and the stand-in extractor, and a grid from its best.pt."""
    name, steps, every = "DCGAN-eval-every", check.size["eval_steps"], check.size["eval_every"]
    run, grid = check.runs / name, check.grids / f"{name}.png"
    argv = [*check.flags("DCGAN"), "--max-steps", steps, "--eval-every", every]
    argv += ["--eval-every-samples", check.size["eval_samples"]]
    argv += ["--feature-extractor", STAND_IN_EXTRACTOR, "--out", run]
    train = {"task": "train", "name": name, "folder": "DCGAN", "precision": "fp32"}
    train.update(compile=False, run=str(run), steps=steps, eval_every=every, warmup=1)
    train.update(argv=[str(a) for a in argv], stand_in_extractor=True, judge=judge_eval)
    argv = [run, "--checkpoint", "best", "--device", check.device, "--out", grid]
    grid_task = {"task": "grid", "name": f"grid-{name}", "folder": "DCGAN", "grid": str(grid)}
    grid_task.update(argv=[str(a) for a in argv], judge=judge_grid)
    return [train, grid_task]


def kill_and_resume(check):
    """Part 3: `python train.py` (DCGAN) killed by SIGKILL some steps past a checkpoint, then
    `python train.py --resume`."""
    run, every = check.runs / "DCGAN-killed", check.size["checkpoint_every"]
    past = check.size["steps_past"]
    job = check.job(
        "DCGAN-killed",
        ROOT / "DCGAN",
        "train.py",
        *check.flags("DCGAN"),
        *("--max-steps", NEVER_ENDING, "--checkpoint-every", every, "--sample-every", 1),
        *("--out", run),
    )
    job.start()
    marker = run / "samples" / f"step_{every + past:07d}.png"  # the run is past the checkpoint
    while not marker.exists() and job.poll() is None and job.seconds < job.timeout:
        if time.monotonic() > check.deadline:
            break
        time.sleep(POLL_S)
    if job.poll() is not None or not marker.exists():
        job.kill()
        check.failed(3, "kill -9", job, f"it ended or ran out of time before step {every + past}")
        return
    job.kill()  # SIGKILL
    try:
        killed_at = checkpoint_step(run)
    except Exception as error:
        check.failed(3, "kill -9", job, f"no readable checkpoint after SIGKILL: {error}")
        return
    whole = killed_at >= every and killed_at % every == 0
    why = f"its step {killed_at} is no multiple of --checkpoint-every {every}"
    check.add(
        3, "ok" if whole else "failed", "kill -9", killed_at=killed_at, why=None if whole else why
    )
    end = killed_at + check.size["resume_steps"]
    command = ("train.py", "--resume", run, "--max-steps", end)
    resumed = check.run(check.job("DCGAN-resumed", ROOT / "DCGAN", *command))
    if resumed.why_stopped:
        check.failed(3, "--resume", resumed, resumed.why_stopped)
        return
    started = re.search(r"steps (\d+) -> (\d+)", resumed.text())
    resumed_from = int(started.group(1)) if started else None
    problems, _ = training_problems(resumed.code, run, end)
    if resumed_from != killed_at:
        problems.append(f"it started at step {resumed_from}, not at the checkpoint's {killed_at}")
    fields = {"resumed_from": resumed_from, "ended_at": end, "wall_s": round(resumed.seconds, 1)}
    if problems:
        check.failed(3, "--resume", resumed, "; ".join(problems), **fields)
    else:
        check.add(3, "ok", "--resume", **fields)


def judge_worker(check, job):
    """Each task of an ended worker judged from its result; a task without one failed (or, when
    the check's time ran out, was skipped)."""
    results, said = job.results(), False
    for task in job.tasks:
        result = results.get(task["name"])
        parts = [1, 2] if task["task"] == "train" and not task.get("eval_every") else [4]
        if task.get("flags_only"):
            parts = [2]
        if result is not None:
            task["judge"](check, job, task, result)
        elif job.why_stopped and job.why_stopped.startswith("skipped"):
            for part in parts:
                check.add(part, "skipped", task["name"], why=job.why_stopped)
        else:
            why = job.why_stopped or f"the worker ended (exit code {job.code}) before this task"
            for part in parts:
                if said:
                    check.add(part, "failed", task["name"], why=why)
                else:  # the command and its output, once
                    check.failed(part, task["name"], job, why)
                    said = True


def run_workers(check, jobs):
    """The workers, --jobs at a time (started before part 3 runs beside them)."""
    waiting, running = list(jobs), []

    def start_more():
        while waiting and len(running) < check.args.jobs:
            running.append(waiting.pop(0))
            running[-1].start()

    start_more()
    yield  # part 3 runs here
    while running:
        for job in list(running):
            if job.poll() is not None:
                running.remove(job)
                judge_worker(check, job)
            elif job.seconds > job.timeout or time.monotonic() > check.deadline:
                job.kill(check.stop_reason(job))
                running.remove(job)
                judge_worker(check, job)
        if time.monotonic() <= check.deadline:
            start_more()
        time.sleep(POLL_S)
    for job in waiting:
        job.why_stopped = "skipped: not started, the check's time being spent"
        judge_worker(check, job)


# --- the report ------------------------------------------------------------------------------


def part_record(check, number):
    rows = check.rows[number]
    failed = [row["name"] for row in rows if row["status"] == "failed"]
    skipped = sum(row["status"] == "skipped" for row in rows)
    ok = bool(rows) and not failed
    return {
        "title": PART_TITLES[number],
        "ok": ok,
        "failed": failed,
        "skipped": skipped,
        "rows": rows,
    }


def part_line(number, part):
    counts = f"{sum(r['status'] == 'ok' for r in part['rows'])} ok"
    if part["failed"]:
        counts += f", {len(part['failed'])} failed: {', '.join(part['failed'])}"
    if part["skipped"]:
        counts += f", {part['skipped']} skipped"
    return f"part {number} {'ok' if part['ok'] else 'FAILED'}: {part['title']} ({counts})"


def markdown(report):
    result = "ok" if report["ok"] else "FAILED"
    lines = [
        f"# GPU check, {report['started']}",
        "",
        f"`{shlex.join(report['command'])}`",
        "",
        f"Device: {report['device_name']}; torch {report['torch']}; data: {report['data']}; "
        f"{report['seconds']:.0f} s in all. Result: **{result}**.",
    ]
    for number, part in report["parts"].items():
        lines += ["", f"## Part {number}: {part['title']}: {'ok' if part['ok'] else 'FAILED'}"]
        rows = part["rows"]
        columns = [c for c in SHOWN if any(row.get(c) is not None for row in rows)]
        lines += ["", "| run | status | " + " | ".join(columns) + " |"]
        lines.append("|---" * (len(columns) + 2) + "|")
        for row in rows:
            cells = [
                str(row.get(c, "")).replace("|", "/") if row.get(c) is not None else ""
                for c in columns
            ]
            lines.append(f"| {row['name']} | {row['status']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(check, started, data):
    rows = [row for number in PART_TITLES for row in check.rows[number]]
    names = [row["device_name"] for row in rows if row.get("device_name")]
    parts = {str(number): part_record(check, number) for number in PART_TITLES}
    report = {
        "started": started.isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "device": check.device,
        "device_name": names[0] if names else check.device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "tiny": check.tiny,
        "data": data,
        "seconds": round((datetime.now() - started).total_seconds(), 1),
        "sizes": check.size,
        "ok": all(part["ok"] for part in parts.values()),
        "parts": parts,
    }
    (check.out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    (check.out / "gpu_check.md").write_text(markdown(report))
    return report


def copy_mnist(check):
    """MNIST's raw files from --data-root into the check's own data root; with --tiny only its
    first images, or a made-up tiny MNIST when the default data root has none."""
    root = Path(check.args.data_root)
    found = [
        folder
        for folder in (root / "MNIST" / "raw", root)
        if all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in MNIST_FILES)
    ]
    raw = check.data / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if not found and check.tiny and check.args.data_root == DEFAULT_DATA_ROOT:
        tiny_mnist(raw, *TINY_MNIST)
        return "a made-up tiny MNIST (tests/conftest.py)"
    if not found:
        expected = f"{', '.join(MNIST_FILES)}, plain or .gz, in {root / 'MNIST' / 'raw'} or {root}"
        raise FileNotFoundError(f"--data-root {root}: no MNIST (expected {expected})")
    source = found[0]
    for path in (source / f"{name}{suffix}" for name in MNIST_FILES for suffix in ("", ".gz")):
        if path.exists():
            shutil.copyfile(path, raw / path.name)
    if not check.tiny:
        return f"the MNIST in {source}"
    read_split = load_folder("DCGAN").support.read_split
    splits = {}
    for prefix, count in zip(("train", "t10k"), TINY_MNIST):
        images, labels = read_split("mnist", check.data, train=prefix == "train", download=False)
        splits[prefix] = images[:count, 0].numpy(), labels[:count].numpy()
    for path in raw.iterdir():
        path.unlink()
    for prefix, (images, labels) in splits.items():
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    count = f"the first {TINY_MNIST[0]} training and {TINY_MNIST[1]} test images"
    return f"{count} of the MNIST in {source}"


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", help="folder for the runs, logs and the report (required)")
    data = "where MNIST's raw files are (DIR/MNIST/raw/* or DIR/*); copied into OUT/data"
    p.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help=data)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="everything shrunk: the dry run on a CPU")
    jobs = "workers at a time (None: all: 8 on a GPU, 2 with --tiny); part 3 runs beside them"
    p.add_argument("--jobs", type=int, help=jobs)
    p.add_argument("--time-limit", type=float, default=TIME_LIMIT_S, help="seconds, in all")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # tasks in this process (a child)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if not args.out:
        parser.error("the following arguments are required: --out")
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"not installed: {', '.join(missing)} (see requirements.txt)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "--device cuda, but no CUDA GPU is visible; the dry run is --device cpu --tiny"
        )
    # a resumed run's event files hold events it purged (part 3): TensorBoard need not say so
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    started, check = datetime.now(), Check(args)
    try:
        data = copy_mnist(check)
    except FileNotFoundError as error:
        parser.error(str(error))
    where = f"{args.device}{' (tiny)' if args.tiny else ''}"
    print(f"gpu_check on {where}; data: {data}; out: {check.out}", flush=True)
    if args.tiny:  # their rows in the report say why
        left_out = [f"{p}{' --compile' if c else ''}" for p, c in TINY_LEFT_OUT]
        print(f"--tiny: part 1 leaves out the {' and '.join(left_out)} runs", flush=True)
    # on a GPU, a worker per folder and one for --eval-every; with --tiny, TINY_WORKERS in all
    groups = [training_tasks(check, folder) for folder in FOLDERS] + [eval_tasks(check)]
    if args.tiny:
        shares = [groups[i::TINY_WORKERS] for i in range(TINY_WORKERS)]
        groups = [[task for group in share for task in group] for share in shares]
    jobs = [check.worker_job(f"worker-{i + 1}", group) for i, group in enumerate(groups)]
    args.jobs = args.jobs or len(jobs)
    workers = run_workers(check, jobs)
    next(workers)
    kill_and_resume(check)
    next(workers, None)
    report = write_report(check, started, data)
    print()
    for number, part in report["parts"].items():
        print(part_line(number, part))
    result = "ok" if report["ok"] else "FAILED"
    print(f"gpu_check {result} in {report['seconds']:.0f} s on {report['device_name']}")
    print(f"wrote {check.out / 'gpu_check.json'} and {check.out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
