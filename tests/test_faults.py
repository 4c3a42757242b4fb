"""Every fault of a file at every entry point of every folder (train.py, --resume, --evaluate,
model.py): exit code 2 and one line naming the flag or the file, and every file of an existing run
left as it was."""

import errno
import os
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import FOLDERS, exits_2, load_checkpoint, load_folder, quick_run


def write_checkpoints(folder, root):
    """Files that are not checkpoints of `folder`, each with the words its refusal must contain."""
    support = load_folder(folder).support
    other = "WGAN" if folder != "WGAN" else "DCGAN"
    good = {"folder": folder, "format": support.FORMAT, "step": 3, "args": {}, "G": {}}
    torch.save(good, root / "whole.pt")
    unreadable, foreign = "not a readable checkpoint", "not a checkpoint of"
    contents = {
        "empty.pt": (b"", unreadable),
        "tensor.pt": (torch.zeros(3), foreign),
        "state_dict.pt": ({"net.0.weight": torch.zeros(2, 2)}, foreign),
        "other_folder.pt": ({**good, "folder": other}, f"{other}/train.py"),
        "other_format.pt": ({**good, "format": support.FORMAT + 1}, "format"),
        "truncated.pt": ((root / "whole.pt").read_bytes()[:200], unreadable),
        "pickled.pt": ({**good, "rng": np.random.get_state()}, "needs pickle"),
    }
    for name, (content, _) in contents.items():
        if isinstance(content, bytes):
            (root / name).write_bytes(content)
        else:
            torch.save(content, root / name)
    (root / "run_without_checkpoint").mkdir()
    files = {root / name: words for name, (_, words) in contents.items()}
    return {
        **files,
        root / "missing.pt": "no checkpoint",
        root / "run_without_checkpoint": "no checkpoint",
    }


@pytest.mark.parametrize("folder", FOLDERS)
def test_files_that_are_not_this_folders_checkpoints_are_refused_by_every_entry_point(
    folder, tmp_path, capsys
):
    gan = load_folder(folder)
    for path, words in write_checkpoints(folder, tmp_path).items():
        before = files_of(tmp_path)
        for module, args in (
            (gan.train, ["--resume", path]),
            (gan.train, ["--evaluate", path]),
            (gan.model, [path, "--out", tmp_path / "new.png", "--device", "cpu"]),
        ):
            err = exits_2(capsys, module, *args)
            assert path.name in err and words in err, (path.name, err)
        assert files_of(tmp_path) == before  # nothing was created, nothing changed


def test_random_bytes_are_called_unreadable_not_a_pickle_refused(tmp_path, capsys):
    """torch.load(weights_only=True) raises UnpicklingError for bytes that are no pickle at all as
    for a pickle of objects it refuses; only the latter "needs pickle" (pickled.pt above).
    support.py is the same in every folder: DCGAN stands for all."""
    dcgan, path = load_folder("DCGAN"), tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    for module, args in (
        (dcgan.train, ["--resume", path]),
        (dcgan.train, ["--evaluate", path]),
        (dcgan.model, [path, "--out", tmp_path / "new.png", "--device", "cpu"]),
    ):
        err = exits_2(capsys, module, *args)
        assert "random.pt" in err and "not a readable checkpoint" in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["random.pt"]


@pytest.mark.parametrize("folder", FOLDERS)
def test_model_py_refuses_bad_values_and_outputs_before_reading_anything(folder, tmp_path, capsys):
    model = load_folder(folder).model
    missing = tmp_path / "no-run"
    existing = tmp_path / "grid.png"
    existing.write_bytes(b"a grid")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "00000.png").write_bytes(b"an image")
    cases = [
        (["--num", "0"], "--num"),
        (["--num", "-3"], "--num"),
        (
            ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"],
            "--device",
        ),
        (["--out", existing], str(existing)),
        (["--out", tmp_path], str(tmp_path)),  # an existing folder is not a grid file
        (["--out", tmp_path / "full", "--single"], "full"),
        (["--out", existing / "grid.png"], "grid.png"),  # a file where a folder would be needed
        (["--seed", "-1"], "--seed"),
    ]
    for flags, word in cases:
        device = [] if "--device" in flags else ["--device", "cpu"]
        assert word in exits_2(capsys, model, missing, *flags, *device), flags
    assert existing.read_bytes() == b"a grid" and not missing.exists()


# --- the run folder under faults: one folder is enough (support.py is the same in all) -----------

dcgan = load_folder("DCGAN")


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("writer", ["grid", "gif"])
def test_a_failed_write_of_a_picture_stops_the_run_naming_the_file(
    writer, tiny_mnist_root, tmp_path, monkeypatch, capsys
):
    """The handler of writers that a real full disk (test_real_faults.py) does not reach first."""
    support, run = dcgan.support, tmp_path / "run"
    quick_run("DCGAN", tiny_mnist_root, run, "--max-steps", 2, "--sample-every", 2)
    before = files_of(run)
    writers = {"grid": (support.vutils, "save_image"), "gif": (support.imageio, "imwrite")}
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(*writers[writer], mock.Mock(side_effect=full))
    every_step = ["--sample-every", 1, "--log-every", 1, "--checkpoint-every", 1]
    err = exits_2(capsys, dcgan.train, "--resume", run, "--max-steps", 4, *every_step)
    named = {"grid": "step_0000003.png", "gif": "progress.gif"}[writer]
    assert "disk is full" in err and named in err, err
    # the last checkpoint is whole: step 2's, untouched; or, as the animation is written last,
    # step 4's
    if writer == "gif":
        assert load_checkpoint(run)["step"] == 4
    else:
        assert files_of(run)[Path("checkpoints/last.pt")] == before[Path("checkpoints/last.pt")]


def test_resuming_to_a_length_already_reached_is_refused_and_changes_nothing(
    tiny_mnist_root, tmp_path, capsys
):
    run = tmp_path / "run"
    quick_run("DCGAN", tiny_mnist_root, run, "--max-steps", 3)
    before = files_of(run)
    err = exits_2(capsys, dcgan.train, "--resume", run, "--max-steps", 2)
    assert "step 3" in err and "--max-steps" in err
    # the stored length: already reached too
    assert "step 3" in exits_2(capsys, dcgan.train, "--resume", run)
    assert files_of(run) == before  # args.json keeps max_steps 3; nothing else was touched


def test_a_checkpoint_of_this_folder_with_other_networks_is_refused(
    tiny_mnist_root, tmp_path, capsys
):
    run = tmp_path / "run"
    quick_run("DCGAN", tiny_mnist_root, run, "--max-steps", 1)
    checkpoint = load_checkpoint(run)
    checkpoint["G"][next(iter(checkpoint["G"]))] = torch.zeros(3, 3)
    torch.save(checkpoint, run / "checkpoints" / "last.pt")
    before = files_of(run)
    assert "does not fit" in exits_2(capsys, dcgan.train, "--resume", run, "--max-steps", 2)
    assert "do not fit" in exits_2(
        capsys, dcgan.model, run, "--out", tmp_path / "grid.png", "--device", "cpu"
    )
    assert files_of(run) == before
