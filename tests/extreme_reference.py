"""Extreme Normalization's formulas written out in float64 (extreme-normalization.txt §3.1,
Alg. 1, §5), shared by the runtime test and the ``brn``/``two-tower`` pass tests: references
are the paper's formulas, never the layer's own output."""
import torch
import torch.nn.functional as F

EPS = 1e-5


def sg(t):
    return t.detach()


def paper_scale_grad(S, Q, r):
    """§3.1 verbatim: ScaleGrad(S, Q, r) = StopGradient(r)·Q + StopGradient(S − r·Q)."""
    r = sg(r) if isinstance(r, torch.Tensor) else r
    return r * Q + sg(S - r * Q)


def reference_brn(x_in, W, b, gamma, beta, mu_bar, nu_bar, group, r_m=1.0, r_v=1.0, f_max=2.0, u_max=5.0):
    """Alg. 1 with one tower whose μ‡, ν‡ come from groups of ``group`` examples (§5), for a
    3×3 conv ``W`` (bias ``b``) feeding the norm: ``(γ q + β, μ, ν)``."""
    B = x_in.shape[0]
    mu = x_in.mean((2, 3))                                              # B x Ci
    gid = torch.arange(B) // group
    mu_g = torch.stack([mu[gid == gid[i]].mean(0) for i in range(B)])
    mu_dd = paper_scale_grad(mu_bar, mu_g, r_m)
    W_sum = W.sum((2, 3))                                               # Co x Ci
    p = F.conv2d(x_in, W, b, padding=1) - (0 if b is None else b[None, :, None, None]) \
        - (mu_dd @ W_sum.t())[:, :, None, None]
    nu = (p ** 2).mean((2, 3)) + EPS
    nu_g = torch.stack([nu[gid == gid[i]].mean(0) for i in range(B)])
    nu_dd = paper_scale_grad(nu_bar, nu_g, r_v * torch.clamp(nu_bar / sg(nu_g), max=f_max))
    clip = sg(torch.clamp(u_max * torch.sqrt(nu_bar / nu), max=1.0))
    q = p / torch.sqrt(nu_dd)[:, :, None, None] * clip[:, :, None, None]
    return q * gamma[None, :, None, None] + beta[None, :, None, None], mu, nu


def randomise_extreme_layers(model, names=("bn1", "bn2")):
    """Move each named ExtremeNorm's affine, input mean and moving ν off their initial values
    (so a formula that ignores one of them shows), and mark the input mean as known."""
    for name in names:
        layer = model.get_submodule(name)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.3, 0.3)
            layer.input_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.3, 1.5)
        layer.input_mean_known = True
