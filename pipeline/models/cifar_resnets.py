"""The thin CIFAR-10 networks of the ResNet paper (He et al. 2015, sec. 4.2), and their plain twins, as timm models.

6n+2 weighted layers: a 3x3 conv stem with 16 channels (+BN+ReLU), three stages of n basic blocks (two 3x3 convs
each) with 16 / 32 / 64 channels at strides 1 / 2 / 2, global average pooling and a 10-way fully connected layer.

    name                   shortcut where the shape changes (stage 2 and 3 entries)
    cifar_resnet{depth}    option A: identity, strided subsampling and zero-padded channels, no parameters
    cifar_resnet{depth}b   option B: 1x1 conv (stride 2) + BN, 2,752 parameters more
    cifar_plain{depth}     none: the same layers with no shortcut anywhere (as many parameters as option A)

    depth (n)                20 (3)    32 (5)    44 (7)    56 (9)    110 (18)
    params, 10 classes (A)   269,722   464,154   658,586   853,018   1,727,962
    the paper (table 6)      0.27M     0.46M     0.66M     0.85M     1.7M

Those five depths are registered for each kind. Option B is its own registered name (the `b` suffix, as timm names
the variants of one architecture: resnet50d) rather than a constructor argument, because a task file selects a
backbone by name alone (`model.backbone.name=cifar_resnet56b`), names are what a sweep varies, and the name is what
MLflow records: no hidden keyword decides what a run trained. `timm.create_model(name, shortcut='B')`
works too, for code that builds models itself.

The taps of `features_only=True` are `act1` (the stem's output, stride 1), `layer1` (1), `layer2` (2) and `layer3`
(4), which pipeline/models/backbones.py names stages `stem, layer1, layer2, layer3`. The default normalisation
(`pretrained_cfg` mean / std) is CIFAR-10's per-channel training-set statistics; the paper subtracts the per-pixel
mean image, which no transform here holds. No pretrained weights exist: `weights: none`, a local file or `runs:/`.

Weights start as the paper's: He init (`kaiming_normal_`, fan_out, as the reference Torch implementation) for
convolutions, BatchNorm at weight 1 and bias 0. The last BN of a block is not zero-initialised: the paper does not, and
in a plain net it would cut the signal.

Importing this module registers the models with timm (pipeline/models/backbones.py imports it).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, register_model
from torch import nn

__all__ = ["CifarResNet", "DEPTHS", "NAMES"]

DEPTHS = (20, 32, 44, 56, 110)
WIDTHS = (16, 32, 64)
# CIFAR-10 training-set per-channel mean and std (of pixel values in 0..1).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SHORTCUTS = ("A", "B", "none")


class PadShortcut(nn.Module):
    """Option A: the identity where the shape changes: every `stride`-th pixel, the new channels zero. No parameters."""

    def __init__(self, out_chs: int, stride: int):
        super().__init__()
        self.out_chs, self.stride = out_chs, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_chs - x.shape[1]))

    def extra_repr(self) -> str:
        return f"out_chs={self.out_chs}, stride={self.stride}"


class BasicBlock(nn.Module):
    """Two 3x3 convs; `shortcut` A or B adds the block's input back before the last ReLU, `none` (plain) does not."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU(inplace=True)
        self.residual = shortcut != "none"
        self.downsample: nn.Module | None = None  # the identity where the shape stays (or no shortcut at all)
        if self.residual and (stride != 1 or in_chs != out_chs):
            self.downsample = PadShortcut(out_chs, stride) if shortcut == "A" else nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act2(out)


class CifarResNet(nn.Module):
    """The 6n+2-layer CIFAR network; `shortcut` A / B (residual, see the module docstring) or none (the plain twin)."""

    def __init__(self, depth: int = 20, shortcut: str = "A", num_classes: int = 10, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: float = 0.0, output_stride: int = 32):
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '' (none), got {global_pool!r}")
        if output_stride < 4:
            # The network's total stride is 4: any output_stride from 4 up needs no dilation.
            raise ValueError(f"output_stride must be >= 4 (the network's own stride), got {output_stride}")
        self.depth, self.shortcut = depth, shortcut
        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, global_pool
        self.grad_checkpointing = False
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_chans, WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(WIDTHS[0])
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=WIDTHS[0], reduction=1, module="act1")]
        in_chs, reduction = WIDTHS[0], 1
        for i, width in enumerate(WIDTHS):
            stride = 1 if i == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs if b == 0 else width, width, stride if b == 0 else 1, shortcut)
                      for b in range(n)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"layer{i + 1}"))
            in_chs = width
        self.num_features = self.head_hidden_size = in_chs
        self.fc = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # The methods every timm model answers.
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, str]:
        return dict(stem=r"^conv1|bn1", blocks=r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise ValueError("gradient checkpointing is not supported (nor needed) by the CIFAR ResNets")

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes, self.global_pool = num_classes, global_pool
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        if self.drop_rate:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg() -> dict[str, Any]:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": CIFAR10_MEAN, "std": CIFAR10_STD, "first_conv": "conv1",
            "classifier": "fc"}


def _create(variant: str, pretrained: bool = False, **kwargs) -> CifarResNet:
    return build_model_with_cfg(CifarResNet, variant, pretrained,
                                feature_cfg=dict(out_indices=(0, 1, 2, 3)), **kwargs)


def _entrypoint(name: str, depth: int, shortcut: str | None) -> Callable[..., CifarResNet]:
    """The timm entry point of `name`; `shortcut` None leaves it a keyword (the option A names take shortcut='B')."""

    def create(pretrained: bool = False, **kwargs) -> CifarResNet:
        fixed = {"shortcut": shortcut} if shortcut is not None else {}
        if shortcut is not None and "shortcut" in kwargs:
            raise TypeError(f"{name} has a fixed shortcut ({shortcut}); use cifar_resnet{depth}(shortcut=...)")
        return _create(name, pretrained, depth=depth, **fixed, **kwargs)

    # timm registers an entry point under its function's name, in its module's namespace (as `def name(...)` would).
    create.__name__ = create.__qualname__ = name
    create.__doc__ = f"ResNet paper CIFAR network, depth {depth}, shortcut {shortcut or 'A (or shortcut=B)'}."
    return create


_VARIANTS = {f"cifar_resnet{d}": (d, None) for d in DEPTHS}  # option A by default
_VARIANTS.update({f"cifar_resnet{d}b": (d, "B") for d in DEPTHS})
_VARIANTS.update({f"cifar_plain{d}": (d, "none") for d in DEPTHS})
NAMES = tuple(_VARIANTS)

# Read by timm's register_model: each name's pretrained_cfg (normalisation, input size; no weights).
default_cfgs = {name: _cfg() for name in NAMES}

for _name, (_depth, _shortcut) in _VARIANTS.items():
    globals()[_name] = register_model(_entrypoint(_name, _depth, _shortcut))
