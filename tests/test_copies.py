"""The deliberate copies stay copies.

Folders share no code: what several folders need is written out in each of them, between the marker lines
`# >>> copied: NAME >>>` and `# <<< copied: NAME <<<`. Every copy of a block must be identical to the others,
line for line, except lines whose comment starts with `# per-folder` (a line that must differ, such as the
folder's name). This test names the folder, file and line
where a copy has drifted.
"""
import re
from collections import defaultdict

import pytest

from conftest import ROOT

FOLDERS = ("simpleGAN", "CGAN", "DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
CONVOLUTIONAL = FOLDERS[2:]
START, END = re.compile(r"# >>> copied: ([\w -]+) >>>$"), re.compile(r"# <<< copied: ([\w -]+) <<<$")
# the blocks each folder must carry: (file, block name) -> folders
EXPECTED = {
    ("train.py", "run management"): FOLDERS,
    ("train.py", "speed"): FOLDERS,
    ("train.py", "parzen"): ("simpleGAN", "CGAN"),
    ("train.py", "sample metrics"): CONVOLUTIONAL,
    ("model.py", "files and errors"): FOLDERS,
    ("dataset.py", "mnist-files"): FOLDERS,
    ("dataset.py", "image-data"): CONVOLUTIONAL,
}


def copied_blocks(path):
    """{name: [(line number, text), ...]} of the copied blocks in one file, markers excluded."""
    blocks, name = {}, None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        start, end = START.match(line.strip()), END.match(line.strip())
        if start:
            assert name is None, f"{path}:{number}: block {start[1]!r} opens inside block {name!r}"
            name, blocks[start[1]] = start[1], []
        elif end:
            assert end[1] == name, f"{path}:{number}: block {end[1]!r} closes, but {name!r} is open"
            name = None
        elif name is not None:
            blocks[name].append((number, line))
    assert name is None, f"{path}: block {name!r} is never closed"
    return blocks


def all_copies():
    """{(file, block name): {folder: lines}} over the seven folders."""
    copies = defaultdict(dict)
    for folder in FOLDERS:
        for file in ("train.py", "model.py", "dataset.py"):
            for name, lines in copied_blocks(ROOT / folder / file).items():
                copies[(file, name)][folder] = lines
    return copies


def drift(reference, other):
    """The first pair of lines that differ, per-folder lines aside, or None."""
    for (number_a, a), (number_b, b) in zip(reference, other):
        if a != b and not ("# per-folder" in a and "# per-folder" in b):
            return number_a, a, number_b, b
    if len(reference) != len(other):
        shorter = min(len(reference), len(other))
        (number_a, a), (number_b, b) = (reference + [(None, "<end of block>")])[shorter], \
            (other + [(None, "<end of block>")])[shorter]
        return number_a, a, number_b, b
    return None


def test_every_folder_carries_its_blocks():
    copies = all_copies()
    for (file, name), folders in EXPECTED.items():
        assert sorted(copies[(file, name)]) == sorted(folders), (file, name)
    assert set(copies) == set(EXPECTED), set(copies) - set(EXPECTED)


@pytest.mark.parametrize("file, name", sorted(EXPECTED))
def test_the_copies_of_a_block_are_identical(file, name):
    copies = all_copies()[(file, name)]
    first, *others = [folder for folder in FOLDERS if folder in copies]
    problems = []
    for folder in others:
        difference = drift(copies[first], copies[folder])
        if difference:
            line_a, text_a, line_b, text_b = difference
            problems.append(f"{folder}/{file}:{line_b} differs from {first}/{file}:{line_a} in block {name!r}:\n"
                            f"  {first}: {text_a.strip()}\n  {folder}: {text_b.strip()}")
    assert not problems, "\n".join(problems)


def test_drift_is_found_and_named():
    """The comparison itself: a changed line, a missing line and a per-folder line."""
    block = [(10, "a = 1"), (11, "b = 2  # per-folder"), (12, "c = 3")]
    assert drift(block, [(20, "a = 1"), (21, "b = 9  # per-folder"), (22, "c = 3")]) is None
    assert drift(block, [(20, "a = 1"), (21, "b = 2  # per-folder"), (22, "c = 4")]) == (12, "c = 3", 22, "c = 4")
    assert drift(block, block[:2]) == (12, "c = 3", None, "<end of block>")
    assert drift(block, [(20, "a = 1"), (21, "b = 2"), (22, "c = 3")]) is not None  # the marker is on both sides
