"""Models: a CIFAR-style ResNet-18 and torchvision classifiers by name.

The CIFAR variant (He et al. 2016, as used for CIFAR in the method's paper) has
a 3x3 stride-1 stem and no max-pool, so 20-32 px inputs keep their spatial size
through the first stage. Every model ends in global average pooling, so one set
of weights serves every staged resolution, and in a `Dropout` before the
classifier whose rate the schedule changes with the resolution
(`set_dropout`).

Model code never touches a communicator.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.yaml_safe import clip


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet18(nn.Module):
    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(2):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.0)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(self.dropout(out))


def _torchvision_model(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    import torchvision

    classifiers = sorted(torchvision.models.list_models(module=torchvision.models))
    if arch not in classifiers:
        kind = (
            "a torchvision model, but not an image classifier (detection, segmentation, video or "
            "optical flow models do not take num_classes this way)"
            if arch in torchvision.models.list_models()
            else "not resnet18_cifar nor a torchvision classification model"
        )
        raise ConfigError(
            f"config key 'model.arch' is '{clip(arch)}': {kind}; valid: resnet18_cifar or a "
            f"classification model such as {', '.join(classifiers[:12])}, ..."
        )
    try:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"config key 'model.arch' is '{arch}': torchvision cannot build it with num_classes="
            f"{num_classes} ({e}); choose another classification model"
        ) from None
    if in_channels != 3:
        # Swap the first convolution for one that takes `in_channels` (grayscale data).
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels,
                    mod.out_channels,
                    mod.kernel_size,
                    mod.stride,
                    mod.padding,
                    bias=mod.bias is not None,
                )
                parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                setattr(parent, name.rsplit(".", 1)[-1], new)
                break
    # Put a settable dropout in front of the classifier (the last Linear layer).
    last = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(last.rsplit(".", 1)[0]) if "." in last else model
    leaf = last.rsplit(".", 1)[-1]
    setattr(parent, leaf, nn.Sequential(nn.Dropout(0.0), getattr(parent, leaf)))
    return model


def build_model(arch: str, num_classes: int, in_channels: int, width: int = 64) -> nn.Module:
    if arch == "resnet18_cifar":
        return CifarResNet18(num_classes, in_channels, width)
    return _torchvision_model(arch, num_classes, in_channels)


def check_model(arch: str, num_classes: int, in_channels: int, width: int, resolutions: list[int]) -> None:
    """Start-up check (every rank, inside `agree`): the model builds and takes one image at the
    lowest and the highest resolution. Without it a bad `model.arch`, or a model that needs larger
    images, would fail only inside the first mini-epoch."""
    model = build_model(arch, num_classes, in_channels, width).eval()
    for r in sorted({min(resolutions), max(resolutions)}):
        try:
            with torch.no_grad():
                out = model(torch.zeros(1, in_channels, r, r))
        except (RuntimeError, ValueError, AssertionError, TypeError) as e:
            raise ConfigError(
                f"config key 'model.arch' is '{arch}', which cannot take {r} px images "
                f"({type(e).__name__}: {str(e)[:200]}); use resnet18_cifar or a model for small images, "
                f"or stage larger resolutions"
            ) from None
        if tuple(out.shape) != (1, num_classes):
            raise ConfigError(
                f"config key 'model.arch' is '{arch}': it outputs shape {tuple(out.shape)} for one image, "
                f"not (1, {num_classes}); choose an image classification model"
            )


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the rate of every dropout layer (the schedule raises it with the resolution)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
