"""Independent references for the kernel tests: PyTorch's own BatchNorm and the sampling
engineer's plain-torch sampled BatchNorm, differentiated by autograd in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bnrewrite.runtime.sampled import SampleSpec, sampled_batch_norm_reference

ACTS = {
    "none": lambda z, s: z,
    "relu": lambda z, s: F.relu(z),
    "relu6": lambda z, s: F.relu6(z),
    "silu": lambda z, s: F.silu(z),
    "leaky_relu": lambda z, s: F.leaky_relu(z, s),
}


def make_input(shape, dtype, channels_last, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 1.7 + 0.4).to(dtype)
    if channels_last:
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        elif x.dim() == 3:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(device)


def reference_grads(x, spec, weight, bias, eps, act, slope, dy):
    """(y, mean, var, count, dx, dw, db) in float64 by autograd through
    ``sampled_batch_norm_reference`` (spec) or ``F.batch_norm`` (spec None) + the activation."""
    x64 = x.detach().double().cpu().requires_grad_(True)
    w64 = weight.detach().double().cpu().requires_grad_(True)
    b64 = bias.detach().double().cpu().requires_grad_(True)
    if spec is None:
        z = F.batch_norm(x64, None, None, w64, b64, True, 0.0, eps)
        dims = [d for d in range(x.dim()) if d != 1]
        var, mean = torch.var_mean(x64.detach(), dim=dims, unbiased=False)
        count = x.numel() // x.shape[1]
    else:
        z, mean, var, count = sampled_batch_norm_reference(x64, spec, w64, b64, eps)
    y = ACTS[act](z, slope)
    dx, dw, db = torch.autograd.grad(y, (x64, w64, b64), dy.detach().double().cpu())
    return y.detach(), mean.detach(), var.detach(), count, dx, dw, db


def rel_err(a, b):
    a = a.detach().double().cpu()
    b = b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# (name, shape, spec factory): specs follow bnrewrite.runtime.sampled.SampleSpec's contract
def spec_cases():
    return [
        ("full-2d", (3, 5, 7, 6), lambda: None),
        ("fs-2d", (3, 5, 7, 6), lambda: SampleSpec(rows=(0, 3), patch=((1, 4), (2, 5)))),
        ("bs-2d", (5, 4, 6, 5), lambda: SampleSpec(rows=(1, 3))),
        ("vdn-2d", (4, 3, 5, 5), lambda: SampleSpec(rows=(0, 3), num_virtual=1, beta=1.0)),
        ("fs+vdn-2d", (5, 4, 7, 6), lambda: SampleSpec(rows=(0, 3), patch=((2, 5), (1, 4)), num_virtual=2,
                                                      beta=0.5)),
        ("bs+vdn-2d", (5, 3, 4, 3), lambda: SampleSpec(rows=(1, 3), num_virtual=1, beta=0.25)),
        ("full-virtual-2d", (4, 3, 5, 4), lambda: SampleSpec(rows=(0, 3), num_virtual=1, beta=0.0)),
        ("full-1d", (6, 5), lambda: None),
        ("bs-1d", (7, 5), lambda: SampleSpec(rows=(2, 6))),
        ("fs-1d-seq", (4, 3, 9), lambda: SampleSpec(rows=(0, 4), patch=((2, 7),))),
        ("fs-3d", (3, 2, 3, 4, 5), lambda: SampleSpec(rows=(0, 3), patch=((1, 3), (0, 2), (1, 4)))),
        ("fs+vdn-3d", (3, 2, 3, 4, 3), lambda: SampleSpec(rows=(0, 2), patch=((0, 2), (1, 3), (0, 3)),
                                                         num_virtual=1, beta=0.5)),
    ]
