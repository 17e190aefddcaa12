"""The merge's screen (dvlib.screening, issue 27): per-site statistics in the report and the merged
file, the outlier rule, content duplicates, repeated labels, counts, the effective-step warning.

Every case runs ``dvlib merge`` through the real command line (in-process ``dvlib.cli.main``) on
four honest smoke sites (synthetic images, smallcnn, 32 px, 2 epochs, built once) or a poisoned
copy of one, and asserts the exit code, the message (site and number) and that nothing was written.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dvlib import screening
from dvlib.cli import main
from dvlib.coordinator import rebuild_pretrained
from dvlib.files import load_model, load_vector
from tests.conftest import write_site_folders

SITES = ("site_a", "site_b", "site_c", "site_d")
FINETUNE = ["--preset", "smoke", "--arch", "smallcnn", "--weights", "random", "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--seed", "0"]
KEY = "backbone.features.0.weight"


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> SimpleNamespace:
    """Four site folders of synthetic PNGs and their vector files (built once)."""
    root = tmp_path_factory.mktemp("screen")
    write_site_folders(root, SITES, n_patients=64)
    files = []
    for s in SITES:
        files.append(root / f"{s}.dv.safetensors")
        assert main(["site", "finetune", "--data", str(root / s), *FINETUNE, "--out", str(files[-1])]) == 0
    return SimpleNamespace(root=root, files=files)


def edit(src: Path, dst: Path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """A copy of a vector file with edits, written by safetensors directly (no dvlib check on the way)."""
    with safe_open(str(src), "pt") as f:
        raw, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(raw["dvlib"])
    m.update(meta or {})
    raw["dvlib"] = json.dumps(m)
    for k, fn in (tensors or {}).items():
        ts[k] = fn(ts[k].clone())
    raw.pop("dvlib_order", None)
    save_file(ts, str(dst), metadata=raw)
    return dst


def refused(capsys, argv, folder: Path, *needles) -> str:
    before = sorted(folder.iterdir())
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvlib: error: ") and "Traceback" not in err, err
    for n in needles:
        assert str(n) in err, f"{n!r} not in:\n{err}"
    assert sorted(folder.iterdir()) == before, "something was written"
    return err


def poisoned(sites, tmp_path, **edits) -> list[Path]:
    """The four sites with site_c replaced by an edited copy (so the site named is site_c)."""
    bad = edit(sites.files[2], tmp_path / "site_c.bad.dv.safetensors", **edits)
    return [sites.files[0], sites.files[1], bad, sites.files[3]]


def scale(x: float):
    return lambda t: t * x


def test_clean_merge_reports_every_statistic_and_refuses_nothing(sites, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, sites.files), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    rep = load_model(out).meta["screening"]
    assert [s["label"] for s in rep["sites"]] == [f"{p.name} (site '{s}')" for p, s in zip(sites.files, SITES)]
    assert str(sites.root) not in json.dumps(rep)  # names, never the coordinator's paths
    assert rep["kept_outliers"] == [] and all(s["outlier"] == [] for s in rep["sites"])
    assert "warning" not in printed.err and printed.out.count(" | ") >= 4 * 4
    # the numbers are what they say: recomputed here from the files and the rebuilt pretrained weights
    vfs = [load_vector(p) for p in sites.files]
    pre = rebuild_pretrained(vfs[0].meta).state_dict()
    flat = [torch.cat([t.reshape(-1).double() for t in vf.vector.values()]) for vf in vfs]
    for i, (vf, s) in enumerate(zip(vfs, rep["sites"])):
        head_move = sum(float(((t.double() - pre[k].double()) ** 2).sum()) for k, t in vf.head.items())
        assert s["norm"] == pytest.approx(math.sqrt(float((flat[i] ** 2).sum()) + head_move), rel=1e-12)
        assert math.sqrt(sum(v ** 2 for v in s["norm_groups"].values())) == pytest.approx(s["norm"], rel=1e-12)
        assert set(s["norm_groups"]) >= {"head", "bn", "backbone.features.0", "backbone.fc"}
        rest = (sum(flat) - flat[i]) / 3
        assert s["cosine_to_others"] == pytest.approx(float(flat[i] @ rest / rest.norm() / flat[i].norm()), rel=1e-9)
        bias = (vf.head["head.bias"].double() - pre["head.bias"].double()).abs().max()
        assert s["head_bias_shift"] == pytest.approx(float(bias), rel=1e-12)
        ratios = [float(v.double()[v > 0].mean() / pre[k].double()[v > 0].mean()) for k, v in vf.bn.items()
                  if k.endswith("running_var")]
        assert s["bn_var_ratio"] == pytest.approx(max(ratios, key=lambda r: abs(math.log10(r))), rel=1e-12)
    assert rep["effective_step"] == pytest.approx(0.5 * 4, rel=1e-5)  # lam * N for the data vector


def test_screen_does_not_change_the_weights(sites, tmp_path, capsys):
    """--keep-outliers on clean sites: the same merge, tensor for tensor, as the screened one."""
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["merge", *map(str, sites.files), "--out", str(a)]) == 0
    assert main(["merge", *map(str, sites.files), "--keep-outliers", "--out", str(b)]) == 0
    sa, sb = load_model(a).state, load_model(b).state
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name, edits, needles", [
    ("x1000", {"tensors": {f"vector/{k}": scale(1000.0) for k in ("backbone.features.0.weight",)}}, []),
    ("head_bias", {"tensors": {"head/head.bias": lambda t: t + torch.eye(len(t))[1] * 50}},
     ["head bias moved by 50"]),
    ("bn_var", {"tensors": {"bn/backbone.features.4.running_var": scale(1e6)}},
     ["BatchNorm running_var", "backbone.features.4.running_var"]),
])
def test_poisoned_site_is_refused_by_name_and_number(sites, tmp_path, capsys, name, edits, needles):
    files = poisoned(sites, tmp_path, **edits)
    out = tmp_path / "m.safetensors"
    err = refused(capsys, ["merge", *files, "--out", out], tmp_path, files[2], "site 'site_c'",
                  "1 of 4 sites are outliers", "--keep-outliers", *needles)
    assert "site_a" not in err and "site_b" not in err  # the honest sites are not named
    # kept on request, and marked in the report and the file
    assert main(["merge", *map(str, files), "--keep-outliers", "--out", str(out)]) == 0
    assert "OUTLIER KEPT" in capsys.readouterr().out
    assert load_model(out).meta["screening"]["kept_outliers"] == [f"{files[2].name} (site 'site_c')"]


def test_x1000_names_the_norm(sites, tmp_path, capsys):
    files = poisoned(sites, tmp_path, tensors={f"vector/{k}": scale(1000.0) for k in load_vector(sites.files[2]).vector})
    norm = load_vector(sites.files[2]).tau.norms()
    expected = 1000 * math.sqrt(sum(v ** 2 for v in norm.values()))  # the head moved nothing extra
    err = refused(capsys, ["merge", *files, "--out", tmp_path / "m.safetensors"], tmp_path, files[2], "vector norm")
    shown = float(err.split("vector norm ")[1].split(":")[0])
    assert shown == pytest.approx(expected, rel=0.02)


def test_zero_vector_claiming_1e9_samples_under_weighted(sites, tmp_path, capsys):
    counts = load_vector(sites.files[2]).meta["train_class_counts"]
    claimed = {**counts, next(iter(counts)): counts[next(iter(counts))] + 10 ** 9 - sum(counts.values())}
    zero = {f"vector/{k}": scale(0.0) for k in load_vector(sites.files[2]).vector}
    files = poisoned(sites, tmp_path, tensors=zero, meta={"sample_count": 10 ** 9, "train_class_counts": claimed})
    refused(capsys, ["merge", *files, "--method", "weighted", "--out", tmp_path / "m.safetensors"], tmp_path,
            files[2], "site 'site_c'", "data vector is all zeros (norm 0)")
    # the same claim without class counts that add up: refused for the count itself
    files = poisoned(sites, tmp_path, tensors=zero, meta={"sample_count": 10 ** 9})
    refused(capsys, ["merge", *files, "--method", "weighted", "--out", tmp_path / "m.safetensors"], tmp_path,
            files[2], "sample_count 1000000000 is not the sum of its train_class_counts")


def test_content_duplicate_and_repeated_label(sites, tmp_path, capsys):
    twin = edit(sites.files[1], tmp_path / "twin.dv.safetensors", meta={"site": "site_z", "dvlib_version": "9"})
    refused(capsys, ["merge", *sites.files, twin, "--out", tmp_path / "m.safetensors"], tmp_path, twin,
            f"the same tensors as {sites.files[1]}", "counts once")
    alias = edit(sites.files[2], tmp_path / "alias.dv.safetensors", meta={"site": "site_a"})
    refused(capsys, ["merge", sites.files[0], sites.files[1], alias, "--out", tmp_path / "m.safetensors"], tmp_path,
            alias, "site label 'site_a' is also the label of", sites.files[0])


@pytest.mark.parametrize("meta, needles", [
    ({"metrics": {"split": "test", "accuracy": 1.5}}, ["'metrics.accuracy' must be a number in [0, 1]", "1.5"]),
    ({"metrics": {"split": "test", "n": -3}}, ["'metrics.n' must be an integer", "-3"]),
    ({"train_class_counts": {"a": -1}}, ["'train_class_counts' must map classes to integers", "-1"]),
    ({"train_class_counts": {"nope": 1}}, ["'train_class_counts' names classes not in 'classes'", "nope"]),
    ({"test_count": 2.5}, ["'test_count' must be an integer", "2.5"]),
    ({"train_class_counts": None}, ["lacks 'train_class_counts'"]),
])
def test_counts_and_metrics_are_range_checked(sites, tmp_path, capsys, meta, needles):
    files = poisoned(sites, tmp_path, meta=meta)
    refused(capsys, ["merge", *files, "--out", tmp_path / "m.safetensors"], tmp_path, files[2], *needles)


def test_effective_step_beyond_the_bound_is_named(sites, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, sites.files), "--lam", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "dvlib: warning: effective step 8 x the sites' mean vector" in err and "beyond 4" in err
    meta = load_model(out).meta
    assert meta["screening"]["effective_step_warning"] in meta["warnings"]
    assert meta["screening"]["effective_step"] == pytest.approx(8.0, rel=1e-5)
    assert main(["merge", *map(str, sites.files), "--lam", "0.9", "--out", str(tmp_path / "n.safetensors")]) == 0
    assert "warning" not in capsys.readouterr().err  # 3.6 x: within the bound


def test_norm_rule_floor_and_two_sites():
    """Close honest norms (tiny MAD) are kept; a 1000x one is not; two sites 1000x apart are both named."""
    assert screening._norm_outliers([4.4, 4.5, 4.45]) == [None, None, None]
    assert screening._norm_outliers([4.4, 4.5, 4.45, 9.0]) == [None] * 4  # 2x: under the floor
    out = screening._norm_outliers([4.4, 4.5, 4399.0])
    assert out[:2] == [None, None] and out[2].startswith("978x")
    assert all(screening._norm_outliers([4.4, 4400.0]))
    assert screening._norm_outliers([4.4, 0.0, 4.5]) == [None, "", None]


def test_robust_rules_on_the_x1000_case(sites, tmp_path, capsys):
    """One site's vector x1000, kept: the plain merge lands 1000x off, the median and the trimmed mean
    stay by the clean merge. Prints each merge's pooled test accuracy over the four sites (`-s`)."""
    files = poisoned(sites, tmp_path, tensors={f"vector/{k}": scale(1000.0) for k in load_vector(sites.files[2]).vector})
    runs = {"clean data_vector": (sites.files, "data_vector"), "x1000 data_vector": (files, "data_vector"),
            "x1000 median": (files, "median"), "x1000 trimmed_mean": (files, "trimmed_mean")}
    states, accuracy = {}, {}
    for name, (inputs, method) in runs.items():
        out = tmp_path / f"{name.replace(' ', '_')}.safetensors"
        assert main(["merge", *map(str, inputs), "--method", method, "--keep-outliers", "--out", str(out)]) == 0
        states[name] = load_model(out).state
        assert main(["evaluate", str(out), "--data", *(str(sites.root / s) for s in SITES), "--split", "test",
                     "--out", str(tmp_path / name.replace(" ", "_"))]) == 0
        rec = json.loads((tmp_path / f"{name.replace(' ', '_')}.eval.json").read_text())
        accuracy[name] = rec["results"][-1]["accuracy"]
    capsys.readouterr()

    def off(name):  # distance of the data-vector keys from the clean merge
        clean = states["clean data_vector"]
        return math.sqrt(sum(float(((states[name][k].double() - clean[k].double()) ** 2).sum())
                             for k in load_vector(sites.files[0]).vector))

    assert off("x1000 median") < off("x1000 data_vector") / 100
    assert off("x1000 trimmed_mean") < off("x1000 data_vector") / 100
    with capsys.disabled():
        print("\npooled test accuracy: " + ", ".join(f"{k} {v:.3f} (off {off(k):.3g})" for k, v in accuracy.items()))


