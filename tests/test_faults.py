"""Faults thrown at the command line: a hostile or broken input never yields a wrong model, a lost
file or a traceback.

A catalogue of bad inputs and failed writes, each run through the real command line (in-process
``dvlib.cli.main``; as subprocesses where a signal, a real read-only folder or a real full disk is
involved). Each case asserts the exit code, that the message names the culprit (file, key, flag or
value) and that every folder it watches holds exactly what it held before, hidden files included:
no output, no temporary file, no input replaced. Then a seeded fuzz test: a few hundred random
corruptions of a valid vector file, each refused with a DvlibError or merged to a finite model.

The valid files are built once per module (smoke-sized: synthetic images, smallcnn, 32 px, 2 epochs).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dvlib.cli import main
from dvlib.io import DvlibError, is_temp_name
from tests.conftest import write_site_folders

SITES = ("site_a", "site_b")
FINETUNE = ["--preset", "smoke", "--arch", "smallcnn", "--weights", "random", "--image-size", "32",
            "--epochs", "2", "--batch-size", "16", "--seed", "0"]
PROJECT = Path(__file__).resolve().parents[1]
KEY = "backbone.features.0.weight"  # the first convolution: a data-vector key


# ------------------------------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def good(tmp_path_factory) -> SimpleNamespace:
    """Two site folders of synthetic PNGs, their vector files and the merged model (built once)."""
    root = tmp_path_factory.mktemp("faults")
    write_site_folders(root, SITES, n_patients=48)
    for s in SITES:
        assert main(["site", "finetune", "--data", str(root / s), *FINETUNE, "--out", str(root / f"{s}.dv.safetensors")]) == 0
    a, b, merged = root / "site_a.dv.safetensors", root / "site_b.dv.safetensors", root / "merged.safetensors"
    assert main(["merge", str(a), str(b), "--out", str(merged)]) == 0
    return SimpleNamespace(root=root, a=a, b=b, merged=merged, site_a=root / "site_a", site_b=root / "site_b")


@pytest.fixture
def work(tmp_path) -> Path:
    w = tmp_path / "work"
    w.mkdir()
    return w


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones too) with its content hash: what must not change."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link -> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "folder"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(capsys, argv, watch, *needles, code: int = 2) -> str:
    """``dvlib argv`` exits ``code`` with one error message holding every needle, and leaves every
    watched folder exactly as it was."""
    watch = [watch] if isinstance(watch, Path) else list(watch)
    before = [snapshot(w) for w in watch]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == code, f"exit {rc}, expected {code}:\n{err}"
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("dvlib: error: "), err
    for n in needles:
        assert str(n) in err, f"{n!r} not in:\n{err}"
    for w, b in zip(watch, before):
        after = snapshot(w)
        assert after == b, f"{w} changed: added {sorted(set(after) - set(b))}, removed {sorted(set(b) - set(after))}"
    return err


def read_raw(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def edit(src: Path, dst: Path, meta: dict | None = None, drop_meta=(), tensors: dict | None = None,
         add: dict | None = None) -> Path:
    """A copy of a dvlib file with edits, written by safetensors directly (no dvlib check on the way)."""
    raw, ts = read_raw(src)
    m = json.loads(raw["dvlib"])
    m.update(meta or {})
    for k in drop_meta:
        m.pop(k, None)
    raw["dvlib"] = json.dumps(m)
    for k, fn in (tensors or {}).items():
        ts[k] = fn(ts[k].clone())
    ts.update(add or {})
    raw.pop("dvlib_order", None)
    save_file(ts, str(dst), metadata=raw)
    return dst


def fill(value: float):
    return lambda t: t.fill_(value)


def poison(value: float):
    """Set the first element of a tensor to ``value``."""
    def fn(t):
        t.view(-1)[0] = value
        return t
    return fn


def copy_site(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def hold_lock(lock_file: Path) -> subprocess.Popen:
    """Another process holding a run's lock (as a working command does); returns once it holds it."""
    code = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.seek(0); f.truncate(); f.write('dvlib pid 4242 (test)'); f.flush()\nprint('ready', flush=True)\n"
            "time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


# ------------------------------------------------------------------------------------- the catalogue
# Each case: (good, work, monkeypatch) -> (argv, folders to watch, needles[, exit code]).

CASES = {}


def case(fn):
    CASES[fn.__name__.removeprefix("case_")] = fn
    return fn


@case
def case_merge_lam_overflows(g, w, mp):
    """--lam=1e308 over finite inputs: the merged output is checked, not only the inputs."""
    return ["merge", g.a, g.b, "--lam=1e308", "--out", w / "m.safetensors"], [w], \
        ["not finite", f"'{KEY}' holds", "Inf", "lam=1e+308", "nothing was written"]


@case
def case_merge_finite_3e38_vectors_overflow(g, w, mp):
    a = edit(g.a, w / "a.dv.safetensors", tensors={f"vector/{KEY}": fill(3e38)})
    b = edit(g.b, w / "b.dv.safetensors", tensors={f"vector/{KEY}": fill(3e38)})
    return ["merge", a, b, "--out", w / "m.safetensors"], [w], ["not finite", KEY, "Inf"]


