"""The restore chain of custody and a hospital's own split, through the real command line.

Two synthetic sites are fine-tuned and merged once (smoke-sized); each case edits a copy of a file
as a careless or hostile party would, runs ``dvlib site restore`` or ``dvlib evaluate``, and asserts
the exit code, the message (file and key named) and that nothing was written.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from dvlib import custody
from dvlib.cli import main
from dvlib.files import load_model
from dvlib.vectors import BN_STAT, COUNTER, key_kinds

SITES = ("site_a", "site_b")
FINETUNE = ["--preset", "smoke", "--arch", "smallcnn", "--weights", "random", "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--seed", "0"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> SimpleNamespace:
    """Two sites, their merged model, and the merged model restored at site_a."""
    from dvlib.data import load_dataset
    from dvlib.split import make_split

    root = tmp_path_factory.mktemp("custody")
    index = load_dataset("synthetic", n_patients=48, size=40)
    for h, part in make_split(index, n_hospitals=2, seed=0).groupby("hospital"):
        for _, r in part.iterrows():
            path = root / SITES[h - 1] / r["label"] / f"{r['image']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(index.load_image(r["image"])).save(path)
        part[["image", "patient"]].to_csv(root / SITES[h - 1] / "patients.csv", index=False)
    for s in SITES:
        assert main(["site", "finetune", "--data", str(root / s), *FINETUNE, "--out", str(root / f"{s}.dv.safetensors")]) == 0
    merged, restored = root / "merged.safetensors", root / "merged.a.safetensors"
    assert main(["merge", *(str(root / f"{s}.dv.safetensors") for s in SITES), "--out", str(merged)]) == 0
    assert main(["site", "restore", str(merged), "--data", str(root / "site_a"), "--out", str(restored)]) == 0
    return SimpleNamespace(root=root, merged=merged, restored=restored, site_a=root / "site_a", site_b=root / "site_b")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _edit(src: Path, dst: Path, meta: dict | None = None, drop=(), tensors=None) -> Path:
    """A copy of a dvlib file with edits, written by safetensors directly (no dvlib check on the way)."""
    with safe_open(str(src), "pt") as f:
        raw, ts = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    m = json.loads(raw["dvlib"])
    m.update(meta or {})
    for k in drop:
        m.pop(k)
    raw["dvlib"] = json.dumps(m)
    for k, fn in (tensors or {}).items():
        ts[k] = fn(ts[k].clone())
    save_file(ts, str(dst), metadata=raw)
    return dst


def _refused(capsys, argv, watch: Path, *needles) -> str:
    before = _snapshot(watch)
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("dvlib: error: ") and "Traceback" not in err
    for n in needles:
        assert str(n) in err, f"{n!r} not in:\n{err}"
    assert _snapshot(watch) == before  # nothing written
    return err


def _bn(state) -> set[str]:
    return {k for k, kd in key_kinds(state).items() if kd in (BN_STAT, COUNTER)}


def test_merged_file_records_its_weights_and_each_visit_what_it_changed(chain, tmp_path, capsys):
    mf, rf = load_model(chain.merged), load_model(chain.restored)
    rec = mf.meta["custody"]
    assert rec["sha256"] == custody.weights_sha256(mf.state)
    assert rec["sha256_without_bn_stats"] == custody.weights_sha256(mf.state, _bn(mf.state))
    assert rec["sha256_without_bn_stats"] == custody.weights_sha256(rf.state, _bn(rf.state))  # a recalibration
    assert rec["sha256"] != custody.weights_sha256(rf.state)
    (visit,) = rf.meta["restore_visits"]
    assert visit["sha256_after"] == custody.weights_sha256(rf.state)
    changed = [k for k in mf.state if not torch.equal(mf.state[k], rf.state[k])]
    assert visit["changed"] == len(changed) > 0 and set(changed) <= _bn(mf.state)
    assert rf.meta["custody"] == rec  # the merged record travels unchanged
    # the next site's visit, bound to the hash the coordinator announced, goes through
    out = tmp_path / "ab.safetensors"
    assert main(["site", "restore", str(chain.restored), "--data", str(chain.site_b), "--merged-sha256", rec["sha256"],
                 "--out", str(out)]) == 0
    assert f"sha256 {rec['sha256']}" in capsys.readouterr().out
    assert [v["site"] for v in load_model(out).meta["restore_visits"]] == ["site_a", "site_b"]


def test_restore_refuses_weights_changed_outside_what_visits_may_change(chain, tmp_path, capsys):
    state = load_model(chain.restored).state
    non_bn = [k for k in state if k not in _bn(state)]
    bad = _edit(chain.restored, tmp_path / "x3.safetensors", tensors={k: (lambda t: t * 3) for k in non_bn})
    _refused(capsys, ["site", "restore", bad, "--data", chain.site_b, "--out", tmp_path / "r.safetensors"], tmp_path,
             bad, f"tensor '{non_bn[0]}' differs from the merged weights", "site_a:recalibrate")


def test_restore_refuses_a_merged_file_with_other_statistics(chain, tmp_path, capsys):
    key = sorted(k for k in _bn(load_model(chain.merged).state) if k.endswith("running_var"))[0]
    bad = _edit(chain.merged, tmp_path / "m.safetensors", tensors={key: lambda t: t * 1e6})
    first = next(k for k in load_model(chain.merged).state if k == key)
    _refused(capsys, ["site", "restore", bad, "--data", chain.site_a, "--out", tmp_path / "r.safetensors"], tmp_path,
             bad, f"tensor '{first}' differs", "no visits")


def test_restore_refuses_statistics_changed_after_the_last_visit(chain, tmp_path, capsys):
    key = sorted(_bn(load_model(chain.restored).state))[0]
    bad = _edit(chain.restored, tmp_path / "r1.safetensors", tensors={key: lambda t: t + 1})
    _refused(capsys, ["site", "restore", bad, "--data", chain.site_b, "--out", tmp_path / "r.safetensors"], tmp_path,
             bad, "changed after the last restore visit (site_a: recalibrate)")


def test_restore_refuses_another_merged_hash_or_a_file_without_a_record(chain, tmp_path, capsys):
    out = tmp_path / "r.safetensors"
    _refused(capsys, ["site", "restore", chain.merged, "--data", chain.site_a, "--merged-sha256", "0" * 64, "--out", out],
             tmp_path, chain.merged, "is not --merged-sha256 " + "0" * 64)
    stripped = _edit(chain.merged, tmp_path / "m.safetensors", drop=["custody"])
    rec = load_model(chain.merged).meta["custody"]["sha256"]
    _refused(capsys, ["site", "restore", stripped, "--data", chain.site_a, "--merged-sha256", rec, "--out", out],
             tmp_path, stripped, "records no merged weights hash")


def test_a_model_file_never_chooses_the_hospitals_split(chain, tmp_path, capsys):
    bad = _edit(chain.merged, tmp_path / "m.safetensors", meta={"split": {"seed": 5, "test_frac": 0.9}})
    for argv in (["site", "restore", bad, "--data", chain.site_a, "--out", tmp_path / "r.safetensors"],
                 ["evaluate", bad, "--data", chain.site_a, "--split", "test", "--out", tmp_path / "ev"]):
        _refused(capsys, argv, tmp_path, bad, "records the split {'seed': 5, 'test_frac': 0.9}",
                 "{'seed': 0, 'test_frac': 0.2}", "never chooses a hospital's split")
