"""Feature adaptation (PANDA, Mean-Shifted) on a tiny BatchNorm CNN: losses, gradients, collapse guard,
BatchNorm policies, resume after kill -9, 1 vs 4 devices, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dn2_jax import adapt, load_variables, models
from dn2_jax.errors import DN2Error

sys.path.insert(0, str(Path(__file__).parent))
from adapt_helper import PRESET, TinyNet, images, variables  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HELPER = Path(__file__).parent / "adapt_helper.py"


def _adapt(cfg, **kw):
    return adapt.adapt(images(), None, variables(), cfg, module=TinyNet(), preset=PRESET, progress=False, **kw)


@pytest.fixture(scope="module")
def panda_runs():
    free = adapt.AdaptConfig(epochs=8, batch_size=8, learning_rate=0.05, anchor="none", freeze=(), bn="frozen")
    anchored = adapt.AdaptConfig(epochs=8, batch_size=8, learning_rate=0.05, anchor="l2sp", anchor_weight=1.0,
                                 freeze=(), bn="frozen")
    return _adapt(free), _adapt(anchored)


@pytest.mark.slow
def test_panda_loss_falls_and_anchor_prevents_collapse(panda_runs):
    (_, free), (_, anchored) = panda_runs
    assert free[-1]["loss"] < 0.6 * free[0]["loss"]
    # Without an anchor the compactness loss shrinks the normal features towards a point ...
    assert free[-1]["spread"] < 0.5
    # ... with L2-SP to the pretrained weights they keep most of their spread.
    assert min(r["spread"] for r in anchored) > 0.75


@pytest.mark.slow
def test_msc_loss_falls():
    _, hist = _adapt(adapt.AdaptConfig(method="msc", epochs=5, batch_size=8, learning_rate=0.01, freeze=()))
    assert hist[-1]["loss"] < hist[0]["loss"] - 0.05


@pytest.mark.parametrize("method", ["panda", "msc"])
def test_gradient_matches_finite_differences(method):
    """d/dt loss(θ + t·v) by jax.grad against central differences, in float64 (no rounding noise)."""
    rng = np.random.default_rng(1)
    cfg = adapt.AdaptConfig(method=method, anchor="l2sp", anchor_weight=0.1, bn="frozen")
    with jax.enable_x64(True):
        v = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables())
        anchor = jax.tree.map(lambda p: p + rng.normal(0, 0.05, p.shape), v["params"])
        direction = jax.tree.map(lambda p: rng.normal(0, 1, p.shape), v["params"])
        centre = jnp.asarray(rng.normal(0, 0.1, 16))
        x, key = images(8), jax.random.key(3)

        @jax.jit
        def loss(params):
            return adapt.loss_fn(params, v["batch_stats"], x, key, module=TinyNet(), preset=PRESET, cfg=cfg,
                                 centre=centre, anchor=anchor, fisher=None)[0]

        grad = jax.grad(loss)(v["params"])
        analytic = sum(float(jnp.sum(g * d)) for g, d in zip(jax.tree.leaves(grad), jax.tree.leaves(direction),
                                                               strict=True))
        eps = 1e-6  # small enough that no ReLU changes sign along the step
        plus = loss(jax.tree.map(lambda p, d: p + eps * d, v["params"], direction))
        minus = loss(jax.tree.map(lambda p, d: p - eps * d, v["params"], direction))
        numeric = float(plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=1e-5)


def test_bn_policies_and_frozen_modules():
    base = variables()
    cfg = adapt.AdaptConfig(epochs=1, batch_size=8, learning_rate=0.05, freeze=("conv0", "bn0"), bn="frozen")
    frozen, _ = _adapt(cfg)
    batch, _ = _adapt(adapt.AdaptConfig(epochs=1, batch_size=8, learning_rate=0.05, freeze=("conv0", "bn0"),
                                        bn="batch"))
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),  # noqa: E731
                                                                  strict=True))
    assert same(frozen["batch_stats"], base["batch_stats"])  # "frozen": running statistics untouched
    assert not same(batch["batch_stats"], base["batch_stats"])  # "batch": running averages updated
    for v in (frozen, batch):
        assert same(v["params"]["conv0"], base["params"]["conv0"]) and same(v["params"]["bn0"], base["params"]["bn0"])
        assert not same(v["params"]["conv1"], base["params"]["conv1"])


def test_method_defaults_are_resolved_and_recorded():
    panda, msc = adapt.AdaptConfig(), adapt.AdaptConfig(method="msc")
    assert (panda.bn, panda.lr, msc.bn, msc.lr) == ("batch", 1e-4, "frozen", 1e-5)
    assert panda.to_dict()["bn"] == "batch" and adapt.AdaptConfig(bn="frozen").bn == "frozen"


def test_default_freeze_per_family():
    lite = models.init_random_variables("efficientnet_lite0")["params"]
    mask = adapt.trainable_mask(lite, adapt.default_freeze(lite))
    assert not any(jax.tree.leaves(mask["blocks_2"])) and all(jax.tree.leaves(mask["blocks_3"]))
    assert not any(jax.tree.leaves(mask["conv_stem"])) and all(jax.tree.leaves(mask["conv_head"]))
    freeze = adapt.default_freeze({"conv1": 0, "bn1": 0, "layer1_0": 0, "layer3_0": 0, "fc": 0})
    assert adapt._frozen("layer2_1", freeze) and not adapt._frozen("layer3_0", freeze)


@pytest.mark.slow
def test_resume_after_kill_gives_the_same_weights(tmp_path):
    cfg = adapt.AdaptConfig(method="panda", epochs=3, batch_size=8, learning_rate=0.05, freeze=())
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, str(HELPER), "run", json.dumps(cfg.to_dict()), str(ckpt), "2"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    resumed, hist = _adapt(cfg, checkpoint_dir=ckpt)
    assert [r["epoch"] for r in hist] == [1, 2, 3]
    straight, hist2 = _adapt(cfg)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [r["loss"] for r in hist] == [r["loss"] for r in hist2]
    with pytest.raises(DN2Error, match="another run"):
        _adapt(adapt.AdaptConfig(method="panda", epochs=3, batch_size=8, learning_rate=0.02, freeze=()),
               checkpoint_dir=ckpt)


@pytest.mark.slow
def test_four_devices_give_the_one_device_update(tmp_path):
    out = tmp_path / "devices.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, str(HELPER), "devices", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    for bn in ("frozen", "batch"):
        assert result[bn]["devices"] == 4
        assert result[bn]["max_moved"] > 1e-3  # the step did something ...
        assert result[bn]["max_diff"] < 1e-5  # ... and the same on 4 devices as on 1


def test_save_adapted_is_another_weights_file(tmp_path):
    base = variables()
    moved = jax.tree.map(lambda a: a + 0.01, base)
    cfg = adapt.AdaptConfig()
    path = adapt.save_adapted(moved, tmp_path / "adapted", backbone="resnet18", base_variables=base, cfg=cfg,
                              history=[{"epoch": 1, "loss": 1.0}])
    loaded = load_variables("resnet18", path)
    assert models.fingerprint(loaded) == models.fingerprint(moved) != models.fingerprint(base)
    with pytest.raises(DN2Error, match="already exists"):
        adapt.save_adapted(moved, path, backbone="resnet18", base_variables=base, cfg=cfg, history=[])


@pytest.mark.parametrize("kwargs, match", [
    ({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"), ({"learning_rate": 0.0}, "learning_rate"),
    ({"learning_rate": -1e-3}, "learning_rate"), ({"method": "dn2"}, "method"), ({"bn": "train"}, "bn"),
    ({"early_stop": 1.5}, "early_stop"), ({"batch_size": 1}, "batch_size"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(DN2Error, match=match):
        adapt.AdaptConfig(**kwargs)


def test_bad_inputs():
    with pytest.raises(DN2Error, match="larger than the 4 normal images"):
        adapt.adapt(images(4), None, variables(), adapt.AdaptConfig(batch_size=8), module=TinyNet(), preset=PRESET)
    with pytest.raises(DN2Error, match="fisher"):
        _adapt(adapt.AdaptConfig(batch_size=8, anchor="ewc"))
    with pytest.raises(DN2Error, match="pixels baseline"):
        adapt.adapt(images(), "pixels", {}, adapt.AdaptConfig(batch_size=8))
    with pytest.raises(DN2Error, match="another backbone"):
        adapt.adapt(images(), "resnet18", models.init_random_variables("efficientnet_lite0"),
                    adapt.AdaptConfig(batch_size=8))


# ------------------------------------------------------------------------------------------------- the CLI


def _folder(root: Path) -> Path:
    """MVTec-style category of 40×40 images: smooth gradients are good, a bright blotch is a defect."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def good():
        x = np.linspace(0, 1, 40)
        img = (np.outer(x, x) * 200 + rng.normal(0, 3, (40, 40)) + 20).clip(0, 255)
        return np.repeat(img[..., None], 3, axis=2).astype(np.uint8)

    def defect():
        img = good()
        img[10:30, 5:25] = [255, 0, 255]
        return img

    for split, kind, make, n in [("train", "good", good, 12), ("test", "good", good, 6), ("test", "blotch", defect, 6)]:
        d = root / split / kind
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(make()).save(d / f"{i:03d}.png")
    return root


