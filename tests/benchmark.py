"""Speed of every folder's training, measured: not a test (pytest collects test_*.py only).

For each folder at its paper configuration (each train.py's own defaults, or the sizes given
here), one generator iteration is timed after a warm-up: all of its D or critic steps and its
G step, as the folder's own train.main runs them (its step functions, networks and batches,
the data kept where --data-on auto puts it; WGAN's steady state, without the official code's
warm-up of the critic). Reported per configuration: the median and spread of milliseconds per
iteration, real images drawn per second, the share of the time spent getting batches, peak
memory and the matrix-product FLOP rate.

DCGAN also runs fed the way pytorch/examples' dcgan feeds its networks (a torchvision data set
of PIL images, Resize/CenterCrop/ToTensor/Normalize, a DataLoader with worker processes) in
place of its batches, and the ratio of the two feeds is printed.

Every configuration runs in a fresh Python process, one after the other: compilation caches,
threads and peak memory belong to that configuration alone.

    python tests/benchmark.py                                         # every folder, paper sizes
    python tests/benchmark.py --folders DCGAN --precision fp32 bf16 --compile off on
    python tests/benchmark.py --device cpu --threads 2 --width 16 --image-size 32 --batch-size 64
"""
import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, load_folder  # noqa: E402

FOLDERS = ("simpleGAN", "CGAN", "DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
MLP_FOLDERS = ("simpleGAN", "CGAN")  # 28x28 MNIST MLPs: --image-size, --width and channels_last do not apply
SYNTHETIC_SIZE = 50_000  # images in a synthetic data set: as many as CIFAR-10's and MNIST's training splits
EXAMPLES_WORKERS = 2  # pytorch/examples dcgan: --workers default 2
# The steady state of a run: WGAN without the official code's critic warm-up, CGAN without the Parzen selection.
STEADY_STATE = {"WGAN": ["--no-critic-warmup"], "CGAN": ["--select-every", 0]}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folders", nargs="+", default=list(FOLDERS), choices=FOLDERS, metavar="FOLDER",
                   help=f"folders to measure, from {', '.join(FOLDERS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cuda or cpu")
    p.add_argument("--batch-size", type=int, default=None, help="minibatch size (None: each folder's own)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image size of the convolutional folders (None: each folder's own)")
    p.add_argument("--width", type=int, default=None,
                   help="--width of the convolutional folders, smaller networks for a CPU (None: each folder's own)")
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"),
                   help="precisions to compare (train.py --precision)")
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"),
                   help="without and/or with train.py --compile")
    p.add_argument("--memory-format", nargs="+", default=["contiguous"], choices=("contiguous", "channels_last"),
                   help="memory formats of the convolutional networks' weights (and so of their activations)")
    p.add_argument("--iters", type=int, default=20, help="timed generator iterations per configuration and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list of configurations this many times, one after the other, and pool each "
                        "configuration's timings: on a shared machine whose speed drifts, interleaved rounds keep "
                        "the drift out of the ratios")
    p.add_argument("--warmup", type=int, default=5,
                   help="untimed generator iterations first (compilation and cuDNN's kernel choice happen here)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's own choice)")
    p.add_argument("--data", default="auto", choices=("auto", "real", "synthetic"),
                   help="auto: each folder's default data set when it is under --data-root, else random images "
                        "of the same size and number")
    p.add_argument("--data-root", default=str(ROOT / "data"), help="where data sets live")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run DCGAN fed by a DataLoader as pytorch/examples' dcgan feeds it")
    p.add_argument("--workers", type=int, default=EXAMPLES_WORKERS,
                   help="DataLoader worker processes of that feed (pytorch/examples dcgan: --workers 2)")
    p.add_argument("--peak-tflops", nargs="+", default=[], metavar="[PRECISION=]TFLOPS",
                   help="the device's peak, to report each configuration's share of it: one number for all, or "
                        "per precision, e.g. fp32=494 bf16=989 (on CUDA fp32 runs with TF32, as train.py sets)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed to one configuration")
    p.add_argument("--json", default="benchmark.json", help="where to write every measurement")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one configuration, in a child process
    return p


