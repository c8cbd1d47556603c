import math

import torch

from granet.pruning import PRUNING, global_pruning, uniform_pruning


def scores_of(*layers):
    return [torch.where(torch.tensor(s) != 0, torch.tensor(s).abs(), -math.inf) for s in layers]


def test_global_pruning_keeps_the_best_weights_across_layers():
    scores = scores_of([5.0, 1.0, 0.0, 4.0], [3.0, 2.0])
    masks, counts = global_pruning(scores, [3, 2], 0.5)
    assert [m.tolist() for m in masks] == [[True, False, False, True], [True, False]]
    assert counts.tolist() == [2, 1]


def test_uniform_pruning_takes_each_layer_to_the_target_of_its_size():
    # layer 0: 10 weights, 8 active -> keeps 10 - floor(0.6 * 10) = 4
    # layer 1: 5 weights, 1 active, already sparser than 60% -> keeps its 1
    first = [float(i) for i in range(1, 9)] + [0.0, 0.0]
    masks, counts = uniform_pruning(scores_of(first, [0.0, 7.0, 0.0, 0.0, 0.0]), [8, 1], 0.6)
    assert counts == [4, 1]
    assert masks[0].nonzero().view(-1).tolist() == [4, 5, 6, 7]
    assert masks[1].tolist() == [False, True, False, False, False]


def test_registry_names():
    assert list(PRUNING) == ["global", "uniform"]


def test_nothing_to_prune_is_none():
    scores = scores_of([5.0, 1.0, 0.0, 0.0], [3.0, 0.0])
    assert global_pruning(scores, [2, 1], 0.5) is None  # keeps round(0.5 * 6) = 3 of 3
    assert uniform_pruning(scores, [2, 1], 0.5) is None  # 2 of 4 and 1 of 2 already


def test_uniform_prunes_a_denser_layer_when_the_total_is_at_the_target():
    # 4 + 1 of 10 active is the global 50% target, but the first layer is above its own 50%
    scores = scores_of([4.0, 3.0, 2.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0])
    assert global_pruning(scores, [4, 1], 0.5) is None
    masks, counts = uniform_pruning(scores, [4, 1], 0.5)
    assert counts == [3, 1] and masks[0].tolist() == [True, True, True, False, False, False]
