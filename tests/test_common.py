"""What every folder shares, tested once for all seven: a run's outputs, SIGTERM, exact resume, the
sampling command, the stop on NaN, the one-line errors of bad flags, missing data and a changed
configuration, z's prior, the data's range and the networks' shapes. Most tests read one
interrupted and one uninterrupted tiny run per folder, both made in this process; one run of
`python train.py` is stopped by a SIGTERM from outside and resumed by the command it prints."""

import json
import os
import signal
from collections import namedtuple
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision
from PIL import Image

from conftest import (
    CONVOLUTIONAL,
    D_STEP,
    FOLDERS,
    QUICK,
    assert_image_shapes,
    assert_same_networks,
    conv_sizes,
    exits_2,
    load_checkpoint,
    load_folder,
    main_with_poisoned_loss,
    run_main,
    scalar_tags,
    sigterm_then_resume,
    small_networks,
)

# d_per_g: D (critic) steps per generator step under QUICK; own_flag: a flag of the paper that
# --resume must refuse to change; data_files: what the default data set's error names;
# image_size: under QUICK; sampling: model.py's flags for a plain grid of --num images.
Paper = namedtuple("Paper", "d_per_g own_flag data_files image_size sampling")
MNIST_FILES, CIFAR_FILES = "MNIST/raw/train-images-idx3-ubyte", "cifar-10-batches-py"
PAPERS = {
    "simpleGAN": Paper(1, ["--k", 2], MNIST_FILES, 28, []),
    "CGAN": Paper(1, ["--dropout", 0.2], MNIST_FILES, 28, ["--digit", 7]),
    "DCGAN": Paper(1, ["--beta1", 0.9], CIFAR_FILES, 32, []),
    "WGAN": Paper(2, ["--clip", 0.1], CIFAR_FILES, 32, []),
    "WGAN-GP": Paper(2, ["--lambda-gp", 5], CIFAR_FILES, 32, []),
    "LSGAN": Paper(1, ["--coding", "pearson"], CIFAR_FILES, 32, []),
    "SN-DCGAN": Paper(1, ["--setting", "C"], CIFAR_FILES, 32, []),
}
STOP_AT, STEPS = 2, 4  # the split run is stopped after step 2 and resumed to step 4


def stopped_by_sigterm(train, at_step, *args):
    """`train.main(ARGS)` in this process, sent SIGTERM as soon as step AT_STEP's grid is written:
    its exit code."""
    save_image = torchvision.utils.save_image  # what support.py writes the grids with

    def save_then_signal(grid, path, *rest, **options):
        save_image(grid, path, *rest, **options)
        if Path(path).name == f"step_{at_step:07d}.png":
            # the run's own handler must take it: the default one would end pytest itself
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torchvision.utils, "save_image", save_then_signal)
        return run_main(train, *args)


@pytest.fixture(scope="module", params=FOLDERS)
def runs(request, tiny_mnist_root, tmp_path_factory):
    """A run with no length given, stopped by SIGTERM at step 2 and resumed to step 4, and an
    uninterrupted one of 4 steps."""
    folder, base = request.param, tmp_path_factory.mktemp(request.param)
    gan = load_folder(folder)
    flags = [*QUICK[folder], "--data-root", tiny_mnist_root, "--log-every", 1, "--sample-every", 1]
    split, straight = base / "split", base / "straight"
    code = stopped_by_sigterm(gan.train, STOP_AT, *flags, "--out", split)
    assert code == 128 + signal.SIGTERM and load_checkpoint(split)["step"] == STOP_AT
    assert run_main(gan.train, "--resume", split, "--max-steps", STEPS) == 0
    assert run_main(gan.train, *flags, "--max-steps", STEPS, "--out", straight) == 0
    return SimpleNamespace(
        folder=folder, gan=gan, paper=PAPERS[folder], split=split, straight=straight
    )


def test_a_run_writes_every_output_and_resume_continues_them(runs):
    run = runs.split
    names = sorted(p.name for p in (run / "samples").iterdir())
    assert names == [f"step_{s:07d}.png" for s in range(1, STEPS + 1)]
    # the writer merges identical neighbours
    assert 1 <= Image.open(run / "progress.gif").n_frames <= STEPS
    tags = scalar_tags(run)
    # the steps before the signal are kept, the resumed ones follow them
    for tag in ("loss/D", "loss/G"):
        assert [step for step, _ in tags[tag]] == list(range(1, STEPS + 1)), tag
    checkpoint = load_checkpoint(run)
    written = checkpoint["folder"], checkpoint["format"], checkpoint["step"]
    assert written == (runs.folder, runs.gan.support.FORMAT, STEPS)
    assert {"G", "D", "opt_G", "opt_D", "rng", "fixed_z", "batches", "args"} <= set(checkpoint)
    args = json.loads((run / "args.json").read_text())
    assert args == json.loads(json.dumps(checkpoint["args"])) and args["max_steps"] == STEPS
    quick = QUICK[runs.folder]
    assert args["batch_size"] == int(quick[quick.index("--batch-size") + 1])  # the run's own


