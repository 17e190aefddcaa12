"""The privacy audit and the DP step on a tiny run (synthetic images, smallcnn at 32 px, 2 hospitals,
1 epoch): every model and scope audited with intervals, the pretrained sanity check, DP vector files
that record what the accountant computes, frozen BatchNorm statistics, and the report made from the
result files alone."""
from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("opacus")
matplotlib.use("Agg")

from dvlib import experiment as ex  # noqa: E402
from dvlib.studies.privacy import dp_steps as xp  # noqa: E402
from dvlib.studies.privacy import audit as xa  # noqa: E402
from dvlib.files import load_model, load_vector  # noqa: E402
from dvlib.io import DvlibError  # noqa: E402
from dvlib.studies.privacy import report as rp  # noqa: E402
from dvlib.studies.privacy.figures import plot_privacy_utility, plot_roc  # noqa: E402
from dvlib.studies.privacy.summary import privacy_summary  # noqa: E402
from dvlib.vectors import BN_STAT, COUNTER  # noqa: E402

TINY = dict(image_size=32, epochs=1, batch_size=8, n_hospitals=2, n_patients=48, eval_batch_size=64)
EPS = 4.0
UNION = ["full", "merged_params_mean", "merged_data_vector", "restored_data_vector_recalibrate",
         "restored_data_vector_finetune_epoch"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = ex.open_run("priv", "smoke", seeds=[0], root=tmp_path_factory.mktemp("runs"), device="cpu", **TINY)
    ex.step_split(r)
    ex.step_finetune(r, progress=False)
    ex.step_merge(r, methods=("params_mean", "data_vector"))
    ex.step_restore(r, methods=("data_vector",), modes=("none", "recalibrate", "finetune_epoch"))
    xa.step_privacy_audit(r, n_boot=200)
    xp.step_dp(r, epsilons=(EPS,), n_boot=100, log=lambda *_: None)
    return r


def _between(df, col):
    return ((df[f"{col}_low"] <= df[col] + 1e-12) & (df[col] <= df[f"{col}_high"] + 1e-12)).all()


def test_every_model_and_scope_is_audited_with_intervals(run):
    audit = run.read("privacy_audit")
    manifest = pd.read_csv(run.manifest_path(0))
    expected = {("pretrained", s) for s in ("pooled", "hospital_1", "hospital_2")}
    expected |= {(f"hospital_{h}", f"hospital_{h}") for h in (1, 2)}
    expected |= {(m, s) for m in UNION for s in ("pooled", "hospital_1", "hospital_2")}
    got = set(zip(audit["model"], audit["scope"]))
    assert got == expected
    assert all(sorted(g) == ["loss", "reference"] for _, g in audit.groupby(["model", "scope"])["attack"])
    for col in ("auc", "tpr@1%", "tpr@0.1%"):
        assert _between(audit, col), col
    # members: the scope's training images; non-members: its test images; patients as groups
    pooled = audit[audit["scope"] == "pooled"]
    assert (pooled["n_members"] == (manifest["subset"] == "train").sum()).all()
    assert (pooled["n_nonmembers"] == (manifest["subset"] == "test").sum()).all()
    h1 = audit[audit["scope"] == "hospital_1"].iloc[0]
    m1 = manifest[manifest["hospital"] == 1]
    assert h1["n_members"] == (m1["subset"] == "train").sum()
    assert h1["nonmember_groups"] == m1.loc[m1["subset"] == "test", "patient"].nunique()
    assert np.allclose(audit["min_fpr"], 1 / audit["n_nonmembers"])
    # ROC curves: each model once per attack in its own scope, from (0, 0) to (1, 1), on the curve
    roc = pd.read_csv(run.dir / "results" / "privacy_roc.csv.gz")
    scopes = roc.groupby("model")["scope"].first()
    assert scopes["hospital_2"] == "hospital_2" and scopes["merged_data_vector"] == "pooled"
    for _, g in roc.groupby(["model", "attack"]):
        assert (g["fpr"].iloc[0], g["tpr"].iloc[0], g["fpr"].iloc[-1], g["tpr"].iloc[-1]) == (0, 0, 1, 1)
        assert len(g) <= xa.CURVE_POINTS and (np.diff(g["fpr"]) >= 0).all() and (np.diff(g["tpr"]) >= 0).all()


def test_pretrained_model_is_the_sanity_check(run):
    audit = run.read("privacy_audit")
    pre = audit[audit["model"] == "pretrained"]
    ref = pre[pre["attack"] == "reference"]
    assert (ref["auc"] == 0.5).all() and (ref["auc_low"] == 0.5).all() and (ref["auc_high"] == 0.5).all()
    loss = pre[pre["attack"] == "loss"]
    assert ((loss["auc_low"] <= 0.5) & (0.5 <= loss["auc_high"])).all()
    # the bootstrap draws are shared by the models of a scope: the notebook's few lines give the step's row
    r = ex.replicate(run, 0, 0)
    net = r.model_from(load_model(run.model_path(0, 0, "merged_data_vector")).state)
    frame, reference = xa.per_image_losses(r, net), xa.per_image_losses(r, r.pretrained_model())
    assert (frame["loss"] == -np.log(np.clip(frame["p_true"], 1e-12, 1))).all()
    from dvlib.studies.privacy import attack as privacy

    score = reference["loss"].to_numpy() - frame["loss"].to_numpy()
    a = privacy.audit(score, frame["member"], groups=frame["patient"], n_boot=200, seed=xa.audit_seed(r, "pooled"))
    row = audit[(audit["model"] == "merged_data_vector") & (audit["attack"] == "reference") &
                (audit["scope"] == "pooled")].iloc[0]
    assert (a.auc, a.auc_low, a.auc_high) == pytest.approx((row["auc"], row["auc_low"], row["auc_high"]), abs=1e-12)


def test_dp_vector_files_record_the_accountants_epsilon(run):
    files = xp.dp_file_summary(run)
    assert list(files["model"]) == ["hospital_1", "hospital_2"]
    assert (files["folder"] == f"dp_eps{EPS:g}_all_but_bn").all()
    np.testing.assert_allclose(files["epsilon"], files["accountant_epsilon"], rtol=1e-9)
    assert (files["epsilon"] <= EPS).all() and (files["epsilon"] > EPS - 0.05).all()
    manifest = pd.read_csv(run.manifest_path(0))
    for _, f in files.iterrows():
        h = int(f["model"].split("_")[1])
        n = ((manifest["hospital"] == h) & (manifest["subset"] == "train")).sum()
        assert f["delta"] == pytest.approx(1 / n)
    ev, au = run.read("dp_eval"), run.read("dp_audit")
    assert set(ev["model"]) == {"hospital_1", "hospital_2", "merged_data_vector", "restored_data_vector_recalibrate",
                                "restored_data_vector_finetune_epoch"}
    assert dict(ev.groupby("restore")["dp_guarantee"].all()) == {"none": True, "recalibrate": False,
                                                                 "finetune_epoch": False}
    assert ev[["accuracy", "balanced_accuracy"]].notna().all().all() and _between(au, "auc")
    hist = run.read("dp_history")
    assert (hist.groupby("model")["epsilon"].max() <= EPS).all()


def test_dp_models_keep_the_pretrained_batchnorm(run):
    r = ex.replicate(run, 0, 0)
    pre = r.pretrained()[0]
    folder = xp.dp_dir(run, 0, 0, EPS, "all_but_bn")
    for h in (1, 2):
        vf = load_vector(folder / f"hospital_{h}.dv.safetensors")
        assert vf.meta["kind"] == "site_vector" and vf.meta["dp"]["batchnorm"].startswith("frozen")
        bn = vf.tau.part(BN_STAT, COUNTER)
        assert bn and all(torch.equal(v, pre[k]) for k, v in bn.items())
        affine = [k for k in vf.vector if k.rsplit(".", 1)[0] + ".running_mean" in pre]
        assert affine and all(not vf.vector[k].any() for k in affine)  # BN weight and bias: not trained
        assert any(vf.vector[k].abs().max() > 0 for k in vf.vector if k not in affine)  # the rest was
    merged = load_model(folder / "merged_data_vector.safetensors").state
    for k, v in pre.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(merged[k], v), k


def test_dp_files_are_reused_and_a_change_is_refused(run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("retrained a DP model that exists")

    monkeypatch.setattr(xp, "finetune_dp_one", boom)
    before, notes = run.read("dp_eval"), []
    xp.step_dp(run, epsilons=(EPS,), restores=("none", "recalibrate", "finetune_epoch"), n_boot=100, log=notes.append)
    pd.testing.assert_frame_equal(run.read("dp_eval"), before)
    assert "DP delta 1/n (the default) is at least 1/n at 2 hospital(s): weak" in notes[0]
    with pytest.raises(DvlibError, match="overwrite=True"):
        xp.step_dp(run, epsilons=(EPS,), max_grad_norm=2.0, restores=("none",), n_boot=20, log=lambda *_: None)


def test_a_bad_budget_is_refused_before_any_hospital_trains(run, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a hospital trained before the whole budget was checked")

    monkeypatch.setattr(xp, "finetune_dp_one", boom)
    before = run.result("dp_eval").read_bytes()
    for kw, match in [(dict(epsilons=(EPS, math.inf)), r"epsilons must be a finite number > 0, got inf"),
                      (dict(epsilons=(EPS, math.nan)), r"epsilons must be a finite number > 0, got nan"),
                      (dict(epsilons=(EPS,), n_boot=5), r"n_boot must be an integer >= 10, got 5"),
                      (dict(epsilons=(EPS,), delta=0.5),
                       r"delta 0\.5 is at least 2/n = \S+ for hospital \d of split seed 0 \(n = \d+ training")]:
        with pytest.raises(DvlibError, match=match):  # overwrite: EPS alone would train, and fail the test
            xp.step_dp(run, overwrite=True, log=lambda *_: None, **kw)
    with pytest.raises(DvlibError, match="n_boot must be an integer >= 10, got 0"):
        xa.step_privacy_audit(run, n_boot=0)
    assert run.result("dp_eval").read_bytes() == before


def test_a_given_delta_reaches_the_vector_file_and_its_folder(run):
    r = ex.replicate(run, 0, 0)
    n = len(r.local(1).images("train"))
    _, meta, history = xp.finetune_dp_one(r, 1, EPS, delta=0.5 / n)
    assert meta["dp"]["delta"] == 0.5 / n and all(h["delta"] == 0.5 / n for h in history)
    assert meta["dp"]["epsilon"] <= EPS
    assert xp.dp_dir(run, 0, 0, EPS, "head", 1e-5).name == "dp_eps4_delta1e-05_head"
    assert xp.dp_dir(run, 0, 0, EPS, "head").name == "dp_eps4_head"  # the default keeps the committed names


def test_training_images_before_the_split_is_written_are_the_split_s(run, tmp_path):
    from dvlib.privacy_budget import training_images

    fresh = ex.open_run("priv", "smoke", seeds=[0], root=tmp_path, device="cpu", **TINY)
    counts = training_images(fresh)  # computed in memory, as notebook 01 will split
    assert not fresh.manifest_path(0).exists()
    manifest = pd.read_csv(run.manifest_path(0))
    assert counts == {(0, h): int(((manifest["hospital"] == h) & (manifest["subset"] == "train")).sum())
                      for h in (1, 2)}
    assert training_images(run) == counts


def test_report_from_the_result_files(run, tmp_path):
    t = rp.privacy_table(run.dir, "reference")
    assert list(t.index)[:3] == [rp.model_label("pretrained"), "hospital 1's own model", "hospital 2's own model"]
    assert t.loc[rp.model_label("pretrained"), "AUC"] == "0.500 [0.500, 0.500]"
    assert "bootstrap" in rp.privacy_caption(run.dir, "reference")
    assert list(rp.per_hospital_table(run.dir).columns) == ["Part 1", "Part 2"]
    dp = rp.dp_table(run.dir)
    assert ("4", "merged, no restore") in dp.index and dp.loc[("4", "merged, no restore"), "DP guarantee"] == "yes"
    assert dp.loc[("4", "merged + BN recalibrate"), "DP guarantee"] == "no"
    fig = plot_roc(run.dir, out=tmp_path / "roc")
    assert fig._suptitle.get_text() and (tmp_path / "roc.png").exists()
    fig = plot_privacy_utility(run.dir, out=tmp_path / "utility")
    assert fig._suptitle.get_text() and (tmp_path / "utility.pdf").exists()
    text = privacy_summary(run.dir)
    for phrase in ("Sanity check", "exactly 0.5", "What a hospital should conclude", "differential privacy", "per image"):
        assert phrase in text, phrase
