"""BT^2 model wrapper: orthogonality through training, the inner-product identity, the bct slice,
and a save/load round trip."""

import pytest
import torch
import torch.nn.functional as F

from bctkit.models.bt2 import BT2Net
from bctkit.models.config import BackboneConfig, BT2Layout
from bctkit.models.factory import build_backbone
from bctkit.models.heads import HeadConfig, build_head
from bctkit.models.store import load_model, save_model

D, D_O, K, C = 12, 10, 6, 2.0


def _net(d: int = D, d_o: int = D_O, k: int = K, seed: int = 0) -> BT2Net:
    torch.manual_seed(seed)
    cfg = BackboneConfig(arch="r8", width=4, image_size=16, embedding_dim=d,
                         bt2=BT2Layout(old_dim=d_o, k=k, C=C))
    net = build_backbone(cfg)
    assert isinstance(net, BT2Net)
    return net


def _parts(net: BT2Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """a, n(f) and v recomputed from the wrapper's pieces, independently of forward_train."""
    h = net.net(x)
    a = F.normalize(net.head(F.relu(h)), dim=1)
    fn = F.normalize(h[:, :D], dim=1)
    v = torch.cat([a, fn @ (C * net.O_p.weight).T], dim=1)
    return {"a": a, "fn": fn, "v": v}


def test_shapes_and_layout():
    net = _net().eval()
    f, z = net.forward_train(torch.randn(3, 1, 16, 16))
    assert f.shape == (3, D) and z.shape == (3, D_O + K)
    assert net.embedding_dim == D_O + K == net.config.output_dim
    assert net.k_a == D_O + K - D


def test_inner_product_identity_and_bct_slice():
    net = _net().eval()
    x1, x2 = torch.randn(5, 1, 16, 16), torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        z1, z2 = net(x1), net(x2)
        p1, p2 = _parts(net, x1), _parts(net, x2)
    lhs = z1 @ z2.T
    rhs = p1["a"] @ p2["a"].T + C**2 * p1["fn"] @ p2["fn"].T
    assert torch.allclose(lhs, rhs, atol=1e-5)
    # z[:d_o] is O_2 applied to v[:d_o]; the rest of z is v[d_o:] unchanged
    assert torch.allclose(z1[:, :D_O], p1["v"][:, :D_O] @ net.O_2.weight.T, atol=1e-6)
    assert torch.equal(z1[:, D_O:], p1["v"][:, D_O:])
    assert torch.allclose(z1.norm(dim=1), torch.full((5,), (1 + C**2) ** 0.5), atol=1e-5)


def test_orthogonal_after_training_steps():
    net = _net().train()
    opt = torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
    w_before = net.O_p.weight.detach().clone()
    target = torch.randn(8, D_O + K)
    for _ in range(10):
        _, z = net.forward_train(torch.randn(8, 1, 16, 16))
        loss = (z - target).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.allclose(net.O_p.weight, w_before)  # the basis really was trained
    for o, n in ((net.O_p, D), (net.O_2, D_O)):
        w = o.weight.detach()
        assert torch.allclose(w @ w.T, torch.eye(n), atol=1e-5)
        assert torch.allclose(w.T @ w, torch.eye(n), atol=1e-5)


def test_needs_an_added_coordinate():
    with pytest.raises(ValueError, match="added"):
        _net(d=16, d_o=10, k=6)


def test_save_load_round_trip(tmp_path):
    net = _net().eval()
    head_cfg = HeadConfig(type="arcface")
    head = build_head(head_cfg, D, 4)
    save_model(tmp_path / "m.safetensors", net, head, head_cfg, {"history": []})
    loaded = load_model(tmp_path / "m.safetensors")
    assert isinstance(loaded.backbone, BT2Net)
    assert loaded.meta["backbone"]["bt2"] == {"old_dim": D_O, "k": K, "C": C}
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.backbone(x), net(x))


def test_plain_backbone_serialises_without_bt2_key():
    assert "bt2" not in BackboneConfig().model_dump()


@pytest.mark.parametrize("shape", [(10, 10), (7, 4), (4, 7), (64, 64)])
def test_orthonormal_columns_is_the_qr_factor(shape):
    """Against LAPACK's QR in float64 (signs fixed so that R's diagonal is positive): the same
    matrix to float32 rounding, and orthonormal."""
    from bctkit.models.bt2 import orthonormal_columns

    a = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    q = orthonormal_columns(a)
    tall = a if shape[0] >= shape[1] else a.T
    q64, r = torch.linalg.qr(tall.double())
    ref = q64 * r.diagonal().sign()
    assert q.dtype == torch.float32 and q.shape == a.shape
    assert float((q.double() - (ref if shape[0] >= shape[1] else ref.T)).abs().max()) < 1e-6
    small = min(shape)
    gram = q.double().T @ q.double() if shape[0] >= shape[1] else q.double() @ q.double().T
    assert float((gram - torch.eye(small, dtype=torch.float64)).abs().max()) < 1e-6


def test_orthogonal_start_is_the_same_with_any_cpu_kernels(tmp_path):
    """The seeded starting bases of O_p and O_2 (state-dict buffers, so part of the fingerprint)
    have the same bits whichever code path MKL (LAPACK) or torch's kernels take on this CPU: each
    environment below emulates another CPU. With torch's orthogonal parametrisation they came from
    MKL's geqrf, and MKL_CBWR=COMPATIBLE alone changed them."""
    import os
    import subprocess
    import sys

    script = ("import sys, torch\n"
              "from bctkit.models import build_backbone\n"
              "from bctkit.models.config import BackboneConfig, BT2Layout\n"
              "torch.manual_seed(0)\n"
              "net = build_backbone(BackboneConfig(arch='r8', width=4, image_size=16, embedding_dim=12, "
              "bt2=BT2Layout(old_dim=10, k=6)))\n"
              "torch.save({k: v for k, v in net.state_dict().items() if k.endswith('base')}, sys.argv[1])\n")
    found = {}
    for name, env in [("native", {}), ("mkl-compatible", {"MKL_CBWR": "COMPATIBLE"}),
                      ("mkl-sse42", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
                      ("aten-avx2", {"ATEN_CPU_CAPABILITY": "avx2"}),
                      ("aten-generic", {"ATEN_CPU_CAPABILITY": "default"})]:
        out = tmp_path / f"{name}.pt"
        res = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                             env={**os.environ, **env}, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        found[name] = torch.load(out)
    assert sorted(found["native"]) == [f"{m}.parametrizations.weight.0.base" for m in ("O_2", "O_p")]
    for name, bases in found.items():
        for key, value in bases.items():
            assert torch.equal(value, found["native"][key]), (name, key)
