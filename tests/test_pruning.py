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
