"""Differentially private local fine-tuning: DP-SGD (Abadi et al. 2016) with Opacus' building blocks.

Each step draws a Poisson batch (every image independently with probability q = batch_size / n, as
the accountant assumes), computes every image's own gradient, clips it to norm ``max_grad_norm``,
sums, adds Gaussian noise of std ``sigma * max_grad_norm``, divides by the expected batch size and
hands the result to Adam (post-processing: no extra privacy cost). An epoch is round(n / batch_size)
such steps. ``sigma`` is the smallest noise that keeps Opacus' RDP accountant at ``target_epsilon``
after all steps, with delta = 1/n by default (the usual advice is delta well below 1/n: a mechanism
that publishes one random image in full is (0, 1/n)-DP); a delta given must be below
:data:`dvlib.privacy_budget.DELTA_FACTOR` / n, and epsilon finite and > 0.

BatchNorm mixes the images of a batch, so it has no per-image gradient: Opacus refuses it. We keep
the pretrained BatchNorm layers frozen (eval mode: running statistics used, never updated; affine
parameters not trained), which makes the network a per-image function. Opacus' validator does not
check this for us: it skips modules without trainable parameters, so a frozen-parameter BatchNorm
left in train mode (batch statistics, a privacy leak) would pass; and it matches layer types exactly,
so timm's ``BatchNormAct2d`` is not recognised as BatchNorm at all (GradSampleHooks' buffer check is
what rejects it when trainable).

Per-image gradients of convolutions: :mod:`~dvlib.studies.privacy.grad_sample`.

Not covered by the guarantee: anything computed from the private data outside these steps, e.g.
class weights from the hospital's label counts (pass public or uniform weights for a strict
guarantee) and the training loss in the history. Noise comes from torch's seeded PRNG (Opacus'
``secure_mode`` would be needed against floating-point attacks in production).
"""
from __future__ import annotations

import functools
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dvlib.io import DvlibError
from dvlib.loader import ImageCache, augment, draw_params
from dvlib.privacy_budget import check_epsilon, resolve_delta
from dvlib.studies.privacy.grad_sample import GRAD_SAMPLERS, grad_sample_hooks

TRAINABLE = ("all_but_bn", "head")
# the last stages of each network (and the new head): the cheaper variant measured against all_but_bn
# (EfficientNet-Lite0: blocks 5-6, conv_head, the pretrained classifier; backward stops at block 5)
LAST_STAGES = {
    "efficientnet_lite0": ("backbone.blocks.5", "backbone.blocks.6", "backbone.conv_head", "backbone.classifier",
                           "head."),
    "resnet50": ("backbone.layer4", "backbone.fc", "head."),
    "smallcnn": ("backbone.features.9", "backbone.fc", "head."),
}
VARIANTS = ("all_but_bn", "last_stages", "head")


def resolve_trainable(trainable, arch: str):
    """What :func:`select_trainable` takes for a variant name: ``"last_stages"`` becomes the
    network's :data:`LAST_STAGES` prefixes; ``"all_but_bn"``, ``"head"`` and prefix sequences pass."""
    if trainable == "last_stages":
        if arch not in LAST_STAGES:
            raise DvlibError(f"no last_stages defined for arch {arch!r}; known: {', '.join(LAST_STAGES)}")
        return LAST_STAGES[arch]
    if isinstance(trainable, str) and trainable not in TRAINABLE:
        raise DvlibError(f"trainable must be one of {', '.join(VARIANTS)} or a sequence of parameter name "
                         f"prefixes, got {trainable!r}")
    return tuple(trainable) if isinstance(trainable, list) else trainable


def trainable_label(trainable) -> str:
    """A variant's name for records and folder names (prefix sequences joined with '+')."""
    return trainable if isinstance(trainable, str) else "+".join(t.rstrip(".") for t in trainable)


