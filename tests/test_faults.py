"""Every user mistake and every fault, at every entry point of every folder: train.py, its --resume and
--evaluate, and model.py. Each ends with exit code 2 and one line naming the flag or the file, without a
traceback, and leaves every file of an existing run as it was."""
import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_checkpoint, load_folder, run_train

FOLDERS = ("simpleGAN", "CGAN", "DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
# Flags that name files or folders: their faults are the subject of the tests further down.
PATH_FLAGS = {"data_root", "out", "resume", "evaluate", "cache_dir", "inception_weights", "lsun_classes"}
# Integer flags for which 0 is a meaning of its own (off), not a mistake.
ZERO_MEANS_OFF = {"select_every", "seed"}


def exits_2(capsys, call, *args):
    """Call `call(*args)` in-process; it must exit with code 2 and one line on stderr, which is returned."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            call(*args)
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    err = capsys.readouterr().err
    assert stopped.value.code == 2, (stopped.value.code, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "error: " in err, err
    return err


def bad_values(action):
    """Values outside a flag's domain, from its type and default."""
    if action.choices is not None:
        return ["no-such-choice"]
    if action.type is int:
        values = ["-1", "2.5", "many"]
        if action.dest == "seed":
            values.append(str(2 ** 32))
        elif action.dest not in ZERO_MEANS_OFF:
            values.append("0")
        return values
    if action.type is float:
        return ["-1", "nan", "inf", "-inf", "ten"]
    return []


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_numeric_or_choice_flag_refuses_values_outside_its_domain(folder, capsys):
    train = load_folder(folder).train
    cases = 0
    for action in train.build_parser()._actions:
        if action.dest in PATH_FLAGS or not action.option_strings:
            continue
        flag = action.option_strings[0]
        for value in bad_values(action):
            err = exits_2(capsys, train.parse_args, [flag, value, "--device", "cpu"])
            assert flag in err, (flag, value, err)
            cases += 1
    assert cases >= 20  # the table is generated from the parser: make sure it did not come out empty


def write_checkpoints(folder, root):
    """Files that are not checkpoints of `folder`, each with the word its refusal must contain."""
    model = load_folder(folder).model
    other = "WGAN" if folder != "WGAN" else "DCGAN"
    good = {"folder": folder, "format": model.FORMAT, "step": 3, "args": {}, "G": {}}
    files = {}

    def put(name, content, words):
        path = root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        files[path] = words

    put("empty.pt", b"", ["not a readable checkpoint"])
    put("random.pt", np.random.default_rng(0).bytes(4096), ["not a readable checkpoint"])
    put("tensor.pt", torch.zeros(3), ["not a checkpoint written"])
    put("state_dict.pt", {"net.0.weight": torch.zeros(2, 2)}, ["not a checkpoint written"])
    put("other_folder.pt", {**good, "folder": other}, [f"{other}/train.py"])
    put("other_format.pt", {**good, "format": model.FORMAT + 1}, ["format"])
    torch.save(good, root / "whole.pt")
    put("truncated.pt", (root / "whole.pt").read_bytes()[:200], ["not a readable checkpoint"])
    files[root / "missing.pt"] = ["no checkpoint"]
    (root / "run_without_checkpoint").mkdir()
    files[root / "run_without_checkpoint"] = ["no checkpoint"]
    return files


@pytest.mark.parametrize("folder", FOLDERS)
def test_files_that_are_not_this_folders_checkpoints_are_refused_by_every_entry_point(folder, tmp_path, capsys):
    modules = load_folder(folder)
    for path, words in write_checkpoints(folder, tmp_path).items():
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        for entry in (lambda: modules.train.parse_args(["--resume", str(path)]),
                      lambda: modules.train.parse_args(["--evaluate", str(path)]),
                      lambda: modules.model.main([str(path), "--out", str(tmp_path / "new.png"), "--device", "cpu"])):
            err = exits_2(capsys, entry)
            assert path.name in err and all(word in err for word in words), (path.name, err)
        # nothing was created, nothing changed
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("folder", FOLDERS)
def test_model_py_refuses_bad_values_and_outputs_before_reading_anything(folder, tmp_path, capsys):
    model = load_folder(folder).model
    missing = str(tmp_path / "no-run")
    existing = tmp_path / "grid.png"
    existing.write_bytes(b"a grid")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "00000.png").write_bytes(b"an image")
    cases = [
        (["--num", "0"], "--num"),
        (["--num", "-3"], "--num"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
        (["--out", str(existing)], str(existing)),
        (["--out", str(tmp_path)], str(tmp_path)),  # an existing folder is not a grid file
        (["--out", str(tmp_path / "full"), "--single"], "full"),
        (["--out", str(existing / "grid.png")], "grid.png"),  # a file where a folder would be needed
        (["--seed", "-1"], "--seed"),
    ]
    for flags, word in cases:
        argv = [missing, *flags] + ([] if "--device" in flags else ["--device", "cpu"])
        err = exits_2(capsys, model.main, argv)
        assert word in err, (flags, err)
    assert existing.read_bytes() == b"a grid" and not (tmp_path / "no-run").exists()


def test_an_unwritable_out_is_refused_before_anything_is_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for folder in FOLDERS:
        err = exits_2(capsys, load_folder(folder).train.parse_args, ["--out", str(blocker / "run"), "--device", "cpu"])
        assert "--out" in err and str(blocker) in err
    assert sorted(tmp_path.iterdir()) == [blocker]


# --- the run folder under faults: one folder is enough, the run management is a checked copy (test_copies.py) ---

def simplegan_run(mnist_root, run, *flags):
    return ["--data-root", str(mnist_root), "--g-width", "16", "--d-width", "8", "--batch-size", "10",
            "--device", "cpu", "--out", str(run), *map(str, flags)]


def run_main(capsys, argv):
    """simpleGAN's train.main in-process: (exit code, stderr)."""
    train = load_folder("simpleGAN").train
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as stopped:
            raise SystemExit(train.main(argv))
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return stopped.value.code, capsys.readouterr().err


def files_of(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def full_disk(*args, **kwargs):
    """A writer on a full disk: it writes a little, then fails as the operating system would."""
    file = args[1] if len(args) > 1 and hasattr(args[1], "write") else None
    if file is not None:
        file.write(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("writer", ["checkpoint", "grid", "gif", "events"])
def test_a_full_disk_stops_the_run_naming_the_file_and_keeps_the_last_checkpoint(writer, mnist_root, tmp_path,
                                                                                monkeypatch, capsys):
    train = load_folder("simpleGAN").train
    run = tmp_path / "run"
    code, _ = run_main(capsys, simplegan_run(mnist_root, run, "--max-steps", 2, "--sample-every", 2))
    assert code == 0
    before = files_of(run)
    target, name = {"checkpoint": (train.torch, "save"), "grid": (train.vutils, "save_image"),
                    "gif": (train.imageio, "imwrite"), "events": (train.SummaryWriter, "add_scalar")}[writer]
    monkeypatch.setattr(target, name, full_disk)
    code, err = run_main(capsys, ["--resume", str(run), "--max-steps", "4", "--sample-every", "1",
                                  "--log-every", "1", "--checkpoint-every", "1"])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "disk is full" in err and {"checkpoint": "last.pt", "grid": "step_0000003.png", "gif": "progress.gif",
                                      "events": str(run)}[writer] in err, err
    # the last checkpoint is whole: step 2's, untouched, or for the animation (written last) step 4's
    if writer == "gif":
        assert load_checkpoint(run)["step"] == 4
    else:
        assert files_of(run)[Path("checkpoints/last.pt")] == before[Path("checkpoints/last.pt")]
    assert not list(run.rglob("*.tmp"))  # no temporary file is left taking the space


def test_resuming_to_a_length_already_reached_is_refused_and_changes_nothing(mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(capsys, simplegan_run(mnist_root, run, "--max-steps", 3))[0] == 0
    before = files_of(run)
    code, err = run_main(capsys, ["--resume", str(run), "--max-steps", "2"])
    assert code == 2 and "step 3" in err and "--max-steps" in err
    code, err = run_main(capsys, ["--resume", str(run)])  # the stored length: already reached too
    assert code == 2 and "step 3" in err
    assert files_of(run) == before  # args.json keeps max_steps 3; nothing else was touched


def test_a_stray_temporary_checkpoint_is_removed_at_the_next_start(mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.tmp").write_bytes(b"left by a run killed while saving")
    assert run_main(capsys, simplegan_run(mnist_root, run, "--max-steps", 1))[0] == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]


def test_a_failed_start_creates_nothing(mnist_root, tmp_path, capsys):
    run, root = tmp_path / "run", tmp_path / "mistyped" / "data"
    for folder in ("simpleGAN", "DCGAN"):
        result = run_train(folder, "--data-root", root, "--dataset", "mnist", "--device", "cpu", "--out", run)
        assert result.returncode == 2 and "Traceback" not in result.stderr and str(root) in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the run folder nor the mistyped data root


def test_a_checkpoint_of_this_folder_with_other_networks_is_refused(mnist_root, tmp_path, capsys):
    run = tmp_path / "run"
    assert run_main(capsys, simplegan_run(mnist_root, run, "--max-steps", 1))[0] == 0
    checkpoint = load_checkpoint(run)
    checkpoint["G"]["net.0.weight"] = torch.zeros(3, 3)
    torch.save(checkpoint, run / "checkpoints" / "last.pt")
    before = files_of(run)
    code, err = run_main(capsys, ["--resume", str(run), "--max-steps", "2"])
    assert code == 2 and "does not fit" in err and "Traceback" not in err
    err = exits_2(capsys, load_folder("simpleGAN").model.main, [str(run), "--out", str(tmp_path / "grid.png"),
                                                                "--device", "cpu"])
    assert "does not fit" in err
    assert files_of(run) == before
