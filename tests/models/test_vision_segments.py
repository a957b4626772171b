"""Vision attention within segments: grouped by length (large batches of pictures of several sizes) gives what
the block-diagonal mask gives, and the gradients agree too."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vlm_models.nn import vision
from vlm_models.nn.vision import EqualSegments, GroupedSegments, VisionAttention, segment_mask
from vlm_runtime.masks import block_diagonal_mask


@settings(max_examples=20, deadline=None)
@given(lengths=st.lists(st.sampled_from([4, 6, 9, 16]), min_size=2, max_size=8), seed=st.integers(0, 100))
def test_grouped_segments_attend_like_the_block_diagonal_mask(lengths: list[int], seed: int) -> None:
    bounds = [0, *np.cumsum(lengths).tolist()]
    limit, vision.DENSE_MASK_LIMIT = vision.DENSE_MASK_LIMIT, 0
    try:
        grouped = segment_mask(bounds)
    finally:
        vision.DENSE_MASK_LIMIT = limit
    if len(set(lengths)) == 1:
        assert isinstance(grouped, EqualSegments)
        return
    assert isinstance(grouped, GroupedSegments)
    mx.random.seed(seed)
    attention = VisionAttention(16, 2)
    n = bounds[-1]
    x, cos, sin = mx.random.normal((n, 16)), mx.random.normal((n, 8)), mx.random.normal((n, 8))
    dense = block_diagonal_mask(bounds)
    np.testing.assert_allclose(
        np.array(attention(x, cos, sin, grouped)), np.array(attention(x, cos, sin, dense)), atol=1e-5
    )

    def loss(model: nn.Module, mask) -> mx.array:
        return (model(x, cos, sin, mask) ** 2).sum()

    g1 = nn.value_and_grad(attention, loss)(attention, grouped)[1]
    g2 = nn.value_and_grad(attention, loss)(attention, dense)[1]
    np.testing.assert_allclose(np.array(g1["qkv"]["weight"]), np.array(g2["qkv"]["weight"]), rtol=1e-4, atol=1e-4)


def test_small_or_single_segments_keep_their_masks() -> None:
    assert segment_mask([0, 10]) is None
    assert isinstance(segment_mask([0, 10, 30]), mx.array)  # small: the dense mask
    assert isinstance(segment_mask([0, 400, 600]), GroupedSegments)
    assert segment_mask([0, 2000, 4000]) == EqualSegments(2000)
