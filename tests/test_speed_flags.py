"""--precision, --compile and --channels-last (support.speed_up) in every folder: bf16 computes in bfloat16, keeps
float32 weights and resumes, also with spectral norm and the gradient penalty; the others keep the checkpoint."""
import copy

import pytest
import torch
from torch import nn

from conftest import CONVOLUTIONAL, FOLDERS, exits_2, load_checkpoint, load_folder, quick_run, run_main, small_networks

CPU = torch.device("cpu")
LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def tiny_networks(folder):
    """A convolutional folder's {"G": G, "D": D} at 32 px, 3 channels and width 8."""
    return dict(zip("GD", small_networks(folder, 3)))


def layouts(checkpoint):
    """Name, shape and dtype of every tensor of the networks and the optimisers in a checkpoint."""
    def walk(prefix, state):
        if torch.is_tensor(state):
            yield prefix, tuple(state.shape), state.dtype
        elif isinstance(state, (dict, list, tuple)):
            for key, value in (state.items() if isinstance(state, dict) else enumerate(state)):
                yield from walk(f"{prefix}.{key}", value)
    return sorted(entry for part in ("G", "D", "opt_G", "opt_D") for entry in walk(part, checkpoint[part]))


@pytest.mark.parametrize("folder", FOLDERS)
def test_bf16_run_computes_in_bfloat16_keeps_float32_weights_and_resumes(folder, tiny_mnist_root, tmp_path,
                                                                         monkeypatch, capsys):
    gan, run = load_folder(folder), tmp_path / "run"
    real_speed_up, layers, outputs, compiled = gan.support.speed_up, {"G": [], "D": []}, {"G": [], "D": []}, []

    def hooked_speed_up(networks, precision, compile, device, channels_last=False, compiled_names=("G", "D")):
        """The run's speed flags as support.Run applies them, then hooks that record what every layer computed in."""
        compiled.extend(name for name in networks if name in compiled_names)
        real_speed_up(networks, precision, compile, device, channels_last, compiled_names)
        for name, net in networks.items():
            net.register_forward_hook(lambda module, inputs, output, name=name: outputs[name].append(output.dtype))
            for layer in (m for m in net.modules() if isinstance(m, LAYERS)):
                layer.register_forward_hook(lambda module, inputs, output, name=name: layers[name].append(output.dtype))
    monkeypatch.setattr(gan.support, "speed_up", hooked_speed_up)
    quick_run(folder, tiny_mnist_root, run, "--precision", "bf16", "--max-steps", 2)
    # every convolution and linear layer of both networks ran in bfloat16; the losses were given float32
    assert layers["G"] and layers["D"] and set(layers["G"] + layers["D"]) == {torch.bfloat16}
    assert outputs["G"] and outputs["D"] and set(outputs["G"] + outputs["D"]) == {torch.float32}
    # --compile would compile both networks, but for WGAN-GP's critic, whose input gradient enters its loss
    assert compiled == (["G"] if folder == "WGAN-GP" else ["G", "D"])
    checkpoint = load_checkpoint(run)
    assert checkpoint["args"]["precision"] == "bf16" and checkpoint["step"] == 2
    # the parameters, buffers and optimiser moments are float32: bf16 lives only inside the forward passes
    assert {dtype for _, _, dtype in layouts(checkpoint) if dtype.is_floating_point} == {torch.float32}
    assert run_main(gan.train, "--resume", run, "--max-steps", 3) == 0
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 3 and checkpoint["args"]["precision"] == "bf16"
    # the precision is part of the run's configuration
    assert "--precision" in exits_2(capsys, gan.train, "--resume", run, "--max-steps", 4, "--precision", "fp32")


def test_spectral_norm_under_bf16_runs_in_float32_once_per_forward_and_normalises():
    gan = load_folder("SN-DCGAN")
    networks, twins = tiny_networks("SN-DCGAN"), tiny_networks("SN-DCGAN")  # twins: the same networks in float32
    D = networks["D"]
    calls = []
    for _, layer in D.normalized_layers():
        layer.parametrizations.weight[0].register_forward_pre_hook(
            lambda module, inputs: calls.append(torch.is_autocast_enabled("cpu")))
    gan.support.speed_up(networks, "bf16", False, CPU)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(3):
        D(x)
        twins["D"](x)
    # Eq. 20-22: each layer's power iteration ran once per forward, outside autocast, in float32 ...
    assert calls == [False] * 3 * len(D.normalized_layers())
    # ... so u, v and the normalised weights are exactly those of the float32 network
    for (_, layer), (_, twin) in zip(D.normalized_layers(), twins["D"].normalized_layers()):
        sn, sn_twin = layer.parametrizations.weight[0], twin.parametrizations.weight[0]
        assert sn._u.dtype == torch.float32
        assert torch.equal(sn._u, sn_twin._u) and torch.equal(sn._v, sn_twin._v)
    # training under bf16 keeps sigma(W / sigma(W)) near 1 (Appendix C.1), as training in float32 does
    for nets in (networks, twins):
        G, D = nets["G"], nets["D"]
        opt_G, opt_D = torch.optim.Adam(G.parameters(), 1e-4), torch.optim.Adam(D.parameters(), 1e-4)
        for _ in range(3):
            gan.train.discriminator_step(G, D, opt_D, x, gan.model.sample_z(8), "standard")
            gan.train.generator_step(G, D, opt_G, gan.model.sample_z(8), "standard")
    sigmas, twin_sigmas = gan.model.normalized_sigmas(networks["D"]), gan.model.normalized_sigmas(twins["D"])
    assert all(abs(sigmas[k] - 1) < 0.1 and abs(sigmas[k] - twin_sigmas[k]) < 0.01 for k in sigmas), sigmas