def check_args(parser, args):
    for name in ("batch_size", "image_size", "width", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.iters < 1 or args.rounds < 1 or args.warmup < 0 or args.workers < 0:
        parser.error("--iters and --rounds must be at least 1, --warmup and --workers at least 0")
    if args.device not in ("auto", "cpu", "cuda") and not args.device.startswith("cuda:"):
        parser.error(f"--device must be auto, cuda or cpu, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; use --device cpu")
    try:
        args.peak = peak_tflops(args.peak_tflops)
    except ValueError:
        parser.error(f"--peak-tflops takes numbers or PRECISION=NUMBER, got {' '.join(args.peak_tflops)}")
    try:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).touch()
    except OSError as error:
        parser.error(f"cannot write --json {args.json}: {error.strerror or error}")


def peak_tflops(values):
    """{"fp32": 494.0, "bf16": 989.0} from ["fp32=494", "bf16=989"]; a bare number counts for both."""
    peak = {}
    for value in values:
        precision, _, number = value.rpartition("=")
        for name in ([precision] if precision else ["fp32", "bf16"]):
            if name not in ("fp32", "bf16"):
                raise ValueError(value)
            peak[name] = float(number)
    return peak


def configurations(args):
    """Every configuration to measure, in the order they run; the first of each folder is its reference."""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    for folder in args.folders:
        feeds = ["batches", "dataloader"] if folder == "DCGAN" and args.baseline else ["batches"]
        formats = ["contiguous"] if folder in MLP_FOLDERS else args.memory_format
        for feed in feeds:
            for precision in args.precision:
                for compile in args.compile:
                    for memory_format in formats:
                        yield {"folder": folder, "feed": feed, "precision": precision, "compile": compile == "on",
                               "memory_format": memory_format, "device": device, "batch_size": args.batch_size,
                               "image_size": args.image_size, "width": args.width, "iters": args.iters,
                               "warmup": args.warmup, "threads": args.threads, "data": args.data,
                               "data_root": args.data_root, "workers": args.workers}


# ---------------------------------------------------------------------------------------------
# One configuration, measured in this process (the child side of --worker)
# ---------------------------------------------------------------------------------------------

class Timed:
    """The batches a train.py draws from, with the time spent drawing them."""

    def __init__(self, batches, clock):
        self.batches, self.clock = batches, clock

    def __next__(self):
        self.clock.fetching_started()
        started = time.perf_counter()
        batch = next(self.batches)
        self.clock.fetch_seconds += time.perf_counter() - started
        self.clock.fetches += 1
        return batch

    def __getattr__(self, name):
        return getattr(self.batches, name)


class Clock:
    """The ends of the generator iterations of a training run, and what happened in the timed ones: from the
    end of the `untimed`-th iteration on. Iteration 1's FLOPs are counted (eagerly: not with --compile)."""

    def __init__(self, device, untimed, count_flops):
        self.device, self.untimed, self.counter = device, untimed, None
        self.iterations, self.ends, self.started, self.fetch_seconds, self.fetches = 0, [], None, 0.0, 0
        self.flops, self.count_flops = None, count_flops
        self.memory_before, self.windowed = None, False

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def fetching_started(self):
        if self.started is None:  # iteration 1 begins with its first batch
            self.started = time.perf_counter()
            if self.count_flops:
                from torch.utils.flop_counter import FlopCounterMode
                self.counter = FlopCounterMode(display=False)
                self.counter.mod_tracker = TotalOnly()
                self.counter.__enter__()

    def iteration_ended(self):
        self.sync()
        self.iterations += 1
        self.ends.append(time.perf_counter())
        if self.counter is not None:
            self.counter.__exit__(None, None, None)
            self.flops, self.counter = self.counter.get_total_flops(), None
        if self.iterations == self.untimed:  # the timed window opens
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            self.windowed = self.device.type != "cuda" and peak_rss_reset()
            self.memory_before = torch.cuda.memory_allocated(self.device) / 2 ** 20 if self.device.type == "cuda" \
                else proc_status_mb("VmRSS")
            self.fetch_seconds, self.fetches = 0.0, 0
            self.ends = [self.ends[-1]]


