"""The sample metrics of the five convolutional folders: IS, FID and KID through torch-fidelity,
driven through train.main in this process with a small deterministic feature extractor registered
in torch-fidelity's registry in place of Inception-v3, whose weights a machine without network
cannot download."""

import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, NOISE_SOURCE_REGISTRY

from conftest import (
    CONVOLUTIONAL,
    QUICK,
    assert_same_networks,
    exits_2,
    load_checkpoint,
    load_folder,
    quick_run,
    run_main,
    scalar_tags,
)

EXTRACTOR = "test-pixels"
SCORED = ["--eval-samples", 100, "--feature-extractor", EXTRACTOR]  # --evaluate's flags here
# --eval-every's flags here: every 2 steps, 50 samples
EVERY_2 = ["--eval-every", 2, "--eval-every-samples", 50, "--feature-extractor", EXTRACTOR]
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"


class PixelFeatures(FeatureExtractorBase):
    """Inception-v3's stand-in: fixed projections of the 8x8-pooled image, 32 "features" and 10
    class "logits"."""

    get_provided_features_list = staticmethod(lambda: ("features", "logits"))
    get_default_feature_layer_for_metric = staticmethod(
        lambda metric: "logits" if metric == "isc" else "features"
    )
    can_be_compiled = staticmethod(lambda: False)

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        # Building it draws from the global random stream, as building Inception-v3's does ...
        self.layer = nn.Linear(3 * 8 * 8, 32, bias=False)
        # ... but its weights are always the same
        generator = torch.Generator().manual_seed(0)
        self.layer.weight.data = torch.randn(32, 3 * 8 * 8, generator=generator) / 8
        self.register_buffer("classes", torch.randn(32, 10, generator=generator) * 5)

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.dtype, x.shape)
        features = self.layer(F.adaptive_avg_pool2d(x.float() / 255, 8).flatten(1))
        out = {"features": features, "logits": features @ self.classes}
        return tuple(out[name] for name in self.features_list)


if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(EXTRACTOR, PixelFeatures)