def test_gradient_penalty_under_bf16_is_float32_and_matches_float32():
    gan = load_folder("WGAN-GP")
    _, D = small_networks("WGAN-GP", 3)
    reference = copy.deepcopy(D)
    gan.support.speed_up({"D": D}, "bf16", False, CPU)
    real, fake = torch.rand(8, 3, 32, 32) * 2 - 1, torch.rand(8, 3, 32, 32) * 2 - 1
    penalties = []
    for critic in (reference, D):
        torch.manual_seed(1)  # the same eps for both
        gp = gan.train.gradient_penalty(critic, real, fake)
        gp.backward()  # the double backward, through autocast for the bf16 critic
        penalties.append(gp)
    assert penalties[1].dtype == torch.float32 and penalties[1].isfinite()
    assert penalties[1].item() == pytest.approx(penalties[0].item(), rel=0.05)
    # the penalty's gradient w.r.t. the critic's weights (the double backward; the output bias has none) is
    # float32 and points where float32's does
    grads = [p.grad for p in D.parameters() if p.grad is not None]
    assert len(grads) == len([p for p in reference.parameters() if p.grad is not None]) > 1
    assert all(g.dtype == torch.float32 and g.isfinite().all() for g in grads)
    grad, grad_ref = (torch.cat([p.grad.flatten() for p in critic.parameters() if p.grad is not None])
                      for critic in (D, reference))
    assert grad.norm() > 0 and torch.cosine_similarity(grad, grad_ref, dim=0) > 0.99


@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_compile_compiles_in_place_and_channels_last_changes_only_the_layout(folder):
    """Compiled in place (at the first call); channels-last changes the convolutions' layout, not their arithmetic."""
    speed_up, networks = load_folder(folder).support.speed_up, tiny_networks(folder)
    keys = {name: list(net.state_dict()) for name, net in networks.items()}
    speed_up(networks, "fp32", False, CPU)  # the defaults leave the networks as they are
    assert all("forward" not in vars(net) and net._compiled_call_impl is None for net in networks.values())
    G, D = networks["G"], networks["D"]
    z = load_folder(folder).model.sample_z(4)
    G.eval(), D.eval()
    before = D(G(z))
    speed_up(networks, "fp32", False, CPU, channels_last=True)
    convolutions = [m for net in networks.values() for m in net.modules() if isinstance(m, LAYERS[:2])]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert torch.allclose(D(G(z)), before, rtol=1e-4, atol=1e-5)
    speed_up(networks, "fp32", True, CPU)
    assert all(net._compiled_call_impl is not None for net in networks.values())
    assert {name: list(net.state_dict()) for name, net in networks.items()} == keys


def test_compiled_run_has_the_checkpoint_of_an_eager_run_and_resumes_without_compile(tiny_mnist_root, tmp_path,
                                                                                     capsys):
    """One compiled run (slow on a CPU): SN-DCGAN, both networks compiled, spectral norm, and bf16 with it."""
    capsys.readouterr()
    for run, flags in ((tmp_path / "compiled", ["--compile"]), (tmp_path / "eager", [])):
        quick_run("SN-DCGAN", tiny_mnist_root, run, "--max-steps", 1, "--precision", "bf16", *flags)
    assert "--compile: G and D compile" in capsys.readouterr().out
    with_compile, without = load_checkpoint(tmp_path / "compiled"), load_checkpoint(tmp_path / "eager")
    assert with_compile["args"]["compile"] is True and without["args"]["compile"] is False
    assert layouts(with_compile) == layouts(without)
    # the same training step: compiled and eager arithmetic agree to rounding
    for part in ("G", "D"):
        for key, value in with_compile[part].items():
            assert torch.allclose(value.float(), without[part][key].float(), atol=1e-3), (part, key)
    # --compile may change on --resume
    resume = ["--resume", tmp_path / "compiled", "--no-compile", "--max-steps", 2]
    assert run_main(load_folder("SN-DCGAN").train, *resume) == 0
    checkpoint = load_checkpoint(tmp_path / "compiled")
    assert checkpoint["step"] == 2 and checkpoint["args"]["compile"] is False
