"""Speed of every folder's training, measured: not a test (pytest collects test_*.py only).

For each folder at its paper configuration (each train.py's own defaults, or the sizes given
here), one generator iteration is timed after a warm-up: all of its D or critic steps and its
G step, through the folder's own step functions (train.py), networks (model.py) and batches
(dataset.py's Batches, the data kept on the device). Reported per configuration: the median
and spread of milliseconds per iteration, real images drawn per second, the share of the time
spent getting batches, peak memory and the matrix-product FLOP rate.

DCGAN also runs fed the way pytorch/examples' dcgan feeds its networks (a torchvision data set
of PIL images, Resize/CenterCrop/ToTensor/Normalize, a DataLoader with worker processes), in the
same run, and the ratio of the two feeds is printed.

Every configuration runs in a fresh Python process, one after the other: compilation caches,
threads and peak memory belong to that configuration alone.

    python tests/benchmark.py                                         # every folder, paper sizes
    python tests/benchmark.py --folders DCGAN --precision fp32 bf16 --compile off on
    python tests/benchmark.py --device cpu --threads 2 --width 16 --image-size 32 --batch-size 64
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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
                   help="precisions to compare (train.py --precision); folders without the flag run fp32 only")
    p.add_argument("--compile", nargs="+", default=["off", "on"], choices=("off", "on"),
                   help="without and/or with train.py --compile; folders without the flag run without only")
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


def has_speed_flags(folder):
    """Whether the folder's train.py offers --precision and --compile (through its speed_up function)."""
    return "\ndef speed_up(" in (ROOT / folder / "train.py").read_text()


def configurations(args):
    """Every configuration to measure, in the order they run; the first of each folder is its reference."""
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else \
        "cpu" if args.device == "auto" else args.device
    for folder in args.folders:
        feeds = ["batches", "dataloader"] if folder == "DCGAN" and args.baseline else ["batches"]
        formats = ["contiguous"] if folder in MLP_FOLDERS else args.memory_format
        speed = has_speed_flags(folder)
        precisions = args.precision if speed else ["fp32"]
        compiles = args.compile if speed else ["off"]
        for feed in feeds:
            for precision in precisions:
                for compile in compiles:
                    for memory_format in formats:
                        yield {"folder": folder, "feed": feed, "precision": precision, "compile": compile == "on",
                               "memory_format": memory_format, "device": device, "batch_size": args.batch_size,
                               "image_size": args.image_size, "width": args.width, "iters": args.iters,
                               "warmup": args.warmup, "threads": args.threads, "data": args.data,
                               "data_root": args.data_root, "workers": args.workers}


# ---------------------------------------------------------------------------------------------
# One configuration, measured in this process (the child side of --worker)
# ---------------------------------------------------------------------------------------------

class Setup:
    """A folder's networks, optimisers and one generator iteration, fed by `fetch()`."""

    def __init__(self, networks, iteration, batches_per_iteration, batch_size, data_bytes):
        self.networks, self.iteration = networks, iteration
        self.batches_per_iteration, self.batch_size, self.data_bytes = batches_per_iteration, batch_size, data_bytes


def folder_args(folder, modules, config):
    """The folder's own train.py configuration (its paper defaults), with the benchmark's sizes."""
    argv = ["--device", config["device"]]
    if config["batch_size"]:
        argv += ["--batch-size", config["batch_size"]]
    if folder not in MLP_FOLDERS:
        for flag in ("image_size", "width"):
            if config[flag]:
                argv += [f"--{flag.replace('_', '-')}", config[flag]]
    args, _ = modules.train.parse_args([str(a) for a in argv])
    return args


