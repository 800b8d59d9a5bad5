"""Any timm backbone as an ordered set of named stages: `stem, layer1 .. layer4` for the ResNet family.

The fine-tuning code and every task head talk to stage names only. `Backbone.forward` returns an ordered dict of
feature maps, one per stage; `channels` and `strides` describe them. Stages come from timm's `feature_info`
(the modules where timm taps features), which every `features_only` timm model has.
"""
from __future__ import annotations

import logging
from collections import OrderedDict

import timm
import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.models import cifar_resnets  # noqa: F401  registers cifar_resnet*/cifar_plain* with timm
from pipeline.models import weights as W

log = logging.getLogger(__name__)

# The variants the original ResNet write-up and its follow-ups discuss; any other timm model name works too.
RESNET_FAMILY = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "wide_resnet50_2", "densenet121",
)


class Backbone(nn.Module):
    """A timm feature extractor whose top-level modules are grouped into named stages.

    Attributes set by `pipeline.train.finetune` (and nothing else):
      no_grad_stages: the leading stages run under `torch.no_grad()` (the frozen prefix costs a forward pass only)
      bn_eval_stages: BatchNorm layers of these stages stay in eval mode whatever `train()` is called
    """

    def __init__(self, body: nn.Module, name: str, weights: str = "none", lineage: W.Lineage | None = None):
        super().__init__()
        self.body = body
        self.name = name
        self.weights = weights  # what was loaded: a timm tag, a file path, runs:/ or models:/ (pipeline run), or none
        self.lineage = lineage or W.Lineage(weights)  # where those weights came from, what was taken from them
        info = body.feature_info
        self.out_modules = info.module_name()
        self.stages, self.stage_children, self.sequential = _group_stages(body, self.out_modules, info.reduction())
        out_names = self.stages[-len(self.out_modules):]
        self.out_stages = list(out_names)
        self.channels = dict(zip(out_names, info.channels()))
        self.strides = dict(zip(out_names, info.reduction()))
        self.no_grad_stages = 0
        self.bn_eval_stages: set[str] = set()

    @property
    def num_features(self) -> int:
        return self.channels[self.out_stages[-1]]

    def stage_modules(self) -> OrderedDict[str, nn.Module]:
        """Each stage as one module (a ModuleList of its parts), in forward order."""
        return OrderedDict((s, nn.ModuleList(self.stage_children[s])) for s in self.stages)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if not self.sequential:
            feats = self.body(x)
            return OrderedDict(zip(self.out_stages, feats))
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, stage in enumerate(self.stages):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.no_grad_stages):
                for module in self.stage_children[stage]:
                    x = module(x)
            if stage in self.channels:
                out[stage] = x
        return out

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # Re-applied on every train(): requires_grad=False alone does not stop BN running stats from updating.
        for stage in self.bn_eval_stages:
            for module in self.stage_children[stage]:
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self


def _group_stages(body: nn.Module, out_modules: list[str], reductions: list[int]):
    """Split the body's top-level children into stages that each end at one feature tap.

    FeatureListNet flattens nested names (`features.denseblock1` -> `features_denseblock1`), so taps are matched on
    the flattened name. Children before the first tap form `stem` when the first tap is already past the stem
    (reduction > 2, e.g. ConvNeXt); for ResNets the first tap is the stem's own output (reduction 2).
    """
    names = _stage_names(len(out_modules), first_reduction=reductions[0])
    children = list(body.named_children())
    taps = [m.replace(".", "_") for m in out_modules]
    child_names = [n for n, _ in children]
    if not all(t in child_names for t in taps):
        # Hook- or getter-based extractors (EfficientNet, ViT) run as one piece: stages by parameter order.
        return names, _stages_by_param_order(body, out_modules, names), False
    groups: OrderedDict[str, list[nn.Module]] = OrderedDict((n, []) for n in names)
    stage_of_tap = dict(zip(taps, names[-len(taps):]))
    pending: list[nn.Module] = []  # children since the previous tap
    for child_name, module in children:
        pending.append(module)
        if child_name not in stage_of_tap:
            continue
        stage = stage_of_tap[child_name]
        if stage == names[1] and len(names) > len(taps):
            groups["stem"], pending = pending[:-1], pending[-1:]  # the children before the first tap
        groups[stage], pending = pending, []
    return names, groups, True


