"""Save and load LoRA adapters of a hooked model in the standard peft format.

Booting the hook bridge renames the wrapped modules, so peft's own ``save_pretrained`` on a booted
model would write non-standard tensor names. These helpers write and read the names every peft
tool expects (``base_model.model.model.layers.N.mlp.down_proj.lora_A.weight`` ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
    path = Path(path) / WEIGHTS
    if not path.is_file():
        raise EmInterpError(f"{path} does not exist")
    try:
        saved = load_file(str(path))
    except Exception as exc:  # safetensors raises several kinds on a damaged file
        raise EmInterpError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    params = lora_parameters(model)
    if set(saved) != set(params):
        raise EmInterpError(f"{path}: tensors {sorted(set(saved) ^ set(params))[:4]} do not match the model's adapters")
    with torch.no_grad():
        for key, value in saved.items():
            if params[key].shape != value.shape:
                raise EmInterpError(f"{path}: {key} has shape {list(value.shape)}, expected {list(params[key].shape)}")
            params[key].copy_(value)