def synthetic_images(count, channels, size):
    return torch.randint(0, 256, (count, channels, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(0))


def folder_batches(folder, modules, args, config, device):
    """The folder's Batches on the device over its default data set as its dataset.py decodes it, or over
    random images of the same shape; also the images and which of the two they are."""
    ds = modules.dataset
    generator = torch.Generator().manual_seed(0)

    def real():
        if folder == "CGAN":  # images and labels, the training split
            images, labels = ds.load_labelled(args.dataset, config["data_root"], args.image_size, download=False)
            return ds.split_validation(images, labels, args.valid_size)[0]
        if folder == "simpleGAN":
            return (ds.load_images(args.dataset, config["data_root"], "train", download=False),)
        return (ds.load_images(args.dataset, config["data_root"], args.image_size, download=False),)

    def synthetic():
        if folder == "CGAN":
            return (synthetic_images(SYNTHETIC_SIZE, 1, args.image_size),
                    torch.randint(0, modules.model.CLASSES, (SYNTHETIC_SIZE,), generator=generator))
        if folder == "simpleGAN":
            return (synthetic_images(SYNTHETIC_SIZE, 1, ds.IMAGE_SIZE),)
        return (synthetic_images(SYNTHETIC_SIZE, ds.CHANNELS[args.dataset], args.image_size),)

    data, kind = None, "synthetic"
    if config["data"] != "synthetic":
        try:
            data, kind = real(), "real"
        except ds.DataError:
            if config["data"] == "real":
                raise
    if data is None:
        data = synthetic()
    return ds.Batches(*data, args.batch_size, device, args.seed), data[0], kind


def to_memory_format(networks, memory_format):
    if memory_format == "channels_last":
        for net in networks:
            net.to(memory_format=torch.channels_last)


def convolutional_setup(folder, modules, args, config, device, fetch):
    """A convolutional folder's networks, optimisers and generator iteration, as its train.py main() has them."""
    model, train = modules.model, modules.train
    channels = modules.dataset.CHANNELS[args.dataset]
    Critic = getattr(model, "Critic", None) or model.Discriminator
    G = model.Generator(args.image_size, channels, args.z_dim, args.width).to(device)
    D = Critic(args.image_size, channels, args.width).to(device)
    if folder != "SN-DCGAN":  # SN-DCGAN's networks initialise themselves
        G.apply(model.init_weights)
        D.apply(model.init_weights)
    to_memory_format((G, D), config["memory_format"])
    if folder == "WGAN":
        opt_G, opt_D = train.rmsprop(G.parameters(), args.lr), train.rmsprop(D.parameters(), args.lr)
    else:
        decay = {"weight_decay": args.weight_decay} if folder == "DCGAN" else {}
        opt_G = torch.optim.Adam(G.parameters(), args.lr, (args.beta1, args.beta2), **decay)
        opt_D = torch.optim.Adam(D.parameters(), args.lr, (args.beta1, args.beta2), **decay)

    def z(n):
        return model.sample_z(n, args.z_dim, device)

    # D's (or the critic's) updates per generator iteration, and their extra arguments, as in each main()
    if folder == "DCGAN":
        n_d, d_extra, g_extra, d_step = 1, (), (), train.discriminator_step
    elif folder == "LSGAN":
        coding = train.CODINGS[args.coding]
        n_d, d_extra, g_extra, d_step = 1, (coding,), (coding,), train.discriminator_step
    elif folder == "SN-DCGAN":
        n_d, d_extra, g_extra, d_step = args.n_dis, (args.loss,), (args.loss,), train.discriminator_step
    elif folder == "WGAN":  # the steady state: n_critic, not the official code's 100-iteration warm-up phases
        n_d, d_extra, g_extra, d_step = args.n_critic, (args.clip,), (), train.critic_step
    else:  # WGAN-GP
        n_d, d_extra, g_extra, d_step = args.n_critic, (args.lambda_gp,), (), train.critic_step

    def iteration():
        for _ in range(n_d):
            x = fetch()
            d_step(G, D, opt_D, x, z(len(x)), *d_extra)
        train.generator_step(G, D, opt_G, z(args.batch_size), *g_extra)

    return {"G": G, "D": D}, iteration, n_d


def simplegan_setup(modules, args, config, device, fetch, images):
    model, train = modules.model, modules.train
    G = model.Generator(args.z_dim, args.g_width).to(device)
    D = model.Discriminator(args.d_width).to(device)
    model.init_generator(G, modules.dataset.pixel_means(images).to(device))
    model.init_discriminator(D)
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)

    def iteration():
        for _ in range(args.k):
            x = fetch()
            train.discriminator_step(G, D, opt_D, x, model.sample_z(len(x), args.z_dim, device))
        train.generator_step(G, D, opt_G, model.sample_z(args.batch_size, args.z_dim, device))

    return {"G": G, "D": D}, iteration, args.k