def _stage_names(num_taps: int, first_reduction: int) -> list[str]:
    if first_reduction <= 2:
        return ["stem"] + [f"layer{i}" for i in range(1, num_taps)]
    return ["stem"] + [f"layer{i}" for i in range(1, num_taps + 1)]


def _stages_by_param_order(body: nn.Module, out_modules: list[str], names: list[str]) -> OrderedDict:
    """Stages for extractors that run as one piece: every module holding weights joins the first tap at or after it.

    timm registers modules in forward order, so a module's position in `named_modules()` tells its stage.
    """
    leaves = [(n, m) for n, m in body.named_modules()
              if n and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(recurse=False)))]
    tap_stages = names[-len(out_modules):]
    ends = []  # index of the last leaf inside each tap
    for tap in out_modules:
        inside = [i for i, (n, _) in enumerate(leaves) if n == tap or n.startswith(tap + ".")]
        ends.append(max(inside) if inside else (ends[-1] if ends else -1))
    groups: OrderedDict[str, list[nn.Module]] = OrderedDict((n, []) for n in names)
    for i, (_, module) in enumerate(leaves):
        stage = next((s for s, end in zip(tap_stages, ends) if i <= end), tap_stages[-1])
        if stage == tap_stages[0] and len(names) > len(out_modules) and not _inside(leaves[i][0], out_modules[0]):
            stage = "stem"
        groups[stage].append(module)
    return groups


def _inside(name: str, tap: str) -> bool:
    return name == tap or name.startswith(tap + ".")


def build(name: str, weights: str = "imagenet", out_indices: tuple[int, ...] | None = None,
          output_stride: int = 32) -> Backbone:
    """Build backbone `name` (any timm model) and load its weights: imagenet | a timm tag | hf-hub:<org>/<repo> | a
    file path | none. `runs:/` and `models:/` weights are fetched by the stage runner (pipeline/models/tracked.py).

    `output_stride` 8 or 16 dilates the last stages instead of striding them (timm models that support it, e.g.
    ResNets); the weights are the same, `strides` then reports the dilated reductions.
    """
    check_name(name)
    kwargs = {"features_only": True}
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if weights == "none":
        return Backbone(timm.create_model(name, pretrained=False, **kwargs), name, weights="none")
    if W.is_path(weights):
        found = W.read_weights(weights)
        loaded_as, source = weights, f"model.backbone.weights: '{weights}'"
    else:
        loaded_as = W.resolve_tag(name, weights)
        found = W.FileWeights(W.hub_state_dict(loaded_as), skipped=[])
        source = f"weights {loaded_as}"
    body, loaded, dropped = _load(name, found.tensors, source, kwargs)
    lineage = W.Lineage(loaded_as, found.run_id, found.task, loaded, found.skipped + dropped)
    return Backbone(body, name, weights=loaded_as, lineage=lineage)


def build_or_random(name: str, weights: str, fallback_to_random: bool, output_stride: int = 32) -> Backbone:
    """`build`, except that unreachable hub weights fall back to random init when asked (the quickstart alone); a
    user's own weights (a file, a run's checkpoint) never do."""
    try:
        return build(name, weights, output_stride=output_stride)
    except UserError as err:
        if not fallback_to_random or weights == "none" or W.is_path(weights) or W.is_tracked(weights):
            raise
        log.warning(f"!!! {err}\n!!! continuing from RANDOM INIT (weights=none); accuracy will be lower than with "
                    "pretrained weights")
        return build(name, "none", output_stride=output_stride)


