"""The dn2 command end to end on tiny subsets (small input size so it runs in seconds)."""

import json

import numpy as np
import pytest
from PIL import Image

from dn2_jax.cli import main

TINY = ["--input-size", "32", "--batch-size", "16"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def inspection_folder(tmp_path_factory):
    """MVTec-style category: smooth gradients are good, a bright blotch is a defect."""
    root = tmp_path_factory.mktemp("mvtec") / "widget"
    rng = np.random.default_rng(0)

    def good(i):
        x = np.linspace(0, 1, 40)
        img = (np.outer(x, x) * 200 + rng.normal(0, 3, (40, 40)) + 20).clip(0, 255)
        return np.repeat(img[..., None], 3, axis=2).astype(np.uint8)

    def defect(i):
        img = good(i)
        img[10:30, 5:25] = [255, 0, 255]
        return img

    for split, kind, make, n in [("train", "good", good, 12), ("test", "good", good, 6),
                                 ("test", "blotch", defect, 6)]:
        d = root / split / kind
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(make(i)).save(d / f"{i:03d}.png")
    return root


def test_eval_writes_schema_and_reuses_cached_embeddings(capsys, tmp_path):
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["eval", "--classes", "0,1", "--bank-size", "12", "--test-size", "40", *TINY, "--out", out,
            "--cache-dir", cache]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert {"dataset", "backbone", "k", "mode", "per_class", "mean", "settings", "timings"} <= set(res)
    assert res["dataset"] == "fashion_mnist" and res["backbone"] == "efficientnet_lite0"
    assert res["k"] == 2 and res["mode"] == "semi"
    assert list(res["per_class"]) == ["T-shirt/top", "Trouser"]
    assert all(0.0 <= v <= 1.0 for v in res["per_class"].values())
    assert res["mean"] == pytest.approx(np.mean(list(res["per_class"].values())))
    assert res["settings"]["bank_size"] == 12 and res["settings"]["test_size"] == 40
    assert (out / "roc.png").stat().st_size > 1000 and (out / "scores.png").stat().st_size > 1000
    assert "Trouser" in stdout
    stores = sorted(p.name for p in cache.iterdir())
    assert len(stores) == 2  # train subset and test subset
    mtimes = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["per_class"] == res["per_class"]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == mtimes  # nothing recomputed or rewritten
    # a subset of what is cached (one of the two classes) is served from the same stores
    code, _, err = run(capsys, *[a if a != "0,1" else "1" for a in args])
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == mtimes
    assert json.loads((out / "results.json").read_text())["per_class"] == {"Trouser": res["per_class"]["Trouser"]}


def test_eval_on_inspection_folder_ranks_defects_above_good(capsys, tmp_path, inspection_folder):
    out = tmp_path / "run"
    code, _, err = run(capsys, "eval", "--dataset", f"mvtec:{inspection_folder}", *TINY, "--out", out, "--no-cache")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert list(res["per_class"]) == ["widget"]
    assert res["per_class"]["widget"] > 0.9


def test_unsupervised_and_group_modes(capsys, tmp_path):
    common = ["--classes", "0", "--backbone", "pixels", "--no-cache", "--test-size", "100"]
    code, _, err = run(capsys, "eval", "--mode", "unsupervised", "--contamination", "0.1", "--bank-size", "40",
                       *common, "--out", tmp_path / "u")
    assert code == 0, err
    res = json.loads((tmp_path / "u" / "results.json").read_text())
    assert res["mode"] == "unsupervised"
    assert res["extra"]["contaminants"]["mean"] == 4
    assert "auc_without_cleaning" in res["extra"]
    code, _, err = run(capsys, "eval", "--mode", "group", "--group-size", "3", "--train-groups", "30",
                       "--test-groups", "20", *common, "--out", tmp_path / "g")
    assert code == 0, err
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert list(res["per_class"]) == ["T-shirt/top+Trouser+Pullover"]
    assert "auc_pointwise" in res["extra"]


def test_embed_fit_score_flow(capsys, tmp_path, inspection_folder):
    bank = tmp_path / "bank"
    code, _, err = run(capsys, "embed", "--dataset", f"mvtec:{inspection_folder}", "--split", "train", *TINY,
                       "--out", bank)
    assert code == 0, err
    code, out, err = run(capsys, "fit", bank, "--fpr", "0.1")
    assert code == 0, err and "threshold" in out
    scores = tmp_path / "scores.json"
    code, _, err = run(capsys, "score", bank, "--images", inspection_folder / "test", "--out", scores)
    assert code == 0, err
    rows = json.loads(scores.read_text())["scores"]
    good = [r["score"] for r in rows if "/good/" in r["id"]]
    bad = [r["score"] for r in rows if "/blotch/" in r["id"]]
    assert min(bad) > max(good)
    assert all(r["anomalous"] for r in rows if "/blotch/" in r["id"])


@pytest.mark.parametrize(
    "argv,match",
    [
        (["eval", "--dataset", "imagenet22k"], "unknown dataset"),
        (["eval", "--backbone", "vgg16"], "unknown backbone"),
        (["eval", "--mode", "weird"], "unknown mode"),
        (["eval", "--classes", "12"], "class 12 does not exist"),
        (["eval", "--classes", "0", "--bank-size", "3", "--k", "5"], "k=5 is larger than the bank"),
        (["eval", "--classes", "0", "--mode", "unsupervised", "--bank-size", "6", "--k", "4"], "k=4"),
        (["eval", "--backbone", "resnet50"], "resnet50"),
    ],
)
def test_user_mistakes_exit_with_one_line_and_no_results(capsys, tmp_path, argv, match):
    out = tmp_path / "run"
    code, _, err = run(capsys, *argv, *TINY, "--out", out, "--no-cache")
    assert code == 2
    assert err.startswith("dn2: error:") and match in err and len(err.strip().splitlines()) == 1
    assert not (out / "results.json").exists()


def test_output_dir_that_is_a_file_is_refused_before_work(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    code, _, err = run(capsys, "eval", "--out", target, "--no-cache")
    assert code == 2 and "is not a directory" in err
    assert target.read_text() == "not a directory"
