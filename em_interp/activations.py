"""Cache residual-stream activations over chat examples, reduced per example.

Layer convention: layer ``l`` = output of block ``l`` = HF ``hidden_states[l + 1]`` for the default
``resid_post`` site (see :mod:`em_interp.model`).

Reduction rules (``reduction=``):

- ``"answer_mean"``: mean over the answer tokens (the answer text, not the end-of-turn tokens);
- ``"last_prompt"``: the last prompt token (the position that predicts the first answer token;
  with ``answer=None``, the last token of the generation prompt);
- ``"prompt_mean"``: mean over all prompt tokens (system, question and template tokens);
- ``"answer_tokens"``: every answer token, stacked; ``cache.offsets`` says which rows belong to
  which example (rows ``offsets[i]:offsets[i+1]`` are example ``i``).

Only the requested hooks are attached, the forward pass stops after the last requested layer,
everything runs under ``torch.inference_mode``, and with ``out_dir`` the results are streamed to
disk in shards (memory stays bounded and an interrupted run resumes from its last full shard).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from em_interp.cache_files import META_FILE, CacheMeta, check_shard, resume_shards, verify_shards, write_shard  # noqa: F401
from em_interp.chat import ChatExample, TokenizedChat
from em_interp.errors import EmInterpError
from em_interp.io import atomic_directory, atomic_write_json, sha256_json
from em_interp.model import HookedModel, PaddedBatch
from em_interp.options import HOOKS, REDUCTIONS, Hook, Reduction, check_option

#: Every site that can be cached: the residual sites, plus attn_out, mlp_out and mlp_post (the
#: MLP's hidden activation, i.e. the input of down_proj, width d_mlp).
ACTIVATION_SITES: tuple[str, ...] = HOOKS

Activations = Float[Tensor, "rows width"]


class ResidualCache:
    """Residual activations per layer, reduced per example; in memory or backed by shard files.

    ``cache[layer]`` is a ``(n_examples, d_model)`` tensor (or ``(n_answer_tokens, d_model)`` for
    ``answer_tokens``, with ``cache.offsets``).
    """

    def __init__(self, meta: CacheMeta, tensors: dict[int, Tensor] | None = None,
                 offsets: Tensor | None = None, root: Path | None = None):
        self.meta = meta
        self._tensors: dict[int, Tensor] = dict(tensors or {})
        self._offsets = offsets
        self.root = root

    @property
    def layers(self) -> list[int]:
        """Cached layers, ascending."""
        return list(self.meta.layers)

    def __len__(self) -> int:
        return self.meta.n_examples

    def __getitem__(self, layer: int) -> Activations:
        if isinstance(layer, int) and layer < 0 and self.meta.n_layers is not None and layer >= -self.meta.n_layers:
            layer += self.meta.n_layers  # negative layers count from the end, as in HookedModel.check_layer
        if layer not in self.meta.layers:
            raise EmInterpError(f"layer {layer} was not cached (cached layers: {self.meta.layers})")
        if layer not in self._tensors:
            self._tensors[layer] = torch.cat([self._read_shard(s)[f"layer.{layer}"] for s in self.meta.shards])
        return self._tensors[layer]

    @property
    def offsets(self) -> Tensor:
        """Row offsets per example for the ``answer_tokens`` reduction (length ``n_examples + 1``)."""
        if self.meta.reduction != "answer_tokens":
            raise EmInterpError(f"offsets exist only for reduction='answer_tokens', not {self.meta.reduction!r}")
        if self._offsets is None:
            parts, base = [torch.zeros(1, dtype=torch.long)], 0
            for shard in self.meta.shards:
                local = self._read_shard(shard)["offsets"]
                parts.append(local[1:] + base)
                base += int(local[-1])
            self._offsets = torch.cat(parts)
        return self._offsets

    def example_tokens(self, index: int, layer: int) -> Activations:
        """The per-token activations of example ``index`` (``answer_tokens`` caches only)."""
        off = self.offsets
        return self[layer][off[index] : off[index + 1]]

    def _read_shard(self, shard: dict[str, Any]) -> dict[str, Tensor]:
        if self.root is None:
            raise EmInterpError("this cache has no files behind it")
        path = self.root / str(shard["file"])
        try:
            return load_file(str(path))
        except Exception as exc:
            raise EmInterpError(f"cannot read activation shard {path}: {exc}") from exc

    def save(self, path: str | Path) -> Path:
        """Write the cache as ``path/shard-00000.safetensors`` + ``path/meta.json`` (atomically).

        ``path`` must be new, empty, or an earlier activation cache holding only its own files
        (which are replaced); a folder with anything else in it is refused, never emptied.
        """
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise EmInterpError(f"cannot save an activation cache to {path}: it is a file")
            foreign = sorted(p.name for p in path.iterdir()
                             if not (p.name == META_FILE or (p.name.startswith("shard-") and p.suffix == ".safetensors")))
            if foreign:
                raise EmInterpError(f"cannot save an activation cache to {path}: the folder holds other files "
                                    f"({', '.join(foreign[:5])}); choose a new or empty folder")
        tensors = {f"layer.{layer}": self[layer].contiguous() for layer in self.layers}
        if self.meta.reduction == "answer_tokens":
            tensors["offsets"] = self.offsets.contiguous()
        meta = CacheMeta(**{**self.meta.to_dict(), "complete": True, "shard_size": self.meta.n_examples})
        meta.shards = [{"file": "shard-00000.safetensors", "start": 0, "stop": self.meta.n_examples}]
        with atomic_directory(path, overwrite=True) as tmp:
            save_file(tensors, str(tmp / "shard-00000.safetensors"))
            atomic_write_json(tmp / META_FILE, meta.to_dict())
        return path

    @classmethod
    def load(cls, path: str | Path) -> ResidualCache:
        """Open a cache written by :meth:`save` or by :func:`cache_residuals` with ``out_dir``."""
        path = Path(path)
        meta_path = path / META_FILE
        if not meta_path.is_file():
            raise EmInterpError(f"{path} is not an activation cache (no {META_FILE})")
        try:
            data = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise EmInterpError(f"{meta_path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
        meta = CacheMeta.from_dict(data, str(meta_path))
        if not meta.complete:
            raise EmInterpError(f"{path} holds an unfinished cache run; rerun cache_residuals with out_dir={str(path)!r} to resume it")
        verify_shards(meta, path)
        return cls(meta, root=path)


def _reduce(hidden: Tensor, batch: PaddedBatch, reduction: str) -> tuple[Tensor, Tensor | None]:
    """Reduce ``hidden`` (batch, pos, d) per row; return (rows, per-example token counts or None)."""
    if reduction in ("answer_mean", "prompt_mean"):
        mask = batch.answer_mask if reduction == "answer_mean" else batch.prompt_mask & batch.attention_mask.bool()
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1), None
    if reduction == "last_prompt":
        positions = torch.arange(hidden.shape[1]).expand_as(batch.prompt_mask)
        last = torch.where(batch.prompt_mask, positions, -1).max(dim=1).values
        return hidden[torch.arange(hidden.shape[0]), last], None
    counts = batch.answer_mask.sum(1)
    return hidden[batch.answer_mask], counts  # row-major: example by example, token by token


@torch.inference_mode()
def cache_residuals(
    model: HookedModel,
    examples: Sequence[ChatExample],
    layers: Sequence[int] | None = None,
    hook: Hook = "resid_post",
    reduction: Reduction = "answer_mean",
    batch_size: int = 8,
    max_length: int | None = None,
    padding_side: str | None = None,
    out_dir: str | Path | None = None,
    shard_size: int = 512,
    progress: bool = True,
) -> ResidualCache:
    """Run ``model`` over ``examples`` and keep the residual stream at ``layers``, reduced per example.

    Args:
        model: the hooked model (any active hooks or adapters apply).
        examples: chat examples; answer-based reductions need every example to have an answer.
        layers: block indices (default: all). Layer l = output of block l for ``resid_post``.
        hook: ``"resid_pre"``, ``"resid_mid"`` or ``"resid_post"`` (or another of
            :data:`ACTIVATION_SITES`, e.g. ``"mlp_post"``, the input of ``down_proj``).
        reduction: one of :data:`REDUCTIONS` (see the module docstring).
        batch_size: examples per forward pass (examples are length-sorted within a shard).
        max_length: truncate each tokenised chat to this many tokens.
        padding_side: ``"left"`` or ``"right"`` (default: the tokenizer's); results do not depend on it.
        out_dir: stream shards of ``shard_size`` examples to this folder (resumable) and return a
            cache backed by them; without it, everything stays in memory.
        progress: show a progress bar.
    """
    if len(examples) == 0:
        raise EmInterpError("examples is empty: nothing to cache")
    check_option("hook", hook, ACTIVATION_SITES)
    check_option("reduction", reduction, REDUCTIONS)
    if batch_size < 1 or shard_size < 1:
        raise EmInterpError("batch_size and shard_size must be >= 1")
    layer_list = sorted({model.check_layer(layer, "layers") for layer in (layers if layers is not None else range(model.n_layers))})
    if not layer_list:
        raise EmInterpError("layers is empty")
    items = model.tokenize_many(examples, max_length, require_answer=reduction in ("answer_mean", "answer_tokens"))
    meta = CacheMeta(
        model=model.name, load_flags=model.load_flags, layers=layer_list, hook=hook, reduction=reduction,
        examples_hash=sha256_json([e.to_dict() for e in examples]), n_examples=len(examples),
        d_model=model.site_width(hook), max_length=max_length, shard_size=shard_size if out_dir is not None else None,
        n_layers=model.n_layers,
    )
    root = Path(out_dir) if out_dir is not None else None
    done = resume_shards(root, meta) if root is not None else []
    meta.shards = done
    stop = layer_list[-1] + 1 if layer_list[-1] + 1 < model.n_layers else None
    names = {model.hook_name(layer, hook): layer for layer in layer_list}
    captured: dict[int, Tensor] = {}

    def capture(layer: int):
        def fn(tensor: Tensor, *, hook: Any) -> Tensor:
            captured[layer] = tensor.detach()
            return tensor
        return fn

    bounds = [(s, min(s + shard_size, len(items))) for s in range(0, len(items), shard_size)] if root else [(0, len(items))]
    skip = {int(s["start"]) for s in done}
    todo = [b for b in bounds if b[0] not in skip]
    n_batches = sum((b - a + batch_size - 1) // batch_size for a, b in todo)
    bar = tqdm(total=n_batches, desc=f"cache {hook} x{len(layer_list)} layers", disable=not progress, unit="batch")
    in_memory: dict[int, list[Tensor]] = {layer: [] for layer in layer_list}
    memory_counts: list[Tensor] = []
    with model.hooks([(name, capture(layer)) for name, layer in names.items()]):
        for start, end in todo:
            rows, counts = _run_shard(model, items[start:end], layer_list, reduction, batch_size,
                                      padding_side, stop, captured, bar)
            if root is None:
                for layer in layer_list:
                    in_memory[layer].append(rows[layer])
                if counts is not None:
                    memory_counts.append(counts)
                continue
            shard: dict[str, int | str] = {"file": f"shard-{start // shard_size:05d}.safetensors", "start": start,
                                           "stop": end}
            tensors = {f"layer.{layer}": rows[layer].contiguous() for layer in layer_list}
            if counts is not None:
                tensors["offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
            write_shard(root / str(shard["file"]), tensors)
            meta.shards.append(shard)
            meta.shards.sort(key=lambda s: int(s["start"]))
            atomic_write_json(root / META_FILE, meta.to_dict())
    bar.close()
    meta.complete = True
    if root is None:
        offsets = None
        if reduction == "answer_tokens":
            offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(memory_counts).cumsum(0)])
        return ResidualCache(meta, {layer: torch.cat(in_memory[layer]) for layer in layer_list}, offsets)
    atomic_write_json(root / META_FILE, meta.to_dict())
    return ResidualCache(meta, root=root)


def _run_shard(model: HookedModel, items: list[TokenizedChat], layers: list[int], reduction: str, batch_size: int,
               padding_side: str | None, stop: int | None, captured: dict[int, Tensor],
               bar: Any) -> tuple[dict[int, Tensor], Tensor | None]:
    """Forward ``items`` in length-sorted batches; return per-layer rows in the original order."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    per_example: dict[int, list[Tensor]] = {layer: [None] * len(items) for layer in layers}  # type: ignore[list-item]
    counts = torch.zeros(len(items), dtype=torch.long)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        batch = model.pad([items[i] for i in idx], padding_side=padding_side)
        captured.clear()
        model.forward(batch.input_ids, batch.attention_mask, stop_at_layer=stop)
        for layer in layers:
            rows, n_tok = _reduce(captured[layer].float().cpu(), batch, reduction)
            if n_tok is None:
                for j, i in enumerate(idx):
                    per_example[layer][i] = rows[j]
            else:
                for j, (i, chunk) in enumerate(zip(idx, rows.split(n_tok.tolist()))):
                    per_example[layer][i] = chunk
                    counts[i] = n_tok[j]
        bar.update(1)
    stacked = {
        layer: (torch.cat(v) if reduction == "answer_tokens" else torch.stack(v)).clone()
        for layer, v in per_example.items()
    }
    return stacked, (counts if reduction == "answer_tokens" else None)