class TotalOnly:
    """FlopCounterMode's per-module attribution: here only the total, without the module hooks that
    autograd.grad (WGAN-GP's penalty) refuses."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def offline_readers(support, config, kinds):
    """support's readers of MNIST and of the other data sets, downloading nothing; where the data set is not under
    --data-root (or with --data synthetic), random uint8 images of its shape and number."""
    generator = torch.Generator().manual_seed(0)

    def synthetic(shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)

    def offline(read, random_data):
        signature = inspect.signature(read)

        def reader(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            bound.arguments["download"] = False
            if config["data"] != "synthetic":
                try:
                    data = read(*bound.args, **bound.kwargs)
                    kinds.add("real")
                    return data
                except support.DataError:
                    if config["data"] == "real":
                        raise
            kinds.add("synthetic")
            return random_data(bound.arguments)
        return reader

    support.read_mnist = offline(support.read_mnist, lambda a: (
        synthetic((SYNTHETIC_SIZE, 28, 28)), torch.randint(0, 10, (SYNTHETIC_SIZE,), generator=generator)))
    support.load_images = offline(support.load_images, lambda a: synthetic(
        (SYNTHETIC_SIZE, support.CHANNELS[a["name"]], a["image_size"], a["image_size"])))


def examples_feed(images, batch_size, device, config):
    """DCGAN's data fed as pytorch/examples' dcgan feeds it, in place of Batches: a torchvision data set of PIL
    images with Resize, CenterCrop, ToTensor and Normalize to [-1, 1], in a shuffling DataLoader with worker
    processes, `for i, data in enumerate(dataloader)` every epoch, data[0].to(device). Real CIFAR-10 when it is
    under --data-root (torchvision's CIFAR10 class), else random 32x32 images handed out as CIFAR10 hands out
    its own: a PIL image made from a uint8 array per item."""
    import numpy as np
    import torchvision
    from PIL import Image
    from torchvision import transforms

    channels, size = images.shape[1], images.shape[-1]
    half = (0.5,) * channels
    transform = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
                                    transforms.Normalize(half, half)])

    class PILImages(torchvision.datasets.VisionDataset):
        def __init__(self, data):
            super().__init__(root=None, transform=transform)
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            return self.transform(Image.fromarray(self.data[index])), 0

    dataset = None
    if channels == 3 and config["data"] != "synthetic":
        try:
            dataset = torchvision.datasets.CIFAR10(config["data_root"], train=True, transform=transform)
        except RuntimeError:  # not there
            if config["data"] == "real":
                raise
    if dataset is None:
        pixels = torch.randint(0, 256, (SYNTHETIC_SIZE, 32, 32, channels), dtype=torch.uint8).numpy()
        dataset = PILImages(pixels if channels == 3 else np.ascontiguousarray(pixels[..., 0]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=config["workers"])

    def each_epoch():
        while True:
            for data in loader:
                yield data[0].to(device)

    class Feed:
        """What train.py and support.Run read of their batches."""
        per_epoch, placement, batches = len(loader), f"a DataLoader with {config['workers']} workers", each_epoch()

        def __next__(self):
            return next(self.batches)

        def state_dict(self):
            return {}

    return Feed()


def measure(config):
    """Time one configuration: the folder's own train.main, run for 1 + warmup + iters generator iterations with
    its generator step and its batches timed from outside. Iteration 1 (eager FLOPs counted) and the warm-up
    iterations (compilation, cuDNN's kernel choice) are not timed."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    folder, device = config["folder"], torch.device(config["device"])
    gan = load_folder(folder)
    clock = Clock(device, 1 + config["warmup"], count_flops=not config["compile"])
    kinds = set()
    offline_readers(gan.support, config, kinds)
    real_step, real_batches = gan.train.generator_step, gan.train.batches

    def generator_step(*args):
        loss = real_step(*args)
        clock.iteration_ended()
        return loss

    made = []

    def batches(*args, **kwargs):
        feed = examples_feed(args[0], args[1], device, config) if config["feed"] == "dataloader" else \
            real_batches(*args, **kwargs)
        made.append(Timed(feed, clock))
        return made[-1]

    gan.train.generator_step, gan.train.batches = generator_step, batches
    sizes = [] if folder in MLP_FOLDERS else [
        part for name in ("image_size", "width") if config[name] for part in (f"--{name.replace('_', '-')}",
                                                                               config[name])]
    never = 10 ** 9  # no grid, scalar log or checkpoint inside the timed iterations
    with tempfile.TemporaryDirectory() as out:
        argv = ["--device", config["device"], "--data-root", config["data_root"], "--out", f"{out}/run",
                "--max-steps", 1 + config["warmup"] + config["iters"], "--sample-every", never, "--log-every", never,
                "--checkpoint-every", never, "--precision", config["precision"],
                "--compile" if config["compile"] else "--no-compile",
                "--channels-last" if config["memory_format"] == "channels_last" else "--no-channels-last",
                *(["--batch-size", config["batch_size"]] if config["batch_size"] else []), *sizes,
                *STEADY_STATE.get(folder, [])]
        with contextlib.redirect_stdout(sys.stderr):  # the run's progress bar; stdout carries the result
            code = gan.train.main([str(arg) for arg in argv])
        if code:
            raise RuntimeError(f"{folder}/train.py ended with exit code {code}")
        args = json.loads(Path(out, "run", "args.json").read_text())
    times = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    cuda = device.type == "cuda"
    peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else peak_rss_mb(clock.windowed)
    batches_per_iteration = clock.fetches / len(times)
    images = batches_per_iteration * args["batch_size"]
    data = getattr(made[0].batches, "images", None) if made else None
    return {**config, "batch_size": args["batch_size"], "image_size": args.get("image_size"),
            "width": args.get("width"), "dataset": args["dataset"],
            "data_kind": "synthetic" if "synthetic" in kinds or not kinds else "real",
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "ms": [t * 1000 for t in times], "median_ms": median * 1000, "p25_ms": q[0] * 1000, "p75_ms": q[2] * 1000,
            "min_ms": min(times) * 1000, "max_ms": max(times) * 1000,
            "warmup_s": clock.ends[0] - clock.started,
            "batches_per_iteration": batches_per_iteration, "images_per_iteration": images,
            "images_per_s": images / median, "data_share": clock.fetch_seconds / sum(times),
            "peak_memory_mb": peak_mb, "peak_memory_kind": "CUDA max allocated" if cuda else
            ("peak RSS, timed iterations" if clock.windowed else "peak RSS, whole process"),
            "memory_before_timed_mb": clock.memory_before,
            "data_on_device_mb": data.nbytes / 2 ** 20 if data is not None else 0.0,
            "flops_per_iteration": clock.flops, "tflops": clock.flops / median / 1e12 if clock.flops else None}


def peak_rss_reset():
    """Start a new peak-RSS window (Linux: clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mb(field):
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its peak) in MB; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb(windowed):
    """Peak resident memory of this process: since peak_rss_reset() when windowed, else over its whole life."""
    if windowed:
        return proc_status_mb("VmHWM")
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pooled(runs):
    """One configuration's rounds as one result: the statistics of all their timed iterations together, and the
    spread of the rounds' medians."""
    if any("error" in run for run in runs):
        return next(run for run in runs if "error" in run)
    times = sorted(t for run in runs for t in run["ms"])
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    median = statistics.median(times)
    first = runs[0]
    return {**first, "ms": times, "median_ms": median, "p25_ms": q[0], "p75_ms": q[2], "min_ms": times[0],
            "max_ms": times[-1], "round_medians_ms": [run["median_ms"] for run in runs],
            "images_per_s": first["images_per_iteration"] / median * 1000,
            "data_share": statistics.mean(run["data_share"] for run in runs),
            "peak_memory_mb": max(run["peak_memory_mb"] for run in runs),
            "tflops": first["flops_per_iteration"] / median * 1000 / 1e12 if first["flops_per_iteration"] else None}


def with_flops(results):
    """FLOPs are counted eagerly, so not with --compile; a compiled configuration does the arithmetic of its
    folder's eager one."""
    for result in results:
        eager = next((r for r in results if r["folder"] == result["folder"] and r.get("flops_per_iteration")), None)
        if "error" not in result and not result["flops_per_iteration"] and eager:
            result["flops_per_iteration"] = eager["flops_per_iteration"]
            result["tflops"] = eager["flops_per_iteration"] / result["median_ms"] * 1000 / 1e12
    return results


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} CPUs)"


