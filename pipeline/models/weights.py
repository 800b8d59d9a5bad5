"""Where backbone weights come from: timm tags and `hf-hub:` repos in the standard hub caches, or a local file; and
the record of what was taken from them (`Lineage`).

`imagenet` means timm's default pretrained tag for the model; `tv_in1k` / `tv2_in1k` are torchvision's own weights;
`hf-hub:<org>/<repo>` is any timm-format repo on the Hugging Face hub. Hub files are read from the Hugging Face cache
first (an offline machine filled by `pipeline weights pull`), then downloaded with short timeouts. Every failure is a
`UserError` naming the weights and the remedies. Weights kept in MLflow (`runs:/`, `models:/`) are fetched by
pipeline/models/tracked.py, which knows the tracking store, and reach the backbone as a checkpoint file.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from pipeline.errors import UserError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")
HF_HUB = "hf-hub:"  # timm's prefix for a model repo on the Hugging Face hub
TRACKED = ("runs:/", "models:/")  # MLflow's URIs of a run's files and of models (as tracking.is_tracked)


@dataclass
class Lineage:
    """Where a backbone's weights came from and what was taken from them: recorded as the run's `weights.*` tags."""

    source: str  # model.backbone.weights as given (a tag, hf-hub:..., runs:/..., models:/..., a file) or none
    run_id: str | None = None  # the run that produced the weights, whenever there is one
    task: str | None = None  # that run's task
    loaded: int = 0  # tensors loaded into the backbone
    skipped: list[str] = field(default_factory=list)  # tensors of the weights left out on purpose (a head)

    def line(self, shown: int = 6) -> str:
        """One line: `loaded 120 backbone tensors from runs:/ab12 (run ab12, task classification); skipped 2: ...`."""
        origin = f" (run {self.run_id}, task {self.task or 'unknown'})" if self.run_id else ""
        text = f"loaded {self.loaded} backbone tensors from {self.source}{origin}"
        if self.skipped:
            names = ", ".join(self.skipped[:shown]) + (f", ... ({len(self.skipped) - shown} more)"
                                                        if len(self.skipped) > shown else "")
            text += f"; skipped {len(self.skipped)}: {names}"
        return text

    def tags(self) -> dict[str, str]:
        tags = {"weights.loaded_tensors": str(self.loaded), "weights.skipped_tensors": str(len(self.skipped))}
        if self.skipped:
            tags["weights.skipped"] = ", ".join(self.skipped)  # the tracker shortens it past MLflow's limit
        if self.run_id:
            tags.update({"weights.source_run_id": self.run_id, "weights.source_task": self.task or ""})
        return tags


@dataclass
class FileWeights:
    """A weights file's backbone tensors, and what the file says about where they came from."""

    tensors: dict[str, torch.Tensor]
    skipped: list[str]  # the file's other tensors: a pipeline checkpoint's task head, left out on purpose
    run_id: str | None = None  # a pipeline checkpoint names the run that wrote it, and its config the task
    task: str | None = None


def is_tracked(weights: str) -> bool:
    return weights.startswith(TRACKED)


def is_path(weights: str) -> bool:
    if weights.startswith((HF_HUB, *TRACKED)):
        return False
    return "/" in weights or os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))


def resolve_tag(arch: str, weights: str) -> str:
    """`imagenet` -> timm's default tag (`resnet50.a1_in1k`); `tv_in1k` or `resnet50.tv_in1k` -> `resnet50.tv_in1k`;
    `hf-hub:<org>/<repo>` stays as it is (the repo holds weights for `arch`)."""
    if weights.startswith(HF_HUB):
        if not weights[len(HF_HUB):].strip("/") or weights.count("/") != 1:
            raise UserError(f"model.backbone.weights: '{weights}' is not a hub repo id; write hf-hub:<org>/<repo>, "
                            "e.g. hf-hub:timm/resnet18.a1_in1k")
        return weights
    if is_tracked(weights):
        # Only the stage runner knows which tracking store to read (tracking.uri); see pipeline/models/tracked.py.
        raise UserError(f"model.backbone.weights: {weights} is fetched from MLflow by 'pipeline run'; outside it, "
                        "download the run's checkpoints/best.pt and give its path")
    tags = timm.list_pretrained(f"{arch}.*")
    cfg = timm.models.get_pretrained_cfg(arch)
    if (weights == "imagenet" or not tags) and (cfg is None or not (cfg.hf_hub_id or cfg.url)):
        # e.g. the CIFAR ResNets (pipeline/models/cifar_resnets.py): models only ever trained from scratch.
        raise UserError(f"model.backbone.weights: '{weights}', but {arch} has no pretrained weights; set "
                        f"model.backbone.weights=none (random init), or to a local file or runs:/<run id>")
    if weights == "imagenet":
        return f"{arch}.{cfg.tag}" if cfg.tag else arch
    name = weights if weights.startswith(f"{arch}.") else f"{arch}.{weights}"
    if _pretrained_cfg(name) is None:
        own = ", ".join(t.split(".", 1)[1] for t in tags) or "(none)"
        raise UserError(f"model.backbone.weights: '{weights}' is not a tag of {arch}; valid: imagenet, none, a file "
                        f"path, hf-hub:<org>/<repo>, runs:/<run id>, models:/<name>/<version>, {own}")
    return name


def _pretrained_cfg(name: str):
    if name.startswith(HF_HUB):
        return timm.models.PretrainedCfg(hf_hub_id=name[len(HF_HUB):])
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm raises for a tag its architecture does not have
        return None


