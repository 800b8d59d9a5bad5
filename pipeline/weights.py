"""Where backbone weights come from: timm tags in the standard hub caches, or a local state_dict file.

`imagenet` means timm's default pretrained tag for the model; `tv_in1k` / `tv2_in1k` are torchvision's own weights.
Hub files are read from the Hugging Face cache first (an offline machine filled by `pipeline weights pull`), then
downloaded with short timeouts. Every failure is a `UserError` naming the weights and the remedies.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch

from pipeline.checkpoint import load_error_reason
from pipeline.errors import UserError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def is_path(weights: str) -> bool:
    return "/" in weights or os.sep in weights or weights.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt"))


def resolve_tag(arch: str, weights: str) -> str:
    """`imagenet` -> timm's default tag (`resnet50.a1_in1k`); `tv_in1k` or `resnet50.tv_in1k` -> `resnet50.tv_in1k`."""
    if weights == "imagenet":
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise UserError(f"model.backbone.weights: timm has no pretrained weights for '{arch}'; use weights=none")
        return f"{arch}.{cfg.tag}" if cfg.tag else arch
    name = weights if weights.startswith(f"{arch}.") else f"{arch}.{weights}"
    if _pretrained_cfg(name) is None:
        tags = [t for t in timm.list_pretrained(f"{arch}.*")]
        raise UserError(f"model.backbone.weights: '{weights}' is not a tag of {arch}; "
                        f"valid: imagenet, none, a file path, {', '.join(t.split('.', 1)[1] for t in tags) or '(none)'}")
    return name


def _pretrained_cfg(name: str):
    try:
        return timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm raises for a tag its architecture does not have
        return None


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


def read_state_dict(path: str | Path, what: str = "model.backbone.weights") -> dict[str, torch.Tensor]:
    """Load a state_dict (or a checkpoint holding one) safely: tensors only (`weights_only=True`)."""
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
    return unwrap_state_dict(obj, path, what)


def unwrap_state_dict(obj, path: Path, what: str) -> dict[str, torch.Tensor]:
    # Training checkpoints nest the weights; DataParallel/DDP prefix every key with `module.`.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{what}: '{path}' holds no state_dict (a dict of tensors); save one with "
                        f"torch.save(model.state_dict(), path)")
    sd = {k.removeprefix("module."): v for k, v in obj.items()}
    # A checkpoint of this pipeline holds the whole task model: keep the backbone part.
    if any(k.startswith("backbone.body.") for k in sd):
        sd = {k.removeprefix("backbone.body."): v for k, v in sd.items() if k.startswith("backbone.body.")}
    return sd


def pull(names: list[str]) -> list[Path]:
    """Download weights into the standard cache: `resnet50` (its default tag), `resnet50.tv_in1k`, ..."""
    paths = []
    for name in names:
        arch, _, tag = name.partition(".")
        if not timm.is_model(arch):
            raise UserError(f"weights pull: '{arch}' is not a timm model")
        tagged = resolve_tag(arch, tag or "imagenet")
        paths.append(hub_file(tagged, download=True))
    return paths
