"""Backbones: every listed family member builds with named stages; weights load from files and the hub cache."""
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.models import backbones, weights

CHANNELS = {
    "resnet18": [64, 64, 128, 256, 512],
    "resnet34": [64, 64, 128, 256, 512],
    "resnet50": [64, 256, 512, 1024, 2048],
    "resnet101": [64, 256, 512, 1024, 2048],
    "resnet152": [64, 256, 512, 1024, 2048],
    "resnext50_32x4d": [64, 256, 512, 1024, 2048],
    "resnext101_32x8d": [64, 256, 512, 1024, 2048],
    "wide_resnet50_2": [64, 256, 512, 1024, 2048],
    "densenet121": [64, 256, 512, 1024, 1024],
}
STAGES = ["stem", "layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name", backbones.RESNET_FAMILY)
def test_family_builds_with_named_stages(name: str):
    b = backbones.build(name, "none")
    assert b.stages == STAGES
    assert list(b.channels.values()) == CHANNELS[name]
    assert list(b.strides.values()) == [2, 4, 8, 16, 32]
    # Every parameter belongs to exactly one stage.
    in_stages = [id(p) for ms in b.stage_children.values() for m in ms for p in m.parameters()]
    assert sorted(in_stages) == sorted(id(p) for p in b.parameters())
    if name in ("resnet18", "resnet50", "densenet121"):  # forward is slow for the big ones on 2 cores
        out = b(torch.randn(1, 3, 64, 64))
        assert [(k, v.shape[1], v.shape[-1]) for k, v in out.items()] == \
               [(s, c, 64 // st) for s, c, st in zip(STAGES, CHANNELS[name], [2, 4, 8, 16, 32])]


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0"])
def test_other_timm_models_get_stages(name: str):
    b = backbones.build(name, "none")
    assert b.stages[0] == "stem" and b.stages[-1] == "layer4"
    assert sum(p.numel() for ms in b.stage_children.values() for m in ms for p in m.parameters()) == \
           sum(p.numel() for p in b.parameters())
    out = b(torch.randn(1, 3, 64, 64))
    assert list(out) == b.out_stages


def test_unknown_name_lists_close_names():
    with pytest.raises(UserError, match="'resnet5O' is not a timm model; did you mean .*resnet50"):
        backbones.build("resnet5O", "none")


def test_depth():
    assert [backbones.depth(n) for n in ("resnet18", "resnext101_32x8d", "wide_resnet50_2", "densenet121")] == \
           [18, 101, 50, 121]


def _same(backbone: backbones.Backbone, full: torch.nn.Module) -> bool:
    """Every tensor of the backbone's body is the full model's tensor of that name, bit for bit, and the full model
    holds nothing else but its classifier. timm's feature wrapper renames DenseNet's `features.denseblock1` to
    `features_denseblock1`; a body that matched no name at all must not pass as "the same"."""
    ref = full.state_dict()
    body = {k if k in ref else k.replace("_", ".", 1): v for k, v in backbone.body.state_dict().items()}
    assert body and set(body) <= set(ref), sorted(set(body) - set(ref))[:5]
    left = set(ref) - set(body)
    assert left and all(k.split(".")[0] in ("fc", "classifier", "head") for k in left), sorted(left)[:5]
    return all(torch.equal(v, ref[k]) for k, v in body.items())


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_weights_from_a_local_timm_state_dict(tmp_path: Path, name: str):
    full = timm.create_model(name, pretrained=False, num_classes=7)  # a classifier that must be dropped
    path = tmp_path / "w.pth"
    torch.save(full.state_dict(), path)
    b = backbones.build(name, str(path))
    assert b.weights == str(path)
    assert _same(b, full)


def test_weights_from_a_torchvision_state_dict_and_a_checkpoint(tmp_path: Path):
    import torchvision

    tv = torchvision.models.resnet18(weights=None)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert _same(backbones.build("resnet18", str(tmp_path / "tv.pth")), tv)
    # A training checkpoint with DDP's `module.` prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}, "epoch": 3}, tmp_path / "c.pt")
    assert _same(backbones.build("resnet18", str(tmp_path / "c.pt")), tv)


def test_mismatched_state_dict_names_the_keys(tmp_path: Path):
    torch.save(timm.create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match=r"does not match resnet18: \d+ unexpected keys \(layer1\.2\.conv1\.weight"):
        backbones.build("resnet18", str(tmp_path / "r34.pth"))


def test_bad_weight_files(tmp_path: Path):
    with pytest.raises(UserError, match="file '.*nope.pth' not found"):
        backbones.build("resnet18", str(tmp_path / "nope.pth"))
    torch.save({"lr": 0.1, "epochs": 3}, tmp_path / "notsd.pth")
    with pytest.raises(UserError, match="holds no state_dict"):
        backbones.build("resnet18", str(tmp_path / "notsd.pth"))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is not a loadable state_dict"):
        backbones.build("resnet18", str(tmp_path / "garbage.pth"))


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned",))


def test_pickled_code_is_refused(tmp_path: Path):
    torch.save({"conv1.weight": _Evil()}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="not a loadable state_dict"):
        backbones.build("resnet18", str(tmp_path / "evil.pth"))


def fill_hub_cache(hub: Path, tagged: str, state_dict: dict) -> Path:
    """Lay a file out exactly as huggingface_hub caches `timm/<tagged>`/model.safetensors."""
    cfg = timm.models.get_pretrained_cfg(tagged)
    repo = hub / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors"))
    return snapshot / "model.safetensors"


@pytest.mark.parametrize("weights_arg, tagged", [("imagenet", None), ("tv_in1k", "resnet18.tv_in1k"),
                                                  ("resnet18.tv_in1k", "resnet18.tv_in1k")])
def test_weights_from_a_prefilled_hub_cache_offline(hub_cache: Path, weights_arg: str, tagged: str | None):
    tagged = tagged or weights.resolve_tag("resnet18", "imagenet")
    full = timm.create_model("resnet18", pretrained=False)
    fill_hub_cache(hub_cache, tagged, full.state_dict())
    b = backbones.build("resnet18", weights_arg)
    assert b.weights == tagged
    assert _same(b, full)


def test_missing_hub_weights_offline_name_the_remedies():
    with pytest.raises(UserError) as err:
        backbones.build("resnet34", "imagenet")
    message = str(err.value)
    assert "weights resnet34." in message and "pipeline weights pull resnet34." in message
    assert "local state_dict file" in message and "none" in message


def test_unknown_tag():
    with pytest.raises(UserError, match="'in22k_bogus' is not a tag of resnet18; valid: .*tv_in1k"):
        backbones.build("resnet18", "in22k_bogus")


def test_fallback_to_random_only_when_asked(said):
    messages = said
    b = backbones.build_or_random("resnet34", "imagenet", fallback_to_random=True)
    assert b.weights == "none" and "RANDOM INIT" in messages[0]
    with pytest.raises(UserError):
        backbones.build_or_random("resnet34", "imagenet", fallback_to_random=False)


@pytest.mark.parametrize("output_stride, strides", [(16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])])
def test_output_stride_dilates_the_last_stages(tmp_path: Path, output_stride: int, strides: list[int]):
    full = timm.create_model("resnet18", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "w.pth")
    b = backbones.build("resnet18", str(tmp_path / "w.pth"), output_stride=output_stride)
    assert b.stages == STAGES and list(b.strides.values()) == strides
    assert _same(b, full)  # dilation changes no weight shapes
    out = b(torch.randn(1, 3, 64, 64))
    assert [v.shape[-1] for v in out.values()] == [64 // s for s in strides]
    random = backbones.build_or_random("resnet18", "none", False, output_stride=output_stride)
    assert list(random.strides.values()) == strides