def _cli(capsys, *argv):
    from dn2_jax.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_cli_adapt_then_eval_adapt(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "widget")
    tiny = ["--input-size", "32"]
    code, out, err = _cli(capsys, "adapt", "--images", "widget/train/good", *tiny, "--epochs", "1", "--batch-size",
                          "8", "--out", "weights/widget", "--plot", "loss.png")
    assert code == 0, err
    adapted = load_variables("efficientnet_lite0", "weights/widget")
    assert models.fingerprint(adapted) != models.fingerprint(load_variables("efficientnet_lite0"))
    assert Path("loss.png").stat().st_size > 1000 and not list(Path("weights").glob(".*"))  # checkpoint removed

    args = ["eval", "--dataset", "mvtec:widget", *tiny, "--batch-size", "8", "--adapt", "panda", "--adapt-epochs",
            "1", "--adapt-batch-size", "8", "--cache-dir", "cache", "--out", "run"]
    code, out, err = _cli(capsys, *args)
    assert code == 0, err
    res = json.loads(Path("run/results.json").read_text())
    assert res["settings"]["adapt"] == "panda" and res["settings"]["adapt_epochs"] == 1
    assert {"auc_pretrained", "loss_epoch_1", "auc_epoch_1"} <= set(res["extra"])
    assert res["extra"]["auc_epoch_1"]["mean"] == pytest.approx(res["mean"], abs=1e-6)  # last epoch = the score
    assert Path("run/adaptation.png").stat().st_size > 1000
    # The adapted backbone is just another weights file: DN2 with it gives the same ROC-AUC.
    (weights,) = Path("cache/adapted").iterdir()
    code, out, err = _cli(capsys, "eval", "--dataset", "mvtec:widget", *tiny, "--batch-size", "8", "--weights",
                          weights, "--no-cache", "--out", "run2")
    assert code == 0, err
    assert json.loads(Path("run2/results.json").read_text())["mean"] == pytest.approx(res["mean"], abs=1e-6)
    # A rerun reuses the adapted weights (no training).
    code, out, err = _cli(capsys, *args[:-1], "run3")
    assert code == 0 and "reusing adapted weights" in out, err