def worker(config_json):
    """Child process: measure one configuration and print its numbers as the last line, after RESULT."""
    config = json.loads(config_json)
    try:
        result = measure(config)
    except SystemExit as error:  # the folder's train.py refused the sizes; its message is on stderr already
        result = {**config, "error": f"the folder's train.py refused this configuration (exit {error.code})"}
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        result = {**config, "error": f"{type(error).__name__}: {first_line}"}
    print("RESULT " + json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------
# The parent: run every configuration, print the table, write the JSON
# ---------------------------------------------------------------------------------------------

def run_one(config, timeout):
    environment = dict(os.environ)
    if config["threads"]:
        environment["OMP_NUM_THREADS"] = str(config["threads"])
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(config)], capture_output=True,
                              text=True, timeout=timeout, env=environment)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"took longer than --timeout {timeout:g} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {**config, "error": f"exit {done.returncode}: {tail}"}
    result = json.loads(lines[-1][len("RESULT "):])
    if "error" in result and done.stderr.strip():
        result["error"] += f" ({done.stderr.strip().splitlines()[-1]})"
    return result


def label(result):
    return (f"{result['folder']:<9} {'DataLoader' if result['feed'] == 'dataloader' else 'Batches':<10} "
            f"{result['precision']:<4} {'on' if result['compile'] else 'off':<7} "
            f"{'ch-last' if result['memory_format'] == 'channels_last' else 'contig':<7}")


