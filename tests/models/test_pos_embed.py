import pytest
import torch

from dinoreg.models.pos_embed import resample_patch_pos_embed, resample_pos_embed
from official_reference import official_interpolate_pos_encoding


def _stripe_spread(antialias: bool) -> float:
    """Coefficient of variation of the per-row gradient sums on the 16x16 grid after pushing unit
    gradients back through a 16x16 -> 7x7 resize (the registers paper, Fig. 11)."""
    grid = torch.zeros(1, 16 * 16, 8, requires_grad=True)
    resample_patch_pos_embed(grid, (7, 7), antialias=antialias, offset=0.0).sum().backward()
    grad = grid.grad[0, :, 0].view(16, 16)
    rows, cols = grad.sum(dim=1), grad.sum(dim=0)
    torch.testing.assert_close(rows, cols)  # the resize is separable and symmetric
    return (rows.std() / rows.mean()).item()


def test_fig11_antialiasing_removes_gradient_striping():
    striped, smooth = _stripe_spread(False), _stripe_spread(True)
    # Without antialiasing bicubic taps skip whole rows/columns: alternate rows get ~0 or negative
    # gradient (spread ~0.96). With antialiasing every row gets a similar share (spread ~0.08).
    assert striped > 0.5
    assert smooth < 0.15
    assert striped > 5 * smooth


@pytest.mark.parametrize("antialias,offset", [(True, 0.0), (False, 0.1)])
def test_identity_at_native_grid(antialias, offset):
    pos = torch.randn(1, 1 + 16 * 16, 8)
    assert resample_pos_embed(pos, (16, 16), antialias=antialias, offset=offset) is pos


@pytest.mark.parametrize("antialias,offset", [(True, 0.0), (False, 0.1)])
@pytest.mark.parametrize("grid", [(7, 7), (37, 37), (12, 20), (20, 9)])
def test_matches_official_interpolation(antialias, offset, grid):
    pos = torch.randn(1, 1 + 16 * 16, 8)
    patch = 14
    ours = resample_pos_embed(pos, grid, antialias=antialias, offset=offset)
    ref = official_interpolate_pos_encoding(pos, grid[0] * grid[1], grid[0] * patch, grid[1] * patch, patch,
                                            antialias, offset)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # same ops, same order: bit-identical
    torch.testing.assert_close(ours[:, 0], pos[:, 0])  # the cls position is never resampled


def test_antialias_and_legacy_paths_differ_off_the_native_grid():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 16 * 16, 8)
    for grid in ((7, 7), (37, 37)):
        registers_path = resample_pos_embed(pos, grid, antialias=True, offset=0.0)
        legacy_path = resample_pos_embed(pos, grid, antialias=False, offset=0.1)
        # downsampling: antialiasing averages where legacy skips; upsampling: torch's antialiased bicubic
        # uses the a=-0.5 kernel, the plain one a=-0.75, and the offset shifts sampling positions
        assert (registers_path - legacy_path).abs().max() > 0.05


def test_runs_in_fp32_and_returns_the_input_dtype():
    pos = torch.randn(1, 1 + 16 * 16, 8).to(torch.bfloat16)
    out = resample_pos_embed(pos, (7, 9), antialias=True, offset=0.0)
    assert out.dtype == torch.bfloat16
    ref = resample_pos_embed(pos.float(), (7, 9), antialias=True, offset=0.0)
    torch.testing.assert_close(out, ref.to(torch.bfloat16))


def test_non_square_source_grid_is_an_error():
    with pytest.raises(ValueError, match="square"):
        resample_patch_pos_embed(torch.randn(1, 15, 4), (3, 3), antialias=True, offset=0.0)
