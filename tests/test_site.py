"""The multi-site workflow (dvlib.site, `dvlib site ...`, `dvlib merge`, `dvlib evaluate --data`).

One end-to-end run with every site as its own process: synthetic images exported as PNG folders, one
per site -> `site finetune` at each -> `merge` -> `site restore` at each in turn -> `evaluate`. Then
checks of the files, the merge formula, the restore bookkeeping and its equality with one-pass
recalibration, and bad inputs (in-process: exit code 2, a message naming the file/key, no output).
No accuracy assertions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from dvlib.bn import recalibrate_bn
from dvlib.cli import main
from dvlib.files import load_model, load_vector, save_vector
from dvlib.io import sha256_file
from dvlib.loader import batches
from dvlib.local import open_local
from dvlib.models import build
from dvlib.vectors import BN_STAT, COUNTER, HEAD, PARAM, DataVector, key_kinds, keys_of
from tests.conftest import write_site_folders


def load_checkpoint(path):
    mf = load_model(path)
    return mf.state, mf.meta

SIZE = 32
SITES = ("site_a", "site_b")
FINETUNE = ["--preset", "smoke", "--arch", "smallcnn", "--weights", "random", "--image-size", str(SIZE),
            "--epochs", "2", "--batch-size", "16", "--seed", "0"]


def _dvlib(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dvlib", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, f"{proc.args} failed ({proc.returncode}):\n{out}\n{err}"
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Two site folders of synthetic PNGs (a few dozen per class each) with patients.csv."""
    root = tmp_path_factory.mktemp("multisite")
    write_site_folders(root, SITES, n_patients=96)
    return root


@pytest.fixture(scope="module")
def flow(work: Path) -> dict:
    """The whole workflow, each step a separate process."""
    procs = [_dvlib(work, "site", "finetune", "--data", s, *FINETUNE, "--out", f"{s}.dv.safetensors")
             for s in SITES]
    logs = {s: _wait(p) for s, p in zip(SITES, procs)}
    logs["merge"] = _wait(_dvlib(work, "merge", *(f"{s}.dv.safetensors" for s in SITES), "--method",
                                 "data_vector", "--lam", "0.5", "--bn-buffers", "mean", "--out", "merged.safetensors"))
    _wait(_dvlib(work, "site", "restore", "merged.safetensors", "--data", "site_a", "--mode", "recalibrate",
                 "--out", "merged.a.safetensors"))
    _wait(_dvlib(work, "site", "restore", "merged.a.safetensors", "--data", "site_b", "--out", "merged.bn.safetensors"))
    logs["eval"] = _wait(_dvlib(work, "evaluate", "merged.bn.safetensors", "--data", *SITES, "--split", "test",
                                "--out", "eval/merged_bn"))
    return logs


def _identifiers(site: Path) -> set[str]:
    """Everything that names an image or a patient at this site."""
    pats = pd.read_csv(site / "patients.csv", dtype=str)
    files = [p for p in site.rglob("*.png")]
    return set(pats["patient"]) | set(pats["image"]) | {p.stem for p in files} | {p.name for p in files}


# ---------------------------------------------------------------------------------- end to end

def test_site_vector_files(work, flow):
    ref = build("smallcnn", 4, weights="random", seed=0)
    kinds = key_kinds(ref.state_dict(), ref)
    for s in SITES:
        vf = load_vector(work / f"{s}.dv.safetensors")
        m = vf.meta
        assert m["site"] == s and m["arch"] == "smallcnn" and m["head"] == "append" and m["weights"] == "random"
        assert m["classes"] == ["bar", "disc", "ring", "spots"]
        assert m["pretrained_sha256"] == ref.pretrained_sha256
        assert m["image_size"] == SIZE and m["hyperparameters"]["epochs"] == 2 and m["preset"] == "smoke"
        assert m["dvlib_version"] and m["format_version"] == 1 and m["split"] == {"seed": 0, "test_frac": 0.2}
        n_images = len(list((work / s).rglob("*.png")))
        assert m["sample_count"] + m["test_count"] == n_images and m["sample_count"] > m["test_count"] > 0
        assert m["metrics"]["split"] == "test" and m["metrics"]["n"] == m["test_count"]
        assert set(vf.vector) == set(keys_of(kinds, PARAM))
        assert set(vf.head) == set(keys_of(kinds, HEAD)) and all(k.startswith("head.") for k in vf.head)
        assert set(vf.bn) == set(keys_of(kinds, BN_STAT, COUNTER))
        assert any(float(t.abs().max()) > 0 for t in vf.vector.values())  # it did train
        assert f"local test: n={m['test_count']}" in flow[s]


