"""Speed of every folder's training, measured: not a test (pytest collects test_*.py only).

Each folder's own train.main runs at its paper configuration (its defaults, or the sizes given here; WGAN without
the official warm-up of the critic, CGAN without the Parzen selection), and one generator iteration, all of its D
or critic steps and its G step, is timed after a warm-up: milliseconds, real images drawn per second, the share
of the time spent getting batches, peak memory and the FLOP rate. Random images stand in for a data set that is
not under --data-root. DCGAN also runs fed as pytorch/examples' dcgan feeds it (torchvision's CIFAR10, PIL
transforms, a DataLoader with 2 workers), and the ratio of the two feeds is printed. Every configuration runs
in a fresh Python process, one after the other.

    python tests/benchmark.py                                         # every folder, paper sizes
    python tests/benchmark.py --folders DCGAN --precision fp32 bf16 --compile off on
    python tests/benchmark.py --device cpu --threads 2 --width 16 --image-size 32 --batch-size 64
"""
import argparse
import contextlib
import inspect
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FOLDERS, ROOT, load_folder  # noqa: E402

MLP_FOLDERS = ("simpleGAN", "CGAN")  # 28x28 MNIST MLPs: --image-size, --width and channels_last do not apply
SYNTHETIC_SIZE = 50_000  # images in a synthetic data set: as many as CIFAR-10's and MNIST's training splits
EXAMPLES_WORKERS = 2  # pytorch/examples dcgan: --workers default 2
STEADY_STATE = {"WGAN": ["--no-critic-warmup"], "CGAN": ["--select-every", 0]}
NEVER = 10 ** 9  # no grid, scalar log or checkpoint inside the timed iterations
TIMEOUT = 3600  # seconds allowed to one configuration


def at_least(minimum):
    def parse(text):
        if int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return int(text)
    return parse


