"""--precision and --compile in the convolutional folders: the runs resume, bf16 keeps float32 master
weights while the networks really compute in bfloat16, spectral norm and the gradient penalty hold
under bf16, and --compile leaves the checkpoint as it was. Speed itself is measured by benchmark.py."""
import copy

import pytest
import torch
from torch import nn

import benchmark
from conftest import assert_clean_error, load_checkpoint, load_folder, run_train

FOLDERS = ("DCGAN", "WGAN", "WGAN-GP", "LSGAN", "SN-DCGAN")
QUICK = ["--dataset", "mnist", "--image-size", 32, "--width", 8, "--batch-size", 8, "--device", "cpu"]
# WGAN's official warm-up runs 100 critic iterations per generator step at first: too slow for a smoke run
EXTRA = {"WGAN": ["--no-critic-warmup"]}
SIZES = {"device": "cpu", "batch_size": 8, "image_size": 32, "width": 8, "memory_format": "contiguous"}
CPU = torch.device("cpu")


def tiny_setup(folder):
    """A folder's networks at 32 px and width 8, and one generator iteration on random images, built as
    benchmark.py builds them from the folder's own train.py."""
    modules = load_folder(folder)
    args = benchmark.folder_args(folder, modules, SIZES)
    torch.manual_seed(0)
    channels = modules.dataset.CHANNELS[args.dataset]
    networks, iteration, _ = benchmark.convolutional_setup(
        folder, modules, args, SIZES, CPU, lambda: torch.rand(8, channels, 32, 32) * 2 - 1)
    return modules, args, networks, iteration


def float_tensors(state):
    """Every floating-point tensor in a (nested) state dict."""
    if torch.is_tensor(state):
        return [state] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [t for value in state.values() for t in float_tensors(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in float_tensors(value)]
    return []


def layouts(checkpoint):
    """Name, shape and dtype of every tensor of the networks and the optimisers in a checkpoint."""
    def walk(prefix, state):
        if torch.is_tensor(state):
            yield prefix, tuple(state.shape), state.dtype
        elif isinstance(state, dict):
            for key, value in state.items():
                yield from walk(f"{prefix}.{key}", value)
        elif isinstance(state, (list, tuple)):
            for i, value in enumerate(state):
                yield from walk(f"{prefix}.{i}", value)
    return sorted(entry for part in ("G", "D", "opt_G", "opt_D") for entry in walk(part, checkpoint[part]))


@pytest.mark.parametrize("folder", FOLDERS)
def test_bf16_run_resumes_keeps_float32_master_weights_and_keeps_its_precision(folder, mnist_root, tmp_path):
    run = tmp_path / "run"
    common = [*QUICK, *EXTRA.get(folder, [])]
    result = run_train(folder, "--data-root", mnist_root, "--precision", "bf16", "--max-steps", 2, "--out", run,
                       *common)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(run)
    assert checkpoint["args"]["precision"] == "bf16" and checkpoint["step"] == 2
    # the parameters, buffers and optimiser moments are float32: bf16 lives only inside the forward passes
    tensors = [t for part in ("G", "D", "opt_G", "opt_D") for t in float_tensors(checkpoint[part])]
    assert tensors and all(t.dtype == torch.float32 for t in tensors)

    result = run_train(folder, "--resume", run, "--max-steps", 3)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(run)
    assert checkpoint["step"] == 3 and checkpoint["args"]["precision"] == "bf16"
    # the precision is part of the run's configuration
    assert_clean_error(run_train(folder, "--resume", run, "--max-steps", 4, "--precision", "fp32"), "precision")


@pytest.mark.parametrize("folder", FOLDERS)
def test_bf16_runs_the_networks_in_bfloat16_and_hands_float32_to_the_losses(folder):
    modules, args, networks, iteration = tiny_setup(folder)
    layers = [m for net in networks.values() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d,
                                                                                      nn.Linear))]
    seen = {name: [] for name in networks}
    for name, net in networks.items():
        for m in net.modules():
            if m in layers:
                m.register_forward_hook(lambda module, inputs, output, name=name: seen[name].append(output.dtype))
    iteration()  # the float32 reference: the hooks see float32
    assert seen["G"] and seen["D"] and all(d == torch.float32 for d in seen["G"] + seen["D"])

    modules.train.speed_up(networks, "bf16", False, CPU)
    for dtypes in seen.values():
        dtypes.clear()
    iteration()
    # every convolution and linear layer of both networks ran in bfloat16 during the step
    assert seen["G"] and seen["D"] and all(d == torch.bfloat16 for d in seen["G"] + seen["D"])
    G, D = networks["G"], networks["D"]
    z = modules.model.sample_z(4, args.z_dim)
    assert G(z).dtype == torch.float32 and D(G(z)).dtype == torch.float32  # what the losses see
    # master weights: parameters, their gradients and the optimisers' moments stay float32
    for net in networks.values():
        assert all(p.dtype == torch.float32 for p in net.parameters())
        assert all(p.grad is None or p.grad.dtype == torch.float32 for p in net.parameters())
        assert all(b.dtype == torch.float32 for b in net.buffers() if b.is_floating_point())


