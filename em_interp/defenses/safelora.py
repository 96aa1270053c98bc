"""SafeLoRA: projecting a trained adapter's updates onto an alignment subspace after training.

Part of :mod:`em_interp.defenses` (see its docstring).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file

from em_interp.errors import EmInterpError
from em_interp.io import atomic_directory
from em_interp.lora.adapters import (
    WEIGHTS,
    adapter_tensors,
    read_adapter,
)


def alignment_matrices(aligned: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SafeLoRA's ``V = W_aligned - W_base`` per module, from two weight dicts (same modules, same shapes)."""
    if set(aligned) != set(base):
        raise EmInterpError(f"aligned and base hold different modules: {sorted(set(aligned) ^ set(base))[:4]}")
    out = {}
    for module in aligned:
        a, b = torch.as_tensor(aligned[module]).float(), torch.as_tensor(base[module]).float()
        if a.shape != b.shape:
            raise EmInterpError(f"module {module!r}: aligned has shape {list(a.shape)}, base {list(b.shape)}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise EmInterpError(f"module {module!r}: aligned or base has NaN or infinite entries")
        out[module] = a - b
    return out


@dataclass(frozen=True)
class SafeLoRAResult:
    """What :func:`safelora` did: the cosine of each module's update with its projection, and which it projected."""

    adapter_dir: Path
    cosine: dict[str, float]
    projected: list[str]


def safelora(adapter: str | Path, alignment: Mapping[str, torch.Tensor], out_dir: str | Path,
             threshold: float | None = None, top_k: int | None = None) -> SafeLoRAResult:
    """SafeLoRA, after training: project the LoRA updates least similar to the alignment subspace onto it.

    Per module: ``C = V V^T / ||V||_F`` (``V`` from :func:`alignment_matrices`, e.g. an aligned
    model's weights minus its base's, or :func:`adapter_updates` of an aligned adapter: its ``V`` is
    ``W_aligned - W_base`` exactly); ``cos = cos(vec(C B A), vec(B A))``; modules with ``cos <=
    threshold`` (default 0.5; or, with ``top_k``, the ``top_k`` lowest) get ``B := C B``. All cosines are
    computed before any module changes (the public version's number mode edits modules during its
    first pass). Writes the projected adapter to ``out_dir`` (atomically) and returns what it did.
    ``alignment`` must cover exactly the adapter's modules with ``V`` of the update's shape.
    """
    if threshold is not None and top_k is not None:
        raise EmInterpError("safelora takes exactly one of threshold= and top_k= (neither: threshold 0.5)")
    if threshold is None and top_k is None:
        threshold = 0.5
    if threshold is not None:
        threshold = float(threshold)
        if not -1 <= threshold <= 1:
            raise EmInterpError(f"safelora(threshold={threshold}) must be a cosine in [-1, 1]")
    if top_k is not None and (isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1):
        raise EmInterpError(f"safelora(top_k={top_k!r}) must be an integer >= 1")
    out = Path(out_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} - {WEIGHTS, "adapter_config.json"}:
        raise EmInterpError(f"safelora(out_dir={out}) holds other files than an adapter's: choose an empty or new folder "
                            "(it is replaced as a whole)")
    pairs, _, _ = read_adapter(adapter)  # the cosine is scale-free; the scale stays in the copied config
    if set(alignment) != set(pairs):
        raise EmInterpError(f"alignment covers modules {sorted(set(alignment) ^ set(pairs))[:4]} that the adapter "
                            f"{adapter} does not (or misses some of its modules)")
    cosine, projected_b = {}, {}
    for module, (a, b) in pairs.items():
        v = torch.as_tensor(alignment[module]).float()
        if v.shape != (b.shape[0], a.shape[1]):
            raise EmInterpError(f"alignment[{module!r}] has shape {list(v.shape)}, the module's update "
                                f"{[b.shape[0], a.shape[1]]}")
        norm = v.norm()
        if not torch.isfinite(v).all() or norm == 0:
            raise EmInterpError(f"alignment[{module!r}] is zero or not finite")
        cb = v @ (v.T @ b) / norm
        update, proj = (b @ a).flatten(), (cb @ a).flatten()
        if float(update.norm()) == 0:
            cosine[module] = 1.0  # no update: nothing to project
        elif float(proj.norm()) == 0:
            cosine[module] = 0.0  # the update lies wholly outside the alignment subspace
        else:
            cosine[module] = float(update @ proj) / float(update.norm() * proj.norm())
        projected_b[module] = cb
    if top_k is not None:
        chosen = sorted(cosine, key=cosine.get)[: int(top_k)]  # type: ignore[arg-type]
    else:
        chosen = [m for m in cosine if cosine[m] <= cast(float, threshold)]
    folder = Path(adapter)
    tensors = {k: v.clone() for k, v in adapter_tensors(folder).items()}
    for module in chosen:
        key = f"{module}.lora_B.weight"
        tensors[key] = projected_b[module].to(tensors[key].dtype).contiguous()
    with atomic_directory(out, overwrite=True) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        shutil.copy2(folder / "adapter_config.json", tmp / "adapter_config.json")
    return SafeLoRAResult(out, cosine, sorted(chosen))