def check_available(arch: str, weights: str, fallback_to_random: bool = False) -> None:
    """Refuse weights that cannot be had, before anything else of a run happens: a file that is not there, hub weights
    neither cached nor downloadable (downloaded now when they can be). `runs:/` and `models:/` weights are checked
    where their tracking store is known (pipeline/models/tracked.py); a quickstart that falls back to random init is
    let through (it says so loudly when it builds the model)."""
    if weights == "none" or is_tracked(weights) or fallback_to_random:
        return
    if is_path(weights):
        if not Path(weights).is_file():
            raise UserError(f"model.backbone.weights: file '{weights}' not found; give the path of a state_dict "
                            "(.pth / .safetensors) or none")
        return
    hub_file(resolve_tag(arch, weights))


def hub_state_dict(tagged_name: str, download: bool = True) -> dict[str, torch.Tensor]:
    """The state_dict of a timm pretrained tag, from the cache if there, else downloaded into the standard cache."""
    return read_state_dict(hub_file(tagged_name, download=download), what=f"weights {tagged_name}")


def hub_file(tagged_name: str, download: bool = True) -> Path:
    cfg = _pretrained_cfg(tagged_name)
    cached = _cached_file(cfg)
    if cached is not None:
        return cached
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise _missing(tagged_name, "not in the local cache and downloads are off")
    host = _host(cfg)
    if not _reachable(host):
        # huggingface_hub would retry with back-off for a minute before giving up on a machine without a network.
        raise _missing(tagged_name, f"not in the local cache and {host} is not reachable")
    try:
        return _download(cfg)
    except Exception as err:  # any network or hub failure means the same to the user: no weights here
        raise _missing(tagged_name, f"download failed: {' '.join(str(err).split())[:160]}") from None


def _host(cfg) -> str:
    if cfg.hf_hub_id:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.url).hostname or ""


def _reachable(host: str, timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_file(cfg) -> Path | None:
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        for filename in names:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(found, str):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if path.is_file():
            return path
    return None


def _download(cfg) -> Path:
    if cfg.hf_hub_id:
        from huggingface_hub import hf_hub_download

        # Short timeouts: an offline machine should fail in seconds, not retry for minutes.
        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        names = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HUB_FILES
        last: Exception | None = None
        for filename in names:
            try:
                return Path(hf_hub_download(cfg.hf_hub_id, filename))
            except Exception as err:  # a missing safetensors file falls back to the .bin
                last = err
        raise last  # type: ignore[misc]
    torch.hub.load_state_dict_from_url(cfg.url, map_location="cpu", weights_only=True)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)


def _missing(name: str, why: str) -> UserError:
    return UserError(
        f"weights {name} unavailable ({why}); on a connected machine run 'pipeline weights pull {name}' "
        f"(fills the hub cache this machine reads, e.g. ~/.cache/huggingface), or set model.backbone.weights to a "
        f"local state_dict file, or to none for random init")


def load_error_reason(err: Exception) -> str:
    """Why `torch.load(..., weights_only=True)` refused a file, in a few words."""
    text = " ".join(str(err).split())
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if "Weights only load failed" in text and found:
        return f"it holds pickled code that asks to run {found.group(1)}, refused: files load with weights_only=True"
    return text[:160]


def read_state_dict(path: str | Path, what: str = "model.backbone.weights") -> dict[str, torch.Tensor]:
    """Load a state_dict (or a checkpoint holding one) safely: tensors only (`weights_only=True`)."""
    return read_weights(path, what).tensors


def read_weights(path: str | Path, what: str = "model.backbone.weights") -> FileWeights:
    """`read_state_dict`, with the tensors left out and, for a checkpoint of this pipeline, its run and task."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file '{path}' not found; give the path of a state_dict (.pth / .safetensors) or none")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a safe state_dict"
        raise UserError(f"{what}: '{path}' is not a loadable state_dict ({load_error_reason(err)})") from None
    tensors, skipped = split_state_dict(obj, path, what)
    run_id = obj.get("run_id") if isinstance(obj, dict) and isinstance(obj.get("run_id"), str) else None
    saved = obj.get("config") if isinstance(obj, dict) else None
    task = saved.get("task") if isinstance(saved, dict) and isinstance(saved.get("task"), str) else None
    return FileWeights(tensors, skipped, run_id, task)


def split_state_dict(obj, path: Path, what: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the backbone's tensors, the names of the others): a checkpoint of this pipeline holds a whole task model."""
    # Training checkpoints nest the weights; DataParallel/DDP prefix every key with `module.`.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what}: '{path}' holds no state_dict (a dict of tensors); save one with "
                        f"torch.save(model.state_dict(), path)")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    # A checkpoint of this pipeline holds the whole task model: keep the backbone part, name the rest (its head).
    if any(k.startswith("backbone.body.") for k in sd):
        return ({k.removeprefix("backbone.body."): v for k, v in sd.items() if k.startswith("backbone.body.")},
                [k for k in sd if not k.startswith("backbone.body.")])
    return sd, []


def pull(names: list[str]) -> list[Path]:
    """Download weights into the standard cache: `resnet50` (its default tag), `resnet50.tv_in1k`, `hf-hub:org/repo`."""
    paths = []
    for name in names:
        if name.startswith(HF_HUB):
            paths.append(hub_file(resolve_tag("", name), download=True))
            continue
        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            raise UserError(f"weights pull: '{arch}' is not a timm model")
        tagged = resolve_tag(arch, tag or "imagenet")
        paths.append(hub_file(tagged, download=True))
    return paths