def cgan_setup(modules, args, config, device, fetch, images):
    model, train = modules.model, modules.train
    G = model.Generator(args.z_dim, model.CLASSES, args.image_size, args.dropout).to(device)
    D = model.Discriminator(model.CLASSES, args.image_size, args.dropout).to(device)
    model.init_weights(G, model.G_IRANGE)
    model.init_weights(D, model.D_IRANGE)
    model.init_output_bias(G, modules.dataset.to_unit(images).mean(0).to(device))
    opt_G = torch.optim.SGD(G.parameters(), args.lr, momentum=args.momentum)
    opt_D = torch.optim.SGD(D.parameters(), args.lr, momentum=args.momentum)

    def iteration():
        x, y = fetch()
        z = model.sample_z(len(x), args.z_dim, device)
        train.discriminator_step(G, D, opt_D, x, y, z)
        train.generator_step(G, D, opt_G, model.sample_z(len(x), args.z_dim, device), y)

    return {"G": G, "D": D}, iteration, 1


def examples_dataloader(args, config, channels):
    """DCGAN's data fed as pytorch/examples' dcgan feeds it: a torchvision data set of PIL images with
    Resize, CenterCrop, ToTensor and Normalize to [-1, 1], in a shuffling DataLoader with worker processes.

    Real CIFAR-10 when it is under --data-root (torchvision's CIFAR10 class), else random 32x32 images handed
    out as CIFAR10 hands out its own: a PIL image made from a uint8 array per item.
    """
    import numpy as np
    import torchvision
    from PIL import Image
    from torchvision import transforms

    half = (0.5,) * channels
    transform = transforms.Compose([transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size),
                                    transforms.ToTensor(), transforms.Normalize(half, half)])

    class PILImages(torchvision.datasets.VisionDataset):
        def __init__(self, data):
            super().__init__(root=None, transform=transform)
            self.data = data

        def __len__(self):
            return len(self.data)

        def __getitem__(self, index):
            return self.transform(Image.fromarray(self.data[index])), 0

    dataset, kind = None, "synthetic"
    if config["data"] != "synthetic" and args.dataset == "cifar10":
        try:
            dataset, kind = torchvision.datasets.CIFAR10(config["data_root"], train=True, transform=transform), "real"
        except RuntimeError:  # not there
            if config["data"] == "real":
                raise
    if dataset is None:
        images = synthetic_images(SYNTHETIC_SIZE, channels, 32).permute(0, 2, 3, 1).numpy()
        dataset = PILImages(images if channels == 3 else np.ascontiguousarray(images[..., 0]))
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True,
                                       num_workers=config["workers"]), kind


def build(config, device, fetch_timer):
    """The Setup of one configuration, and what its data is."""
    folder = config["folder"]
    modules = load_folder(folder)
    args = folder_args(folder, modules, config)
    torch.manual_seed(0)

    if config["feed"] == "batches":
        batches, images, kind = folder_batches(folder, modules, args, config, device)
    else:
        loader, kind = examples_dataloader(args, config, modules.dataset.CHANNELS[args.dataset])
        batches, images = examples_batches(loader, device), None

    fetch = fetch_timer(lambda: next(batches))
    if folder == "simpleGAN":
        networks, iteration, n_d = simplegan_setup(modules, args, config, device, fetch, images)
    elif folder == "CGAN":
        networks, iteration, n_d = cgan_setup(modules, args, config, device, fetch, images)
    else:
        networks, iteration, n_d = convolutional_setup(folder, modules, args, config, device, fetch)
    data_bytes = batches.images.nbytes if hasattr(batches, "images") else 0
    sizes = {"batch_size": args.batch_size, "image_size": getattr(args, "image_size", None),
             "width": getattr(args, "width", None), "dataset": args.dataset, "data_kind": kind}
    return modules, Setup(networks, iteration, n_d, args.batch_size, data_bytes), sizes


def examples_batches(loader, device):
    """pytorch/examples dcgan's loop: `for i, data in enumerate(dataloader)`, every epoch anew; data[0].to(device)."""
    while True:
        for data in loader:
            yield data[0].to(device)


