"""--precision and --compile, applied visibly by each train.py: fp32 is strict float32 (TF32 off),
tf32 turns TF32 on, bf16 runs the steps under bfloat16 autocast with float32 weights and resumes;
--compile compiles the networks in place. Flags that were removed are refused naming what replaced
them."""

import pytest
import torch
from torch import nn

from conftest import FOLDERS, exits_2, load_checkpoint, load_folder, quick_run, run_main

LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def tf32():
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("folder", FOLDERS)
def test_fp32_turns_tf32_off_and_tf32_turns_it_on(folder, tiny_mnist_root, tmp_path):
    before = tf32()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        quick_run(folder, tiny_mnist_root, tmp_path / "fp32", "--max-steps", 1)
        assert tf32() == (False, False)
        tf32_run = ["--max-steps", 1, "--precision", "tf32"]
        quick_run(folder, tiny_mnist_root, tmp_path / "tf32", *tf32_run)
        assert tf32() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def layer_dtypes(folder, root, run, *flags):
    """The dtypes that every convolution and linear layer computed in during a 2-step run."""
    seen = set()

    def record(module, inputs, output):
        if isinstance(module, LAYERS):
            seen.add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        quick_run(folder, root, run, "--max-steps", 2, "--sample-every", 100, *flags)
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("folder", FOLDERS)
def test_bf16_steps_compute_in_bfloat16_keep_float32_state_and_resume(
    folder, tiny_mnist_root, tmp_path, capsys
):
    assert layer_dtypes(folder, tiny_mnist_root, tmp_path / "fp32") == {torch.float32}
    run = tmp_path / "bf16"
    assert torch.bfloat16 in layer_dtypes(folder, tiny_mnist_root, run, "--precision", "bf16")
    checkpoint = load_checkpoint(run)
    state = [*checkpoint["G"].values(), *checkpoint["D"].values()]
    assert {t.dtype for t in state if t.is_floating_point()} == {torch.float32}
    train = load_folder(folder).train
    assert run_main(train, "--resume", run, "--max-steps", 3) == 0
    assert load_checkpoint(run)["step"] == 3
    # the precision is where and how fast, not what: --resume may change it
    assert run_main(train, "--resume", run, "--max-steps", 4, "--precision", "fp32") == 0
    assert load_checkpoint(run)["step"] == 4


@pytest.mark.parametrize("folder", FOLDERS)
def test_compile_compiles_the_networks_in_place(folder, tiny_mnist_root, tmp_path, monkeypatch):
    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda net, *a, **k: compiled.append(net))
    quick_run(folder, tiny_mnist_root, tmp_path / "run", "--max-steps", 1, "--compile")
    # WGAN-GP's penalty differentiates a gradient of D, which torch.compile cannot: G only
    assert len(compiled) == (1 if folder == "WGAN-GP" else 2)
    assert any("Generator" in type(net).__name__ for net in compiled)
    assert load_checkpoint(tmp_path / "run")["args"]["compile"] is True


@pytest.mark.parametrize("removed", ["--channels-last", "--data-on", "--data-on=disk"])
def test_a_removed_flag_is_refused_naming_what_replaced_it(removed, tmp_path, capsys):
    line = exits_2(capsys, load_folder("DCGAN").train, removed, "--out", tmp_path / "run")
    assert "was removed" in line and removed.split("=")[0] in line
    assert not (tmp_path / "run").exists()
