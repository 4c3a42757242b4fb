"""support.py (all seven folders) and images.py (the five convolutional ones) are edited in DCGAN/
and copied: the copies must stay identical, and a drifted one is named with its first different
line. The trio imports nothing but the paper's libraries, the shared files and its own modules."""

import ast
import itertools

import pytest

from conftest import CONVOLUTIONAL, FOLDERS, ROOT

TRIO = ("train.py", "model.py", "dataset.py")
SHARED = {"support.py": FOLDERS, "images.py": CONVOLUTIONAL}
# What the paper's code may import: the numerical libraries, the shared files, the folder's own,
# and two of Python's helpers for writing functions (functools.partial, contextlib.contextmanager:
# SN-DCGAN's spectral normalisation computed in float32 for a step).
PAPER_IMPORTS = {
    "contextlib",
    "functools",
    "math",
    "sys",
    "numpy",
    "torch",
    "torchvision",
    "support",
    "images",
    "model",
    "dataset",
    "features",
    "spectra",
}


def first_difference(reference, copy):
    """(line number, reference line, copy line) where two texts first differ, or None."""
    pairs = itertools.zip_longest(reference.splitlines(), copy.splitlines(), fillvalue="<end>")
    return next(((n, a, b) for n, (a, b) in enumerate(pairs, 1) if a != b), None)


def test_first_difference_names_the_line():
    assert first_difference("a\nb\nc\n", "a\nb\nc\n") is None
    assert first_difference("a\nb\nc\n", "a\nB\nc\n") == (2, "b", "B")
    assert first_difference("a\nb\n", "a\nb\nc\n") == (3, "<end>", "c")


@pytest.mark.parametrize("name", SHARED)
def test_the_shared_files_are_identical_copies(name):
    reference = (ROOT / "DCGAN" / name).read_text()
    drifted = []
    for folder in SHARED[name]:
        difference = first_difference(reference, (ROOT / folder / name).read_text())
        if difference:
            number, ours, theirs = difference
            drifted.append(
                f"{folder}/{name} differs from DCGAN/{name} first at line {number}:\n"
                f"  DCGAN:   {ours.strip()}\n  {folder}: {theirs.strip()}"
            )
    assert not drifted, "\n".join(drifted) + f"\nedit DCGAN/{name} and copy it over the others"


def test_the_mlp_folders_do_not_carry_what_they_never_run():
    assert not any((ROOT / folder / "images.py").exists() for folder in FOLDERS[:2])


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_trio_imports_only_the_papers_libraries_and_the_shared_files(folder):
    foreign = []
    for file in TRIO:
        for node in ast.walk(ast.parse((ROOT / folder / file).read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module]
            else:
                continue
            foreign += [
                f"{folder}/{file}:{node.lineno}: {name}"
                for name in names
                if name.split(".")[0] not in PAPER_IMPORTS
            ]
    assert not foreign, "what is not the paper lives in support.py:\n" + "\n".join(foreign)
