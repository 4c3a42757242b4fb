"""Training speed of every folder, measured: not a test (pytest collects test_*.py only).

Each folder's own train.main runs in this process at small settings (MNIST; the convolutional
folders at 32 px, --width 16, batches of 64; simpleGAN and CGAN at their own sizes; WGAN without
the critic's warm-up, CGAN without the Parzen selection). A step is one generator iteration with
all of its D or critic updates. After --warmup steps, --steps steps are timed (support.Run.end_step
is wrapped: nothing is logged, drawn or saved inside the window); each configuration runs --repeats
times, interleaved, and the table shows the median steps/s with the slowest and fastest repeat.
Without MNIST under --data-root, a made-up MNIST (tests/conftest.py) stands in for it.

    python tests/benchmark.py                                   # every folder, fp32 and bf16
    python tests/benchmark.py --folders DCGAN WGAN --precision fp32 --repeats 5
    python tests/benchmark.py --device cuda --precision fp32 tf32 bf16 --compile
    python tests/benchmark.py --quick                           # tiny networks, a few steps
"""

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import FOLDERS, QUICK, ROOT, load_folder, run_main, tiny_mnist  # noqa: E402

MLP_FOLDERS = ("simpleGAN", "CGAN")  # 28x28 MNIST MLPs: no --image-size or --width
STEADY_STATE = {"WGAN": ["--no-critic-warmup"], "CGAN": ["--select-every", 0]}
SMALL = {"image_size": 32, "width": 16, "batch_size": 64}  # the convolutional folders' sizes
NEVER = 10**9  # no log, grid or checkpoint inside the timed window
MADE_UP_IMAGES = 12_000  # training images of a made-up MNIST (CGAN holds 10,000 out)
MNIST_FILES = [f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
DEFAULT_DATA_ROOT = ROOT.parent / "shared" / "data"


def at_least(minimum):
    def parse(text):
        if int(text) < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return int(text)

    return parse


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--folders",
        nargs="+",
        default=list(FOLDERS),
        choices=FOLDERS,
        metavar="FOLDER",
        help="which folders",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--precision",
        nargs="+",
        default=["fp32", "bf16"],
        choices=("fp32", "tf32", "bf16"),
        help="train.py --precision; tf32 only on CUDA",
    )
    p.add_argument("--compile", action="store_true", help="train.py --compile in every run")
    p.add_argument("--steps", type=at_least(1), default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=at_least(1), default=5, help="untimed steps first")
    p.add_argument("--repeats", type=at_least(1), default=3, help="runs of each configuration")
    p.add_argument("--batch-size", type=at_least(1), help="None: 64, the MLPs their own")
    p.add_argument(
        "--image-size",
        type=int,
        default=SMALL["image_size"],
        help="the convolutional folders' image size",
    )
    p.add_argument(
        "--width",
        type=at_least(1),
        default=SMALL["width"],
        help="the convolutional folders' --width",
    )
    p.add_argument("--threads", type=at_least(1), help="torch CPU threads")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="where MNIST is")
    p.add_argument(
        "--quick",
        action="store_true",
        help="the test suite's tiny networks, 3 timed steps after 1, 2 repeats",
    )
    p.add_argument("--json", help="also write every measurement to this file")
    return p


def has_mnist(root):
    raw = Path(root) / "MNIST" / "raw"
    return all((raw / name).is_file() or (raw / f"{name}.gz").is_file() for name in MNIST_FILES)


def folder_flags(folder, args):
    """The folder's small settings (or with --quick its tiny ones), on MNIST."""
    if args.quick:
        return [str(a) for a in QUICK[folder] if a not in ("--device", "cpu")]
    flags = ["--dataset", "mnist", *map(str, STEADY_STATE.get(folder, []))]
    if folder not in MLP_FOLDERS:
        flags += ["--image-size", args.image_size, "--width", args.width]
        flags += ["--batch-size", args.batch_size or SMALL["batch_size"]]
    elif args.batch_size:
        flags += ["--batch-size", args.batch_size]
    return [str(a) for a in flags]


