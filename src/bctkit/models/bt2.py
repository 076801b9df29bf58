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

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from bctkit.models.base import EmbeddingNet
from bctkit.models.config import BackboneConfig
from bctkit.models.registry import build_plain


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
        self.O_p = orthogonal(nn.Linear(d, d, bias=False))
        self.O_2 = orthogonal(nn.Linear(d_o, d_o, bias=False))

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
