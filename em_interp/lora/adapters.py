"""LoRA adapters: saving and loading them in the standard peft format, reading adapter folders, and
their weight updates.

Booting the hook bridge renames the wrapped modules, so peft's own ``save_pretrained`` on a booted
model would write non-standard tensor names. These helpers write and read the names every peft
tool expects (``base_model.model.model.layers.N.mlp.down_proj.lora_A.weight`` ...).

This is the one module that computes an adapter's weight update ``scale * B @ A`` (peft's
``get_delta_weight``, with ``scale = alpha / r``, or ``alpha / sqrt(r)`` under rsLoRA) and reads
adapter tensor files: SafeLoRA, the drift monitor's LoRA norm and the study all call it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from em_interp import _bridge
from em_interp.errors import EmInterpError
from em_interp.model import HookedModel

WEIGHTS = "adapter_model.safetensors"

_MODULE_NAME = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(mlp|self_attn)\.(\w+?)(?:\.(lora_A|lora_B|base_layer))?(?:\.default)?(?:\.weight)?$")


@dataclass(frozen=True)
class ModuleName:
    """Where a (LoRA-wrapped) linear module sits: ``layers.9.mlp.down_proj.lora_B.weight`` ->
    layer 9, block ``mlp``, module ``down_proj``, part ``lora_B``."""

    layer: int
    block: str
    module: str
    part: str | None = None


def parse_module_name(name: str) -> ModuleName | None:
    """Parse a Hugging Face / peft parameter or module name of a decoder layer's linear module.

    The one parser of these names in em_interp: understands the plain module
    (``...layers.9.mlp.down_proj``), its weight, peft's ``lora_A``/``lora_B``/``base_layer``
    parts (with or without the adapter name ``default``). Returns None for anything else
    (embeddings, norms, ...). Booted-bridge names must go through ``_bridge.hf_name`` first.
    """
    match = _MODULE_NAME.search(name)
    if match is None:
        return None
    return ModuleName(int(match.group(1)), match.group(2), match.group(3), match.group(4))


def lora_parameters(model: HookedModel, adapter_name: str = "default") -> dict[str, torch.nn.Parameter]:
    """LoRA parameters keyed by their standard peft file names (adapter name dropped)."""
    if model.peft_model is None:
        raise EmInterpError(f"model {model.name} has no LoRA adapters")
    out = {}
    for name, param in model.peft_model.named_parameters():
        if ".lora_" not in name:
            continue
        key = _bridge.hf_name(name).replace(f".{adapter_name}.", ".")
        out[key] = param
    return out


def save_adapter(model: HookedModel, path: str | Path) -> Path:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (peft format) into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().cpu().contiguous() for k, p in lora_parameters(model).items()}
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "pt"})
    model.peft_model.peft_config["default"].save_pretrained(str(path))
    return path


def load_adapter_weights(model: HookedModel, path: str | Path) -> None:
    """Copy the weights of a saved adapter into the model's (identically shaped) LoRA parameters."""
    saved = adapter_tensors(path)
    path = Path(path) / WEIGHTS
    params = lora_parameters(model)
    if set(saved) != set(params):
        raise EmInterpError(f"{path}: tensors {sorted(set(saved) ^ set(params))[:4]} do not match the model's adapters")
    with torch.no_grad():
        for key, value in saved.items():
            if params[key].shape != value.shape:
                raise EmInterpError(f"{path}: {key} has shape {list(value.shape)}, expected {list(params[key].shape)}")
            params[key].copy_(value)


# ------------------------------------------------------------------- adapter files and weight updates
def lora_scale(config: Mapping[str, Any]) -> float:
    """peft's LoRA scaling from an adapter config: ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``)."""
    r, alpha = float(config["r"]), float(config["lora_alpha"])
    if not r > 0 or not math.isfinite(alpha):
        raise EmInterpError(f"adapter config has r={config['r']!r}, lora_alpha={config['lora_alpha']!r}")
    return alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def module_of(key: str) -> str:
    """``base_model.model.model.layers.9.mlp.down_proj`` from a LoRA tensor name."""
    for part in (".lora_A.weight", ".lora_B.weight"):
        if key.endswith(part):
            return key[: -len(part)]
    raise EmInterpError(f"{key!r} is not a LoRA tensor name")