def check_fits(name: str, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """The error `build` gives for weights in the extractor's own naming (a pipeline checkpoint's backbone) that do
    not fit backbone `name`, raised without building anything (the model is laid out on the meta device)."""
    with torch.device("meta"):
        own = timm.create_model(name, pretrained=False, features_only=True).state_dict()
    problem = mismatch(own, state_dict, name)
    if problem:
        raise UserError(f"{source} does not match {name}: {problem}")


def mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], name: str) -> str | None:
    """None when `given` fits `expected` key for key and shape; else the first mismatched keys and shapes, in model
    order. BatchNorm's step counters (`num_batches_tracked`) are left aside: FrozenBatchNorm2d (a detection backbone)
    has none, and they are not weights."""
    missing = [k for k in expected if k not in given and not _counter(k)]
    unexpected = [k for k in given if k not in expected and not _counter(k)]
    shapes = [f"{k} {list(given[k].shape)} given, {list(v.shape)} in {name}" for k, v in expected.items()
              if k in given and given[k].shape != v.shape]
    parts = [f"{len(missing)} missing keys {_few(missing)}"] if missing else []
    parts += [f"{len(unexpected)} unexpected keys {_few(unexpected)}"] if unexpected else []
    parts += [f"{len(shapes)} of another shape ({'; '.join(shapes[:3])}{'; ...' if len(shapes) > 3 else ''})"] \
        if shapes else []
    return ", ".join(parts) or None


def _counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _load(name: str, state_dict: dict, source: str, kwargs: dict) -> tuple[nn.Module, int, list[str]]:
    """The body with `state_dict` loaded, how many tensors were loaded, and the names of those left out."""
    body = timm.create_model(name, pretrained=False, **kwargs)
    own = body.state_dict()
    if {k for k in state_dict if not _counter(k)} == {k for k in own if not _counter(k)}:
        # Already in the extractor's own naming (a checkpoint of this pipeline's backbone).
        _load_strict(body, state_dict, source, name)
        return body, len(state_dict), []
    # A full classification model's state_dict (timm or torchvision naming): drop its classifier, match the rest.
    full = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    classifier = timm.models.get_pretrained_cfg(name).classifier if timm.models.get_pretrained_cfg(name) else None
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    dropped = [k for k in state_dict if any(k.startswith(c + ".") for c in classifiers)]
    sd = {k: v for k, v in state_dict.items() if k not in dropped}
    problem = mismatch(full, sd, name)
    if problem:
        raise UserError(f"{source} does not match {name}: {problem}; is it a {name} state_dict?")
    try:
        body = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": sd}, **kwargs)
    except RuntimeError as err:  # what the key and shape check above cannot see
        raise UserError(f"{source} does not fit {name}: {_first_line(err)}") from None
    return body, len(sd), dropped


def _load_strict(module: nn.Module, state_dict: dict, source: str, name: str) -> None:
    problem = mismatch(module.state_dict(), state_dict, name)
    if problem:
        raise UserError(f"{source} does not match {name}: {problem}")
    # Strict but for BatchNorm step counters a FrozenBatchNorm2d checkpoint lacks (mismatch checked the rest).
    module.load_state_dict(state_dict, strict=False)


def _few(keys: list[str]) -> str:
    return "(" + ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "") + ")" if keys else ""


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return " ".join(lines[1:3] if len(lines) > 1 else lines)[:300]


def check_name(name: str) -> None:
    if timm.is_model(name):
        return
    import difflib

    close = difflib.get_close_matches(name, timm.list_models() + list(RESNET_FAMILY), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(dict.fromkeys(close))}?" if close else f"; e.g. {', '.join(RESNET_FAMILY[:5])}"
    raise UserError(f"model.backbone.name: '{name}' is not a timm model{hint}")


def depth(name: str) -> int | None:
    """The depth in a family name (resnet50 -> 50, resnext101_32x8d -> 101, densenet121 -> 121, cifar_plain56 -> 56)."""
    import re

    match = re.match(r"^[a-z_]*?(\d+)", name)
    return int(match.group(1)) if match else None


def pretrained_mean_std(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)