def test_no_images_file_names_or_patient_ids_leave_the_site(work, flow):
    outputs = [work / f"{s}.dv.safetensors" for s in SITES]
    outputs += [work / f for f in ("merged.safetensors", "merged.bn.safetensors")]
    secrets = set().union(*(_identifiers(work / s) for s in SITES))
    assert len(secrets) > 100
    for path in outputs:
        blob = path.read_bytes()
        leaked = sorted(x for x in secrets if x.encode() in blob)
        assert not leaked, f"{path.name} holds {leaked[:5]}"
        assert str(work).encode() not in blob, f"{path.name} holds a local path"
    # only the three sections, no image-sized tensors
    with safe_open(str(outputs[0]), "pt") as f:
        assert {k.split("/")[0] for k in f.keys()} == {"vector", "head", "bn"}


def test_merged_checkpoint_is_the_formula(work, flow):
    merged, meta = load_checkpoint(work / "merged.safetensors")
    pre = build("smallcnn", 4, weights="random", seed=0).state_dict()
    vfs = [load_vector(work / f"{s}.dv.safetensors") for s in SITES]
    for k, v in merged.items():
        if k in vfs[0].vector:
            expect = pre[k] + 0.5 * (vfs[0].vector[k] + vfs[1].vector[k])
        elif k.startswith("head."):
            expect = (vfs[0].head[k] + vfs[1].head[k]) / 2
        elif k.endswith("num_batches_tracked"):
            expect = torch.maximum(vfs[0].bn[k], vfs[1].bn[k])
        else:
            expect = (vfs[0].bn[k] + vfs[1].bn[k]) / 2
        torch.testing.assert_close(v, expect, atol=1e-6, rtol=1e-6, msg=k)
    assert meta["method"] == "data_vector" and meta["lam"] == 0.5 and meta["bn_buffers"] == "mean"
    assert meta["classes"] == vfs[0].classes and meta["arch"] == "smallcnn"
    assert meta["pretrained_sha256"] == vfs[0].meta["pretrained_sha256"]
    assert meta["sample_counts"] == [vf.sample_count for vf in vfs]
    assert [s["file"] for s in meta["sources"]] == [f"{s}.dv.safetensors" for s in SITES]
    assert [s["sha256"] for s in meta["sources"]] == [sha256_file(vf.path) for vf in vfs]
    assert meta["restore_visits"] == []


def test_restore_bookkeeping(work, flow):
    _, meta_a = load_checkpoint(work / "merged.a.safetensors")
    _, meta = load_checkpoint(work / "merged.bn.safetensors")
    counts = {s: load_vector(work / f"{s}.dv.safetensors").sample_count for s in SITES}
    assert [v["site"] for v in meta_a["restore_visits"]] == ["site_a"]
    visits = meta["restore_visits"]
    assert [(v["site"], v["mode"], v["subset"]) for v in visits] == [(s, "recalibrate", "train") for s in SITES]
    assert [v["images"] for v in visits] == [counts[s] for s in SITES]
    assert [v["reset"] for v in visits] == [True, False]
    assert meta["bn_images"] == sum(counts.values()) and meta["kind"] == "restored"
    assert meta["sources"] == load_checkpoint(work / "merged.safetensors")[1]["sources"]