class TotalOnly:
    """FlopCounterMode's per-module attribution: here only the total, without the module hooks that
    autograd.grad (WGAN-GP's penalty) refuses."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(iteration):
    """FLOPs of one iteration (matrix products and convolutions, backward included, as FlopCounterMode counts
    them), run eagerly in float32 before --precision and --compile apply: they leave the arithmetic the same."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = TotalOnly()
    with counter:
        iteration()
    return counter.get_total_flops()


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


def measure(config):
    """Time one configuration; a dict of its numbers."""
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    if cuda:  # as every train.py sets them
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    fetch_seconds = [0.0]

    def fetch_timer(get):
        def fetch():
            started = time.perf_counter()
            batch = get()
            fetch_seconds[0] += time.perf_counter() - started
            return batch
        return fetch

    modules, setup, sizes = build(config, device, fetch_timer)
    flops = count_flops(setup.iteration)

    if config["precision"] != "fp32" or config["compile"]:
        if not hasattr(modules.train, "speed_up"):
            raise RuntimeError(f"{config['folder']}/train.py has no --precision or --compile")
        modules.train.speed_up(setup.networks, config["precision"], config["compile"], device)

    sync()
    started = time.perf_counter()
    for _ in range(config["warmup"]):
        setup.iteration()
    sync()
    warmup_seconds = time.perf_counter() - started

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    windowed = not cuda and peak_rss_reset()
    memory_before = torch.cuda.memory_allocated(device) / 2 ** 20 if cuda else proc_status_mb("VmRSS")
    fetch_seconds[0] = 0.0
    times = []
    for _ in range(config["iters"]):
        started = time.perf_counter()
        setup.iteration()
        sync()
        times.append(time.perf_counter() - started)
    peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else peak_rss_mb(windowed)

    median = statistics.median(times)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [median] * 3
    images = setup.batches_per_iteration * setup.batch_size
    return {**config, **sizes,
            "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
            "torch_threads": torch.get_num_threads(),
            "ms": [t * 1000 for t in times], "median_ms": median * 1000, "p25_ms": q[0] * 1000, "p75_ms": q[2] * 1000,
            "min_ms": min(times) * 1000, "max_ms": max(times) * 1000, "warmup_s": warmup_seconds,
            "batches_per_iteration": setup.batches_per_iteration, "images_per_iteration": images,
            "images_per_s": images / median, "data_share": fetch_seconds[0] / sum(times),
            "peak_memory_mb": peak_mb, "peak_memory_kind": "CUDA max allocated" if cuda else
            ("peak RSS, timed iterations" if windowed else "peak RSS, whole process"),
            "memory_before_timed_mb": memory_before,
            "data_on_device_mb": setup.data_bytes / 2 ** 20,
            "flops_per_iteration": flops, "tflops": flops / median / 1e12}


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
            "tflops": first["flops_per_iteration"] / median * 1000 / 1e12}


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
    except SystemExit as error:  # the folder's parse_args refused the sizes; its message is on stderr already
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
    share = result["tflops"] / peak[result["precision"]] if result["precision"] in peak else None
    speedup = reference["median_ms"] / result["median_ms"] if reference and "error" not in reference else None
    return (f"{label(result)} {result['median_ms']:9.2f} {result['p25_ms']:7.2f}-{result['p75_ms']:<7.2f} "
            f"{result['images_per_s']:9.1f} {result['data_share']:6.1%} {result['peak_memory_mb']:8.0f} "
            f"{result['tflops']:8.3f} {f'{share:.1%}' if share is not None else '-':>6} "
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
    for folder in args.folders:
        if not has_speed_flags(folder):
            print(f"{folder}/train.py has no --precision or --compile: fp32 without compile only")
    started = datetime.now()
    rounds = [[] for _ in configs]
    for round_ in range(1, args.rounds + 1):
        for i, config in enumerate(configs):
            print(f"[round {round_}/{args.rounds}, {i + 1}/{len(configs)}] {label({**config})}", end=" ", flush=True)
            result = run_one(config, args.timeout)
            print(f"error: {result['error']}" if "error" in result else
                  f"{result['median_ms']:.2f} ms/iter (warm-up {result['warmup_s']:.1f} s)", flush=True)
            rounds[i].append(result)
    results = [pooled(runs) for runs in rounds]
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