def test_bf16_keeps_the_losses_in_float32():
    modules, _, networks, _ = tiny_setup("DCGAN")
    G, D = networks["G"], networks["D"]
    modules.train.speed_up(networks, "bf16", False, CPU)
    opt_D, opt_G = torch.optim.Adam(D.parameters()), torch.optim.Adam(G.parameters())
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    losses = [*modules.train.discriminator_step(G, D, opt_D, x, modules.model.sample_z(8)),
              modules.train.generator_step(G, D, opt_G, modules.model.sample_z(8))]
    assert all(loss.dtype == torch.float32 and loss.isfinite() for loss in losses)


def test_spectral_norm_under_bf16_runs_in_float32_once_per_forward_and_normalises():
    modules, _, networks, iteration = tiny_setup("SN-DCGAN")
    D = networks["D"]
    reference = copy.deepcopy(D)  # the same D in float32
    calls = []
    for _, layer in D.normalized_layers():
        layer.parametrizations.weight[0].register_forward_pre_hook(
            lambda module, inputs: calls.append(torch.is_autocast_enabled("cpu")))
    modules.train.speed_up({"D": D}, "bf16", False, CPU)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    for _ in range(3):
        D(x)
        reference(x)
    # Eq. 20-22: each layer's power iteration ran once per forward, outside autocast, in float32 ...
    assert calls == [False] * 3 * len(D.normalized_layers())
    # ... so u, v and the normalised weights are exactly those of the float32 network
    for (_, layer), (_, twin) in zip(D.normalized_layers(), reference.normalized_layers()):
        sn, sn_twin = layer.parametrizations.weight[0], twin.parametrizations.weight[0]
        assert sn._u.dtype == torch.float32
        assert torch.equal(sn._u, sn_twin._u) and torch.equal(sn._v, sn_twin._v)
    # training under bf16 keeps sigma(W / sigma(W)) near 1 (Appendix C.1), as training in float32 does
    _, _, twins, twin_iteration = tiny_setup("SN-DCGAN")
    modules.train.speed_up({"G": networks["G"]}, "bf16", False, CPU)
    for _ in range(3):
        iteration()
        twin_iteration()
    sigmas, twin_sigmas = modules.model.normalized_sigmas(D), modules.model.normalized_sigmas(twins["D"])
    assert all(abs(sigmas[k] - 1) < 0.1 and abs(sigmas[k] - twin_sigmas[k]) < 0.01 for k in sigmas), sigmas


def test_gradient_penalty_under_bf16_is_float32_and_matches_float32():
    modules, _, networks, _ = tiny_setup("WGAN-GP")
    D = networks["D"]
    reference = copy.deepcopy(D)
    modules.train.speed_up({"D": D}, "bf16", False, CPU)
    real, fake = torch.rand(8, 3, 32, 32) * 2 - 1, torch.rand(8, 3, 32, 32) * 2 - 1
    penalties = []
    for critic in (reference, D):
        torch.manual_seed(1)  # the same eps for both
        gp = modules.train.gradient_penalty(critic, real, fake)
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


@pytest.mark.parametrize("folder", FOLDERS)
def test_compile_compiles_what_it_can_in_place(folder):
    """nn.Module.compile() in place (compilation itself waits for the first call); WGAN-GP's critic stays eager,
    since torch.compile has no double backward for the gradient penalty."""
    modules, _, networks, _ = tiny_setup(folder)
    keys = {name: list(net.state_dict()) for name, net in networks.items()}
    modules.train.speed_up(networks, "fp32", False, CPU)  # the defaults leave the networks as they are
    assert all("forward" not in vars(net) and net._compiled_call_impl is None for net in networks.values())
    modules.train.speed_up(networks, "fp32", True, CPU)
    compiled = {name for name, net in networks.items() if net._compiled_call_impl is not None}
    assert compiled == ({"G"} if folder == "WGAN-GP" else {"G", "D"})
    assert {name: list(net.state_dict()) for name, net in networks.items()} == keys