def peak_tflops(text):
    """{"bf16": 989.0} from "bf16=989"; a bare number counts for both precisions."""
    precision, _, number = text.rpartition("=")
    if precision not in ("", "fp32", "bf16"):
        raise argparse.ArgumentTypeError(f"takes TFLOPS or PRECISION=TFLOPS, got {text}")
    return {name: float(number) for name in ([precision] if precision else ["fp32", "bf16"])}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS, metavar="FOLDER",
                   help=f"folders to measure, from {', '.join(FOLDERS)}")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--batch-size", type=at_least(1), help="minibatch size (None: each folder's own)")
    p.add_argument("--image-size", type=at_least(1), help="image size of the convolutional folders")
    p.add_argument("--width", type=at_least(1), help="--width of the convolutional folders, smaller for a CPU")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"), help="train.py's")
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"), help="train.py --compile")
    p.add_argument("--memory-format", nargs="+", default=["contiguous"], choices=("contiguous", "channels_last"),
                   help="memory formats of the convolutional networks (train.py --channels-last)")
    p.add_argument("--iters", type=at_least(1), default=20, help="timed generator iterations per configuration")
    p.add_argument("--rounds", type=at_least(1), default=1,
                   help="run the whole list of configurations this many times and pool each configuration's "
                        "timings: on a shared machine whose speed drifts, interleaved rounds keep the drift out")
    p.add_argument("--warmup", type=at_least(0), default=5,
                   help="untimed generator iterations first (compilation and cuDNN's kernel choice happen here)")
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads (None: torch's own choice)")
    p.add_argument("--data-root", default=str(ROOT / "data"), help="where data sets live")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run DCGAN fed by a DataLoader as pytorch/examples' dcgan feeds it")
    p.add_argument("--peak-tflops", nargs="+", type=peak_tflops, default=[], metavar="[PRECISION=]TFLOPS",
                   help="the device's peak, to report each configuration's share of it: one number for all, or "
                        "per precision, e.g. fp32=494 bf16=989 (on CUDA fp32 runs with TF32, as train.py sets)")
    p.add_argument("--json", default="benchmark.json", help="where to write every measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one configuration, in a child process
    return p


def configurations(args):
    """Every configuration to measure, in the order they run."""
    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    for folder in args.folders:
        for feed, precision, compile, memory_format in itertools.product(
                ["batches", "dataloader"] if folder == "DCGAN" and args.baseline else ["batches"], args.precision,
                args.compile, ["contiguous"] if folder in MLP_FOLDERS else args.memory_format):
            yield {"folder": folder, "feed": feed, "precision": precision, "compile": compile == "on",
                   "memory_format": memory_format, "device": device, "batch_size": args.batch_size,
                   "image_size": args.image_size, "width": args.width, "iters": args.iters, "warmup": args.warmup,
                   "threads": args.threads, "data_root": args.data_root}


# --- one configuration, measured in this process (the child side of --worker) --------------------------------

class Clock:
    """The batches a train.py draws, wrapped: the ends of its generator iterations and the time spent getting batches
    after the `untimed`-th iteration, and iteration 1's FLOPs (counted eagerly: not with --compile)."""

    def __init__(self, device, untimed, count_flops):
        self.device, self.untimed, self.iterations, self.ends, self.started = device, untimed, 0, [], None
        self.fetch_seconds, self.fetches, self.flops, self.counter, self.batches = 0.0, 0, None, None, None
        if count_flops:
            self.counter = FlopCounterMode(display=False)
            # only the total: no per-module attribution, whose module hooks autograd.grad (WGAN-GP) refuses
            self.counter.mod_tracker = contextlib.nullcontext()
            self.counter.mod_tracker.parents = {"Global"}

    def __next__(self):
        if self.started is None:  # iteration 1 begins with its first batch
            self.started = time.perf_counter()
            if self.counter is not None:
                self.counter.__enter__()
        started = time.perf_counter()
        batch = next(self.batches)
        self.fetch_seconds += time.perf_counter() - started
        self.fetches += 1
        return batch

    def __getattr__(self, name):  # what train.py and support.Run read of their batches
        return getattr(self.batches, name)

    def iteration_ended(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.iterations += 1
        self.ends.append(time.perf_counter())
        if self.iterations == 1 and self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.flops = self.counter.get_total_flops()
        if self.iterations == self.untimed:  # the timed window opens
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.fetch_seconds, self.fetches, self.ends = 0.0, 0, self.ends[-1:]


def offline_readers(support, kinds):
    """support's readers, downloading nothing: random images of a set's shape and size where it is not there."""
    generator = torch.Generator().manual_seed(0)

    def synthetic(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

    def offline(read, random_data):
        signature = inspect.signature(read)

        def reader(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.arguments["download"] = False
            try:
                data = read(*bound.args, **bound.kwargs)
                kinds.add("real")
                return data
            except support.DataError:
                kinds.add("synthetic")
                return random_data(bound.arguments)
        return reader

    support.read_mnist = offline(support.read_mnist, lambda a: (
        synthetic(SYNTHETIC_SIZE, 28, 28), torch.randint(0, 10, (SYNTHETIC_SIZE,), generator=generator)))
    support.load_images = offline(support.load_images, lambda a: synthetic(
        SYNTHETIC_SIZE, support.CHANNELS[a["name"]], a["image_size"], a["image_size"]))


class PILImages(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) handed out as torchvision's CIFAR10 hands out its own: a PIL image per item."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[index].permute(1, 2, 0).squeeze(-1).numpy())), 0


class ExamplesFeed:
    """DCGAN's data as pytorch/examples' dcgan feeds it: CIFAR10 (or train.py's images, as PIL images) through
    Resize, CenterCrop, ToTensor and Normalize in a shuffling DataLoader with workers, data[0].to(device)."""

    def __init__(self, images, batch_size, device, data_root):
        import torchvision
        from torchvision import transforms

        size, half = images.shape[-1], (0.5,) * images.shape[1]
        transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                        transforms.Normalize(half, half)])
        try:
            dataset = torchvision.datasets.CIFAR10(data_root, train=True, transform=transform)
        except RuntimeError:  # not there
            dataset = PILImages(images, transform)
        loader = torch.utils.data.DataLoader(dataset, batch_size, shuffle=True, num_workers=EXAMPLES_WORKERS)
        self.per_epoch, self.placement = len(loader), f"a DataLoader with {EXAMPLES_WORKERS} workers"
        self.batches = (data[0].to(device) for _ in itertools.count() for data in loader)

    def __next__(self):
        return next(self.batches)

    def state_dict(self):
        return {}


def measure(config):
    """One configuration: the folder's train.main for 1 + warmup + iters generator iterations, its generator step
    and batches timed from outside; iteration 1 (FLOPs counted) and the warm-up (compilation) are not timed."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    folder, device, kinds = config["folder"], torch.device(config["device"]), set()
    gan = load_folder(folder)
    clock = Clock(device, 1 + config["warmup"], count_flops=not config["compile"])
    offline_readers(gan.support, kinds)
    real_step, real_batches = gan.train.generator_step, gan.train.batches

    def generator_step(*args):
        loss = real_step(*args)
        clock.iteration_ended()
        return loss

    def batches(*args, **kwargs):
        clock.batches = ExamplesFeed(*args[:2], device, config["data_root"]) if config["feed"] == "dataloader" \
            else real_batches(*args, **kwargs)
        return clock

    gan.train.generator_step, gan.train.batches = generator_step, batches
    sizes = [] if folder in MLP_FOLDERS else [part for name in ("image_size", "width") if config[name]
                                              for part in (f"--{name.replace('_', '-')}", config[name])]
    with tempfile.TemporaryDirectory() as out:
        argv = ["--device", config["device"], "--data-root", config["data_root"], "--out", f"{out}/run",
                "--max-steps", 1 + config["warmup"] + config["iters"], "--sample-every", NEVER, "--log-every", NEVER,
                "--checkpoint-every", NEVER, "--precision", config["precision"],
                "--compile" if config["compile"] else "--no-compile",
                "--channels-last" if config["memory_format"] == "channels_last" else "--no-channels-last",
                *(["--batch-size", config["batch_size"]] if config["batch_size"] else []), *sizes,
                *STEADY_STATE.get(folder, [])]
        with contextlib.redirect_stdout(sys.stderr):  # the run's progress bar; stdout carries the result
            code = gan.train.main([str(arg) for arg in argv])
        if code:
            raise RuntimeError(f"{folder}/train.py ended with exit code {code}")
        args = json.loads(Path(out, "run", "args.json").read_text())
    cuda = device.type == "cuda"
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    return {**config, "batch_size": args["batch_size"], "image_size": args.get("image_size"),
            "width": args.get("width"), "dataset": args["dataset"], "data_kind": "/".join(sorted(kinds)) or "-",
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "torch_threads": torch.get_num_threads(), "ms": [t * 1000 for t in times],
            "warmup_s": clock.ends[0] - clock.started, "data_share": clock.fetch_seconds / sum(times),
            "images_per_iteration": clock.fetches / len(times) * args["batch_size"],
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_memory_kind": "CUDA max allocated, timed iterations" if cuda else "peak RSS, whole process",
            "flops_per_iteration": clock.flops}


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
              if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{models[0] if models else platform.machine()} ({os.cpu_count()} CPUs)"


def worker(config_json):
    """Child process: measure one configuration and print its numbers as the last line, after RESULT."""
    config = json.loads(config_json)
    try:
        result = measure(config)
    except SystemExit as error:  # the folder's train.py refused the sizes; its message is on stderr already
        result = {**config, "error": f"the folder's train.py refused this configuration (exit {error.code})"}
    except Exception as error:
        result = {**config, "error": f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"}
    print("RESULT " + json.dumps(result))
    return 0


# --- the parent: run every configuration, print the table, write the JSON ------------------------------------

def run_one(config):
    environment = {**os.environ, **({"OMP_NUM_THREADS": str(config["threads"])} if config["threads"] else {})}
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True,
                              text=True, timeout=TIMEOUT, env=environment)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"took longer than {TIMEOUT} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    stderr = done.stderr.strip().splitlines() or ["no output"]
    if not lines:
        return {**config, "error": f"exit {done.returncode}: {stderr[-1]}"}
    result = json.loads(lines[-1][len("RESULT "):])
    if "error" in result:
        result["error"] += f" ({stderr[-1]})"
    return result


def pooled(runs):
    """One configuration's rounds as one result: all their timed iterations together, and the rounds' medians."""
    if any("error" in run for run in runs):
        return next(run for run in runs if "error" in run)
    times = sorted(t for run in runs for t in run["ms"])
    median = statistics.median(times)
    quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    return {**runs[0], "ms": times, "median_ms": median, "p25_ms": quartiles[0], "p75_ms": quartiles[2],
            "round_medians_ms": [statistics.median(run["ms"]) for run in runs],
            "images_per_s": runs[0]["images_per_iteration"] / median * 1000,
            "data_share": statistics.mean(run["data_share"] for run in runs),
            "peak_memory_mb": max(run["peak_memory_mb"] for run in runs)}


def label(result):
    return (f"{result['folder']:<9} {'DataLoader' if result['feed'] == 'dataloader' else 'Batches':<10} "
            f"{result['precision']:<4} {'on' if result['compile'] else 'off':<7} "
            f"{'ch-last' if result['memory_format'] == 'channels_last' else 'contig':<7}")


def report(results, peak):
    """The table, then the ratios of DCGAN's two feeds at equal settings."""
    lines = [f"{'folder':<9} {'feed':<10} {'prec':<4} {'compile':<7} {'memory':<7} {'ms/iter':>9} {'p25-p75':>15} "
             f"{'img/s':>9} {'data':>6} {'peak MB':>8} {'TFLOP/s':>8} {'%peak':>6}"]
    for r in results:
        tflops = r.get("tflops")
        share = f"{tflops / peak[r['precision']]:.1%}" if tflops and r["precision"] in peak else "-"
        lines.append(f"{label(r)} error: {r['error']}" if "error" in r else
                     f"{label(r)} {r['median_ms']:9.2f} {r['p25_ms']:7.2f}-{r['p75_ms']:<7.2f} "
                     f"{r['images_per_s']:9.1f} {r['data_share']:6.1%} {r['peak_memory_mb']:8.0f} "
                     f"{f'{tflops:.3f}' if tflops else '-':>8} {share:>6}")
    settings = ("folder", "precision", "compile", "memory_format")
    for loader in (r for r in results if r["feed"] == "dataloader" and "error" not in r):
        ours = next((r for r in results if r["feed"] == "batches" and "error" not in r
                     and all(r[k] == loader[k] for k in settings)), None)
        if ours:
            lines.append(f"{ours['folder']} {ours['precision']} compile {'on' if ours['compile'] else 'off'} "
                         f"{ours['memory_format']}: Batches {ours['median_ms']:.2f} ms/iter vs DataLoader "
                         f"{loader['median_ms']:.2f} ms/iter: {loader['median_ms'] / ours['median_ms']:.2f}x "
                         f"(data share {ours['data_share']:.1%} vs {loader['data_share']:.1%})")
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; use --device cpu")
    try:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).touch()
    except OSError as error:
        parser.error(f"cannot write --json {args.json}: {error.strerror or error}")
    peak = {name: value for entry in args.peak_tflops for name, value in entry.items()}
    configs, started = list(configurations(args)), datetime.now()
    rounds = [[] for _ in configs]
    for round_, (i, config) in itertools.product(range(1, args.rounds + 1), enumerate(configs)):
        print(f"[round {round_}/{args.rounds}, {i + 1}/{len(configs)}] {label(config)}", end=" ", flush=True)
        result = run_one(config)
        print(f"error: {result['error']}" if "error" in result else
              f"{statistics.median(result['ms']):.2f} ms/iter (warm-up {result['warmup_s']:.1f} s)", flush=True)
        rounds[i].append(result)
    results = [pooled(runs) for runs in rounds]
    # FLOPs are counted eagerly, not with --compile: a compiled configuration does its folder's eager arithmetic
    eager_flops = {r["folder"]: r["flops_per_iteration"] for r in results if r.get("flops_per_iteration")}
    for r in (r for r in results if "error" not in r):
        flops = r["flops_per_iteration"] = r["flops_per_iteration"] or eager_flops.get(r["folder"])
        r["tflops"] = flops / r["median_ms"] / 1e9 if flops else None
    measured = next((r for r in results if "error" not in r), {})
    print(f"\n{measured.get('device_name', args.device)}, torch {torch.__version__}, "
          f"{measured.get('torch_threads', '?')} threads; {args.rounds} x {args.iters} timed iterations, each round "
          f"after {args.warmup}; data: {', '.join(sorted({r['data_kind'] for r in results if 'data_kind' in r}))}")
    print(report(results, peak))
    Path(args.json).write_text(json.dumps({
        "started": started.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
        "torch": torch.__version__, "python": platform.python_version(), "peak_tflops": peak, "results": results},
        indent=2))
    print(f"\nevery measurement in {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
