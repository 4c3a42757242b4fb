"""tests/gpu_check.py: its dry run (--device cpu --tiny) runs every part's code on the CPU and
reports what it found; its judgement fails what is wrong; its GPU plan is what the folders take."""

import argparse
import json
import subprocess
import sys

import gpu_check
import pytest

from conftest import CONVOLUTIONAL, FOLDERS, ROOT, load_folder

PARTS = ("1", "2", "3", "4")
TINY_SKIP = "--tiny"  # the one reason a dry run may skip a row: what --tiny leaves out on purpose


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for every test here: its exit code and output, its JSON report and its
    Markdown summary, and its folder."""
    out = tmp_path_factory.mktemp("gpu_check")
    command = [sys.executable, "tests/gpu_check.py", "--device", "cpu", "--tiny", "--out", out]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    report_path, summary_path = out / "gpu_check.json", out / "gpu_check.md"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    summary = summary_path.read_text() if summary_path.exists() else ""
    return done, report, summary, out


def rows(report, part):
    return report["parts"][part]["rows"]


def test_every_part_ran_and_reported_ok(dry_run):
    done, report, _, _ = dry_run
    assert done.returncode == 0 and report is not None, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["ok"] and list(report["parts"]) == list(PARTS)
    for number, part in report["parts"].items():
        assert part["ok"] and part["rows"], (number, part)
        for row in part["rows"]:
            skipped = row["status"] == "skipped" and row["why"].startswith(TINY_SKIP)
            assert row["status"] == "ok" or skipped, row
    # one line per part, then the summary
    lines = done.stdout.splitlines()
    for number, title in gpu_check.PART_TITLES.items():
        assert any(line.startswith(f"part {number} ok: {title}") for line in lines), number
    assert any(line.startswith("gpu_check ok in") for line in lines)


def test_every_folder_trained_in_fp32_and_bf16(dry_run):
    _, report, summary, _ = dry_run
    runs = {(row["folder"], row["precision"], row["compile"]): row for row in rows(report, "1")}
    planned = {(f, p, c) for f in FOLDERS for p, c in gpu_check.RUNS}
    assert set(runs) == planned
    for (folder, precision, compiled), row in runs.items():
        if (precision, compiled) in gpu_check.TINY_LEFT_OUT:  # tf32 and compiling: on CUDA
            assert row["status"] == "skipped", row
            continue
        assert row["status"] == "ok" and row["steps"] == report["sizes"]["steps"], row
        assert row["steps_per_s"] > 0, row
        assert isinstance(row["loss_D"], float) and isinstance(row["loss_G"], float), row
        # what only CUDA can measure is said to be missing, not made up
        assert row["peak_mb"] == row["syncs_in_loop"] == "n/a on cpu"
        assert f"| {folder}-{precision} | ok |" in summary


def test_fp32_and_bf16_turn_tf32_off_and_tf32_turns_it_on(dry_run):
    _, report, _, _ = dry_run
    flags = {(row["folder"], row["precision"]): row for row in rows(report, "2")}
    assert set(flags) == {(f, p) for f in FOLDERS for p in ("fp32", "bf16", "tf32")}
    for (folder, precision), row in flags.items():
        on = precision == "tf32"
        assert row["status"] == "ok" and row["tf32"] == f"matmul {on}, cudnn {on}", row


def test_the_killed_run_resumed_from_its_checkpoint(dry_run):
    _, report, _, _ = dry_run
    killed, resumed = rows(report, "3")
    assert killed["name"] == "kill -9" and resumed["name"] == "--resume"
    every = report["sizes"]["checkpoint_every"]
    assert killed["killed_at"] > 0 and killed["killed_at"] % every == 0
    assert resumed["resumed_from"] == killed["killed_at"]
    assert resumed["ended_at"] == killed["killed_at"] + report["sizes"]["resume_steps"]


def test_model_py_drew_every_grid_and_eval_every_scored_the_run(dry_run):
    _, report, _, out = dry_run
    runs = {row["name"]: row for row in rows(report, "4")}
    sizes = report["sizes"]
    assert len(runs["DCGAN-eval-every"]["fid"]) == sizes["eval_steps"] // sizes["eval_every"]
    assert (out / "runs" / "DCGAN-eval-every" / "checkpoints" / "best.pt").is_file()
    for name in [f"{folder}-fp32" for folder in CONVOLUTIONAL] + ["DCGAN-eval-every"]:
        # 8 x 8 images of 32 px, 2 px apart
        assert runs[f"grid-{name}"]["grid"] == f"{name}.png 274x274", runs[f"grid-{name}"]
    for folder in set(FOLDERS) - set(CONVOLUTIONAL):
        assert runs[f"grid-{folder}-fp32"]["status"] == "ok"


def check_in(out, tiny):
    args = argparse.Namespace(out=str(out), tiny=tiny, device="cpu", time_limit=60, jobs=None)
    args.data_root = gpu_check.DEFAULT_DATA_ROOT
    return gpu_check.Check(args)


def test_a_host_sync_or_a_wrong_tf32_flag_fails_its_part(dry_run, tmp_path):
    """The judgement of a finished run, given what a worker on a GPU could report."""
    _, report, _, out = dry_run
    check = check_in(tmp_path, tiny=True)
    run = out / "runs" / "DCGAN-fp32"
    job = gpu_check.Job("worker", ["true"], ROOT, tmp_path / "worker.log")
    task = {"name": "DCGAN-fp32", "folder": "DCGAN", "precision": "fp32", "compile": False}
    task.update(run=str(run), steps=report["sizes"]["steps"])
    good = {"exit_code": 0, "tf32": [False, False], "steps": 3, "steps_per_s": 5.0}
    good.update(syncs_in_loop=0, syncs_in_loop_where=[])
    gpu_check.judge_training(check, job, task, good)
    assert [r["status"] for r in check.rows[1] + check.rows[2]] == ["ok", "ok"]
    synced = {**good, "syncs_in_loop": 3, "syncs_in_loop_where": ["DCGAN/support.py:900 x3"]}
    gpu_check.judge_training(check, job, task, {**synced, "tf32": [False, True]})
    assert check.rows[1][-1]["status"] == "failed" and "3 host syncs" in check.rows[1][-1]["why"]
    assert check.rows[2][-1]["status"] == "failed" and "[False, True]" in check.rows[2][-1]["why"]
    # a run that ends short of its steps fails too
    gpu_check.judge_training(check, job, {**task, "steps": 5}, good)
    assert "not 5" in check.rows[1][-1]["why"]


def test_on_a_gpu_every_folder_takes_every_precision_and_compile(tmp_path):
    """The GPU check's runs, planned as on a GPU: each folder's parser takes their flags."""
    check = check_in(tmp_path, tiny=False)
    for folder in FOLDERS:
        tasks = gpu_check.training_tasks(check, folder)
        training = [t for t in tasks if t["task"] == "train"]
        assert {(t["precision"], t["compile"]) for t in training} == set(gpu_check.RUNS)
        parser = load_folder(folder).train.build_parser()
        for task in training:
            args = parser.parse_args(task["argv"])
            assert (args.precision, args.compile) == (task["precision"], task["compile"])
            assert args.max_steps == check.size["steps"] and args.dataset == "mnist"
        assert [t["name"] for t in tasks if t["task"] == "grid"] == [f"grid-{folder}-fp32"]
    train, grid = gpu_check.eval_tasks(check)
    args = load_folder("DCGAN").train.build_parser().parse_args(train["argv"])
    assert args.eval_every == check.size["eval_every"] and grid["argv"][0] == train["run"]