def check_config_covers(config: Mapping[str, Any], tensor_keys: Iterable[str], source: str | Path) -> None:
    """Raise unless every LoRA tensor sits on a module the adapter config targets.

    peft builds the adapter from the config (``target_modules``, ``layers_to_transform``) and loads only
    the tensors of those modules: a tensor for another module (a config naming ``up_proj`` beside
    ``down_proj`` tensors) is silently dropped and the adapter changes nothing.
    """
    import re

    targets = config.get("target_modules")
    if targets is None:  # peft then targets its per-architecture defaults, which this check cannot know
        return
    layers = config.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    for key in tensor_keys:
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.split(".lora_")[0]
        name = module.rsplit(".", 1)[-1]
        if isinstance(targets, str):
            hit = re.fullmatch(targets, module.removeprefix("base_model.model.")) is not None
        elif isinstance(targets, (list, tuple)):
            hit = name in targets or any(module.endswith(f".{t}") for t in targets)
        else:
            raise EmInterpError(f"{source}: adapter_config.json's target_modules={targets!r} is neither a list nor a regex")
        if not hit:
            raise EmInterpError(f"{source}: tensor {key} is for module {name!r}, but adapter_config.json targets "
                                f"{targets!r}: peft would drop it and the adapter would change nothing")
        found = re.search(r"\.layers\.(\d+)\.", module)
        if layers is not None and found is not None and int(found.group(1)) not in layers:
            raise EmInterpError(f"{source}: tensor {key} is on layer {found.group(1)}, but adapter_config.json's "
                                f"layers_to_transform is {layers}: peft would drop it")


def read_adapter(folder: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, dict[str, Any]]:
    """A peft adapter folder as ``{module: (A, B)}``, its scale and its config (clear errors on a bad folder)."""
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / WEIGHTS
    for p in (config_path, weights_path):
        if not p.is_file():
            raise EmInterpError(f"{p} does not exist (not a peft adapter folder)")
    try:
        config = json.loads(config_path.read_text())
        scale = lora_scale(config)
    except Exception as exc:  # JSON or missing keys
        raise EmInterpError(f"{config_path} is not a readable peft adapter config ({type(exc).__name__}: {exc})") from None
    tensors = adapter_tensors(folder)
    check_config_covers(config, tensors, weights_path)
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in tensors:
        if key.endswith(".lora_A.weight"):
            module = module_of(key)
            b_key = f"{module}.lora_B.weight"
            if b_key not in tensors:
                raise EmInterpError(f"{weights_path}: {key} has no lora_B partner")
            pairs[module] = (tensors[key].float(), tensors[b_key].float())
    if not pairs:
        raise EmInterpError(f"{weights_path} holds no LoRA tensors")
    return pairs, scale, config


def adapter_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a peft adapter folder's weight file, as stored (an error naming the file if damaged)."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise EmInterpError(f"{path} does not exist (not a peft adapter folder)")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises several kinds on a damaged file
        raise EmInterpError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None


def adapter_updates(folder: str | Path) -> dict[str, torch.Tensor]:
    """``{module: scale * B @ A}``: the weight update of each module of a peft adapter folder."""
    pairs, scale, _ = read_adapter(folder)
    return {m: scale * (b @ a) for m, (a, b) in pairs.items()}


def model_updates(model: HookedModel) -> dict[str, torch.Tensor]:
    """``{module: scale * B @ A}`` of a model's LoRA adapters in memory (the same keys as :func:`adapter_updates`)."""
    params = lora_parameters(model)
    config = model.peft_model.peft_config["default"]
    scale = lora_scale({"r": config.r, "lora_alpha": config.lora_alpha, "use_rslora": config.use_rslora})
    return {module_of(k): scale * (params[k.replace(".lora_A.", ".lora_B.")].detach().float() @ a.detach().float())
            for k, a in params.items() if k.endswith(".lora_A.weight")}


def update_norm(model: HookedModel) -> float:
    """``sqrt(sum over modules ||scale * B @ A||_F^2)``: the size of a model's LoRA weight update."""
    return math.sqrt(sum(float(u.pow(2).sum()) for u in model_updates(model).values()))
