"""tests/gpu_check.py's dry run (--device cpu --tiny): every part of the GPU check runs its code path on the CPU,
tiny, and reports what it found in gpu_check.json and gpu_check.md."""
import json
import subprocess
import sys

import pytest

from conftest import FOLDERS, ROOT

PARTS = ("1", "2", "3", "4", "5")
TINY_SKIP = "--tiny"  # the one reason a dry run may skip a row: what --tiny leaves out on purpose


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One dry run for every test here: its exit code and output, its JSON report and its Markdown summary."""
    out = tmp_path_factory.mktemp("gpu_check")
    done = subprocess.run([sys.executable, "tests/gpu_check.py", "--device", "cpu", "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else None
    summary = (out / "gpu_check.md").read_text() if (out / "gpu_check.md").exists() else ""
    return done, report, summary


def rows(report, part):
    return report["parts"][part]["rows"]


def test_every_part_ran_and_reported_ok(dry_run):
    done, report, _ = dry_run
    assert done.returncode == 0 and report is not None, done.stdout[-3000:] + done.stderr[-3000:]
    assert report["ok"] and list(report["parts"]) == list(PARTS)
    for number, part in report["parts"].items():
        assert part["ok"] and part["rows"], (number, part)
        for row in part["rows"]:
            assert row["status"] == "ok" or (row["status"] == "skipped" and row["why"].startswith(TINY_SKIP)), row


def test_every_folder_trained_in_every_precision(dry_run):
    _, report, _ = dry_run
    runs = {(row["folder"], row["precision"], row["compile"]): row for row in rows(report, "1")}
    assert set(runs) == {(folder, precision, compiled) for folder in FOLDERS
                         for precision, compiled in (("fp32", False), ("bf16", False), ("bf16", True))}
    for (folder, precision, compiled), row in runs.items():
        if compiled:  # left out by --tiny: compiling takes minutes per folder on a CPU
            assert row["status"] == "skipped", row
            continue
        assert row["status"] == "ok" and row["steps"] == report["sizes"]["steps"], row
        assert row["steps_per_s"] > 0 and isinstance(row["loss_D"], float) and isinstance(row["loss_G"], float)
        # what only CUDA can measure is said to be missing, not made up
        assert row["peak_mb"] == row["syncs_in_loop"] == "n/a on cpu"


def test_the_summary_names_every_folder_and_part(dry_run):
    _, _, summary = dry_run
    assert "Result: **ok**" in summary
    for folder in FOLDERS:
        assert f"| {folder}-fp32 | ok |" in summary and f"| {folder}-bf16 | ok |" in summary
    for number in PARTS:
        assert f"## Part {number}:" in summary


def test_every_data_placement_gave_the_same_batches(dry_run):
    _, report, _ = dry_run
    hashes = {row["name"]: row["batches_sha256"] for row in rows(report, "2") if row["name"].startswith("hashes")}
    assert set(hashes) == {"hashes device", "hashes host", "hashes disk"}
    assert len(set(map(tuple, hashes.values()))) == 1
    assert len(hashes["hashes disk"]) == report["sizes"]["hashed_batches"]
    timed = {row["placement"] for row in rows(report, "2") if row["name"].startswith("DCGAN-data-on")}
    assert timed == {"device", "host", "disk"}


def test_the_killed_run_resumed_from_its_checkpoint(dry_run):
    _, report, _ = dry_run
    killed, resumed = rows(report, "3")
    assert killed["name"] == "kill -9" and resumed["name"] == "--resume"
    assert killed["killed_at"] > 0 and killed["killed_at"] % report["sizes"]["checkpoint_every"] == 0
    assert resumed["resumed_from"] == killed["killed_at"]
    assert resumed["ended_at"] == killed["killed_at"] + report["sizes"]["resume_steps"]


def test_eval_every_scored_the_run_and_model_py_drew_its_grid(dry_run):
    _, report, _ = dry_run
    runs = {row["name"]: row for row in rows(report, "4")}
    sizes = report["sizes"]
    assert len(runs["DCGAN-eval-every"]["fid"]) == sizes["eval_steps"] // sizes["eval_every"]
    assert runs["grid-DCGAN-eval-every"]["grid"].endswith("274x274")  # 8 x 8 images of 32 px, 2 px apart


def test_the_benchmark_compared_dcgans_two_feeds(dry_run):
    _, report, _ = dry_run
    feeds = {row["feed"]: row for row in rows(report, "5")}
    assert set(feeds) == {"batches", "dataloader"}
    assert feeds["batches"]["ms_per_iter"] > 0 and feeds["dataloader"]["feed_ratio"] > 0
    assert feeds["batches"]["share_of_peak"] == "n/a on cpu"
