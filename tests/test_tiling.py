"""Tiled restoration: exact for a pointwise function, close for the model, clear errors."""
import pytest
import torch

import sipl_fast
from sipl_fast.tiling import tile_starts, tiled

from conftest import tiny_model


@pytest.mark.parametrize("size,tile,overlap", [(37, 16, 4), (16, 16, 4), (100, 32, 31), (5, 8, 2), (33, 10, 0)])
def test_tiles_cover_everything_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    covered = set()
    for s in starts:
        covered |= set(range(s, min(s + tile, size)))
    assert covered == set(range(size)) and starts[0] == 0
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_pointwise_function_is_reproduced_exactly():
    x = torch.rand(2, 3, 37, 29, dtype=torch.float64)
    fn = lambda t: torch.sin(t) * 2 + 1  # noqa: E731
    torch.testing.assert_close(tiled(fn, x, 16, 5), fn(x), rtol=1e-12, atol=1e-12)


def test_tiled_model_matches_untiled_when_one_tile_covers_the_image():
    model = tiny_model()
    x = torch.rand(1, 3, 21, 18, dtype=torch.float64)
    run = lambda t: sipl_fast.restore(model, t, 1)  # noqa: E731
    torch.testing.assert_close(tiled(run, x, 32, 8), run(x), rtol=0, atol=0)
    assert tiled(run, x, 16, 8).shape == x.shape


@pytest.mark.parametrize("tile,overlap", [(0, 0), (16, 16), (16, -1)])
def test_bad_tiles_raise_value_error(tile, overlap):
    with pytest.raises(ValueError, match="tile"):
        tiled(lambda t: t, torch.rand(1, 3, 40, 40), tile, overlap)