HEADER = (f"{'folder':<9} {'feed':<10} {'prec':<4} {'compile':<7} {'memory':<7} {'ms/iter':>9} "
          f"{'p25-p75':>15} {'img/s':>9} {'data':>6} {'peak MB':>8} {'TFLOP/s':>8} {'%peak':>6} {'speedup':>7}")


def row(result, reference, peak):
    if "error" in result:
        return f"{label(result)} error: {result['error']}"
    tflops = result["tflops"]
    share = tflops / peak[result["precision"]] if tflops and result["precision"] in peak else None
    speedup = reference["median_ms"] / result["median_ms"] if reference and "error" not in reference else None
    return (f"{label(result)} {result['median_ms']:9.2f} {result['p25_ms']:7.2f}-{result['p75_ms']:<7.2f} "
            f"{result['images_per_s']:9.1f} {result['data_share']:6.1%} {result['peak_memory_mb']:8.0f} "
            f"{f'{tflops:.3f}' if tflops else '-':>8} {f'{share:.1%}' if share is not None else '-':>6} "
            f"{f'{speedup:.2f}x' if speedup is not None else '-':>7}")


def same_settings(a, b):
    return all(a[k] == b[k] for k in ("folder", "precision", "compile", "memory_format"))


def report(results, peak):
    """The table (speedup: the folder's first configuration, same feed, over this one's median), then the
    ratios of DCGAN's two feeds at equal settings."""
    lines = [HEADER]
    for result in results:
        reference = next(r for r in results if r["folder"] == result["folder"] and r["feed"] == result["feed"])
        lines.append(row(result, reference, peak))
    for loader in (r for r in results if r["feed"] == "dataloader" and "error" not in r):
        ours = next((r for r in results if r["feed"] == "batches" and same_settings(r, loader) and "error" not in r),
                    None)
        if ours:
            lines.append(f"{label(ours).split()[0]} {ours['precision']} compile {'on' if ours['compile'] else 'off'} "
                         f"{ours['memory_format']}: Batches {ours['median_ms']:.2f} ms/iter vs DataLoader "
                         f"{loader['median_ms']:.2f} ms/iter: {loader['median_ms'] / ours['median_ms']:.2f}x "
                         f"(data share {ours['data_share']:.1%} vs {loader['data_share']:.1%})")
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    check_args(parser, args)
    configs = list(configurations(args))
    started = datetime.now()
    rounds = [[] for _ in configs]
    for round_ in range(1, args.rounds + 1):
        for i, config in enumerate(configs):
            print(f"[round {round_}/{args.rounds}, {i + 1}/{len(configs)}] {label({**config})}", end=" ", flush=True)
            result = run_one(config, args.timeout)
            print(f"error: {result['error']}" if "error" in result else
                  f"{result['median_ms']:.2f} ms/iter (warm-up {result['warmup_s']:.1f} s)", flush=True)
            rounds[i].append(result)
    results = with_flops([pooled(runs) for runs in rounds])
    measured = next((r for r in results if "error" not in r), {})
    print(f"\n{measured.get('device_name', args.device)}, torch {torch.__version__}, "
          f"{measured.get('torch_threads', '?')} threads; {args.rounds} x {args.iters} timed iterations, each "
          f"round after {args.warmup}; "
          f"data: {', '.join(sorted({r['data_kind'] for r in results if 'data_kind' in r})) or '-'}")
    print(report(results, args.peak))
    summary = {"started": started.isoformat(timespec="seconds"), "command": [sys.executable, *sys.argv],
               "torch": torch.__version__, "python": platform.python_version(), "peak_tflops": args.peak,
               "results": results}
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"\nevery measurement in {args.json}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