@case
def case_merge_params_mean_3e38_overflow(g, w, mp):
    a = edit(g.a, w / "a.dv.safetensors", tensors={f"vector/{KEY}": fill(3e38)})
    b = edit(g.b, w / "b.dv.safetensors", tensors={f"vector/{KEY}": fill(3e38)})
    return ["merge", a, b, "--method", "params_mean", "--out", w / "m.safetensors"], [w], ["not finite", KEY]


def _inf_model(g, w) -> Path:
    return edit(g.merged, w / "inf.safetensors", tensors={KEY: poison(float("inf"))})


@case
def case_restore_refuses_inf_model(g, w, mp):
    m = _inf_model(g, w)
    return ["site", "restore", m, "--data", g.site_a, "--out", w / "r.safetensors"], [w], [m, KEY, "1 Inf"]


@case
def case_evaluate_refuses_inf_model(g, w, mp):
    m = _inf_model(g, w)
    return ["evaluate", m, "--data", g.site_a, "--out", w / "ev"], [w], [m, KEY, "1 Inf"]


@case
def case_restore_overflow_on_images_is_not_written(g, w, mp):
    """Finite but huge weights overflow the BatchNorm statistics on real images: never written."""
    m = edit(g.merged, w / "huge.safetensors", tensors={KEY: fill(1e30)}, drop_meta=["custody"])  # past the chain check
    return ["site", "restore", m, "--data", g.site_a, "--out", w / "r.safetensors"], [w], \
        [m, "not finite", "site_a", "running_var"]


@case
def case_merge_out_is_an_input(g, w, mp):
    a, b = shutil.copy(g.a, w / "a.dv.safetensors"), shutil.copy(g.b, w / "b.dv.safetensors")
    return ["merge", a, b, "--out", a], [w], ["is also an input", a]


@case
def case_merge_out_is_an_input_through_a_symlink(g, w, mp):
    a, b = shutil.copy(g.a, w / "a.dv.safetensors"), shutil.copy(g.b, w / "b.dv.safetensors")
    (w / "link.safetensors").symlink_to(a)
    return ["merge", a, b, "--out", w / "link.safetensors"], [w], ["is also an input", "link.safetensors"]


@case
def case_merge_out_is_an_input_through_a_hard_link(g, w, mp):
    a, b = shutil.copy(g.a, w / "a.dv.safetensors"), shutil.copy(g.b, w / "b.dv.safetensors")
    os.link(a, w / "hard.safetensors")
    return ["merge", a, b, "--out", w / "hard.safetensors"], [w], ["is also an input", "hard.safetensors"]


@case
def case_merge_byte_identical_copy(g, w, mp):
    c = shutil.copy(g.a, w / "copy.dv.safetensors")
    return ["merge", g.a, g.b, c, "--out", w / "m.safetensors"], [w], [c, "the same bytes as", g.a, "counts once"]


@case
def case_merge_same_file_twice(g, w, mp):
    return ["merge", g.a, g.b, g.b, "--out", w / "m.safetensors"], [w], [g.b, "given twice"]