def test_restore_visits_equal_one_pass_recalibration(work, flow):
    """A then B in separate processes == dvlib.bn.recalibrate_bn over A's and B's batches at once."""
    merged, _ = load_checkpoint(work / "merged.safetensors")
    restored, _ = load_checkpoint(work / "merged.bn.safetensors")
    model = build("smallcnn", 4, weights="random")
    model.load_state_dict(merged)
    shards = [open_local(str(work / s)).shard("train", SIZE, "cpu") for s in SITES]
    iters = [(x for x, _ in batches(sh.cache, sh.rows, None, 64, SIZE, train=False)) for sh in shards]
    seen = recalibrate_bn(model, iters)
    assert seen == [len(sh) for sh in shards]
    ref = model.state_dict()
    bn_keys = [k for k in ref if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn_keys
    for k in bn_keys:
        torch.testing.assert_close(restored[k], ref[k], atol=1e-5, rtol=1e-5, msg=k)
    for k in ref:  # weights untouched
        if k not in bn_keys:
            assert torch.equal(restored[k], merged[k]), k


def test_accumulating_visits_equal_one_recalibration():
    torch.manual_seed(0)
    xs = [torch.rand(5, 3, 16, 16) for _ in range(4)]
    a, b = build("smallcnn", 3, weights="random"), build("smallcnn", 3, weights="random")
    assert recalibrate_bn(a, [xs[:2]], reset=True) == [10]
    assert recalibrate_bn(a, [xs[2:]], reset=False) == [10]
    recalibrate_bn(b, [xs[:2], xs[2:]])
    for k, v in b.state_dict().items():
        torch.testing.assert_close(a.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    assert all(m.momentum == 0.1 for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_evaluate_outputs(work, flow):
    rec = json.loads((work / "eval" / "merged_bn.eval.json").read_text())
    table = pd.read_csv(work / "eval" / "merged_bn.eval.csv")
    assert list(table["eval_on"]) == [*SITES, "pooled"] and set(table["subset"]) == {"test"}
    counts = {s: load_vector(work / f"{s}.dv.safetensors").meta["test_count"] for s in SITES}
    assert list(table["n"]) == [counts["site_a"], counts["site_b"], sum(counts.values())]
    assert [r["eval_on"] for r in rec["results"]] == [*SITES, "pooled"]
    assert len(rec["results"][-1]["confusion"]) == 4 and len(rec["restore_visits"]) == 2
    assert (work / "eval" / "merged_bn.confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pooled" in flow["eval"]


def test_evaluate_site_file_and_finetune_epoch_visit(work, flow, tmp_path, capsys):
    # a site's own model, rebuilt from its vector file, evaluated on all its images
    assert main(["evaluate", str(work / "site_a.dv.safetensors"), "--data", str(work / "site_a"),
                 "--out", str(tmp_path / "local_a")]) == 0
    rec = json.loads((tmp_path / "local_a.eval.json").read_text())
    assert rec["results"][0]["n"] == len(list((work / "site_a").rglob("*.png")))
    # a labelled restore visit, then recalibration starts afresh (the weights changed)
    ft, rc = tmp_path / "ft.safetensors", tmp_path / "ft.rc.safetensors"
    assert main(["site", "restore", str(work / "merged.safetensors"), "--data", str(work / "site_b"),
                 "--mode", "finetune_epoch", "--batch-size", "16", "--out", str(ft)]) == 0
    assert main(["site", "restore", str(ft), "--data", str(work / "site_a"), "--out", str(rc)]) == 0
    _, meta = load_checkpoint(rc)
    assert [(v["site"], v["mode"]) for v in meta["restore_visits"]] == [("site_b", "finetune_epoch"),
                                                                        ("site_a", "recalibrate")]
    assert meta["restore_visits"][1]["reset"] is True and meta["bn_images"] == meta["restore_visits"][1]["images"]


# ----------------------------------------------------------------------------------- bad inputs

def _copy_vector(src: Path, dst: Path, meta=None, tensors=None) -> Path:
    """Rewrite a vector file byte-for-byte except for the edits (bypasses save_vector's checks)."""
    with safe_open(str(src), "pt") as f:
        raw = dict(f.metadata())
        ts = {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(raw["dvlib"])
    m.update(meta or {})
    raw["dvlib"] = json.dumps(m)
    for k, fn in (tensors or {}).items():
        ts[k] = fn(ts[k])
    save_file(ts, str(dst), metadata=raw)
    return dst


def _refused(capsys, argv: list[str], out: Path, *needles: str) -> str:
    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvlib: error:"), err
    for n in needles:
        assert n in err, f"{n!r} not in:\n{err}"
    assert not out.exists() and not out.with_suffix(".json").exists()
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, f"left behind: {sorted(map(str, after - before))}"
    return err


@pytest.fixture
def good(work, flow) -> tuple[Path, Path]:
    return work / "site_a.dv.safetensors", work / "site_b.dv.safetensors"


def test_merge_refuses_other_pretrained_weights(good, tmp_path, capsys):
    a, b = good
    bad = _copy_vector(b, tmp_path / "other.dv.safetensors", meta={"pretrained_sha256": "0" * 64})
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(bad), "--out", str(out)], out, str(bad), "pretrained_sha256",
             "other weights")


def test_merge_refuses_when_rebuilt_weights_differ(good, tmp_path, capsys):
    a, b = good
    fake = "1" * 64  # both files agree, but the coordinator cannot rebuild these weights
    fa = _copy_vector(a, tmp_path / "a.dv.safetensors", meta={"pretrained_sha256": fake})
    fb = _copy_vector(b, tmp_path / "b.dv.safetensors", meta={"pretrained_sha256": fake})
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(fa), str(fb), "--out", str(out)], out, "sha256", fake, "--weights")
    # --weights: the right weights are accepted, other weights refused
    other = build("smallcnn", 4, weights="random", seed=1).backbone.state_dict()
    save_file({k: v.contiguous() for k, v in other.items()}, str(tmp_path / "other_weights.safetensors"))
    _refused(capsys, ["merge", str(a), str(b), "--weights", str(tmp_path / "other_weights.safetensors"),
                      "--out", str(out)], out, "sha256")
    assert main(["merge", str(a), str(b), "--weights", "random", "--out", str(out)]) == 0
    assert out.exists()


def test_merge_refuses_class_order_mismatch(good, tmp_path, capsys):
    a, b = good
    classes = load_vector(b).classes
    bad = _copy_vector(b, tmp_path / "swapped.dv.safetensors", meta={"classes": classes[::-1]})
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(bad), "--out", str(out)], out, str(bad), "different order")