class StepClock:
    """support.Run.end_step wrapped: the time each step's updates ended (after a CUDA sync)."""

    def __init__(self, support, device):
        self.support, self.cuda, self.ends = support, device.type == "cuda", []
        self.real = support.Run.end_step

    def __enter__(self):
        clock, real = self, self.real

        def end_step(run, *args, **kwargs):
            if clock.cuda:
                torch.cuda.synchronize()
            clock.ends.append(time.perf_counter())
            return real(run, *args, **kwargs)

        self.support.Run.end_step = end_step
        return self

    def __exit__(self, *error):
        self.support.Run.end_step = self.real


def measure(folder, precision, args, device, data_root, out):
    """One run of FOLDER's train.main: steps/s over the --steps after --warmup."""
    gan = load_folder(folder)
    argv = [
        *folder_flags(folder, args),
        *("--data-root", data_root, "--device", device.type, "--precision", precision),
        *("--max-steps", args.warmup + args.steps, "--out", out),
        *("--sample-every", NEVER, "--log-every", NEVER, "--checkpoint-every", NEVER),
        *(["--compile"] if args.compile else []),
    ]
    # the run's own lines and progress bar would bury the table: its errors go to stderr
    with StepClock(gan.support, device) as clock, contextlib.redirect_stdout(io.StringIO()):
        code = run_main(gan.train, *argv)
    if code != 0:
        return {"error": f"{folder}/train.py ended with exit code {code}"}
    # ends[k] is when step k + 1's updates ended: the window is steps warmup + 1 .. warmup + steps
    seconds = clock.ends[args.warmup + args.steps - 1] - clock.ends[args.warmup - 1]
    return {"steps_per_s": args.steps / seconds}


def cpu_name():
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return f"{models[0] if models else platform.machine()} ({os.cpu_count()} CPUs)"


def table(results):
    lines = [f"{'folder':<10} {'precision':<9} {'steps/s':>9} {'slowest':>9} {'fastest':>9}"]
    for r in results:
        name = f"{r['folder']:<10} {r['precision']:<9}"
        if "error" in r:
            lines.append(f"{name} error: {r['error']}")
            continue
        per_s = r["steps_per_s"]
        low, high = min(per_s), max(per_s)
        lines.append(f"{name} {r['median_steps_per_s']:9.2f} {low:9.2f} {high:9.2f}")
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA GPU is visible; use --device cpu")
    if device.type == "cpu" and "tf32" in args.precision:
        parser.error("--precision tf32 acts on CUDA only; on the CPU it would repeat fp32")
    if args.quick:
        args.steps, args.warmup, args.repeats = 3, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [(f, p) for f in args.folders for p in args.precision]
    timings = {config: [] for config in configs}
    errors = {}
    with tempfile.TemporaryDirectory() as scratch:
        data_root, data = args.data_root, f"MNIST in {args.data_root}"
        if not has_mnist(data_root):
            data_root = Path(scratch) / "data"
            tiny_mnist(data_root / "MNIST" / "raw", MADE_UP_IMAGES, 10)
            data = f"a made-up MNIST of {MADE_UP_IMAGES} images (none in {args.data_root})"
        for repeat in range(args.repeats):
            for folder, precision in configs:
                if (folder, precision) in errors:
                    continue
                out = Path(scratch) / f"{folder}-{precision}-{repeat}"
                result = measure(folder, precision, args, device, data_root, out)
                if "error" in result:
                    errors[folder, precision] = result["error"]
                    continue
                timings[folder, precision].append(result["steps_per_s"])
                shown = f"{result['steps_per_s']:.2f} steps/s"
                print(f"[{repeat + 1}/{args.repeats}] {folder} {precision}: {shown}", flush=True)
    results = []
    for folder, precision in configs:
        result = {"folder": folder, "precision": precision}
        if (folder, precision) in errors:
            result["error"] = errors[folder, precision]
        else:
            per_s = timings[folder, precision]
            result.update(steps_per_s=per_s, median_steps_per_s=statistics.median(per_s))
        results.append(result)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(
        f"\n{name}, torch {torch.__version__}, torch threads: {torch.get_num_threads()}; "
        f"{args.repeats} repeats of {args.steps} steps after {args.warmup}; "
        f"compile {'on' if args.compile else 'off'}; data: {data}"
    )
    print(table(results))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "json"}
        report = {"device": str(device), "torch": torch.__version__, "settings": settings}
        Path(args.json).write_text(json.dumps({**report, "results": results}, indent=2))
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
