"""Hand-computed checks of the shared pure helpers (geometry, token log-probs)."""

from __future__ import annotations

import math

import torch

from cv_ray.geometry import apply, compose, iou, map_box, scaling, translation
from cv_ray.logprobs import token_logprobs


def test_compose_applies_right_matrix_first():
    # b: scale by 2, then a: shift by (10, 0).  (1, 1) -> (2, 2) -> (12, 2)
    m = compose(translation(10, 0), scaling(2, 2))
    assert apply(m, 1, 1) == (12.0, 2.0)


def test_map_box_of_a_crop_and_a_quarter_turn():
    # A crop at (30, 40) maps result pixels back by adding the offset.
    assert map_box(translation(30, 40), [0, 0, 10, 5]) == [30.0, 40.0, 40.0, 45.0]
    # rotate_90 (CCW) of a W=100 x H=60 image: result is 60 x 100 and result (x, y) came from input (W - y, x).
    to_input = [[0.0, -1.0, 100.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    # Result box [0, 0, 60, 10] (the top strip of the result) is the right-most strip of the input.
    assert map_box(to_input, [0, 0, 60, 10]) == [90.0, 0.0, 100.0, 60.0]


def test_iou_hand_values():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    # overlap 5x10 = 50; union 100 + 100 - 50 = 150
    assert math.isclose(iou([0, 0, 10, 10], [5, 0, 15, 10]), 50 / 150)
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_token_logprobs_with_temperature_and_ban():
    logits = torch.tensor([[0.0, math.log(3.0), 5.0]])
    ids = torch.tensor([1])
    # Token 2 banned: softmax over [0, log 3] = [1/4, 3/4]; log-prob of token 1 = log(3/4).
    lp, ent = token_logprobs(logits, ids, temperature=1.0, banned_token_ids=[2])
    assert torch.allclose(lp, torch.tensor([math.log(0.75)]))
    # entropy = -(1/4 log 1/4 + 3/4 log 3/4)
    assert torch.allclose(ent, torch.tensor([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]))
    # Temperature 2 without the ban: logits/2 = [0, log(3)/2, 2.5] -> softmax by hand.
    z = torch.tensor([0.0, math.log(3.0) / 2, 2.5])
    expected = z[1] - torch.logsumexp(z, 0)
    lp2, _ = token_logprobs(logits, ids, temperature=2.0)
    assert torch.allclose(lp2, expected.unsqueeze(0))
