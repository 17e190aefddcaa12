"""Fine-tuning spread over several devices (one process each) gives the models of the one-device path;
the contract of the experiment's caches (:mod:`dvlib.experiment.cache`)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from dvlib import experiment as ex
from dvlib.files import load_vector
from dvlib.io import DvlibError

SMALL = dict(dataset="pad_ufes_20", image_size=32, epochs=2, batch_size=8, n_hospitals=2, eval_batch_size=64)


def test_devices_default_to_every_gpu_only_when_auto():
    assert ex.finetune_devices("auto", None, cuda_count=0) == ["auto"]
    assert ex.finetune_devices("auto", None, cuda_count=1) == ["auto"]
    assert ex.finetune_devices("auto", None, cuda_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert ex.finetune_devices("cuda:1", None, cuda_count=3) == ["cuda:1"]
    assert ex.finetune_devices("cpu", None, cuda_count=2) == ["cpu"]
    assert ex.finetune_devices("auto", ["cpu", "cpu"]) == ["cpu", "cpu"]


@pytest.mark.parametrize("bad", ["tpu", f"cuda:{torch.cuda.device_count()}"])
def test_unusable_device_is_named(bad):
    with pytest.raises(DvlibError, match=bad):
        ex.finetune_devices("auto", ["cpu", bad])


def _run(root, name, pad_root, monkeypatch):
    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    run = ex.open_run(name, "smoke", seeds=[0, 1], root=root, device="cpu", **SMALL)
    ex.step_split(run)
    return run


def test_two_worker_processes_train_the_same_models(tmp_path, pad_root, monkeypatch):
    one = _run(tmp_path, "one", pad_root, monkeypatch)
    two = _run(tmp_path, "two", pad_root, monkeypatch)
    t1 = ex.step_finetune(one, progress=False)
    t2 = ex.step_finetune(two, progress=False, devices=["cpu", "cpu"])
    assert len(t1) == len(t2) == 2 * 3 * 3  # replicates x models x (hospital_1, hospital_2, pooled)
    for s, tr in one.replicates:
        for t in ex.finetune_targets(one):
            a, b = load_vector(one.model_path(s, tr, t)), load_vector(two.model_path(s, tr, t))
            assert a.sample_count == b.sample_count > 0
            assert a.tau.tensors.keys() == b.tau.tensors.keys()
            for k in a.tau.tensors:  # worker processes may use other thread counts: float sums in another order
                torch.testing.assert_close(a.tau.tensors[k], b.tau.tensors[k], rtol=1e-4, atol=1e-5,
                                           msg=f"split {s} {t} {k}")
    # the two splits trained different models (the comparison above is not vacuous)
    a0, a1 = (load_vector(one.model_path(s, 0, "full")).head for s in (0, 1))
    assert not torch.equal(a0["head.weight"], a1["head.weight"])
    # finished checkpoints are kept: a second call trains nothing (it would fail: images are gone)
    for img in (pad_root / "pad_ufes_20" / "images").rglob("*.*"):
        img.unlink()
    assert len(ex.step_finetune(two, progress=False, devices=["cpu", "cpu"])) == len(t2)


def test_a_failing_worker_names_the_model_and_device(tmp_path, pad_root, monkeypatch):
    run = _run(tmp_path, "broken", pad_root, monkeypatch)
    victim = next((pad_root / "pad_ufes_20" / "images").rglob("*.png"))
    victim.write_bytes(b"not an image")
    with pytest.raises(DvlibError, match=r"on cpu failed.*" + victim.stem):
        ex.step_finetune(run, progress=False, devices=["cpu", "cpu"])


def test_whole_protocol_with_gpu_like_model_moves_and_bf16(tmp_path, pad_root, monkeypatch):
    """What a GPU changes, imitated on the CPU: moving a model makes new parameter tensors (in
    channels_last), and the forward pass runs under bf16 autocast. Every step must still work on the
    models it reuses (a move inside inference mode once broke reloading them, on GPUs only)."""
    from dvlib import device

    def moving_prepare(model, dev):
        model._apply(lambda t: t.clone())
        return model.to(memory_format=torch.channels_last)

    monkeypatch.setattr(device, "prepare", moving_prepare)  # fit, predict, restore, verify look it up when called
    monkeypatch.setattr(device, "_autocast", lambda dev: torch.autocast("cpu", dtype=torch.bfloat16))
    run = _run(tmp_path, "gpu-like", pad_root, monkeypatch)
    ex.step_finetune(run, progress=False)
    merged = ex.step_merge(run, methods=("params_mean", "data_vector"))
    ex.step_lambda(run, (0.5,))
    ex.step_bn_policy(run, ("mean",))
    restored = ex.step_restore(run, methods=("pretrained", "data_vector"), modes=("none", "recalibrate",
                                                                                  "finetune_epoch"))
    ex.step_similarity(run)
    assert len(merged) and len(restored)
    assert restored[["accuracy", "balanced_accuracy"]].notna().all().all()
    for s, t in run.replicates:
        assert ex.verify_merge(run, s, t) < 1e-5
        assert ex.verify_recalibration(run, s, t) < 1e-4


def test_dirichlet_hospitals_may_lack_classes_and_still_train(tmp_path, pad_root, monkeypatch):
    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    run = ex.open_run("noniid", "smoke", seeds=[0], root=tmp_path, device="cpu",
                      **{**SMALL, "scheme": "dirichlet", "alpha": 0.1, "n_hospitals": 3, "epochs": 1})
    shards = ex.step_split(run)
    train = shards[shards.subset == "train"].set_index("hospital")[["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]]
    assert (train == 0).any(axis=None), "alpha 0.1 should leave some hospital without some class"
    assert ex.split_checks(run)[0]["every_class_in_every_train_split"] is False
    assert ex.split_checks(run)[0]["patient_disjoint"] is True
    table = ex.step_finetune(run, progress=False)
    assert set(table["model"]) == {"hospital_1", "hospital_2", "hospital_3", "full"}
    # make_split itself still refuses unless asked (as for iid runs, where a missing class is a mistake)
    from dvlib.split import make_split

    with pytest.raises(DvlibError, match="no training images of class"):
        make_split(ex.dataset_index(run), 3, "dirichlet", 0.1, 0.2, seed=0)


# --- the experiment's caches --------------------------------------------------------------------------

def _split_replicate(root, pad_root, monkeypatch):
    monkeypatch.setenv("DVLIB_DATA", str(pad_root))
    monkeypatch.setenv("DVLIB_PLAIN", "0")
    ex.reset_caches()
    run = ex.open_run("caches", "smoke", seeds=[0], root=root, device="cpu", **SMALL)
    ex.step_split(run)
    r = ex.replicate(run, 0, 0)
    pre = r.pretrained()[0]
    return run, r, pre, {k: v + 0.01 if v.is_floating_point() else v for k, v in pre.items()}


def _holds(net, state) -> bool:
    own = net.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in state)


def test_model_from_is_a_new_network_unless_the_shared_one_is_asked_for(tmp_path, pad_root, monkeypatch):
    run, r, pre, other = _split_replicate(tmp_path, pad_root, monkeypatch)
    a, b = r.model_from(pre), r.model_from(other)
    assert a is not b and not a.training and not b.training
    assert _holds(a, pre) and _holds(b, other)  # the second did not overwrite the first
    shared = r.model_from(pre, shared=True)
    assert shared is not a and _holds(shared, pre)
    assert r.model_from(other, shared=True) is shared and _holds(shared, other) and _holds(a, pre)
    assert r.pretrained_model() is not r.pretrained_model()
    assert r.pretrained_model(shared=True) is shared and _holds(shared, pre)


def test_stored_probabilities_serve_only_the_same_weights_and_cache_version(tmp_path, pad_root, monkeypatch):
    from dvlib.experiment import cache

    run, r, pre, other = _split_replicate(tmp_path, pad_root, monkeypatch)
    first, _ = r.evaluate(r.model_from(pre), model="pre")
    assert r.evaluations == {"computed": 1, "reused": 0}
    assert ex.replicate(run, 0, 0) is r  # kept by the process
    ex.reset_caches()  # as a later process: only <run>/cache/ remains
    r2 = ex.replicate(run, 0, 0)
    assert r2 is not r
    again, _ = r2.evaluate(r2.model_from(pre), model="pre")
    assert r2.evaluations == {"computed": 0, "reused": 1}
    pd.testing.assert_frame_equal(pd.DataFrame(first), pd.DataFrame(again), check_exact=True)
    r2.evaluate(r2.model_from(other), model="other")  # other weights: computed
    assert r2.evaluations == {"computed": 1, "reused": 1}
    monkeypatch.setattr(cache, "CACHE_VERSION", cache.CACHE_VERSION + 1)  # the forward pass changed
    ex.reset_caches()
    r3 = ex.replicate(run, 0, 0)
    r3.evaluate(r3.model_from(pre), model="pre")
    assert r3.evaluations == {"computed": 1, "reused": 0}
    assert len(list((run.dir / "cache" / "predictions").glob("*.npz"))) == 3
