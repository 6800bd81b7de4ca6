"""The dn2 command end to end on tiny subsets (raw pixels or a small input size so it runs in seconds)."""

import csv
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dn2_jax.cli import main

TINY = ["--input-size", "32", "--batch-size", "16"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _good(rng, size=40):
    x = np.linspace(0, 1, size)
    img = (np.outer(x, x) * 200 + rng.normal(0, 3, (size, size)) + 20).clip(0, 255)
    return np.repeat(img[..., None], 3, axis=2).astype(np.uint8)


@pytest.fixture(scope="module")
def inspection_folder(tmp_path_factory):
    """MVTec-style category: smooth gradients are good, a bright blotch is a defect."""
    root = tmp_path_factory.mktemp("mvtec") / "widget"
    rng = np.random.default_rng(0)

    def defect():
        img = _good(rng)
        img[10:30, 5:25] = [255, 0, 255]
        return img

    for split, kind, make, n in [("train", "good", lambda: _good(rng), 12), ("test", "good", lambda: _good(rng), 6),
                                 ("test", "blotch", defect, 6)]:
        d = root / split / kind
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(make()).save(d / f"{i:03d}.png")
    return root


def _rows_auc(rows):
    labels = [int("/blotch/" in r["id"]) for r in rows]
    return roc_auc_score(labels, [r["score"] for r in rows])


def store_mtimes(cache):
    """Modification times of the embedding stores' files under a cache dir (not xla/, the compiled programs,
    whose access-time files JAX rewrites on every hit)."""
    return {p: p.stat().st_mtime_ns for p in cache.rglob("*") if p.relative_to(cache).parts[0] != "xla"}


@pytest.mark.slow
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
    assert "Trouser" in stdout and "quick run" not in stdout
    # xla/: compiled programs (dn2_jax/compile_cache.py; only when this is the process's first compilation)
    stores = sorted(p.name for p in cache.iterdir() if p.name != "xla")
    assert len(stores) == 2  # train subset and test subset
    mtimes = store_mtimes(cache)
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert json.loads((out / "results.json").read_text())["per_class"] == res["per_class"]
    assert store_mtimes(cache) == mtimes  # nothing recomputed or rewritten
    # a subset of what is cached (one of the two classes) is served from the same stores
    code, _, err = run(capsys, *[a if a != "0,1" else "1" for a in args])
    assert code == 0, err
    assert store_mtimes(cache) == mtimes
    assert json.loads((out / "results.json").read_text())["per_class"] == {"Trouser": res["per_class"]["Trouser"]}


@pytest.mark.slow
def test_eval_on_inspection_folder_ranks_defects_above_good(capsys, tmp_path, inspection_folder):
    out = tmp_path / "run"
    code, _, err = run(capsys, "eval", "--dataset", f"mvtec:{inspection_folder}", *TINY, "--out", out, "--no-cache")
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert list(res["per_class"]) == ["widget"]
    assert res["per_class"]["widget"] > 0.9


@pytest.mark.parametrize("normalize", ["--normalize", "--no-normalize"])
def test_eval_on_a_folder_equals_fit_and_score_on_it(capsys, tmp_path, normalize):
    """What `dn2 eval` measures is what `dn2 fit` + `dn2 score` deploy: same ROC-AUC from the same split."""
    inspection_folder = tmp_path / "widget"
    rng = np.random.default_rng(3)
    for split, kind, n, shift in [("train", "good", 16, 0), ("test", "good", 10, 0), ("test", "blotch", 10, 12)]:
        (inspection_folder / split / kind).mkdir(parents=True)
        for i in range(n):
            img = rng.normal(120, 40, (12, 12)) + shift * (rng.random((12, 12)) < 0.5)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(inspection_folder / split / kind / f"{i}.png")
    out, det, scores = tmp_path / "run", tmp_path / "det", tmp_path / "scores.json"
    settings = ["--backbone", "pixels", "--k", "3", normalize]
    code, _, err = run(capsys, "eval", "--dataset", f"mvtec:{inspection_folder}", *settings, "--out", out,
                       "--no-cache")
    assert code == 0, err
    auc = json.loads((out / "results.json").read_text())["per_class"]["widget"]
    assert 0.1 < auc < 0.95  # not a perfect separation, so that equal AUCs say something
    code, _, err = run(capsys, "fit", "--images", inspection_folder / "train" / "good", *settings, "--out", det)
    assert code == 0, err
    code, _, err = run(capsys, "score", det, "--images", inspection_folder / "test", "--out", scores)
    assert code == 0, err
    assert _rows_auc(json.loads(scores.read_text())["scores"]) == pytest.approx(auc, abs=1e-6)


@pytest.mark.slow
def test_unsupervised_and_group_modes_give_the_measured_values(capsys, tmp_path):
    # Reference values: the same runs before the evaluation was routed through the Detector (raw pixels).
    # The paper's cleaning and the mean pool keep those values beside the chosen rule's / pool's.
    common = ["--classes", "0", "--backbone", "pixels", "--no-cache"]
    code, _, err = run(capsys, "eval", "--mode", "unsupervised", "--contamination", "0.1", "--bank-size", "40",
                       "--test-size", "100", "--clean", "fixed", "--clean-k", "10", "--clean-fraction", "0.35",
                       "--clean-rounds", "2", *common, "--out", tmp_path / "u")
    assert code == 0, err
    res = json.loads((tmp_path / "u" / "results.json").read_text())
    assert res["mode"] == "unsupervised" and res["settings"]["clean"] == "fixed"
    assert res["extra"]["auc_paper_cleaning"]["mean"] == pytest.approx(0.913333, abs=1e-5)
    assert res["extra"]["auc_without_cleaning"]["mean"] == pytest.approx(0.893333, abs=1e-5)
    assert res["extra"]["contaminants"]["mean"] == 4
    assert res["extra"]["contaminants_after_paper_cleaning"]["mean"] == 0  # the paper's rule dropped all four
    assert res["per_class"]["T-shirt/top"] == pytest.approx(0.912222, abs=1e-5)  # fixed, leave-one-out k 10
    assert res["extra"]["contaminants_after_cleaning"]["mean"] == 1
    assert res["extra"]["bank_after_cleaning"]["mean"] == 26  # 40 - floor(0.35 * 40) over two rounds
    assert res["extra"]["contamination"]["mean"] == pytest.approx(0.1)
    assert 0 <= res["extra"]["contamination_estimated"]["mean"] < 1
    code, stdout, err = run(capsys, "eval", "--mode", "group", "--group-size", "3", "--train-groups", "30",
                            "--test-groups", "20", "--group-pool", "hist", *common, "--out", tmp_path / "g")
    assert code == 0, err
    res = json.loads((tmp_path / "g" / "results.json").read_text())
    assert list(res["per_class"]) == ["T-shirt/top+Trouser+Pullover"] and res["settings"]["group_pool"] == "hist"
    assert res["extra"]["auc_mean_pool"]["mean"] == pytest.approx(0.69, abs=1e-5)
    assert res["extra"]["auc_pointwise"]["mean"] == pytest.approx(0.42, abs=1e-5)
    assert res["per_class"]["T-shirt/top+Trouser+Pullover"] == pytest.approx(0.78, abs=1e-5)  # hist, 8 prototypes
    # truthful messages: no "quick subsample" claim, the number of images actually embedded
    assert "quick run" not in stdout
    n_train = len(np.unique(np.ravel(_group_train_sets())))
    assert f"embedding {n_train} train images" in stdout


def _group_train_sets():
    from dn2_jax import protocols
    from dn2_jax.data import load_dataset

    train, test = load_dataset("fashion_mnist", "train"), load_dataset("fashion_mnist", "test")
    return protocols.train_test_groups(train.labels, test.labels, [0, 1, 2], 30, 10, 10, seed=0)[0]


def test_fit_score_flow_reports_p_values_neighbours_csv_and_gallery(capsys, tmp_path, inspection_folder):
    det = tmp_path / "det"
    code, out, err = run(capsys, "fit", "--images", inspection_folder / "train" / "good", "--backbone", "pixels",
                         "--fpr", "0.1", "--out", det)
    assert code == 0, err
    assert "threshold" in out and "12 normal images" in out
    scores, table, png = tmp_path / "scores.json", tmp_path / "scores.csv", tmp_path / "gallery.png"
    code, out, err = run(capsys, "score", det, "--images", inspection_folder / "test", "--out", scores,
                         "--gallery", png, "--top", "3")
    assert code == 0, err
    report = json.loads(scores.read_text())
    rows = report["scores"]
    assert len(rows) == 12 and all(r["id"].endswith(".png") for r in rows)
    good = [r for r in rows if "/good/" in r["id"]]
    bad = [r for r in rows if "/blotch/" in r["id"]]
    assert min(r["score"] for r in bad) > max(r["score"] for r in good)
    assert all(r["anomalous"] for r in bad)
    assert max(r["p_value"] for r in bad) == pytest.approx(1 / 13)  # above every leave-one-out score of 12
    assert all(0 < r["p_value"] <= 1 for r in rows)
    for r in rows:  # the k = 2 nearest normal images: train/good files, squared distances ascending
        assert len(r["neighbours"]) == 2 and all("/train/good/" in n["id"] for n in r["neighbours"])
        assert r["neighbours"][0]["sq_dist"] <= r["neighbours"][1]["sq_dist"]
        assert r["score"] == pytest.approx(np.mean([n["sq_dist"] for n in r["neighbours"]]), rel=1e-5)
    n_bad = sum(r["anomalous"] for r in rows)
    assert report["summary"]["images"] == 12 and report["summary"]["anomalous"] == n_bad
    assert f"12 images: {n_bad} anomalous, {12 - n_bad} normal" in out
    assert png.stat().st_size > 5000
    code, out, err = run(capsys, "score", det, "--images", inspection_folder / "test", "--out", table)
    assert code == 0, err
    with open(table) as f:
        table_rows = list(csv.DictReader(f))
    assert [r["id"] for r in table_rows] == [r["id"] for r in rows]
    assert [float(r["score"]) for r in table_rows] == [r["score"] for r in rows]
    assert table_rows[0]["neighbour_1"] == rows[0]["neighbours"][0]["id"]


def test_embed_then_fit_from_the_store_then_score_a_dataset_names_rows_by_path(capsys, tmp_path, inspection_folder):
    bank, det = tmp_path / "bank", tmp_path / "det"
    spec = f"mvtec:{inspection_folder}"
    code, _, err = run(capsys, "embed", "--dataset", spec, "--split", "train", "--backbone", "pixels", "--out", bank)
    assert code == 0, err
    code, _, err = run(capsys, "fit", "--store", bank, "--out", det)  # backbone etc. from the store
    assert code == 0, err
    out_file = tmp_path / "s.json"
    code, _, err = run(capsys, "score", det, "--dataset", spec, "--out", out_file)
    assert code == 0, err
    rows = json.loads(out_file.read_text())["scores"]
    assert all(r["id"].startswith(str(inspection_folder.resolve())) and r["id"].endswith(".png") for r in rows)
    assert _rows_auc(rows) == 1.0
    # a store has no file names: neighbours are named DATASET@SPLIT#ID
    assert rows[0]["neighbours"][0]["id"].startswith(f"mvtec:{inspection_folder.resolve()}@train#")


def test_score_at_another_k_recomputes_the_threshold_and_says_so(capsys, tmp_path, inspection_folder):
    train, test = inspection_folder / "train" / "good", inspection_folder / "test"
    for k in (2, 5):
        code, _, err = run(capsys, "fit", "--images", train, "--backbone", "pixels", "--k", k,
                           "--out", tmp_path / f"k{k}")
        assert code == 0, err
    code, _, err = run(capsys, "score", tmp_path / "k2", "--images", test, "--k", "5", "--out", tmp_path / "a.json")
    assert code == 0, err
    assert "fitted at k=2" in err and "recomputed for k=5" in err
    code, _, err = run(capsys, "score", tmp_path / "k5", "--images", test, "--out", tmp_path / "b.json")
    assert code == 0, err
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["summary"] == b["summary"] and a["summary"]["threshold"] == pytest.approx(b["summary"]["threshold"])
    assert [r["anomalous"] for r in a["scores"]] == [r["anomalous"] for r in b["scores"]]
    assert [r["p_value"] for r in a["scores"]] == [r["p_value"] for r in b["scores"]]


def _mixed_folder(root, per_class):
    """folder:ROOT with two classes and images of two sizes in each (fewer than 100 per class)."""
    rng = np.random.default_rng(1)
    for split, n in (("train", per_class), ("test", 4)):
        for c, name in enumerate(("plain", "striped")):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                img = _good(rng, 36 if i % 2 else 44)
                if c:
                    img[::4] = 255
                Image.fromarray(img).save(d / f"{i:02d}.png")
    return root


@pytest.mark.slow
def test_eval_on_a_small_folder_of_mixed_sizes_adapts_the_quick_subsample_and_resumes(capsys, tmp_path):
    root = _mixed_folder(tmp_path / "shapes", per_class=6)
    out, cache = tmp_path / "run", tmp_path / "cache"
    args = ["eval", "--dataset", f"folder:{root}", *TINY, "--out", out, "--cache-dir", cache]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err  # before: "bank_size=100 must be in [1, 6]", a flag never passed
    assert "quick run on a subsample (6 train images per class, 8 of 8 test images" in stdout
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["bank_size_per_class"] == {"plain": 6, "striped": 6}
    assert res["mean"] > 0.9
    mtimes = store_mtimes(cache)
    assert any(p.name == "manifest.json" for p in mtimes)  # mixed sizes are cached in stores too
    code, _, err = run(capsys, *args)
    assert code == 0, err
    assert store_mtimes(cache) == mtimes
    assert json.loads((out / "results.json").read_text())["per_class"] == res["per_class"]
    code, _, err = run(capsys, *args[:-4], "--bank-size", "100", "--out", out, "--no-cache")
    assert code == 2 and "bank_size=100" in err  # a size the user asked for is still checked


@pytest.mark.parametrize(
    "argv,match",
    [
        (["eval", "--dataset", "imagenet22k"], "unknown dataset"),
        (["eval", "--backbone", "vgg16"], "unknown backbone"),
        (["eval", "--mode", "weird"], "invalid choice: 'weird'"),
        (["eval", "--classes", "12"], "class 12 does not exist"),
        (["eval", "--classes", "0", "--bank-size", "3", "--k", "5"], "k=5 is larger than the bank"),
        (["eval", "--classes", "0", "--mode", "unsupervised", "--bank-size", "6", "--k", "4"], "k=4"),
        (["eval", "--backbone", "resnet50"], "resnet50"),
        (["eval", "--k", "0"], "k must be >= 1"),
        (["eval", "--contamination", "0.1"], "--contamination applies to --mode unsupervised, not --mode semi"),
        (["eval", "--mode", "group", "--test-size", "10"], "--test-size applies to --mode semi or unsupervised"),
        (["eval", "--mode", "group", "--full"], "--full applies to --mode semi or unsupervised"),
        (["eval", "--mode", "semi", "--group-size", "4"], "--group-size applies to --mode group"),
        (["eval", "--backbone", "pixels", "--input-size", "32"], "input_size"),
        (["eval", "--no-cache", "--cache-dir", "x"], "--no-cache and --cache-dir"),
        (["eval", "--mode", "unsupervised", "--clean", "magic"], "invalid choice: 'magic'"),
        (["eval", "--mode", "unsupervised", "--clean-fraction", "0"], "for no cleaning use clean='none'"),
        (["eval", "--mode", "unsupervised", "--clean-fraction", "1.5"], "clean_fraction must be a number in (0, 1)"),
        (["eval", "--mode", "unsupervised", "--clean-rounds", "0"], "clean_rounds must be None or a positive int"),
        (["eval", "--mode", "unsupervised", "--clean", "paper", "--clean-k", "3"], "do not apply to cleaning rule"),
        (["eval", "--mode", "unsupervised", "--clean", "none", "--clean-rounds", "2"], "do not apply to cleaning"),
        (["eval", "--mode", "unsupervised", "--classes", "0", "--bank-size", "30", "--clean-k", "40"],
         "leave-one-out k=40; class"),
        (["eval", "--mode", "unsupervised", "--classes", "0", "--bank-size", "30", "--clean-k", "5",
          "--clean-fraction", "0.95"], "after the 'fixed' cleaning"),
        (["eval", "--mode", "unsupervised", "--classes", "0", "--bank-size", "15", "--clean", "adaptive",
          "--clean-k", "3"], "needs a bank of at least 20 images; class 'T-shirt/top' has 15"),
        (["eval", "--clean", "paper"], "--clean applies to --mode unsupervised, not --mode semi"),
        (["eval", "--mode", "group", "--clean-k", "3"], "--clean-k applies to --mode unsupervised"),
        (["eval", "--mode", "group", "--group-pool", "median"], "invalid choice: 'median'"),
        (["eval", "--mode", "group", "--group-pool", "mean", "--prototypes", "4"], "--prototypes applies to a"),
        (["eval", "--mode", "group", "--group-pool", "hist", "--prototypes", "0"], "prototypes must be >= 1"),
        (["eval", "--mode", "group", "--prototypes", "4"], "--prototypes applies to a --group-pool with 'hist', "
                                                           "not --group-pool comp"),
        (["eval", "--mode", "group", "--group-size", "7", "--classes", "0"], "group_pool 'comp' takes sets of "
                                                                            "at most 6 images"),
        (["eval", "--mode", "unsupervised", "--prototypes", "4"], "--prototypes applies to --mode group"),
        (["eval", "--mode", "group", "--group-pool", "hist", "--classes", "0", "--train-groups", "3",
          "--prototypes", "50"],
         "prototypes=50 is more than the 9 normal train images"),
    ],
)
def test_eval_mistakes_exit_with_one_line_and_no_results(capsys, tmp_path, argv, match):
    out = tmp_path / "run"
    extra = [] if "--no-cache" in argv else ["--no-cache"]
    code, _, err = run(capsys, *argv, *TINY[2:], "--out", out, *extra)
    assert code == 2
    assert err.startswith("dn2: error:") and match in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.fixture(scope="module")
def pixel_detector(tmp_path_factory, inspection_folder):
    det = tmp_path_factory.mktemp("det") / "det"
    assert main(["fit", "--images", str(inspection_folder / "train" / "good"), "--backbone", "pixels",
                 "--out", str(det)]) == 0
    return det


@pytest.mark.parametrize(
    "argv,match",
    [
        (["score", "{det}", "--images", "{test}", "--k", "0"], "k must be a positive int, got 0"),
        (["score", "{det}", "--images", "{test}", "--k", "12"], "k=12 needs a bank of at least 13"),
        (["score", "{det}", "--images", "{test}", "--out", "{tmp}/s.txt"], "must end in .json or .csv"),
        (["score", "{det}", "--images", "{test}", "--out", "{tmp}"], "is a directory"),
        (["score", "{det}", "--images", "{test}", "--top", "3"], "--top only applies with --gallery"),
        (["score", "{det}", "--images", "{test}", "--split", "train"], "--split only apply with --dataset"),
        (["score", "{tmp}/nothing", "--images", "{test}"], "does not exist"),
        (["score", "{det}", "--images", "{tmp}/nothing"], "is not a directory"),
        (["score", "{det}", "--images", "{test}", "--gallery", "{tmp}/g.jpg"], "must end in .png"),
        (["fit", "--images", "{test}", "--backbone", "pixels", "--out", "{det}"], "already exists"),
        (["fit", "--images", "{test}", "--backbone", "pixels", "--clean", "paper", "--clean-fraction", "1.5",
          "--out", "{tmp}/d"], "clean_fraction must be a number in (0, 1)"),
        (["fit", "--images", "{test}", "--backbone", "pixels", "--k", "12", "--out", "{tmp}/d"], "k=12"),
        (["fit", "--images", "{test}", "--backbone", "pixels", "--clean-k", "3", "--out", "{tmp}/d"],
         "clean_k only apply with a cleaning rule"),
        (["fit", "--images", "{test}", "--backbone", "pixels", "--clean", "fixed", "--clean-k", "40",
          "--out", "{tmp}/d"],
         "clean_k=40 (leave-one-out neighbours of 'fixed' cleaning) must be smaller than the bank, which has 12"),
        (["fit", "--images", "{test}", "--backbone", "pixels", "--clean", "adaptive", "--clean-k", "3",
          "--out", "{tmp}/d"], "at least 20 rows"),
        (["score", "{det}", "--queries", "{det}/bank", "--skip-bad-images"], "--skip-bad-images only applies"),
    ],
)
def test_fit_and_score_mistakes_exit_with_one_line_and_nothing_written(capsys, tmp_path, pixel_detector,
                                                                       inspection_folder, argv, match):
    before = sorted(pixel_detector.rglob("*"))
    argv = [a.format(det=pixel_detector, test=inspection_folder / "test", tmp=tmp_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("dn2: error:") and match in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == [] and sorted(pixel_detector.rglob("*")) == before


def test_output_dir_that_is_a_file_is_refused_before_work(capsys, tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a directory")
    code, _, err = run(capsys, "eval", "--out", target, "--no-cache")
    assert code == 2 and "is not a directory" in err
    assert target.read_text() == "not a directory"


def test_skip_bad_images_leaves_out_a_corrupt_file_and_reports_it(capsys, tmp_path, inspection_folder):
    """Default: stop naming the file. --skip-bad-images: go on without it, listing it on stderr and in the output."""
    import shutil

    root = tmp_path / "widget"
    shutil.copytree(inspection_folder, root)
    bad = root / "test" / "blotch" / "zz_broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    test, det, scores = root / "test", tmp_path / "det", tmp_path / "s.json"
    code, _, err = run(capsys, "fit", "--images", root / "train" / "good", "--backbone", "pixels", "--out", det)
    assert code == 0, err
    for argv in (["score", det, "--images", test, "--out", scores],
                 ["eval", "--dataset", f"mvtec:{root}", "--backbone", "pixels", "--no-cache", "--out", tmp_path / "r"],
                 ["embed", "--dataset", f"mvtec:{root}", "--split", "test", "--backbone", "pixels",
                  "--out", tmp_path / "st"]):
        code, _, err = run(capsys, *argv)
        assert code == 2 and err.startswith("dn2: error:") and str(bad.name) in err, err
        assert not scores.exists() and not (tmp_path / "r").exists() and not (tmp_path / "st").exists()
    code, out, err = run(capsys, "score", det, "--images", test, "--out", scores, "--skip-bad-images")
    assert code == 0, err
    assert "dn2 score: skipped 1 image file that could not be decoded:" in err
    assert f"  cannot decode image {bad}: " in err
    report = json.loads(scores.read_text())
    assert [s["path"] for s in report["skipped"]] == [str(bad)] and report["summary"]["skipped"] == 1
    assert len(report["scores"]) == 12 and _rows_auc(report["scores"]) == 1.0
    assert "1 undecodable files skipped" in out
    code, _, err = run(capsys, "eval", "--dataset", f"mvtec:{root}", "--backbone", "pixels", "--no-cache",
                       "--skip-bad-images", "--out", tmp_path / "r")
    assert code == 0, err
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [(s["split"], s["path"]) for s in res["skipped_images"]] == [("test", str(bad.resolve()))]
    assert res["settings"]["n_test"] == {"widget": 12} and res["per_class"]["widget"] == 1.0
    assert "dn2 eval: skipped 1 image file" in err
    code, _, err = run(capsys, "embed", "--dataset", f"mvtec:{root}", "--split", "test", "--backbone", "pixels",
                       "--skip-bad-images", "--out", tmp_path / "st")
    assert code == 0, err
    assert "dn2 embed: skipped 1 image file" in err and str(bad.resolve()) in err
    from dn2_jax import store

    st = store.open_store(tmp_path / "st")
    assert st.count == 12 and [s["path"] for s in st.metadata["skipped"]] == [str(bad.resolve())]
    (train_bad := root / "train" / "good" / "zz_broken.png").write_bytes(b"GIF89a broken")
    code, out, err = run(capsys, "fit", "--images", root / "train" / "good", "--backbone", "pixels",
                         "--skip-bad-images", "--out", tmp_path / "det2")
    assert code == 0, err
    assert "12 normal images" in out and f"  cannot decode image {train_bad}: " in err
