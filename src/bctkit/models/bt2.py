"""BT^2's model wrapper (Zhou et al. 2023; methods.md item 7): any backbone, widened through a
learnable orthonormal basis transformation so that compatibility does not cost the new model its
own features.

With d = ``embedding_dim`` (the size of f), d_o = ``bt2.old_dim`` and k = ``bt2.k``::

    h   = backbone(x)                      d + d_o channels
    f   = h[:d]                            the new model's own feature (base head, paragon target)
    u   = head(relu(h))
    a   = n(u[:k_a])                       k_a = d_o + k - d added coordinates
    b   = O_p (C n(f))                     O_p orthogonal, d x d
    v   = [a; b]                           d_o + k
    bct = O_2 v[:d_o]                      O_2 orthogonal, d_o x d_o: the old-compatible block
    z   = [bct; v[d_o:]]                   the stored embedding, d_o + k dims

v -> z is orthogonal, so <z, z'> = <a, a'> + C^2 <n(f), n(f')>: nothing of f is lost, and
z[:d_o] is what cross tests compare with the old model. With d = d_o (the paper's setting) k_a = k;
in a chain the next model's d_o is this model's d_o + k, so dimensions accumulate by k per upgrade.
``head`` outputs exactly the k_a coordinates that are used (the paper's d_o-wide head whose other
outputs are discarded computes the same function).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig
from bctkit.models.registry import build_plain


def fixed_order_sum(x: np.ndarray, axis: int) -> np.ndarray:
    """Sum over ``axis`` in an order this code fixes: halves added elementwise until one is left.
    Elementwise IEEE additions are correctly rounded, so the result has the same bits whatever the
    SIMD width or library (``sum`` and matrix products reduce in a CPU-dependent order)."""
    x = np.moveaxis(x, axis, 0)
    while x.shape[0] > 1:
        half = x.shape[0] // 2
        head = x[:half] + x[half : 2 * half]
        x = np.concatenate([head, x[2 * half :]]) if x.shape[0] % 2 else head
    return x[0]


def orthonormal_columns(a: torch.Tensor) -> torch.Tensor:
    """Q of a = QR with R's diagonal positive (what torch's orthogonal parametrisation makes of an
    initial weight with LAPACK's geqrf / householder_product), computed so that its bits depend on
    ``a`` alone: classical Gram-Schmidt applied twice per column ("twice is enough": orthogonal to
    float64 rounding for any matrix that is not near-singular) in float64, from elementwise
    products, :func:`fixed_order_sum`, division and sqrt only, which IEEE 754 rounds correctly on
    every CPU (NumPy: one thread, no fused multiply-add); then rounded once to ``a``'s dtype.
    LAPACK's result differs between CPUs (MKL picks a code path per CPU), and it fed BT^2's
    fingerprint. O(n^3) elementwise work: 0.4 s for n = 512 (2-core AMD EPYC)."""
    n, k = a.shape
    if n < k:
        return orthonormal_columns(a.mT).mT
    cols = a.detach().cpu().numpy().astype(np.float64).T.copy()
    qt = np.zeros_like(cols)  # row j: column j of Q
    for j in range(k):
        v = cols[j]
        for _ in range(2 if j else 0):
            r = fixed_order_sum(qt[:j] * v, 1)
            v = v - fixed_order_sum(qt[:j] * r[:, None], 0)
        qt[j] = v / np.sqrt(fixed_order_sum(v * v, 0))
    return torch.from_numpy(np.ascontiguousarray(qt.T)).to(a.dtype)


def orthogonal_linear(n: int) -> nn.Linear:
    """An n x n bias-free linear layer under torch's orthogonal parametrisation whose seeded starting
    point (the parametrisation's ``base``, a state-dict buffer) is the same on any CPU: the starting
    matrix is 2 u - 1 for u = ``torch.rand(n, n)`` (the draws of nn.Linear's own initialisation, which
    scales them by 2 / sqrt(n), a product whose rounding depends on torch's CPU kernels; 2 u - 1 is
    exact and the orthonormal factor ignores the scale), orthonormalised by :func:`orthonormal_columns`."""
    layer = torch.nn.utils.skip_init(nn.Linear, n, n, bias=False)
    start = torch.rand(n, n) * 2 - 1
    with torch.no_grad():
        layer.weight.copy_(start)
    layer = orthogonal(layer)
    with torch.no_grad():
        layer.parametrizations.weight[0].base.copy_(orthonormal_columns(start))
    return layer


class BT2Net(EmbeddingNet):
    """Any registered backbone (``net``: the config without ``bt2``, its embedding widened to
    d + d_o) with BT^2's basis transformation, so an upgrade may change the family (CNN -> ViT);
    ``forward`` returns z. The sizes and C are kept as plain attributes (not read from the pydantic
    config) so that the forward pass can be scripted with TorchScript once the orthogonal
    parametrisations are removed (``bctkit export``)."""

    __jit_unused_properties__ = ["embedding_dim"]

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__(cfg)
        if cfg.bt2 is None:
            raise ValueError("BT2Net needs a backbone config with a bt2 layout")
        d, d_o, k = cfg.embedding_dim, cfg.bt2.old_dim, cfg.bt2.k
        self.k_a = d_o + k - d
        self.f_dim, self.old_dim, self.C = d, d_o, float(cfg.bt2.C)
        if self.k_a < 1:
            raise ValueError(
                f"bt2: old_dim + k - embedding_dim = {self.k_a}; the model needs at least one added "
                "coordinate (raise k or lower embedding_dim)"
            )
        self.net = build_plain(cfg.model_copy(update={"embedding_dim": d + d_o, "bt2": None}))
        self.head = nn.Linear(d + d_o, self.k_a)
        self.O_p = orthogonal_linear(d)
        self.O_2 = orthogonal_linear(d_o)

    def forward_train(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f, z): f for the base head and the paragon target, z the stored embedding."""
        d_o = self.old_dim
        h = self.net(x)
        f = h[:, : self.f_dim]
        a = F.normalize(self.head(F.relu(h)), dim=1)
        b = self.O_p(self.C * F.normalize(f, dim=1))
        v = torch.cat([a, b], dim=1)
        z = torch.cat([self.O_2(v[:, :d_o]), v[:, d_o:]], dim=1)
        return f, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_train(x)[1]
