"""Fine-tuning control on named stages: freezing, BatchNorm policy, per-stage learning rates, gradual unfreezing.

Everything here works on part names only: the backbone's stages (`stem, layer1 .. layer4`) followed by the task
model's head parts (`head`; later `fpn`, `rpn`, `roi_heads`, `aspp`, `aux`, `embedding`, `margin`), so it serves
every task unchanged. Task models expose `.backbone` (a `pipeline.backbones.Backbone`) and `.head_parts()`.

Freezing happens in one place, `apply()`; param groups come from a pure function, `param_groups()`.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from pipeline.errors import UserError


@dataclass(frozen=True)
class Plan:
    parts: tuple[str, ...]           # backbone stages, then head parts, in forward order
    backbone_stages: tuple[str, ...]
    frozen: frozenset[str]           # frozen at the start
    unfreeze: dict[str, int]         # stage -> first epoch (1-based) it trains
    bn: str                          # frozen | eval | train
    lr_mult: dict[str, float]        # every part's multiplier of train.lr
    no_decay_norm_bias: bool
    cache_features: bool = False

    def frozen_at(self, epoch: int) -> frozenset[str]:
        return frozenset(s for s in self.frozen if self.unfreeze.get(s, 10**9) > epoch)

    def unfreezing_at(self, epoch: int) -> list[str]:
        return [s for s in self.parts if self.unfreeze.get(s) == epoch]


def parts(model: nn.Module) -> OrderedDict[str, list[nn.Module]]:
    """Every named part of a task model, in forward order: backbone stages, then head parts."""
    out: OrderedDict[str, list[nn.Module]] = OrderedDict(model.backbone.stage_children)
    for name, module in model.head_parts().items():
        out[name] = [module]
    return out


def make_plan(model: nn.Module, *, freeze: list[str] | str, bn: str, lr_mult: dict[str, float],
              layer_decay: float | None, unfreeze: dict[str, int], no_decay_norm_bias: bool, epochs: int,
              cache_features: bool = False) -> Plan:
    """Validate the `finetune:` section against this model's parts and resolve every part's lr multiplier."""
    names = list(parts(model))
    stages = list(model.backbone.stages)
    frozen = stages if freeze == "all" else list(freeze)
    for key, listed in (("freeze", frozen), ("lr_mult", lr_mult), ("unfreeze", unfreeze)):
        for name in listed:
            if name not in names:
                raise UserError(f"finetune.{key}: unknown stage '{name}'; valid: {', '.join(names)} (or freeze: all)")
    for stage, epoch in unfreeze.items():
        if stage not in frozen:
            raise UserError(f"finetune.unfreeze.{stage}: '{stage}' is not frozen; add it to finetune.freeze")
        if not 1 <= epoch <= epochs:
            raise UserError(f"finetune.unfreeze.{stage}={epoch}: must be an epoch in 1..train.epochs ({epochs})")
    for stage in lr_mult:
        if stage in frozen and stage not in unfreeze:
            raise UserError(f"finetune.lr_mult.{stage}: '{stage}' is frozen for the whole run; remove the multiplier "
                            f"or unfreeze it (finetune.unfreeze.{stage}=EPOCH)")
    if cache_features and (freeze != "all" and set(stages) - set(frozen) or unfreeze):
        raise UserError("finetune.cache_features needs the whole backbone frozen for the whole run "
                        "(finetune.freeze: all, no finetune.unfreeze)")
    mults = _multipliers(names, stages, lr_mult, layer_decay)
    return Plan(parts=tuple(names), backbone_stages=tuple(stages), frozen=frozenset(frozen), unfreeze=dict(unfreeze),
                bn=bn, lr_mult=mults, no_decay_norm_bias=no_decay_norm_bias, cache_features=cache_features)


def _multipliers(names: list[str], stages: list[str], lr_mult: dict[str, float], layer_decay: float | None):
    # Layer-wise decay: head parts 1, the last stage decay, the one before decay^2, ... then explicit multipliers win.
    mults = {name: 1.0 for name in names}
    if layer_decay is not None:
        for depth_from_top, stage in enumerate(reversed(stages), start=1):
            mults[stage] = layer_decay ** depth_from_top
    mults.update(lr_mult)
    return mults


def apply(model: nn.Module, plan: Plan, epoch: int) -> None:
    """Put the model in the state the plan asks for at `epoch` (1-based): the one place that freezes anything."""
    frozen = plan.frozen_at(epoch)
    for name, modules in parts(model).items():
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(name not in frozen)
    backbone = model.backbone
    if plan.bn == "eval":
        backbone.bn_eval_stages = set(backbone.stages)
    elif plan.bn == "frozen":
        backbone.bn_eval_stages = {s for s in backbone.stages if s in frozen}
    else:
        backbone.bn_eval_stages = set()
    # The leading run of frozen stages builds no autograd graph. Under bn=train their BN still updates, by request.
    prefix = 0
    for stage in backbone.stages:
        if stage not in frozen:
            break
        prefix += 1
    backbone.no_grad_stages = prefix
    model.train(model.training)  # re-apply the BN policy now


def param_groups(model: nn.Module, plan: Plan, base_lr: float, weight_decay: float, epoch: int = 1,
                 only: list[str] | None = None) -> list[dict]:
    """One group per trainable part (two with `no_decay_norm_bias`: decayed weights, and norm/bias without decay).

    Pure: reads the plan, not `requires_grad`, so it can be called before `apply()` and tested alone. Frozen
    parameters are absent. `base_lr` is kept in each group; schedules set `lr = base_lr * factor` for all groups.
    """
    frozen = plan.frozen_at(epoch)
    groups = []
    for name, modules in parts(model).items():
        if name in frozen or (only is not None and name not in only):
            continue
        params = [p for m in modules for p in m.parameters()]
        lr = base_lr * plan.lr_mult[name]
        if plan.no_decay_norm_bias:
            # Norm weights and biases are 1-d: decaying them only fights the normalisation.
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            split = [(name, decay, weight_decay), (f"{name}.no_decay", no_decay, 0.0)]
        else:
            split = [(name, params, weight_decay)]
        for group_name, ps, wd in split:
            if ps:
                groups.append({"params": ps, "name": group_name, "stage": name, "lr": lr, "base_lr": lr,
                               "weight_decay": wd})
    return groups


def group_table(groups: list[dict], plan: Plan, model: nn.Module) -> str:
    """A printable table of every part: parameters, trainable or not, lr and weight decay."""
    rows = [("part", "params", "trainable", "lr", "weight_decay")]
    by_stage: dict[str, list[dict]] = {}
    for g in groups:
        by_stage.setdefault(g["stage"], []).append(g)
    for name, modules in parts(model).items():
        count = sum(p.numel() for m in modules for p in m.parameters())
        gs = by_stage.get(name)
        if gs:
            wds = "/".join(f"{g['weight_decay']:g}" for g in gs)
            rows.append((name, f"{count:,}", "yes", f"{gs[0]['lr']:.3g}", wds))
        else:
            when = f"from epoch {plan.unfreeze[name]}" if name in plan.unfreeze else "frozen"
            rows.append((name, f"{count:,}", when, "-", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def require_trainable(groups: list[dict], what: str) -> None:
    """Refuse a start where nothing would train: no param group, or every group at lr 0 (lr_mult)."""
    if not any(g["lr"] > 0 for g in groups):
        raise UserError(f"{what}: nothing trains at the start of this run (finetune.freeze covers every part, or each "
                        "trainable part has lr_mult 0); leave at least the head trainable")


def trainable_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def groups_until(model: nn.Module, plan: Plan, base_lr: float, weight_decay: float, epoch: int) -> list[dict]:
    """The optimizer's groups after `epoch` epochs, in the order training added them: the groups trainable from the
    start, then each unfreezing's groups at its epoch. Resuming rebuilds the same order, so optimizer state fits."""
    groups = param_groups(model, plan, base_lr, weight_decay, epoch=0)
    for e in range(1, epoch + 1):
        stages = plan.unfreezing_at(e)
        if stages:
            groups += param_groups(model, plan, base_lr, weight_decay, epoch=e, only=stages)
    return groups
