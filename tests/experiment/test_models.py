"""The experiment networks: shapes, known sizes and argument checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from granet.experiment.models import MODELS, build_model


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# (model, in_channels, image_size): MNIST- and CIFAR-shaped inputs, small where the net is big.
SHAPES = [
    ("mlp", 1, 28),
    ("mlp", 3, 32),
    ("lenet5", 1, 28),
    ("lenet5", 3, 32),
    ("vgg19", 1, 28),
    ("resnet18", 3, 16),
    ("resnet34", 1, 12),
    ("resnet50", 3, 8),
    ("resnet50-imagenet", 3, 32),
]


@pytest.mark.parametrize(("name", "in_channels", "image_size"), SHAPES)
def test_forward_gives_one_logit_per_class(name, in_channels, image_size):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_channels=in_channels, image_size=image_size)
    with torch.no_grad():
        out = model.eval()(torch.randn(2, in_channels, image_size, image_size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_every_model_is_covered():
    assert {name for name, _, _ in SHAPES} == set(MODELS)


def test_mlp_layers():
    model = build_model("mlp")
    widths = [(m.in_features, m.out_features) for m in model if isinstance(m, nn.Linear)]
    assert widths == [(784, 1000), (1000, 1000), (1000, 1000), (1000, 10)]
    assert build_model("mlp", in_channels=3, image_size=32).fc1.in_features == 3072


@pytest.mark.parametrize(("in_channels", "image_size"), [(1, 28), (3, 32)])
def test_lenet5_reaches_the_classic_16x5x5_map(in_channels, image_size):
    model = build_model("lenet5", in_channels=in_channels, image_size=image_size)
    assert model.fc1.in_features == 16 * 5 * 5
    assert n_params(model) == 61706 + 25 * 6 * (in_channels - 1)  # 61,706 for LeNet-5 on 1x32x32


@pytest.mark.parametrize(
    ("name", "expected"),
    # The usual CIFAR ResNets have these sizes; resnet50-imagenet is the standard ResNet-50.
    [("resnet18", 11_173_962), ("resnet34", 21_282_122), ("resnet50", 23_520_842)],
)
def test_cifar_resnet_sizes(name, expected):
    model = build_model(name, in_channels=3, image_size=32)
    assert n_params(model) == expected
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)


def test_imagenet_resnet50_is_the_standard_one():
    model = build_model("resnet50-imagenet", num_classes=1000, in_channels=3, image_size=224)
    assert n_params(model) == 25_557_032
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d)


def test_vgg19_has_16_batchnormed_3x3_convs():
    model = build_model("vgg19", in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 16
    assert model.classifier.in_features == 512


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="choose from: mlp, lenet5, vgg19, resnet18, resnet34"):
        build_model("resnet101")


@pytest.mark.parametrize("arg", ["num_classes", "in_channels", "image_size"])
def test_bad_sizes(arg):
    with pytest.raises(ValueError, match=arg):
        build_model("mlp", **{arg: 0})