def test_merge_refuses_truncated_file(good, tmp_path, capsys):
    a, b = good
    bad = tmp_path / "cut.dv.safetensors"
    data = b.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(bad), "--out", str(out)], out, str(bad), "truncated")


def test_merge_refuses_pickle_files(good, tmp_path, capsys):
    a, _ = good
    pt = tmp_path / "site_b.pt"
    torch.save(build("smallcnn", 4, weights="random").state_dict(), pt)
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(pt), "--out", str(out)], out, str(pt), "pickle")
    disguised = tmp_path / "disguised.dv.safetensors"
    disguised.write_bytes(pt.read_bytes())
    _refused(capsys, ["merge", str(a), str(disguised), "--out", str(out)], out, str(disguised), "pickle")


def test_merge_refuses_nan(good, tmp_path, capsys):
    a, b = good
    key = next(iter(load_vector(b).vector))

    def poison(t):
        t = t.clone()
        t.view(-1)[0] = float("nan")
        return t

    bad = _copy_vector(b, tmp_path / "nan.dv.safetensors", tensors={f"vector/{key}": poison})
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(bad), "--out", str(out)], out, str(bad), f"vector/{key}", "NaN")


def test_merge_refuses_newer_format(good, tmp_path, capsys):
    a, b = good
    bad = _copy_vector(b, tmp_path / "future.dv.safetensors", meta={"format_version": 99})
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(bad), "--out", str(out)], out, str(bad), "format_version 99",
             "upgrade dvlib")