def test_cosine_rule_names_a_site_pointing_away():
    """A site whose vector points against the others' mean is refused by name with its cosine;
    kept with keep_outliers and marked. Small hand-made vectors: cosines are exact."""
    from dvlib.io import DvlibError
    from dvlib.vectors import PARAM, DataVector

    pre = {"w": torch.zeros(2)}
    taus = [DataVector({"w": torch.tensor(v)}, {"w": PARAM}) for v in ([1.0, 0.0], [1.0, 0.2], [-1.0, 0.5])]
    c = (-1 + 0.05) / (math.sqrt(1.25) * math.sqrt(1.01))  # c against (a + b) / 2 = (1, 0.1)
    with pytest.raises(DvlibError, match=rf"1 of 3 sites.*\n  - c: cosine to the other sites' mean {c:.3g} < -0.5"):
        screening.screen(["a", "b", "c"], taus, pre)
    rep = screening.screen(["a", "b", "c"], taus, pre, keep_outliers=True)
    assert rep["kept_outliers"] == ["c"] and rep["sites"][2]["outlier"]
    assert rep["sites"][0]["cosine_to_others"] == 0.0  # a = (1, 0) against (b + c) / 2 = (0, 0.35)
    assert rep["sites"][2]["cosine_to_others"] == pytest.approx(c, rel=1e-6)
