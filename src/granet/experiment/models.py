"""The networks of the experiments, defined here (torchvision is not needed).

All return raw logits. Layers carry torchvision-like names (``conv1``, ``layer2.0.conv1``, ``fc``,
``features.0``, ``classifier``) so that sparsity include/exclude patterns read naturally.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

MODELS: tuple[str, ...] = (
    "mlp",
    "lenet5",
    "vgg19",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet50-imagenet",
)


def build_model(
    name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28
) -> nn.Module:
    """A freshly initialised network ``name`` (one of :data:`MODELS`) for square images of
    ``in_channels`` x ``image_size`` x ``image_size`` and ``num_classes`` classes."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(MODELS)}")
    for arg, value in (
        ("num_classes", num_classes),
        ("in_channels", in_channels),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    if name == "mlp":
        return mlp(in_channels * image_size**2, num_classes)
    if name == "lenet5":
        return lenet5(num_classes, in_channels, image_size)
    if name == "vgg19":
        return VGG(VGG19_LAYERS, num_classes, in_channels)
    block, depths = RESNETS[name.removesuffix("-imagenet")]
    return ResNet(block, depths, num_classes, in_channels, imagenet_stem=name.endswith("imagenet"))


def mlp(
    in_features: int, num_classes: int, hidden: tuple[int, ...] = (1000, 1000, 1000)
) -> nn.Sequential:
    """Fully connected ReLU network on the flattened input (784-1000-1000-1000-10 on MNIST)."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    widths = (in_features, *hidden)
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:]), start=1):
        layers += [(f"fc{i}", nn.Linear(fan_in, fan_out)), (f"relu{i}", nn.ReLU())]
    layers.append((f"fc{len(widths)}", nn.Linear(widths[-1], num_classes)))
    return nn.Sequential(OrderedDict(layers))


def lenet5(num_classes: int, in_channels: int, image_size: int) -> nn.Sequential:
    """LeNet-5: conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, fc classes (ReLU and max
    pooling). Images smaller than 32x32 are zero-padded up to about 32 by the first convolution,
    so 28x28 and 32x32 inputs both reach the classic 16x5x5 feature map."""
    padding = max(0, (32 - image_size + 1) // 2)
    side = ((image_size + 2 * padding - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for lenet5")
    layers = OrderedDict(
        conv1=nn.Conv2d(in_channels, 6, 5, padding=padding),
        relu1=nn.ReLU(),
        pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 16, 5),
        relu2=nn.ReLU(),
        pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(16 * side * side, 120),
        relu3=nn.ReLU(),
        fc2=nn.Linear(120, 84),
        relu4=nn.ReLU(),
        fc3=nn.Linear(84, num_classes),
    )
    return nn.Sequential(layers)


VGG19_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M")
VGG19_LAYERS += (512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG in its CIFAR form: 3x3 convolutions with BatchNorm and ReLU, 2x2 max pooling ("M"),
    global average pooling and one linear classifier. Pooling rounds up, so 28x28 inputs work."""

    def __init__(self, layers: tuple[int | str, ...], num_classes: int, in_channels: int) -> None:
        super().__init__()
        modules: list[nn.Module] = []
        channels = in_channels
        for layer in layers:
            if layer == "M":
                modules.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                modules += [
                    nn.Conv2d(channels, int(layer), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(layer)),
                    nn.ReLU(inplace=True),
                ]
                channels = int(layer)
        self.features = nn.Sequential(*modules)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_planes, out_planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 convolution with BatchNorm where the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes)
    )


RESNETS: dict[str, tuple[type[BasicBlock | Bottleneck], tuple[int, ...]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """ResNet with four stages of 64, 128, 256 and 512 planes. The CIFAR form has a 3x3 stride-1
    stem and no max pooling; ``imagenet_stem`` gives the 7x7 stride-2 stem and 3x3 max pool."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, ...],
        num_classes: int,
        in_channels: int,
        imagenet_stem: bool = False,
    ) -> None:
        super().__init__()
        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, padding=3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1) if imagenet_stem else nn.Identity()
        in_planes = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
            blocks = []
            for j in range(depth):
                stride = 2 if i > 1 and j == 0 else 1
                blocks.append(block(in_planes, planes, stride))
                in_planes = planes * block.expansion
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _init_convs(model: nn.Module) -> None:
    """He initialisation (fan-out, ReLU) for every convolution, as in the ResNet paper."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
