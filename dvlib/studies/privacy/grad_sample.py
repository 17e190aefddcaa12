"""Per-image gradients for DP-SGD (:func:`dvlib.studies.privacy.dp.fit_dp`): Opacus' hooks, with our own
sampler for convolutions.

With ``grad_sampler="dvlib"`` (the default), :func:`conv2d_grad_sample` computes every
convolution's per-image gradients exactly, grouped ones as one convolution-backward with the batch
folded into the groups. Opacus' own sampler instead builds the full [C_out, C_in * k] product and
keeps its diagonal for grouped convolutions (slow in EfficientNet-Lite0's depthwise layers), falls
back to functorch for timm's ``Conv2dSame``, and (opacus 1.6.0) returns wrong gradients for
channels-last inputs. ``"opacus"`` and ``"functorch"`` use Opacus' own samplers (hooks, or functorch
for every layer).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dvlib.io import DvlibError

GRAD_SAMPLERS = ("dvlib", "opacus", "functorch")


def conv2d_grad_sample(layer: nn.Conv2d, activations, backprops: torch.Tensor) -> dict:
    """Per-image gradients of a Conv2d (or timm Conv2dSame) from its input and output gradient."""
    from opacus.grad_sample.conv import compute_conv_grad_sample

    x = activations[0].to(backprops.dtype)
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        return compute_conv_grad_sample(layer, activations, backprops)
    n, padding, w = x.shape[0], list(layer.padding), layer.weight
    if type(layer).__name__ == "Conv2dSame":  # TF "same" padding, computed from the input size
        from timm.layers.padding import pad_same

        x, padding = pad_same(x, layer.kernel_size, layer.stride, layer.dilation), [0, 0]
    ret = {}
    if w.requires_grad and layer.groups > 1:  # batch folded into the groups: one weight-gradient call
        wshape = (n * w.shape[0], *w.shape[1:])
        _, gw, _ = torch.ops.aten.convolution_backward(
            backprops.reshape(1, -1, *backprops.shape[2:]).contiguous(), x.reshape(1, -1, *x.shape[2:]).contiguous(),
            torch.empty(wshape, dtype=w.dtype, device=w.device), None, list(layer.stride), padding,
            list(layer.dilation), False, [0, 0], n * layer.groups, [False, True, False])
        ret[w] = gw.view(n, *w.shape)
    elif w.requires_grad:  # im2col: [n, C_out, L] x [n, C_in * k, L] -> [n, C_out, C_in * k]
        if tuple(layer.kernel_size) == (1, 1) and padding == [0, 0]:  # pointwise: im2col is a (costly) copy
            cols = x[:, :, ::layer.stride[0], ::layer.stride[1]].reshape(n, x.shape[1], -1)
        else:
            cols = F.unfold(x, layer.kernel_size, dilation=layer.dilation, padding=padding, stride=layer.stride)
        ret[w] = torch.bmm(backprops.reshape(n, w.shape[0], -1), cols.transpose(1, 2)).view(n, *w.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        ret[layer.bias] = backprops.reshape(n, layer.out_channels, -1).sum(-1)
    return ret


def grad_sample_hooks(model: nn.Module, grad_sampler: str):
    """Opacus' per-image gradient hooks on ``model`` itself, with :func:`conv2d_grad_sample` for
    convolutions when ``grad_sampler`` is ``"dvlib"``."""
    from opacus.grad_sample.grad_sample_module import GradSampleHooks

    class Hooks(GradSampleHooks):
        GRAD_SAMPLERS = dict(GradSampleHooks.GRAD_SAMPLERS)

    if grad_sampler == "dvlib":
        from timm.layers import Conv2dSame

        Hooks.GRAD_SAMPLERS.update({nn.Conv2d: conv2d_grad_sample, Conv2dSame: conv2d_grad_sample})
    try:  # loss summed over the batch: each image's gradient is its own; strict: no trainable buffers
        return Hooks(model, loss_reduction="sum", strict=True, force_functorch=grad_sampler == "functorch")
    except NotImplementedError as e:
        raise DvlibError(f"Opacus cannot compute per-image gradients for this model: {e}") from e