def freeze_batchnorm(model: nn.Module) -> list[str]:
    """Put every BatchNorm layer in eval mode with its affine parameters frozen; returns their names."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
            names.append(name)
    return names


def select_trainable(model: nn.Module, trainable="all_but_bn") -> list[str]:
    """Set ``requires_grad``: ``"all_but_bn"``, ``"head"`` (``head.*`` only) or a sequence of parameter
    name prefixes (e.g. the last blocks); BatchNorm parameters are never trained. Returns the names."""
    bn = {f"{n}.{p}" if n else p for n, m in model.named_modules()
          if isinstance(m, nn.modules.batchnorm._BatchNorm) for p, _ in m.named_parameters(recurse=False)}
    if trainable == "all_but_bn":
        keep = lambda n: True  # noqa: E731
    elif trainable == "head":
        keep = lambda n: n.startswith("head.")  # noqa: E731
    elif isinstance(trainable, (list, tuple)) and trainable and all(isinstance(t, str) for t in trainable):
        keep = lambda n: n.startswith(tuple(trainable))  # noqa: E731
    else:
        raise DvlibError(f"trainable must be one of {', '.join(TRAINABLE)} or a sequence of parameter "
                         f"name prefixes, got {trainable!r}")
    names = []
    for n, p in model.named_parameters():
        p.requires_grad_(keep(n) and n not in bn)
        if p.requires_grad:
            names.append(n)
    if not names:
        raise DvlibError(f"trainable={trainable!r} selects no parameter outside BatchNorm")
    return names


@functools.lru_cache(maxsize=64)
def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                     accountant: str = "rdp") -> float:
    """Smallest noise multiplier (within Opacus' search tolerance) that keeps epsilon <= target
    (a binary search over the accountant: seconds, hence cached)."""
    from opacus.accountants.utils import get_noise_multiplier

    # Opacus' search starts at noise 10 and returns it for an infinite target: refuse rather than mislabel
    check_epsilon(target_epsilon, "target_epsilon")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
            return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                              sample_rate=sample_rate, steps=steps, accountant=accountant))
    except ValueError as e:
        raise DvlibError(f"target_epsilon={target_epsilon} with delta={delta}, sample rate {sample_rate:.4g} "
                         f"and {steps} steps: {e}") from e


def _epsilon(acc, delta: float) -> float:
    # Opacus' RDP -> (epsilon, delta) conversion (Balle et al. 2020) goes below 0 for large noise and
    # large delta; every epsilon >= 0 holds then, so 0 is the bound
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Optimal order is the", UserWarning)
        return max(0.0, float(acc.get_epsilon(delta=delta)))


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of ``steps`` sampled Gaussian mechanism steps, as Opacus' accountant computes it."""
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return _epsilon(acc, delta)


def fit_dp(model: nn.Module, cache: ImageCache, rows: torch.Tensor, labels: torch.Tensor, *, epochs: int,
           batch_size: int, lr: float, size: int, seed: int, target_epsilon: float, delta: float | None = None,
           max_grad_norm: float = 1.0, class_weight: torch.Tensor | None = None, trainable="all_but_bn",
           device: torch.device | str = "cpu", accountant: str = "rdp", grad_sampler: str = "dvlib") -> list[dict]:
    """Fine-tune ``model`` in place with DP-SGD (Adam on the noisy clipped gradients) to
    (``target_epsilon``, ``delta``)-DP; returns per-epoch rows with the epsilon spent so far.

    ``delta``: default 1/n (n: the training images), else below ``DELTA_FACTOR / n``
    (:mod:`dvlib.privacy_budget`). ``trainable``: see :func:`select_trainable`. ``class_weight``
    multiplies each image's loss before clipping. ``grad_sampler``: ``"dvlib"``
    (:func:`~dvlib.studies.privacy.grad_sample.conv2d_grad_sample`), ``"opacus"`` or ``"functorch"``.
    Hooks are attached to ``model`` itself (Opacus' non-wrapping GradSampleHooks, not GradSampleModule,
    whose state dict keys carry a ``_module.`` prefix). Afterwards ``model`` is a plain module again
    (no hooks, no Opacus attributes, original ``requires_grad``), in eval mode, with its BatchNorm
    statistics and affine parameters untouched.
    """
    from opacus.accountants import create_accountant
    from opacus.optimizers import DPOptimizer
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler
    from opacus.validators import ModuleValidator

    n = len(rows)
    if n == 0:
        raise DvlibError("fit_dp: no training images")
    if len(labels) != n:
        raise DvlibError(f"fit_dp: {n} rows but {len(labels)} labels")
    if not 1 <= batch_size <= n:
        raise DvlibError(f"batch_size must be in 1..{n} (the training images), got {batch_size}")
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
    if epochs < 1 or not max_grad_norm > 0:
        raise DvlibError(f"need epochs >= 1 and max_grad_norm > 0; got {epochs}, {max_grad_norm}")
    if grad_sampler not in GRAD_SAMPLERS:
        raise DvlibError(f"grad_sampler must be one of {', '.join(GRAD_SAMPLERS)}, got {grad_sampler!r}")
    delta = resolve_delta(delta, n)
    device = torch.device(device)
    q = batch_size / n
    steps_per_epoch = max(1, round(n / batch_size))
    was_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    hooks = None
    try:
        model.to(device).train()
        freeze_batchnorm(model)
        names = set(select_trainable(model, trainable))
        params = [p for name, p in model.named_parameters() if name in names]
        try:
            ModuleValidator.validate(model, strict=True)
        except Exception as e:  # opacus.validators.errors.UnsupportedModuleError
            raise DvlibError(f"Opacus rejects this model: {e}") from e
        hooks = grad_sample_hooks(model, grad_sampler)
        hooks.forbid_grad_accumulation()  # Poisson sampling: one backward per step
        sigma = noise_multiplier(target_epsilon, delta, q, epochs * steps_per_epoch, accountant)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)  # batches and augmentation
        noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
        acc = create_accountant(accountant)
        opt = DPOptimizer(torch.optim.Adam(params, lr=lr), noise_multiplier=sigma, max_grad_norm=max_grad_norm,
                          expected_batch_size=batch_size, loss_reduction="mean", generator=noise_gen)
        opt.attach_step_hook(acc.get_optimizer_hook_fn(sample_rate=q))
        sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=gen, steps=steps_per_epoch)
        rows, labels = torch.as_tensor(rows).cpu(), torch.as_tensor(labels).cpu()
        weight = None if class_weight is None else torch.as_tensor(class_weight, dtype=torch.float32).to(device)
        history = []
        for epoch in range(epochs):
            t0, total, seen, empty = time.perf_counter(), 0.0, 0, 0
            for idx in sampler:
                opt.zero_grad(set_to_none=True)
                if not idx:  # an empty Poisson batch is still a step: noise only
                    for p in params:
                        p.grad_sample = p.new_zeros((0, *p.shape))
                    opt.step()
                    empty += 1
                    continue
                idx = torch.tensor(idx)
                raw = cache.data.index_select(0, rows[idx].to(cache.data.device))
                # contiguous NCHW: Opacus' own conv sampler (unfold2d's as_strided) assumes it and is
                # wrong on the channels-last strides that augment() returns
                x = augment(raw, draw_params(len(idx), cache.side, size, gen), size).to(device).contiguous()
                y = labels[idx].to(device)
                per_image = F.cross_entropy(model(x), y, reduction="none")
                if weight is not None:
                    per_image = per_image * weight[y]
                with warnings.catch_warnings():  # the first layer's input needs no gradient: harmless
                    warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
                    per_image.sum().backward()
                opt.step()
                total += float(per_image.detach().sum())
                seen += len(idx)
            dt = time.perf_counter() - t0
            history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "images": seen,
                            "steps": steps_per_epoch, "empty_batches": empty, "seconds": dt,
                            "img_per_s": seen / dt if dt > 0 else float("nan"),
                            "epsilon": _epsilon(acc, delta), "delta": delta,
                            "target_epsilon": target_epsilon, "noise_multiplier": sigma, "sample_rate": q,
                            "max_grad_norm": max_grad_norm, "accountant": accountant,
                            "trainable": trainable if isinstance(trainable, str) else ",".join(trainable),
                            "grad_sampler": grad_sampler})
    finally:
        if hooks is not None:
            hooks.cleanup()  # removes hooks and grad_sample/_forward_counter attributes, not these:
        for m in model.modules():
            for attr in ("activations", "max_batch_len"):
                if attr in m.__dict__:
                    delattr(m, attr)
        for name, p in model.named_parameters():
            p.requires_grad_(was_grad[name])
            p.grad = None
            if hasattr(p, "summed_grad"):
                del p.summed_grad
        model.eval()
    return history