def test_compiled_run_has_the_checkpoint_of_an_eager_run_and_resumes_without_compile(mnist_root, tmp_path):
    """One compiled run (compilation is slow on a small CPU): SN-DCGAN, both networks compiled, spectral norm,
    and bf16 with it."""
    common = ["--data-root", mnist_root, "--max-steps", 1, "--precision", "bf16", *QUICK]
    compiled = run_train("SN-DCGAN", *common, "--compile", "--out", tmp_path / "compiled")
    assert compiled.returncode == 0, compiled.stderr[-2000:]
    assert "--compile: G and D compile" in compiled.stdout
    assert run_train("SN-DCGAN", *common, "--out", tmp_path / "eager").returncode == 0
    with_compile, without = load_checkpoint(tmp_path / "compiled"), load_checkpoint(tmp_path / "eager")
    assert with_compile["args"]["compile"] is True and without["args"]["compile"] is False
    assert layouts(with_compile) == layouts(without)
    # the same training step: compiled and eager arithmetic agree to rounding
    for part in ("G", "D"):
        for key, value in with_compile[part].items():
            assert torch.allclose(value.float(), without[part][key].float(), atol=1e-3), (part, key)
    # --compile may change on --resume
    result = run_train("SN-DCGAN", "--resume", tmp_path / "compiled", "--no-compile", "--max-steps", 2)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(tmp_path / "compiled")
    assert checkpoint["step"] == 2 and checkpoint["args"]["compile"] is False


MLP = {"simpleGAN": ["--g-width", 32, "--d-width", 16], "CGAN": ["--valid-size", 100, "--select-every", 0]}


@pytest.mark.parametrize("folder", MLP)
def test_the_mlp_folders_run_their_networks_in_bf16_keep_float32_weights_and_resume(folder, mnist_root, tmp_path):
    modules = load_folder(folder)
    G, D = modules.model.Generator(), modules.model.Discriminator()
    seen = []
    for layer in [m for net in (G, D) for m in net.modules() if isinstance(m, nn.Linear)]:
        layer.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    modules.train.speed_up({"G": G, "D": D}, "bf16", False, CPU)
    z = modules.model.sample_z(4)
    if folder == "CGAN":
        y = modules.model.one_hot(torch.arange(4))
        out = D(G(z, y), y)
    else:
        out = D(G(z))
    assert out.dtype == torch.float32 and seen and all(dtype == torch.bfloat16 for dtype in seen)

    run = tmp_path / "run"
    common = ["--data-root", mnist_root, "--batch-size", 10, "--device", "cpu", *MLP[folder]]
    result = run_train(folder, *common, "--precision", "bf16", "--max-steps", 2, "--out", run)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = load_checkpoint(run)
    tensors = [t for part in ("G", "D", "opt_G", "opt_D") for t in float_tensors(checkpoint[part])]
    assert checkpoint["args"]["precision"] == "bf16" and all(t.dtype == torch.float32 for t in tensors)
    assert run_train(folder, "--resume", run, "--max-steps", 3).returncode == 0
    assert load_checkpoint(run)["step"] == 3
    assert_clean_error(run_train(folder, "--resume", run, "--max-steps", 4, "--precision", "fp32"), "precision")


@pytest.mark.parametrize("folder", FOLDERS)
def test_channels_last_changes_the_layout_not_the_arithmetic_nor_the_checkpoint(folder):
    modules, args, networks, _ = tiny_setup(folder)
    G, D = networks["G"], networks["D"]
    keys = {name: list(net.state_dict()) for name, net in networks.items()}
    torch.manual_seed(1)
    z = modules.model.sample_z(4, args.z_dim)
    G.eval(), D.eval()
    before = D(G(z))
    modules.train.speed_up(networks, "fp32", False, CPU, channels_last=True)
    convolutions = [m for net in networks.values() for m in net.modules() if isinstance(m, (nn.Conv2d,
                                                                                            nn.ConvTranspose2d))]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions)
    assert torch.allclose(D(G(z)), before, rtol=1e-4, atol=1e-5)
    assert {name: list(net.state_dict()) for name, net in networks.items()} == keys