def test_a_resumed_run_equals_an_uninterrupted_one(runs):
    split, straight = load_checkpoint(runs.split), load_checkpoint(runs.straight)
    assert_same_networks(split, straight)
    assert torch.equal(split["fixed_z"], straight["fixed_z"])
    assert split["batches"] == straight["batches"]
    split_tags, straight_tags = scalar_tags(runs.split), scalar_tags(runs.straight)
    assert split_tags["loss/D"] == straight_tags["loss/D"]
    assert split_tags["loss/G"] == straight_tags["loss/G"]


def test_sigterm_from_another_process_stops_train_py_and_its_printed_command_resumes_it(
    tiny_mnist_root, tmp_path
):
    """The in-process runs above are signalled by themselves; here `python train.py` is, from
    outside, as a scheduler or `kill` does it (support.py is the same in every folder)."""
    flags = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root, "--log-every", 1]
    step = sigterm_then_resume("DCGAN", tmp_path / "run", *flags, more=1)
    logged = [s for s, _ in scalar_tags(tmp_path / "run")["loss/D"]]
    assert logged == list(range(1, step + 2))


def test_the_sampling_command_writes_a_grid_and_single_images(runs, tmp_path):
    sample = [runs.straight, "--num", 10, "--device", "cpu", *runs.paper.sampling]
    assert run_main(runs.gan.model, *sample, "--out", tmp_path / "grid.png") == 0
    cell = runs.paper.image_size + 2
    # 4 images per row, 2 px padding
    assert Image.open(tmp_path / "grid.png").size == (4 * cell + 2, 3 * cell + 2)
    assert run_main(runs.gan.model, *sample, "--out", tmp_path / "single", "--single") == 0
    assert len(list((tmp_path / "single").glob("*.png"))) == 10


def test_resume_refuses_to_change_the_configuration(runs, capsys):
    def files():
        checkpoint, args = runs.split / "checkpoints" / "last.pt", runs.split / "args.json"
        return checkpoint.read_bytes(), args.read_text()

    before = files()
    flag, value = runs.paper.own_flag
    train = runs.gan.train
    assert f"{flag} cannot change" in exits_2(capsys, train, "--resume", runs.split, flag, value)
    assert "--lr cannot change" in exits_2(capsys, train, "--resume", runs.split, "--lr", 0.5)
    assert files() == before


@pytest.mark.parametrize("folder", FOLDERS)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    folder, tiny_mnist_root, tmp_path, capsys, monkeypatch
):
    paper, run = PAPERS[folder], tmp_path / "run"
    flags = ["--max-steps", 10, "--log-every", 1, "--checkpoint-every", 1, "--out", run]
    # D's loss is made Inf in the last D step of generator step 3, whose loss is the one logged
    code = main_with_poisoned_loss(
        monkeypatch,
        load_folder(folder).train,
        D_STEP[folder],
        3 * paper.d_per_g,
        *QUICK[folder],
        "--data-root",
        tiny_mnist_root,
        *flags,
    )
    err = capsys.readouterr().err
    assert code == 1 and "NaN or Inf at step 3;" in err and "Traceback" not in err, err
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 2
    weights = [value for net in ("G", "D") for value in checkpoint[net].values()]
    assert all(value.isfinite().all() for value in weights if value.is_floating_point())


# z's prior in each folder: dimension, mean, variance, support (None: the normal's, unbounded),
# and the prior as torch-fidelity names it for --evaluate's samples (the convolutional folders)
PRIORS = {
    "simpleGAN": (100, 0, 1, (-(3**0.5), 3**0.5), None),
    "CGAN": (100, 0.5, 1 / 12, (0, 1), None),
    "DCGAN": (100, 0, 1 / 3, (-1, 1), "uniform_-1_1"),
    "WGAN": (100, 0, 1, None, "normal"),
    "WGAN-GP": (128, 0, 1, None, "normal"),
    "LSGAN": (1024, 0, 1 / 3, (-1, 1), "uniform_-1_1"),
    "SN-DCGAN": (128, 0, 1, None, "normal"),
}