def test_merge_refuses_a_single_file(good, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(good[0]), "--out", str(out)], out, "at least 2", str(good[0]))


def test_merge_reports_every_problem_at_once(good, tmp_path, capsys):
    a, b = good
    vf = load_vector(b)
    dropped = next(iter(vf.vector))
    short = tmp_path / "short.dv.safetensors"
    meta = {k: v for k, v in vf.meta.items() if k not in ("format_version", "dvlib_version")}
    tau = DataVector({k: v for k, v in vf.tau.tensors.items() if k != dropped},
                     {k: v for k, v in vf.tau.kinds.items() if k != dropped})
    save_vector(short, tau, meta)
    if short.read_bytes()[:1] == b"\x80":  # see test_header_length_is_not_taken_for_a_pickle
        save_vector(short, tau, {**meta, "pad": 1})
    swapped = _copy_vector(b, tmp_path / "swapped.dv.safetensors", meta={"classes": vf.classes[::-1]})
    cut = tmp_path / "cut.dv.safetensors"
    cut.write_bytes(b.read_bytes()[:100])
    out = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(a), str(short), str(swapped), str(cut), "--out", str(out)], out,
             f"{short}", f"missing key '{dropped}'", f"{swapped}", "different order", f"{cut}", "truncated")


def test_empty_site_folder(work, flow, tmp_path, capsys):
    empty = tmp_path / "empty_site"
    empty.mkdir()
    out = tmp_path / "site.dv.safetensors"
    _refused(capsys, ["site", "finetune", "--data", str(empty), *FINETUNE, "--out", str(out)], out, str(empty),
             "empty")
    (empty / "bar").mkdir()
    (empty / "disc").mkdir()
    _refused(capsys, ["site", "finetune", "--data", str(empty), *FINETUNE, "--out", str(out)], out, str(empty),
             "without images")
    out2 = tmp_path / "restored.safetensors"
    _refused(capsys, ["site", "restore", str(work / "merged.safetensors"), "--data", str(empty), "--out", str(out2)],
             out2, str(empty))


def test_restore_refuses_wrong_classes_and_double_visit(work, flow, tmp_path, capsys):
    other = tmp_path / "other_site"
    for c in ("bar", "zebra"):  # a subset of the model's classes is fine; a class it lacks is not
        for i in range(3):
            (other / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 40), (i * 40, 90, 90)).save(other / c / f"x{i}.png")
    out = tmp_path / "r.safetensors"
    _refused(capsys, ["site", "restore", str(work / "merged.safetensors"), "--data", str(other), "--out", str(out)],
             out, "other_site", "['zebra'] are not among the classes of", "merged.safetensors")
    _refused(capsys, ["site", "restore", str(work / "merged.bn.safetensors"), "--data", str(work / "site_b"),
                      "--out", str(out)], out, "site_b", "already contributed")


def test_header_length_is_not_taken_for_a_pickle(tmp_path):
    vf_meta = {"arch": "smallcnn", "classes": ["a", "b"], "sample_count": 1, "pretrained_sha256": "ab" * 32,
               "head": "append", "weights": "random", "build_seed": 0, "image_size": 8}
    vec = DataVector({"w": torch.zeros(2)}, {"w": PARAM})
    for pad in range(300):
        path = save_vector(tmp_path / "v.dv.safetensors", vec, {**vf_meta, "pad": "x" * pad})
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    load_vector(path)


