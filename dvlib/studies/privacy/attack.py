"""Membership inference: how much a released model says about who was in its training set.

An attack gives every image a score (higher = "was a training member"); how well the scores separate
members (a hospital's training images) from non-members (images of the same distribution that the
model never saw: held-out patients) is the leak. We report the ROC AUC and, following Carlini et al.
2022 (LiRA, https://arxiv.org/abs/2112.03570), the TPR at a low FPR, which is what matters to a
patient: an attack that is confidently right about a few people is a leak even when its AUC is ~0.5.

Attacks (from per-image losses only, no shadow models):
- loss threshold (Yeom et al. 2018, https://arxiv.org/abs/1709.01604): score = -loss;
- reference-calibrated (Watson et al. 2022, https://arxiv.org/abs/2111.08440): score = loss under a
  reference model (here the pretrained one, which saw neither set) minus loss under the audited
  model, which removes how hard each image is anyway. LiRA is the principled (costly) version.

Every number comes with a bootstrap percentile interval: members and non-members are resampled
separately and, given ``groups`` (patient ids), whole patients are resampled, because several images
of one patient are not independent evidence. Pure numpy; errors raise :class:`DvlibError`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dvlib.io import DvlibError
from dvlib.privacy_budget import check_n_boot

FPRS = (0.01, 0.001)


def per_example_loss(probs, labels, eps: float = 1e-12) -> np.ndarray:
    """Cross-entropy -log p[y] per image from class probabilities [N, C] (clipped: no log 0)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 2 or y.shape != (p.shape[0],):
        raise DvlibError(f"probabilities of shape {p.shape} do not match labels of shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and (y.min() < 0 or y.max() >= p.shape[1])):
        raise DvlibError(f"labels must be class indices 0..{p.shape[1] - 1}, got {np.unique(y)[:10].tolist()}")
    if not np.isfinite(p).all():
        raise DvlibError(f"probabilities contain {int((~np.isfinite(p)).sum())} non-finite value(s)")
    return -np.log(np.clip(p[np.arange(len(y)), y], eps, 1.0))


def loss_from_p_true(p_true, eps: float = 1e-12) -> np.ndarray:
    """Cross-entropy -log p[y] per image from the probability of the true class alone (what
    ``dvlib.stages.evaluate`` reports as ``p_true``), clipped as :func:`per_example_loss` clips."""
    p = np.asarray(p_true, dtype=np.float64).reshape(-1)
    if not np.isfinite(p).all() or (p.size and (p.min() < 0 or p.max() > 1 + 1e-6)):
        raise DvlibError(f"p_true must be probabilities in [0, 1], got values in [{np.nanmin(p):.3g}, {np.nanmax(p):.3g}]")
    return -np.log(np.clip(p, eps, 1.0))


def loss_attack(loss) -> np.ndarray:
    """Yeom et al.'s attack: members have lower loss, so the score is -loss."""
    return -np.asarray(loss, dtype=np.float64)


def reference_attack(loss, reference_loss) -> np.ndarray:
    """Difficulty-calibrated score: how much lower the audited model's loss is than the reference's."""
    loss, ref = np.asarray(loss, dtype=np.float64), np.asarray(reference_loss, dtype=np.float64)
    if loss.shape != ref.shape:
        raise DvlibError(f"losses of shape {loss.shape} and reference losses of shape {ref.shape} differ")
    return ref - loss


def _check(scores, is_member) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    m = np.asarray(is_member)
    if m.shape != s.shape:
        raise DvlibError(f"{s.size} scores but is_member has shape {m.shape}")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise DvlibError(f"is_member must be boolean or 0/1, got values {np.unique(m)[:5].tolist()}")
        m = m.astype(bool)
    if not np.isfinite(s).all():
        raise DvlibError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite value(s)")
    if m.all() or not m.any():
        raise DvlibError(f"need members and non-members, got {int(m.sum())} members of {m.size}")
    return s, m


def _curves(s: np.ndarray, w_pos: np.ndarray, w_neg: np.ndarray):
    """Empirical ROC for weights [B, N] (bootstrap counts; ones for the plain curve): rows of FPR and
    TPR at every distinct threshold t (call "member" iff score >= t), from (0, 0) to (1, 1)."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    starts = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])  # one block per distinct score
    tp = np.cumsum(np.add.reduceat(w_pos[:, order], starts, axis=1), axis=1)
    fp = np.cumsum(np.add.reduceat(w_neg[:, order], starts, axis=1), axis=1)
    zero = np.zeros((tp.shape[0], 1))
    tpr = np.hstack([zero, tp / tp[:, -1:]])
    fpr = np.hstack([zero, fp / fp[:, -1:]])
    return fpr, tpr, np.r_[np.inf, s_sorted[starts]]


def _auc(fpr, tpr) -> np.ndarray:
    # trapezoids: a block of tied scores is a diagonal segment, i.e. ties count half
    return np.sum(np.diff(fpr, axis=1) * (tpr[:, 1:] + tpr[:, :-1]) / 2, axis=1)


def _tpr_at(fpr, tpr, target: float) -> np.ndarray:
    return np.where(fpr <= target + 1e-12, tpr, 0.0).max(axis=1)


def _check_fpr(fpr: float) -> float:
    if not 0 < fpr < 1:
        raise DvlibError(f"target FPR must be in (0, 1), got {fpr!r}")
    return float(fpr)


def roc_curve(scores, is_member) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) of the exact empirical ROC, starting at (0, 0) with threshold +inf."""
    s, m = _check(scores, is_member)
    fpr, tpr, thr = _curves(s, m[None].astype(float), (~m)[None].astype(float))
    return fpr[0], tpr[0], thr


def roc_auc(scores, is_member) -> float:
    """P(score of a random member > score of a random non-member), ties counted half."""
    fpr, tpr, _ = roc_curve(scores, is_member)
    return float(_auc(fpr[None], tpr[None])[0])


def tpr_at_fpr(scores, is_member, fpr: float) -> float:
    """Highest TPR of any threshold whose FPR is <= ``fpr`` (0 if only "nobody" qualifies)."""
    f, t, _ = roc_curve(scores, is_member)
    return float(_tpr_at(f[None], t[None], _check_fpr(fpr))[0])


def thin_roc(fpr, tpr, points: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """At most ``points`` vertices of an ROC curve, for plotting: the first and last, and around
    each of about ``points / 3`` FPR values (half log-spaced down to 1e-4, half linear) the vertices
    on either side of it. Only vertices of the exact curve are kept, so the thinned curve lies on it; the
    low-FPR corner keeps its detail on log axes."""
    f, t = np.asarray(fpr, dtype=np.float64), np.asarray(tpr, dtype=np.float64)
    if f.shape != t.shape or f.ndim != 1 or f.size < 2 or np.any(np.diff(f) < 0) or np.any(np.diff(t) < 0):
        raise DvlibError("thin_roc needs an ROC curve: fpr and tpr of one shape, both non-decreasing")
    if f.size <= points:
        return f, t
    half = max((points - 2) // 6, 1)  # 2 * half grid values, at most 3 vertices each
    grid = np.unique(np.r_[np.logspace(-4, 0, half), np.linspace(0, 1, half)])
    last_below = np.searchsorted(f, grid, side="right") - 1  # the staircase's top at each grid value
    first_above = np.minimum(np.searchsorted(f, grid, side="left"), f.size - 1)
    keep = np.unique(np.r_[0, f.size - 1, np.clip(last_below, 0, None), first_above,
                           np.minimum(np.clip(last_below, 0, None) + 1, f.size - 1)])
    return f[keep], t[keep]


@dataclass(frozen=True)
class Audit:
    """One attack on one model: estimates with bootstrap percentile intervals and the sample sizes.

    ``tpr[fpr] = (estimate, low, high)``. With fewer than 1/fpr non-members the only FPR <= fpr that
    can be observed is 0, so that TPR is a TPR at FPR 0 (``min_fpr`` = 1 / n_nonmembers says so).
    """

    auc: float
    auc_low: float
    auc_high: float
    tpr: dict = field(default_factory=dict)
    n_members: int = 0
    n_nonmembers: int = 0
    member_groups: int = 0
    nonmember_groups: int = 0
    n_boot: int = 0
    confidence: float = 0.95

    @property
    def min_fpr(self) -> float:
        return 1.0 / self.n_nonmembers


def _boot_weights(mask: np.ndarray, groups: np.ndarray, n_boot: int, rng) -> tuple[np.ndarray, int]:
    """Bootstrap counts [n_boot, N] for the images in ``mask``: groups drawn with replacement, each
    image weighted by how often its group was drawn (0 outside ``mask``)."""
    _, gi = np.unique(groups[mask], return_inverse=True)
    k = int(gi.max()) + 1
    counts = rng.multinomial(k, np.full(k, 1.0 / k), size=n_boot)
    w = np.zeros((n_boot, mask.size))
    w[:, mask] = counts[:, gi.reshape(-1)]
    return w, k


def audit(scores, is_member, groups=None, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95,
          fprs=FPRS) -> Audit:
    """AUC and TPR at each of ``fprs``, each with a percentile interval from ``n_boot`` resamples
    (members and non-members separately; whole groups when ``groups`` gives each image's patient)."""
    s, m = _check(scores, is_member)
    fprs = tuple(_check_fpr(f) for f in fprs)
    n_boot = check_n_boot(n_boot)
    if not 0 < confidence < 1:
        raise DvlibError(f"confidence must be in (0, 1), got {confidence!r}")
    g = np.arange(s.size) if groups is None else np.asarray(groups)
    if g.shape != s.shape:
        raise DvlibError(f"{s.size} scores but groups has shape {g.shape}")
    rng = np.random.default_rng(seed)
    w_pos, kp = _boot_weights(m, g, n_boot, rng)
    w_neg, kn = _boot_weights(~m, g, n_boot, rng)
    fpr, tpr, _ = _curves(s, np.vstack([m, w_pos]), np.vstack([~m, w_neg]))  # row 0: the data itself
    q = [(1 - confidence) / 2, (1 + confidence) / 2]

    def est(v):
        lo, hi = np.quantile(v[1:], q)
        return float(v[0]), float(lo), float(hi)

    auc = est(_auc(fpr, tpr))
    return Audit(*auc, tpr={f: est(_tpr_at(fpr, tpr, f)) for f in fprs}, n_members=int(m.sum()),
                 n_nonmembers=int((~m).sum()), member_groups=kp, nonmember_groups=kn, n_boot=n_boot,
                 confidence=confidence)


def audit_rows(audits) -> list[dict]:
    """Tidy rows for a CSV from ``{(model, attack): Audit}``: model, attack, auc, auc_low, auc_high,
    tpr@1%, tpr@1%_low, tpr@1%_high, ..., min_fpr, n_members, n_nonmembers, groups, n_boot, confidence."""
    rows = []
    for (model, attack), a in audits.items():
        row = {"model": model, "attack": attack, "auc": a.auc, "auc_low": a.auc_low, "auc_high": a.auc_high}
        for f, (e, lo, hi) in a.tpr.items():
            name = f"tpr@{f * 100:g}%"
            row.update({name: e, f"{name}_low": lo, f"{name}_high": hi})
        row.update({"min_fpr": a.min_fpr, "n_members": a.n_members, "n_nonmembers": a.n_nonmembers,
                    "member_groups": a.member_groups, "nonmember_groups": a.nonmember_groups,
                    "n_boot": a.n_boot, "confidence": a.confidence})
        rows.append(row)
    return rows