@pytest.mark.parametrize("argv, match", [
    (["adapt", "--images", "{w}", "--epochs", "0", "--out", "{t}/w"], "epochs"),
    (["adapt", "--images", "{w}", "--learning-rate", "0", "--out", "{t}/w"], "learning_rate"),
    (["adapt", "--images", "{w}", "--backbone", "pixels", "--out", "{t}/w"], "pixels"),
    (["adapt", "--images", "{w}", "--batch-size", "64", "--input-size", "32", "--out", "{t}/w"],
     "larger than the 12"),
    (["eval", "--dataset", "mvtec:{r}", "--adapt", "panda", "--backbone", "pixels", "--out", "{t}/w"], "pixels"),
    (["eval", "--mode", "unsupervised", "--adapt", "msc", "--out", "{t}/w"], "--adapt applies to --mode semi"),
    (["eval", "--adapt", "panda", "--adapt-epochs", "0", "--out", "{t}/w"], "epochs"),
])
def test_cli_bad_adaptation_input(capsys, tmp_path, argv, match):
    root = _folder(tmp_path / "widget")
    argv = [a.format(w=root / "train" / "good", r=root, t=tmp_path) for a in argv]
    code, out, err = _cli(capsys, *argv)
    assert code == 2 and err.startswith("dn2: error:") and len(err.strip().splitlines()) == 1, err
    assert match in err
    assert not (tmp_path / "w").exists()