def snapshot(folder):
    """Every file under FOLDER with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
    }


@pytest.fixture(scope="module")
def dcgan_run(tiny_mnist_root, tmp_path_factory):
    """A 2-step DCGAN run, left unchanged by the tests that use it."""
    return quick_run(
        "DCGAN", tiny_mnist_root, tmp_path_factory.mktemp("dcgan") / "run", "--max-steps", 2
    )


@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_the_noise_torch_fidelity_feeds_G_is_the_folders_own_prior(folder):
    gan = load_folder(folder)
    gan.images.fidelity()  # registers the U(-1, 1) prior
    torch.manual_seed(0)
    own = gan.model.sample_z(20000, 8).flatten().double()
    fed = (
        NOISE_SOURCE_REGISTRY[gan.train.Z_PRIOR](np.random.RandomState(0), (20000, 8))
        .flatten()
        .double()
    )
    # the same support (U(-1, 1) is bounded, N(0, 1) is not) and the same quantiles
    assert (fed.abs().max() <= 1) == (own.abs().max() <= 1)
    quantiles = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    assert torch.allclose(own.quantile(quantiles), fed.quantile(quantiles), atol=0.03)


class Replay(nn.Module):
    """A stand-in for G that returns the given uint8 images one batch after another, scaled to
    [-1, 1]."""

    def __init__(self, images):
        super().__init__()
        self.images, self.next = images, 0

    def forward(self, z):
        batch = self.images[self.next : self.next + len(z)]
        self.next += len(z)
        return batch.float() / 127.5 - 1


def test_fid_of_the_training_set_against_itself_is_zero_and_against_noise_large(tiny_mnist_root):
    gan = load_folder("DCGAN")
    args = argparse.Namespace(
        dataset="mnist",
        data_root=str(tiny_mnist_root),
        image_size=32,
        eval_real="train",
        z_dim=100,
        seed=0,
        feature_extractor=EXTRACTOR,
        cache_dir=None,
        lsun_classes=["bedroom_train"],
    )
    real = gan.images.RealSet(args, gan.dataset.run_images(vars(args)))
    images = real.images
    assert images.dtype == torch.uint8 and images.shape == (600, 1, 32, 32)
    cpu, prior = torch.device("cpu"), gan.train.Z_PRIOR
    itself = gan.images.sample_metrics(Replay(images), args, cpu, prior, real, len(images))
    noise_images = torch.randint(
        0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    noise = gan.images.sample_metrics(Replay(noise_images), args, cpu, prior, real, len(images))
    assert all(math.isfinite(v) for v in [*itself.values(), *noise.values()])
    assert abs(itself["fid"]) < 1e-6 and noise["fid"] > 1
    assert abs(itself["kid"]) < 1e-3 * noise["kid"]
    assert itself["inception_score"] > 1
    assert abs(itself["inception_score"] - noise["inception_score"]) > 0.1


@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_evaluate_prints_the_scores_and_writes_metrics_json(
    folder, tiny_mnist_root, tmp_path, capsys
):
    gan = load_folder(folder)
    run = quick_run(folder, tiny_mnist_root, tmp_path / "run", "--max-steps", 2)
    before = snapshot(run)
    capsys.readouterr()
    assert run_main(gan.train, "--evaluate", run, *SCORED) == 0
    out = capsys.readouterr().out
    recorded = json.loads((run / "metrics.json").read_text())
    assert set(snapshot(run)) - set(before) == {"metrics.json"}
    assert set(recorded) == {"last"}  # no best.pt kept
    metrics = recorded["last"]
    assert f"FID {metrics['fid']:.3f}" in out
    inception = metrics["inception_score"], metrics["inception_score_std"]
    assert "Inception Score {:.3f} ± {:.3f}".format(*inception) in out
    assert f"KID {metrics['kid']:.5f} ± {metrics['kid_std']:.5f}" in out
    assert metrics["folder"] == folder and metrics["step"] == 2 and metrics["samples"] == 100
    assert metrics["checkpoint"] == str((run / "checkpoints" / "last.pt").resolve())
    data = [metrics[key] for key in ("dataset", "image_size", "real_split", "real_images")]
    assert data == ["mnist", 32, "train", 600]
    assert metrics["feature_extractor"] == EXTRACTOR and metrics["seed"] == 0
    assert metrics["z_prior"] == gan.train.Z_PRIOR and metrics["isc_splits"] == 10
    assert (metrics["kid_subsets"], metrics["kid_subset_size"]) == (100, 100)
    names = ("inception_score", "inception_score_std", "fid", "kid", "kid_std")
    scores = [metrics[name] for name in names]
    assert all(math.isfinite(v) for v in scores) and metrics["fid"] > 0

    # the same command gives the same numbers; the test split gives others
    assert run_main(gan.train, "--evaluate", run, *SCORED) == 0
    assert json.loads((run / "metrics.json").read_text()) == recorded
    assert run_main(gan.train, "--evaluate", run, *SCORED, "--eval-real", "test") == 0
    test = json.loads((run / "metrics.json").read_text())["last"]
    assert (test["real_split"], test["real_images"]) == ("test", 200)
    assert test["fid"] != metrics["fid"]


def test_the_real_features_are_computed_once_and_cached(dcgan_run, tmp_path, monkeypatch):
    gan = load_folder("DCGAN")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # torch-fidelity caches in TORCH_HOME
    evaluate = ["--evaluate", dcgan_run, "--eval-samples", 50, "--feature-extractor", EXTRACTOR]
    embedded = []
    real_getitem = gan.images.RealSet.__getitem__
    monkeypatch.setattr(
        gan.images.RealSet,
        "__getitem__",
        lambda self, i: embedded.append(i) or real_getitem(self, i),
    )
    assert run_main(gan.train, *evaluate) == 0
    assert sorted(set(embedded)) == list(range(600))
    cached = list(
        (tmp_path / "torch" / "fidelity_cache").glob(f"mnist-train-32px-600-*-{EXTRACTOR}-*")
    )
    assert cached
    first = json.loads((dcgan_run / "metrics.json").read_text())
    embedded.clear()
    assert run_main(gan.train, *evaluate) == 0
    assert embedded == []  # only the samples were embedded
    assert json.loads((dcgan_run / "metrics.json").read_text()) == first


@pytest.mark.parametrize("folder", CONVOLUTIONAL)
def test_eval_every_logs_the_scores_and_keeps_the_best_checkpoint(
    folder, tiny_mnist_root, tmp_path
):
    gan = load_folder(folder)
    run = quick_run(folder, tiny_mnist_root, tmp_path / "run", "--max-steps", 4, *EVERY_2)
    tags = scalar_tags(run)
    for tag in ("metrics/fid", "metrics/is", "metrics/kid"):
        assert [step for step, _ in tags[tag]] == [2, 4], tag
        assert all(math.isfinite(value) for _, value in tags[tag])
    best, last = load_checkpoint(run, "best.pt"), load_checkpoint(run)
    fids = dict(tags["metrics/fid"])
    assert best["step"] == min(fids, key=fids.get) == best["best"]["step"]
    assert best["best"]["score"] == pytest.approx(min(fids.values()), rel=1e-6)
    assert last["best"] == best["best"] and last["step"] == 4
    if best["step"] == 4:
        assert all(torch.equal(v, last["G"][k]) for k, v in best["G"].items())

    # model.py samples from best.pt (the copy has no last.pt); --resume continues from it
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "last.pt").unlink()
    sampling = ["--checkpoint", "best", "--num", 4, "--device", "cpu"]
    assert run_main(gan.model, copy, *sampling, "--out", tmp_path / "grid.png") == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * 34 + 2, 2 * 34 + 2)
    resume = ["--resume", copy / "checkpoints" / "best.pt", "--max-steps", 5]
    assert run_main(gan.train, *resume) == 0
    resumed = load_checkpoint(tmp_path / "copy")
    assert resumed["step"] == 5 and resumed["best"]["step"] == best["step"]


def test_eval_every_leaves_training_unchanged_and_resumes_exactly(tiny_mnist_root, tmp_path):
    evaluating = ["--eval-every", 1, "--eval-every-samples", 50, "--feature-extractor", EXTRACTOR]
    straight = quick_run(
        "DCGAN", tiny_mnist_root, tmp_path / "straight", "--max-steps", 4, *evaluating
    )
    split = quick_run("DCGAN", tiny_mnist_root, tmp_path / "split", "--max-steps", 2, *evaluating)
    assert run_main(load_folder("DCGAN").train, "--resume", split, "--max-steps", 4) == 0
    plain = quick_run("DCGAN", tiny_mnist_root, tmp_path / "plain", "--max-steps", 4)
    runs = {
        name: load_checkpoint(path)
        for name, path in (("straight", straight), ("split", split), ("plain", plain))
    }
    assert_same_networks(runs["straight"], runs["split"])
    assert_same_networks(runs["straight"], runs["plain"])  # evaluating moved no random stream
    assert runs["straight"]["best"] == runs["split"]["best"] and runs["plain"]["best"] is None
    assert scalar_tags(straight)["metrics/fid"] == scalar_tags(split)["metrics/fid"]
    assert_same_networks(load_checkpoint(straight, "best.pt"), load_checkpoint(split, "best.pt"))


def test_missing_inception_weights_exit_2_naming_the_file_and_the_folder(
    dcgan_run, tiny_mnist_root, tmp_path, monkeypatch, capsys, offline
):
    train = load_folder("DCGAN").train
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))  # no weights in torch's folder
    before = snapshot(dcgan_run)
    err = exits_2(capsys, train, "--evaluate", dcgan_run, "--eval-samples", 20)
    assert WEIGHTS_FILE in err and str(tmp_path / "empty" / "hub" / "checkpoints") in err
    assert not (tmp_path / "empty" / "hub" / "checkpoints" / WEIGHTS_FILE).exists()
    assert snapshot(dcgan_run) == before

    # training with --eval-every stops before it creates anything
    flags = [*QUICK["DCGAN"], "--data-root", tiny_mnist_root, "--max-steps", 2, "--eval-every", 1]
    assert WEIGHTS_FILE in exits_2(capsys, train, *flags, "--out", tmp_path / "new")
    assert not (tmp_path / "new").exists()

    # a damaged weights file in torch's folder
    (tmp_path / "empty" / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "empty" / "hub" / "checkpoints" / WEIGHTS_FILE).write_bytes(b"not a state dict")
    assert WEIGHTS_FILE in exits_2(capsys, train, "--evaluate", dcgan_run, "--eval-samples", 20)
    assert snapshot(dcgan_run) == before


def test_bad_evaluate_input_exits_2_and_leaves_the_run_untouched(
    dcgan_run, tiny_mnist_root, tmp_path, capsys
):
    gan = load_folder("DCGAN")
    before = snapshot(dcgan_run)
    cases = [
        (["--evaluate", dcgan_run, "--eval-samples", 0], "--eval-samples"),
        (["--evaluate", dcgan_run, "--lr", 0.1], "--lr cannot change"),
        (["--evaluate", dcgan_run, "--feature-extractor", "nosuch"], "nosuch"),
        (["--evaluate", dcgan_run, "--resume", dcgan_run], "not both"),
    ]
    for args, words in cases:
        assert words in exits_2(capsys, gan.train, *args), args
    assert snapshot(dcgan_run) == before
    flags = ["--dataset", "mnist", "--data-root", tiny_mnist_root, "--eval-every", 0]
    err = exits_2(capsys, gan.train, *flags, "--out", tmp_path / "new")
    assert "--eval-every must be at least 1" in err
    assert not (tmp_path / "new").exists()
    # model.py: a best.pt that was never written (other files that are no checkpoints:
    # test_faults.py)
    assert "best.pt" in exits_2(
        capsys, gan.model, dcgan_run, "--checkpoint", "best", "--device", "cpu"
    )
    assert snapshot(dcgan_run) == before


def test_evaluate_scores_best_and_last_when_the_run_kept_both(tiny_mnist_root, tmp_path, capsys):
    gan = load_folder("DCGAN")
    run = quick_run("DCGAN", tiny_mnist_root, tmp_path / "run", "--max-steps", 4, *EVERY_2)
    best = load_checkpoint(run, "best.pt")
    if best["step"] == 4:  # the best FID at the last step: make best.pt an earlier, different G
        assert run_main(gan.train, "--resume", run, "--max-steps", 6) == 0
    capsys.readouterr()
    assert run_main(gan.train, "--evaluate", run, *SCORED, "--seed", 3) == 0
    out = capsys.readouterr().out
    recorded = json.loads((run / "metrics.json").read_text())
    assert set(recorded) == {"best", "last"}
    steps = {name: load_checkpoint(run, f"{name}.pt")["step"] for name in recorded}
    assert steps["best"] < steps["last"]
    for name, record in recorded.items():
        assert record["checkpoint"] == str((run / "checkpoints" / f"{name}.pt").resolve())
        assert record["step"] == steps[name]
        assert f"{name} = {run / 'checkpoints' / name}.pt (step {steps[name]})" in out
        assert f"{name}: Inception Score {record['inception_score']:.3f}" in out
        assert f"FID {record['fid']:.3f}; KID {record['kid']:.5f}" in out
        protocol = ("samples", "dataset", "real_split", "real_images", "image_size", "seed")
        assert [record[key] for key in protocol] == [100, "mnist", "train", 600, 32, 3]
        assert record["feature_extractor"] == EXTRACTOR
        assert record["z_prior"] == gan.train.Z_PRIOR and math.isfinite(record["fid"])
    assert recorded["best"]["fid"] != recorded["last"]["fid"]  # two different G's, each scored
    # a checkpoint file given: that one alone, its record replaced; the others' records (another
    # command's) are kept
    (run / "metrics.json").write_text(
        json.dumps({**recorded, "last": {"fid": -1}, "spectra": {"kept": True}})
    )
    last = run / "checkpoints" / "last.pt"
    assert run_main(gan.train, "--evaluate", last, *SCORED, "--seed", 3) == 0
    assert json.loads((run / "metrics.json").read_text()) == {**recorded, "spectra": {"kept": True}}