@case
def case_merge_weights_metadata_is_an_absolute_path(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", meta={"weights": "/etc/passwd"})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], [bad, "'weights'", "bare file name", "/etc/passwd"]


@case
def case_merge_weights_metadata_climbs_folders(g, w, mp):
    a = edit(g.a, w / "a.dv.safetensors", meta={"weights": "../../etc/passwd"})
    b = edit(g.b, w / "b.dv.safetensors", meta={"weights": "../../etc/passwd"})
    return ["merge", a, b, "--weights-dir", w, "--out", w / "m.safetensors"], [w], \
        [a, b, "bare file name", "../../etc/passwd"]


@case
def case_merge_weights_metadata_not_a_string(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", meta={"weights": ["/etc/passwd"]})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], [bad, "'weights'", "bare file name"]


@case
def case_merge_weights_name_only_looked_up_in_named_folders(g, w, mp):
    """A bare name is never opened from the working folder or the file's folder: only --weights-dir."""
    a = edit(g.a, w / "a.dv.safetensors", meta={"weights": "backbone.safetensors"})
    b = edit(g.b, w / "b.dv.safetensors", meta={"weights": "backbone.safetensors"})
    (w / "backbone.safetensors").write_bytes(b"not looked at")  # beside the files: ignored
    mp.chdir(w)
    return ["merge", a, b, "--out", w / "m.safetensors"], [w], ["'backbone.safetensors'", "not in the weights folders",
                                                                 "--weights-dir"]


@case
def case_merge_out_is_a_folder(g, w, mp):
    (w / "m.safetensors").mkdir()
    return ["merge", g.a, g.b, "--out", w / "m.safetensors"], [w], [w / "m.safetensors", "is a folder"]


@case
def case_merge_out_under_a_regular_file(g, w, mp):
    (w / "plain").write_text("a file, not a folder")
    return ["merge", g.a, g.b, "--out", w / "plain" / "m.safetensors"], [w], ["plain is a file, not a folder"]


@case
def case_merge_out_read_only_folder(g, w, mp):
    def ro(src, dst):
        raise OSError(errno.EROFS, "Read-only file system", str(dst))
    mp.setattr(os, "replace", ro)
    return ["merge", g.a, g.b, "--out", w / "m.safetensors"], [w], [w / "m.safetensors", "read-only file system",
                                                                     "nothing was written"]


@case
def case_merge_out_permission_denied(g, w, mp):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    mp.setattr(tempfile, "mkstemp", denied)
    return ["merge", g.a, g.b, "--out", w / "m.safetensors"], [w], [w / "m.safetensors", "permission denied"]


@case
def case_merge_disk_full_in_safetensors(g, w, mp):
    """safetensors reports a full disk as its own error type, not OSError: still a DvlibError."""
    import safetensors.torch as st
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # half-written
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    mp.setattr(st, "save_file", full)
    return ["merge", g.a, g.b, "--out", w / "m.safetensors"], [w], [w / "m.safetensors", "no space left"]


@case
def case_evaluate_disk_full_at_the_last_file_writes_none(g, w, mp):
    """csv and json written, the png fails: all three or none."""
    from matplotlib.figure import Figure

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    mp.setattr(Figure, "savefig", full)
    return ["evaluate", g.merged, "--data", g.site_a, "--out", w / "ev"], [w], ["ev.confusion.png", "no space left"]


@case
def case_evaluate_out_under_a_regular_file(g, w, mp):
    (w / "plain").write_text("x")
    return ["evaluate", g.merged, "--data", g.site_a, "--out", w / "plain" / "ev"], [w], ["plain is a file"]


@case
def case_finetune_out_is_a_folder(g, w, mp):
    (w / "v.dv.safetensors").mkdir()
    return ["site", "finetune", "--data", g.site_a, *FINETUNE, "--out", w / "v.dv.safetensors"], [w, g.site_a], \
        ["v.dv.safetensors", "is a folder"]


@case
def case_finetune_empty_patients_csv(g, w, mp):
    site = copy_site(g.site_a, w / "site")
    (site / "patients.csv").write_text("")
    return ["site", "finetune", "--data", site, *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        [site / "patients.csv", "empty file"]


@case
def case_finetune_patients_csv_without_columns(g, w, mp):
    site = copy_site(g.site_a, w / "site")
    (site / "patients.csv").write_text("file,person\nx,1\n")
    return ["site", "finetune", "--data", site, *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        [site / "patients.csv", "needs columns image, patient"]


@case
def case_finetune_patients_csv_binary(g, w, mp):
    site = copy_site(g.site_a, w / "site")
    (site / "patients.csv").write_bytes(bytes(range(256)) * 4)
    return ["site", "finetune", "--data", site, *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        [site / "patients.csv"]


@case
def case_finetune_patients_csv_one_image_two_patients(g, w, mp):
    site = copy_site(g.site_a, w / "site")
    stem = next((site / "bar").glob("*.png")).stem
    with open(site / "patients.csv", "a") as f:
        f.write(f"{stem},SOMEONE_ELSE\n")
    return ["site", "finetune", "--data", site, *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        [site / "patients.csv", stem, "different patients"]


@case
def case_finetune_corrupt_image(g, w, mp):
    site = copy_site(g.site_a, w / "site")
    (site / "bar" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return ["site", "finetune", "--data", site, *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        [site / "bar" / "broken.png", "corrupt or unreadable"]


@case
def case_finetune_data_is_a_file(g, w, mp):
    (w / "images.zip").write_bytes(b"PK")
    return ["site", "finetune", "--data", w / "images.zip", *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        ["images.zip", "is a file"]


@case
def case_finetune_data_missing(g, w, mp):
    return ["site", "finetune", "--data", w / "nowhere", *FINETUNE, "--out", w / "v.dv.safetensors"], [w], \
        ["nowhere", "unknown dataset"]


@case
def case_finetune_out_replaces_its_weights_file(g, w, mp):
    from dvlib.models import build

    weights = w / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in build("smallcnn", 4, weights="random").backbone.state_dict().items()},
              str(weights))
    args = [a if a != "random" else str(weights) for a in FINETUNE]
    return ["site", "finetune", "--data", g.site_a, *args, "--out", weights], [w], \
        ["--out is also the input --weights", weights]


@case
def case_finetune_save_split_onto_patients_csv(g, w, mp):
    site = copy_site(g.site_a, w / "site")
    return ["site", "finetune", "--data", site, *FINETUNE, "--out", w / "v.dv.safetensors",
            "--save-split", site / "patients.csv"], [w], ["--save-split is also the input patients.csv", "patients.csv"]


@case
def case_finetune_weights_pickle_no_weights_only_false_advice(g, w, mp):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {w / 'PWNED'}",))
    (w / "evil.pth").write_bytes(pickle.dumps({"features.0.weight": Evil()}))
    args = [a if a != "random" else str(w / "evil.pth") for a in FINETUNE]
    return ["site", "finetune", "--data", g.site_a, *args, "--out", w / "v.dv.safetensors"], [w], \
        [w / "evil.pth", "refused", "never runs code"]


@case
def case_merge_weights_garbage_safetensors(g, w, mp):
    (w / "w.safetensors").write_bytes(b"\xff" * 64)
    return ["merge", g.a, g.b, "--weights", w / "w.safetensors", "--out", w / "m.safetensors"], [w], \
        [w / "w.safetensors"]


@case
def case_merge_weights_of_another_network(g, w, mp):
    torch.save({"a": torch.ones(1)}, w / "other.pt")
    return ["merge", g.a, g.b, "--weights", w / "other.pt", "--out", w / "m.safetensors"], [w], \
        ["other.pt", "do not fit smallcnn", "unexpected keys a"]


@case
def case_restore_image_size_negative(g, w, mp):
    return ["site", "restore", g.merged, "--data", g.site_a, "--image-size", "-1", "--out", w / "r.safetensors"], \
        [w], ["--image-size", "'-1'", "[1, 4096]"]


@case
def case_restore_batch_size_one(g, w, mp):
    return ["site", "restore", g.merged, "--data", g.site_a, "--batch-size", "1", "--out", w / "r.safetensors"], \
        [w], ["--batch-size", "'1'", ">= 2"]


@case
def case_merge_lam_negative(g, w, mp):
    return ["merge", g.a, g.b, "--lam", "-1", "--out", w / "m.safetensors"], [w], ["--lam", "'-1'"]


@case
def case_merge_lam_nan(g, w, mp):
    return ["merge", g.a, g.b, "--lam", "nan", "--out", w / "m.safetensors"], [w], ["--lam", "'nan'", "finite"]


@case
def case_finetune_test_frac_one(g, w, mp):
    return ["site", "finetune", "--data", g.site_a, *FINETUNE, "--test-frac", "1", "--out", w / "v.dv.safetensors"], \
        [w], ["--test-frac", "'1'"]


@case
def case_finetune_epochs_zero(g, w, mp):
    return ["site", "finetune", "--data", g.site_a, *FINETUNE, "--epochs", "0", "--out", w / "v.dv.safetensors"], \
        [w], ["--epochs", "'0'"]


@case
def case_unknown_flag(g, w, mp):
    return ["merge", g.a, g.b, "--lambda", "0.5", "--out", w / "m.safetensors"], [w], ["unrecognized arguments", "--lambda"]


@case
def case_merge_truncated(g, w, mp):
    cut = w / "cut.dv.safetensors"
    cut.write_bytes(g.b.read_bytes()[:5000])
    return ["merge", g.a, cut, "--out", w / "m.safetensors"], [w], [cut, "truncated"]


@case
def case_merge_empty_file(g, w, mp):
    (w / "empty.dv.safetensors").write_bytes(b"")
    return ["merge", g.a, w / "empty.dv.safetensors", "--out", w / "m.safetensors"], [w], ["empty.dv.safetensors", "0 bytes"]


@case
def case_merge_pickle_pt(g, w, mp):
    torch.save({"a": torch.ones(2)}, w / "site_b.pt")
    return ["merge", g.a, w / "site_b.pt", "--out", w / "m.safetensors"], [w], ["site_b.pt", "pickle files are refused"]


@case
def case_merge_pickle_disguised(g, w, mp):
    (w / "b.dv.safetensors").write_bytes(pickle.dumps({"vector/x": [1.0]}))
    return ["merge", g.a, w / "b.dv.safetensors", "--out", w / "m.safetensors"], [w], \
        ["b.dv.safetensors", "pickle files are refused"]


@case
def case_merge_nan_in_a_tensor(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", tensors={f"vector/{KEY}": poison(float("nan"))})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], [bad, f"vector/{KEY}", "1 NaN"]


@case
def case_merge_newer_format(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", meta={"format_version": 99})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], [bad, "format_version 99", "upgrade dvlib"]


@case
def case_merge_class_order(g, w, mp):
    raw, _ = read_raw(g.b)
    classes = json.loads(raw["dvlib"])["classes"]
    bad = edit(g.b, w / "b.dv.safetensors", meta={"classes": classes[::-1]})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], [bad, "same classes in a different order"]


@case
def case_merge_other_pretrained_weights(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", meta={"pretrained_sha256": "0" * 64})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], [bad, "pretrained_sha256", "other weights"]


@case
def case_merge_extra_tensor_in_both(g, w, mp):
    """Both files agree on a tensor the network does not have: the pretrained model names it."""
    extra = {"vector/backbone.extra.weight": torch.ones(3)}
    a, b = edit(g.a, w / "a.dv.safetensors", add=extra), edit(g.b, w / "b.dv.safetensors", add=extra)
    return ["merge", a, b, "--out", w / "m.safetensors"], [w], ["backbone.extra.weight"]


@case
def case_merge_extra_head_tensor_in_both(g, w, mp):
    """An extra head/ tensor has no pretrained value: the merged output is checked against the network."""
    extra = {"head/head.extra": torch.ones(4)}
    a, b = edit(g.a, w / "a.dv.safetensors", add=extra), edit(g.b, w / "b.dv.safetensors", add=extra)
    return ["merge", a, b, "--out", w / "m.safetensors"], [w], ["does not fit its metadata", "head.extra"]


@case
def case_merge_head_does_not_match_class_count(g, w, mp):
    raw, _ = read_raw(g.a)
    five = json.loads(raw["dvlib"])["classes"] + ["zebra"]
    a, b = edit(g.a, w / "a.dv.safetensors", meta={"classes": five}), edit(g.b, w / "b.dv.safetensors", meta={"classes": five})
    return ["merge", a, b, "--out", w / "m.safetensors"], [w], ["head/head.weight", "4 outputs", "5 classes"]


@case
def case_merge_missing_tensor(g, w, mp):
    raw, ts = read_raw(g.b)
    del ts[f"vector/{KEY}"]
    raw.pop("dvlib_order")
    save_file(ts, str(w / "b.dv.safetensors"), metadata=raw)
    return ["merge", g.a, w / "b.dv.safetensors", "--out", w / "m.safetensors"], [w], ["b.dv.safetensors", f"missing key '{KEY}'"]


@case
def case_merge_single_file(g, w, mp):
    return ["merge", g.a, "--out", w / "m.safetensors"], [w], ["at least 2", g.a]


@case
def case_merge_missing_input(g, w, mp):
    return ["merge", g.a, w / "gone.dv.safetensors", "--out", w / "m.safetensors"], [w], ["gone.dv.safetensors", "not found"]


@case
def case_merge_input_is_a_folder(g, w, mp):
    (w / "dir.dv.safetensors").mkdir()
    return ["merge", g.a, w / "dir.dv.safetensors", "--out", w / "m.safetensors"], [w], ["dir.dv.safetensors", "is a folder"]


@case
def case_merge_metadata_not_json(g, w, mp):
    raw, ts = read_raw(g.b)
    raw["dvlib"] = "{not json"
    save_file(ts, str(w / "b.dv.safetensors"), metadata=raw)
    return ["merge", g.a, w / "b.dv.safetensors", "--out", w / "m.safetensors"], [w], ["b.dv.safetensors", "corrupt dvlib metadata"]


@case
def case_merge_metadata_huge_number(g, w, mp):
    raw, ts = read_raw(g.b)
    raw["dvlib"] = raw["dvlib"].replace('"image_size": 32', '"image_size": 1e400')
    save_file(ts, str(w / "b.dv.safetensors"), metadata=raw)
    return ["merge", g.a, w / "b.dv.safetensors", "--out", w / "m.safetensors"], [w], ["'image_size'", "inf"]


@case
def case_merge_metadata_other_types(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", meta={"split": "seed 0", "hyperparameters": [1], "site": "a\x1b[2Jb",
                                                    "sample_count": -3})
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], \
        [bad, "'split'", "'hyperparameters'", "'site'", "'sample_count'"]


@case
def case_merge_metadata_missing_key(g, w, mp):
    bad = edit(g.b, w / "b.dv.safetensors", drop_meta=["pretrained_sha256", "classes"])
    return ["merge", g.a, bad, "--out", w / "m.safetensors"], [w], \
        [bad, "lacks 'pretrained_sha256'", "lacks 'classes'"]


@case
def case_merge_a_model_file_as_a_site(g, w, mp):
    return ["merge", g.a, g.merged, "--out", w / "m.safetensors"], [w], [g.merged, "not a site's vector file"]


@case
def case_restore_a_vector_file(g, w, mp):
    return ["site", "restore", g.a, "--data", g.site_a, "--out", w / "r.safetensors"], [w], [g.a, "vector file"]


@case
def case_restore_out_is_the_model(g, w, mp):
    m = shutil.copy(g.merged, w / "m.safetensors")
    return ["site", "restore", m, "--data", g.site_a, "--out", m], [w], ["is also an input", m]


@case
def case_restore_model_with_bad_visit_records(g, w, mp):
    bad = edit(g.merged, w / "m.safetensors", meta={"restore_visits": [{"site": 3, "mode": "recalibrate"}]})
    return ["site", "restore", bad, "--data", g.site_a, "--out", w / "r.safetensors"], [w], [bad, "restore_visits[0]"]


@case
def case_restore_model_with_bad_split_record(g, w, mp):
    bad = edit(g.merged, w / "m.safetensors", meta={"split": {"seed": "zero", "test_frac": 7}})
    return ["site", "restore", bad, "--data", g.site_a, "--out", w / "r.safetensors"], [w], \
        [bad, "'split.seed'", "'split.test_frac'"]


@case
def case_restore_manifest_without_rows(g, w, mp):
    (w / "split.csv").write_text("image,patient,label,hospital,subset\n")
    return ["site", "restore", g.merged, "--data", g.site_a, "--manifest", w / "split.csv", "--out", w / "r.safetensors"], \
        [w], [w / "split.csv", "lists no images"]


@case
def case_restore_manifest_with_empty_cells(g, w, mp):
    (w / "split.csv").write_text("image,patient,label,hospital,subset\nbar/x,,bar,1,train\n")
    return ["site", "restore", g.merged, "--data", g.site_a, "--manifest", w / "split.csv", "--out", w / "r.safetensors"], \
        [w], [w / "split.csv", "'patient' has empty cells", "row 2"]


@case
def case_finetune_class_name_with_a_control_character(g, w, mp):
    return ["site", "finetune", "--data", g.site_a, *FINETUNE, "--classes", "bar", "disc", "ring", "spots", "x\x1b[2J",
            "--out", w / "v.dv.safetensors"], [w], ["--classes class name", "printable"]


@case
def case_inspect_a_pickle(g, w, mp):
    torch.save({"a": 1}, w / "x.safetensors")
    return ["inspect", w / "x.safetensors"], [w], ["x.safetensors", "pickle files are refused"]


@case
def case_split_missing_dataset_leaves_no_run(g, w, mp):
    runs = w / "runs"
    return ["split", "--run", "s2", "--preset", "smoke", "--dataset", w / "missing", "--runs-dir", runs], [w], \
        ["missing", "unknown dataset"]


@case
def case_split_invalid_run_name(g, w, mp):
    return ["split", "--run", "../escape", "--preset", "smoke", "--runs-dir", w / "runs"], [w], ["invalid run name", "../escape"]


@case
def case_split_corrupt_run_json(g, w, mp):
    (w / "runs" / "r").mkdir(parents=True)
    (w / "runs" / "r" / "run.json").write_text("[1, 2]")
    return ["split", "--run", "r", "--preset", "smoke", "--runs-dir", w / "runs"], [w], ["run.json", "not a run's settings"]


@case
def case_split_run_json_field_of_another_type(g, w, mp):
    (w / "runs" / "r").mkdir(parents=True)
    (w / "runs" / "r" / "run.json").write_text(json.dumps({"preset": "smoke", "epochs": "many"}))
    return ["split", "--run", "r", "--runs-dir", w / "runs", "--preset", "smoke"], [w], \
        ["run.json", "'epochs' must be of type int", "'many'"]


@case
def case_finetune_hospital_not_a_number(g, w, mp):
    return ["finetune", "--run", "r", "--preset", "smoke", "--runs-dir", w / "runs", "--hospitals", "one"], [w], \
        ["--hospitals", "'one'"]


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, good, work, monkeypatch, capsys):
    argv, watch, needles, *code = CASES[name](good, work, monkeypatch)
    run_cli(capsys, argv, [*watch, good.root], *needles, code=code[0] if code else 2)
    assert not (work / "PWNED").exists()  # no pickle's code ran
    if name.startswith("split_missing_dataset"):  # the corrected command is not refused
        assert main(["split", "--run", "s2", "--preset", "smoke", "--dataset", "synthetic",
                     "--runs-dir", str(work / "runs")]) == 0


def test_the_catalogue_is_large():
    assert len(CASES) >= 40


def test_torch_advice_is_not_passed_on(good, work, capsys):
    (work / "evil.pth").write_bytes(pickle.dumps(SimpleNamespace(a=1)))
    args = [a if a != "random" else str(work / "evil.pth") for a in FINETUNE]
    err = run_cli(capsys, ["site", "finetune", "--data", good.site_a, *args, "--out", work / "v.dv.safetensors"],
                  [work], work / "evil.pth")
    assert "weights_only=False" not in err.replace("`", "").replace(" set to ", "=") and "re-run" not in err.lower()


# ------------------------------------------------------------------- writes, locks, signals, sidecars

def test_sidecars_are_never_read(good, work, capsys):
    """A JSON file beside a model file (the old sidecar) does not override what the file carries."""
    a, b = shutil.copy(good.a, work / "a.dv.safetensors"), shutil.copy(good.b, work / "b.dv.safetensors")
    for p in (a, b):
        Path(p).with_suffix(".json").write_text(json.dumps({"weights": "/etc/passwd", "classes": ["x", "y"]}))
        Path(str(p).removesuffix(".safetensors") + ".json").write_text(json.dumps({"kind": "merged"}))
    assert main(["merge", str(a), str(b), "--out", str(work / "m.safetensors")]) == 0
    (work / "m.json").write_text(json.dumps({"kind": "site_vector", "classes": ["x", "y"], "restore_visits": 7}))
    assert main(["site", "restore", str(work / "m.safetensors"), "--data", str(good.site_a),
                 "--out", str(work / "r.safetensors")]) == 0
    from dvlib.files import load_model

    meta = load_model(work / "r.safetensors").meta
    assert meta["classes"] == load_model(good.merged).meta["classes"] and meta["weights"] == "random"
    assert [v["site"] for v in meta["restore_visits"]] == ["site_a"]
    assert not (work / "r.json").exists()


def test_a_model_file_is_complete_when_it_is_renamed_into_place(good, work, monkeypatch):
    """One rename per model file, and at that moment the file already holds its metadata and reads back."""
    from dvlib.files import read

    renames = []
    real = os.replace

    def checking(src, dst):
        meta, tensors = read(src)  # every check a reader applies
        renames.append((Path(dst).name, meta["kind"], len(tensors)))
        real(src, dst)
    monkeypatch.setattr(os, "replace", checking)
    assert main(["merge", str(good.a), str(good.b), "--out", str(work / "m.safetensors")]) == 0
    assert renames == [("m.safetensors", "merged", renames[0][2])] and renames[0][2] > 10
    assert sorted(p.name for p in work.iterdir()) == ["m.safetensors"]


def test_file_modes_are_what_the_docs_say(good, work):
    """docs/multi-site.md: model and vector files 0600 whatever the umask; results 0666 less the umask."""
    old = os.umask(0o022)
    try:
        assert main(["merge", str(good.a), str(good.b), "--out", str(work / "m.safetensors")]) == 0
        assert main(["evaluate", str(work / "m.safetensors"), "--data", str(good.site_a), "--out", str(work / "ev")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in work.iterdir()}
    assert modes == {"m.safetensors": 0o600, "ev.eval.csv": 0o644, "ev.eval.json": 0o644, "ev.confusion.png": 0o644}
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in (good.a, good.b, good.merged))
    doc = (PROJECT / "docs" / "multi-site.md").read_text()
    assert "`0600`, whatever the umask" in doc and "`0644` under the usual umask `022`" in doc


def test_keyboard_interrupt_mid_write_exits_130_and_leaves_nothing(good, work, monkeypatch, capsys):
    import safetensors.torch as st

    real = st.save_file

    def interrupted(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the temporary file is complete
        raise KeyboardInterrupt
    monkeypatch.setattr(st, "save_file", interrupted)
    err = run_cli(capsys, ["merge", good.a, good.b, "--out", work / "m.safetensors"], [work], "interrupted", code=130)
    assert len(err.strip().splitlines()) == 1


_KILLER = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch as st
    real = st.save_file
    def dying(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the temporary file is written, not yet renamed
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    st.save_file = dying
    from dvlib.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def _dvlib_dying(sig: str, *argv) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", _KILLER, sig, *map(str, argv)], check=False, cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_sigkill_mid_write_leaves_a_temp_file_the_next_write_removes(good, work, capsys):
    out = work / "m.safetensors"
    proc = _dvlib_dying("SIGKILL", "merge", good.a, good.b, "--out", out)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [p.name for p in work.iterdir()]
    assert len(left) == 1 and is_temp_name(left[0]) and left[0].startswith(".m.safetensors.h"), left
    from dvlib.io import _HOST

    alive = work / f".other.safetensors.h{_HOST}.pid{os.getpid()}.abc123.safetensors.dvlib-tmp"  # a live writer's
    elsewhere = work / f".x.safetensors.h{'0' * 8 if _HOST != '0' * 8 else '1' * 8}.pid4194999.q.dvlib-tmp"  # a dead pid here
    for p in (alive, elsewhere):  # another machine's writer (a shared folder): its pid means nothing here
        p.write_bytes(b"")
    assert main(["merge", str(good.a), str(good.b), "--out", str(work / "n.safetensors")]) == 0
    assert sorted(p.name for p in work.iterdir()) == sorted(["n.safetensors", alive.name, elsewhere.name])


def test_sigterm_mid_write_exits_143_and_leaves_nothing(good, work):
    before = snapshot(work)
    proc = _dvlib_dying("SIGTERM", "merge", good.a, good.b, "--out", work / "m.safetensors")
    assert proc.returncode == 143, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip() == "dvlib: terminated; files being written were discarded"
    assert snapshot(work) == before


def _unshare_ok() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs root and unshare for a private tmpfs")
def _can_mount_privately() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_privately(), reason="needs `unshare -m` and tmpfs mounts (root in a VM)")
def test_real_read_only_folder_and_real_full_disk(good, work):
    """The same as the monkeypatched cases, on a real read-only tmpfs and a real 64 KiB one (private
    mount namespace: nothing outside this test sees them)."""
    ro, full = work / "ro", work / "full"
    ro.mkdir(), full.mkdir()
    script = textwrap.dedent(f"""
        set -e
        mount -t tmpfs -o ro,size=64k tmpfs {ro}
        mount -t tmpfs -o size=64k tmpfs {full}
        {sys.executable} - <<'EOF'
        import os
        from dvlib.cli import main
        print("rc", main(["merge", "{good.a}", "{good.b}", "--out", "{ro}/m.safetensors"]))
        print("rc", main(["merge", "{good.a}", "{good.b}", "--out", "{full}/m.safetensors"]))
        print("left", sorted(os.listdir("{ro}")), sorted(os.listdir("{full}")))
        EOF
    """)
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], check=False, cwd=PROJECT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.splitlines() == ["rc 2", "rc 2", "left [] []"], proc.stdout + proc.stderr
    assert f"{ro}/m.safetensors: cannot write (read-only file system)" in proc.stderr
    assert f"{full}/m.safetensors: cannot write (no space left on the device)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_split_overwrite_is_refused_while_another_command_holds_the_run(good, work, capsys):
    runs = work / "runs"
    assert main(["split", "--run", "r", "--preset", "smoke", "--runs-dir", str(runs)]) == 0
    ckpt = runs / "r" / "split_0" / "train_0" / "models" / "hospital_1.dv.safetensors"
    ckpt.parent.mkdir(parents=True)
    shutil.copy(good.a, ckpt)  # what a working fine-tune has written so far
    holder = hold_lock(runs / "r" / ".lock")
    try:
        before = snapshot(runs / "r")
        before.pop(".lock")
        rc = main(["split", "--run", "r", "--preset", "smoke", "--epochs", "3", "--overwrite", "--runs-dir", str(runs)])
        err = capsys.readouterr().err
        after = snapshot(runs / "r")
        after.pop(".lock")
    finally:
        holder.kill()
        holder.wait()
    assert rc == 2 and "run 'r'" in err and "is in use by dvlib pid 4242" in err, err
    assert after == before and ckpt.exists()
    # once the other command is done, --overwrite starts the run afresh
    assert main(["split", "--run", "r", "--preset", "smoke", "--epochs", "3", "--overwrite", "--runs-dir", str(runs)]) == 0
    assert not ckpt.exists()


def test_finetune_holds_the_run_from_split_to_last_model(work, monkeypatch):
    """`dvlib finetune` keeps the lock between its split and its training: no gap for --overwrite."""
    import pandas as pd

    import dvlib.experiment as ex
    from dvlib import runs

    held = []

    def record(run, *a, **k):
        held.append(runs._HELD.get(str(run.dir.resolve()), 0))
        return pd.DataFrame(columns=["split_seed", "train_seed", "model", "eval_on", "n", "accuracy",
                                     "balanced_accuracy", "macro_f1", "auc_ovr"])
    monkeypatch.setattr(ex, "step_split", record)
    monkeypatch.setattr(ex, "step_finetune", record)
    assert main(["finetune", "--run", "r", "--preset", "smoke", "--runs-dir", str(work / "runs")]) == 0
    assert held == [1, 1]


# ------------------------------------------------------------------------------------------- fuzzing

def _split_file(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join_file(header: dict | str, body: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


ODD_VALUES = [None, True, False, -1, 0, 2**70, 1e308, float("inf"), float("nan"), "", "x" * 5000, [], {}, [1, "a"],
              {"seed": -5}, "../../etc/passwd", "/etc/passwd", "a\nb", 3.5]


def _corrupt(data: bytes, rng: random.Random) -> bytes:
    header, body = _split_file(data)
    kind = rng.randrange(8)
    if kind == 0:  # flip bytes anywhere
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if kind == 1:  # flip bytes in the header
        b = bytearray(data)
        n = struct.unpack("<Q", data[:8])[0]
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(8 + n)] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # truncated
        return data[:rng.randrange(len(data))]
    meta = json.loads(header["__metadata__"]["dvlib"])
    if kind == 3:  # a metadata value of another type or size
        meta[rng.choice(sorted(meta))] = rng.choice(ODD_VALUES)
    elif kind == 4:  # a missing metadata key
        meta.pop(rng.choice(sorted(meta)))
    elif kind == 5:  # a nested value edited (split, hyperparameters, metrics, classes)
        key = rng.choice(["split", "hyperparameters", "metrics", "classes", "train_class_counts"])
        v = meta.get(key)
        if isinstance(v, dict) and v:
            v[rng.choice(sorted(v))] = rng.choice(ODD_VALUES)
        elif isinstance(v, list) and v:
            v[rng.randrange(len(v))] = rng.choice(ODD_VALUES)
    elif kind == 6:  # an extra tensor (also under a section that exists), or one entry's header edited
        names = [k for k in header if k != "__metadata__"]
        if rng.random() < 0.5:
            n = rng.randint(1, 16)
            name = rng.choice(["vector/", "head/", "bn/", "", "other/"]) + rng.choice(
                ["backbone.extra.weight", "head.weight2", "backbone.features.1.running_var", names[0].split("/", 1)[-1]])
            if name not in header:
                header[name] = {"dtype": rng.choice(["F32", "F16", "I64", "F64"]), "shape": [n],
                                "data_offsets": [len(body), len(body) + 8 * n]}
                body = body + bytes(rng.randrange(256) for _ in range(8 * n))
        else:
            entry = header[rng.choice(names)]
            field = rng.choice(["dtype", "shape", "data_offsets"])
            entry[field] = rng.choice([["F32"], "BOOL", "I32", "F16", [], [2**40], [1, 2, 3], [0, 0], -1, None])
    else:  # huge or special numbers written as JSON text
        key = rng.choice(["image_size", "sample_count", "build_seed", "format_version"])
        text = json.dumps(meta).replace(f'"{key}": {json.dumps(meta.get(key))}',
                                        f'"{key}": {rng.choice(["1e400", "-1e400", "NaN", "Infinity", "1" * 400, "[[[[[[]]]]]]"])}')
        header["__metadata__"]["dvlib"] = text
        return _join_file(header, body)
    header["__metadata__"]["dvlib"] = json.dumps(meta)
    return _join_file(header, body)


def test_fuzz_corrupted_vector_files_are_refused_or_merge_finite(good, tmp_path):
    """Seeded random corruptions of a valid vector file: every one refused with a DvlibError or
    merged to a finite model that reads back; never another exception, never a stray file. The
    file also goes where `dvlib evaluate` takes a site's file (the model rebuilt, its recorded split
    reused at a site)."""
    from dvlib.cli.site_cmds import open_local_from
    from dvlib.coordinator import merge_files, open_model
    from dvlib.files import load_model

    flags = SimpleNamespace(data=str(good.site_a), split_seed=None, test_frac=None, manifest=None, hospital=None,
                            site=None)

    rng = random.Random(20240601)
    data = good.b.read_bytes()
    outcomes = {"refused": 0, "merged": 0}
    folder = tmp_path / "fuzz"
    folder.mkdir()
    bad, out = folder / "b.dv.safetensors", folder / "m.safetensors"
    t0 = time.perf_counter()
    for i in range(300):
        bad.write_bytes(_corrupt(data, rng))
        try:
            if i % 3 == 0:  # dvlib evaluate SITE_FILE --data DIR --split test
                _, meta = open_model(bad)
                open_local_from(flags, classes=meta["classes"], meta=meta)
            merge_files([good.a, bad], out)
        except DvlibError as e:
            assert str(e), i
            assert sorted(p.name for p in folder.iterdir()) == ["b.dv.safetensors"], (i, str(e))
            outcomes["refused"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"corruption {i}: {type(e).__name__}: {e}")
        else:
            mf = load_model(out)  # finite, with its metadata, the classes of the network
            assert all(torch.isfinite(t).all() for t in mf.state.values() if t.is_floating_point()), i
            assert mf.meta["kind"] == "merged" and len(mf.meta["sources"]) == 2
            out.unlink()
            outcomes["merged"] += 1
    assert outcomes["refused"] > 100 and outcomes["merged"] > 10, outcomes
    assert time.perf_counter() - t0 < 60
