"""Plain-torch implementation of the fused op's forward and backward (CPU, and any device
without Triton). Same contract as :mod:`._triton`, same float32 accumulation.

Forward (bn-sampling.txt §3.2 Eq. 3, §4.2 Eq. 4, Eq. 1)::

    mean_G, var_G = moments of group G          (G = sampled rows x patch; virtual rows)
    mean = Σ_G a_G·mean_G,  var = Σ_G a_G·var_G  (a_virtual = wv, a_sampled = 1 − wv)
    y    = act((x − mean)·rsqrt(var + eps)·γ + β)

Backward (App. C Eq. 5–6; dy' = dy·act'(z))::

    dγ = Σ dy'·x̂,   dβ = Σ dy'                   (over every point: all were normalised)
    dx = rstd·γ·(dy' − Σ_G [x ∈ G]·(a_G/n_G)·(Σdy' + Σdy'x̂·rstd·(x − mean_G)))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _view5(x: torch.Tensor) -> torch.Tensor:
    spatial = list(x.shape[2:])
    return x.reshape([x.shape[0], x.shape[1]] + [1] * (3 - len(spatial)) + spatial)


def _moments(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(v, dim=(0, 2, 3, 4), unbiased=False)
    return mean, var


def _groups(region, wv: float):
    nv, r0, r1, d0, d1, h0, h1, w0, w1 = (int(v) for v in region)
    sampled = (slice(r0, r1), slice(None), slice(d0, d1), slice(h0, h1), slice(w0, w1))
    virtual = (slice(0, nv),)
    has_v = wv > 0.0 and nv > 0
    has_s = wv < 1.0
    return has_s, sampled, has_v, virtual


def apply_activation(z: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "relu6":
        return F.relu6(z)
    if act == "silu":
        return F.silu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, slope)
    return z


def activation_grad(dy: torch.Tensor, z: torch.Tensor, act: str, slope: float) -> torch.Tensor:
    if act == "relu":
        return torch.where(z > 0, dy, 0.0)
    if act == "relu6":
        return torch.where((z > 0) & (z < 6), dy, 0.0)
    if act == "silu":
        s = torch.sigmoid(z)
        return dy * (s * (1 + z * (1 - s)))
    if act == "leaky_relu":
        return torch.where(z > 0, dy, dy * slope)
    return dy


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(1, -1, 1, 1, 1)


def update_running_stats(running_mean, running_var, stats, momentum, unbias) -> None:
    # through .data, as stock BatchNorm's op and BatchNormState.update_running_stats: a version
    # bump would fail the backward of an earlier call that saved the buffer (eval call, then a
    # training call, then one backward)
    with torch.no_grad():
        running_mean.data.copy_(running_mean.float() * (1 - momentum) + stats[0] * momentum)
        running_var.data.copy_(running_var.float() * (1 - momentum) + stats[1] * unbias * momentum)


def normalized(x, mean, var, weight, bias, eps, act, slope):
    """Eq. 1 and the activation: ``act((x − mean)·rsqrt(var + eps)·γ + β)`` per channel, computed
    in fp32, in x's dtype and memory format (as the kernels give); differentiable."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.float()
    z = (_view5(x).float() - _channel(mean)) * _channel(scale)
    if bias is not None:
        z = z + _channel(bias.float())
    y = apply_activation(z, act, slope).reshape(x.shape).to(x.dtype)
    return torch.empty_like(x).copy_(y)


def forward(x, weight, bias, region, wv, eps, act, slope, running=None, tracked=None):
    x5 = _view5(x).float()
    C = x5.shape[1]
    has_s, sampled, has_v, virtual = _groups(region, wv)
    zeros = x5.new_zeros(C)
    mean, var, mean_v, mean_s = zeros, zeros, zeros, zeros
    if has_v:
        mean_v, var_v = _moments(x5[virtual])
        mean, var = mean + wv * mean_v, var + wv * var_v
    if has_s:
        mean_s, var_s = _moments(x5[sampled])
        mean, var = mean + (1 - wv) * mean_s, var + (1 - wv) * var_s
    y = normalized(x, mean, var, weight, bias, eps, act, slope)
    stats = torch.stack([mean, var, mean_v, mean_s])
    if running is not None:
        running_mean, running_var, momentum, unbias = running
        update_running_stats(running_mean, running_var, stats, momentum, unbias)
    if tracked is not None:
        with torch.no_grad():
            tracked.add_(1)
    return y, stats


def backward(dy, x, weight, bias, stats, region, wv, eps, act, slope):
    x5 = _view5(x).float()
    g = _view5(dy).float()
    mean, var, mean_v, mean_s = stats.unbind(0)
    rstd = torch.rsqrt(var + eps)
    w = weight.float() if weight is not None else torch.ones_like(mean)
    xhat = (x5 - _channel(mean)) * _channel(rstd)
    if act != "none":
        z = xhat * _channel(w)
        if bias is not None:
            z = z + _channel(bias.float())
        g = activation_grad(g, z, act, slope)
    dims = (0, 2, 3, 4)
    sum_dy = g.sum(dims)
    sum_dyx = (g * xhat).sum(dims)
    has_s, sampled, has_v, virtual = _groups(region, wv)
    inner = g.clone()
    if has_s:
        n_s = x5[sampled][:, :1].numel()
        a = (1 - wv) / n_s
        inner[sampled] -= _channel(a * sum_dy) + _channel(a * sum_dyx * rstd) * (x5[sampled] - _channel(mean_s))
    if has_v:
        n_v = x5[virtual][:, :1].numel()
        a = wv / n_v
        inner[virtual] -= _channel(a * sum_dy) + _channel(a * sum_dyx * rstd) * (x5[virtual] - _channel(mean_v))
    dx = (inner * _channel(rstd * w)).reshape(x.shape).to(x.dtype)
    dx = torch.empty_like(x).copy_(dx)
    return dx, sum_dyx, sum_dy