@pytest.mark.parametrize("folder", FOLDERS)
def test_z_follows_the_papers_prior_and_pixels_are_scaled_to_tanh_range(folder):
    gan, (dim, mean, variance, support, prior) = load_folder(folder), PRIORS[folder]
    z = gan.model.sample_z(20000)
    assert z.shape == (20000, dim)
    assert abs(z.mean().item() - mean) < 0.01 and abs(z.var().item() - variance) < 0.005
    if support is None:
        assert z.min() < -3 and z.max() > 3
    else:  # uniform: inside its support, and reaching both ends
        low, high = support
        margin = 0.0005 * (high - low)
        assert low <= z.min() < low + margin and high - margin < z.max() <= high
    if prior:
        assert gan.train.Z_PRIOR == prior
        # pixels x in [-1, 1]: x / 127.5 - 1 (WGAN-GP's official code: 2 (x / 255 - 0.5), the same)
        pixels = torch.tensor([0, 51, 255], dtype=torch.uint8).view(3, 1, 1, 1)
        x = next(gan.dataset.batches(pixels, 3, "cpu", 0))
        assert sorted(x.flatten().tolist()) == pytest.approx([-1.0, 51 / 127.5 - 1, 1.0])


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_the_convolutional_networks_make_and_score_images_of_the_size_asked_for(
    folder, channels, size
):
    model = load_folder(folder).model
    G, D = small_networks(folder, channels, size)
    assert_image_shapes(G, D, model.sample_z(5), channels, size)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("folder", ["DCGAN", "WGAN-GP"])
def test_every_layer_doubles_or_halves_the_size_exactly(folder, size):
    G, D = small_networks(folder, 3, size)
    ups, downs = conv_sizes(G, D, load_folder(folder).model.sample_z(2))
    assert ups[0][1] == 4 and ups[-1][2] == size and all(o == 2 * i for _, i, o in ups)
    assert downs[0][1] == size and downs[-1][2] == 4 and all(2 * o == i for _, i, o in downs)


@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_sampling_changes_no_batch_norm_buffer_and_is_deterministic(folder):
    model = load_folder(folder).model
    G, _ = small_networks(folder)
    G(model.sample_z(16))  # a training forward gives the running statistics non-default values
    buffers = {k: v.clone() for k, v in G.state_dict().items()}
    z = model.sample_z(4)
    assert torch.equal(model.sample(G, z), model.sample(G, z))
    assert all(torch.equal(buffers[k], v) for k, v in G.state_dict().items())
    assert G.training  # the mode it was in is restored


# Flags that name files or folders (their faults are in test_faults.py), and integer flags for
# which 0 means off.
PATH_FLAGS = {"data_root", "out", "resume", "evaluate", "cache_dir", "lsun_classes"}
ZERO_MEANS_OFF = {"select_every", "seed"}


def bad_values(action):
    """Values outside a flag's domain, from its type and default."""
    if action.choices is not None:
        return ["no-such-choice"]
    if action.type is int:
        if action.dest == "seed":
            extra = [str(2**32)]
        else:
            extra = [] if action.dest in ZERO_MEANS_OFF else ["0"]
        return ["-1", "2.5", "many", *extra]
    if action.type is float:
        return ["-1", "nan", "inf", "-inf", "ten"]
    return []


@pytest.mark.parametrize("folder", FOLDERS)
def test_bad_flags_exit_2_in_one_line_and_create_nothing(folder, tiny_mnist_root, tmp_path, capsys):
    """Values outside each numeric or choice flag's domain (from the parser), a batch over the
    set."""
    train = load_folder(folder).train
    cases = [
        ([action.option_strings[0], value], action.option_strings[0])
        for action in train.build_parser()._actions
        if action.option_strings and action.dest not in PATH_FLAGS
        for value in bad_values(action)
    ]
    assert len(cases) >= 20  # the table is generated from the parser: it did not come out empty
    too_large = [*QUICK[folder], "--data-root", tiny_mnist_root, "--batch-size", 10**6]
    cases.append((too_large, "--batch-size 1000000"))
    for flags, words in cases:
        line = exits_2(capsys, train, "--device", "cpu", "--out", tmp_path / "run", *flags)
        assert words in line, flags
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", [0o644, 0o755], ids=["file", "executable-file"])
def test_an_out_inside_a_file_is_refused_as_not_a_folder(mode, tiny_mnist_root, tmp_path, capsys):
    """support.py is the same in every folder: DCGAN's train.py stands for all."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    blocker.chmod(mode)
    flags = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root, "--out", blocker / "run"]
    line = exits_2(capsys, load_folder("DCGAN").train, *flags)
    assert f"--out {blocker / 'run'}: {blocker}" in line and "not a folder" in line, line
    assert list(tmp_path.iterdir()) == [blocker] and blocker.read_text() == "not a folder"


@pytest.mark.parametrize("folder", FOLDERS)
def test_missing_data_offline_exits_2_naming_the_files(folder, tmp_path, capsys, offline):
    root = tmp_path / "mistyped" / "data"
    flags = ["--data-root", root, "--device", "cpu", "--out", tmp_path / "run"]
    err = exits_2(capsys, load_folder(folder).train, *flags)
    assert PAPERS[folder].data_files in err and "--data-root" in err and str(root) in err, err
    assert not (tmp_path / "run").exists()
