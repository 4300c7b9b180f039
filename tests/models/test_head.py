import torch
import torch.nn.functional as F

from dinoreg.models import DINOHead


def test_dino_head_matches_plain_reference():
    torch.manual_seed(0)
    head = DINOHead(16, 50, nlayers=3, hidden_dim=32, bottleneck_dim=8)
    with torch.no_grad():  # a non-unit magnitude checks that g is used as the weight-norm scale
        head.last_layer.parametrizations.weight.original0.mul_(torch.linspace(0.5, 2.0, 50)[:, None])
    x = torch.randn(5, 16)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    h = F.gelu(linears[0](x))
    h = F.gelu(linears[1](h))
    h = F.normalize(linears[2](h), dim=-1)
    g = head.last_layer.parametrizations.weight.original0
    v = head.last_layer.parametrizations.weight.original1
    expected = h @ (g * v / v.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(head(x), expected)


def test_dino_head_initialisation_and_structure():
    torch.manual_seed(0)
    head = DINOHead(64, 100, nlayers=2, hidden_dim=128, bottleneck_dim=16)
    assert [type(m).__name__ for m in head.mlp] == ["Linear", "GELU", "Linear"]
    assert torch.all(head.last_layer.parametrizations.weight.original0 == 1.0)
    assert head.last_layer.bias is None
    assert abs(head.mlp[0].weight.std().item() - 0.02) < 0.002 and head.mlp[0].bias.abs().sum() == 0
    # unit-norm prototypes on an L2-normalised input: logits are cosines in [-1, 1]
    assert head(torch.randn(7, 64) * 100).abs().max() <= 1.0 + 1e-6
    assert DINOHead(8, 4, nlayers=1, bottleneck_dim=6).mlp.weight.shape == (6, 8)