def test_merge_accepts_zero_variance_but_not_negative(good, tmp_path, capsys):
    """Real pretrained weights hold running_var == 0 (dead channels, e.g. EfficientNet-Lite0's ImageNet
    weights in 28 layers); averaging keeps them and BatchNorm adds eps, so they merge. Negative ones don't."""
    a, b = good
    key = next(k for k in load_vector(a).bn if k.endswith("running_var"))
    za = _copy_vector(a, tmp_path / "za.dv.safetensors", tensors={f"bn/{key}": torch.zeros_like})
    zb = _copy_vector(b, tmp_path / "zb.dv.safetensors", tensors={f"bn/{key}": torch.zeros_like})
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(za), str(zb), "--out", str(out)]) == 0
    sd, meta = load_checkpoint(out)
    assert float(sd[key].abs().max()) == 0 and meta["zero_variance_layers"] == [key]
    out2 = tmp_path / "arith.safetensors"
    _refused(capsys, ["merge", str(za), str(zb), "--bn-buffers", "arithmetic", "--lam", "3", "--out", str(out2)],
             out2, "negative running_var", "--bn-buffers mean")


def test_a_site_without_some_class_joins_with_the_agreed_class_list(work, flow, tmp_path, capsys):
    """site_c has no 'disc' images: with --classes it still trains a head for every agreed class, its
    file merges with the others, and restore and evaluate at site_c use the model's class list."""
    import shutil

    classes = sorted(p.name for p in (work / "site_a").iterdir() if p.is_dir())
    assert "disc" in classes and len(classes) >= 3
    site_c = tmp_path / "site_c"
    shutil.copytree(work / "site_b", site_c)
    shutil.rmtree(site_c / "disc")
    vec = tmp_path / "site_c.dv.safetensors"
    # without the agreed list, its classes differ from the others': the merge refuses, naming them
    assert main(["site", "finetune", "--data", str(site_c), *FINETUNE, "--out", str(vec)]) == 0
    merged = tmp_path / "merged.safetensors"
    _refused(capsys, ["merge", str(work / "site_a.dv.safetensors"), str(vec), "--out", str(merged)], merged,
             "classes")
    assert main(["site", "finetune", "--data", str(site_c), *FINETUNE, "--classes", *classes, "--out", str(vec)]) == 0
    meta = load_vector(vec).meta
    assert meta["classes"] == classes and meta["train_class_counts"]["disc"] == 0
    assert all(meta["train_class_counts"][c] > 0 for c in classes if c != "disc")
    assert main(["merge", str(work / "site_a.dv.safetensors"), str(vec), "--out", str(merged)]) == 0
    restored = tmp_path / "merged.c.safetensors"
    assert main(["site", "restore", str(merged), "--data", str(site_c), "--out", str(restored)]) == 0
    assert main(["evaluate", str(restored), "--data", str(site_c), "--out", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev.eval.json").read_text())
    assert ev["classes"] == classes
    # a local class outside the agreed list is refused, naming it
    _refused(capsys, ["site", "finetune", "--data", str(site_c), *FINETUNE, "--classes", *classes[:-1], "bogus",
                      "--out", str(tmp_path / "x.dv.safetensors")], tmp_path / "x.dv.safetensors", classes[-1],
             "not among --classes")
    _refused(capsys, ["site", "finetune", "--data", str(site_c), *FINETUNE, "--classes", "a", "a",
                      "--out", str(tmp_path / "y.dv.safetensors")], tmp_path / "y.dv.safetensors", "2 distinct")


def test_merge_notes_other_versions_and_settings(good, tmp_path, capsys):
    a, b = good
    meta_b = load_vector(b).meta
    b2 = _copy_vector(b, tmp_path / "site_b.dv.safetensors",
                      meta={"dvlib_version": "0.0.9", "hyperparameters": {**meta_b["hyperparameters"], "lr": 0.5}})
    out = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b2), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    notes = load_checkpoint(out)[1]["warnings"]
    assert len(notes) == 2 and all(f"note: {n}" in printed for n in notes)
    assert "different dvlib versions" in notes[0] and "site_b.dv.safetensors 0.0.9" in notes[0]
    assert "different lr" in notes[1] and "0.5" in notes[1]
    assert load_checkpoint(good[0].parent / "merged.safetensors")[1]["warnings"] == []
