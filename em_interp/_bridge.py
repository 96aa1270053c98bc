"""Every TransformerLens-specific line of em_interp lives here.

The rest of the package talks to a model through :class:`em_interp.model.HookedModel`, which calls
only the functions below. If TransformerLens changes its API, this is the one module to update.

Hook names follow TransformerLens: ``blocks.{l}.hook_resid_post`` is the output of block ``l``,
which equals Hugging Face ``hidden_states[l + 1]`` (``hidden_states[0]`` is the embedding output).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from em_interp.options import HOOKS, check_option

HookFn = Callable[..., Any]
"""A TransformerLens hook: ``fn(tensor, *, hook) -> tensor | None``."""

#: Sites (hook points inside a block) that em_interp names, and their TransformerLens names.
SITES: dict[str, str] = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_mid": "blocks.{layer}.hook_resid_mid",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "mlp_out": "blocks.{layer}.hook_mlp_out",
    "mlp_post": "blocks.{layer}.mlp.hook_post",
}

TL_VERSION: str
try:  # pragma: no cover - trivial
    from importlib.metadata import version as _version

    TL_VERSION = _version("transformer-lens")
except Exception:  # pragma: no cover
    TL_VERSION = "unknown"


def boot(hf_model: torch.nn.Module, tokenizer: Any, name: str) -> Any:
    """Wrap a loaded Hugging Face causal LM in a ``TransformerBridge`` (modifies it in place).

    No hub access happens here: the bridge is given the model and tokenizer.
    """
    from transformer_lens.model_bridge import TransformerBridge

    config: Any = hf_model.config
    if not getattr(config, "architectures", None):
        # Models loaded from a GGUF file or built from a config may lack this field, which the
        # bridge uses to choose its architecture adapter.
        config.architectures = [type(hf_model).__name__]
    logging.getLogger("transformer_lens").setLevel(logging.ERROR)
    before = {id(p) for p in hf_model.parameters()}
    bridge = TransformerBridge.boot_transformers(name, hf_model=hf_model, tokenizer=tokenizer)
    # The bridge may add parameters of its own (e.g. a zero unembedding bias); they must never train.
    for param in bridge.parameters():
        if id(param) not in before:
            param.requires_grad_(False)
    bridge.eval()
    thread_kv_cache(bridge)
    return bridge


def thread_kv_cache(bridge: Any) -> int:
    """Make the bridge's attention components use the KV cache under either argument name.

    transformers 5.24 renamed the cache argument its decoder layers pass to attention from
    ``past_key_values`` to ``cache``. TransformerLens (3.9 up to at least 4.3) re-implements
    attention and looks the cache up only as ``past_key_values`` / ``layer_past``: with the new name
    the cache is never read nor updated, so every cached step attends to its own tokens alone (the
    prompt is ignored) and shared-prompt scoring and KV-cache generation silently go wrong. This
    wraps each attention component's cache update (the one TransformerLens line that reads it) so
    that ``cache`` is honoured too. Idempotent; returns how many components were wrapped.
    """
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    wrapped = 0
    for module in bridge.modules():
        if not isinstance(module, AttentionBridge) or getattr(module, "_em_interp_cache_threaded", False):
            continue
        original = module._update_kv_cache

        def update(k: torch.Tensor, v: torch.Tensor, _original: Any = original, **kwargs: Any) -> Any:
            if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
                kwargs["past_key_values"] = kwargs["cache"]
            return _original(k, v, **kwargs)

        setattr(module, "_update_kv_cache", update)  # noqa: B010 (an instance attribute shadowing the method)
        module._em_interp_cache_threaded = True
        wrapped += 1
    return wrapped


def cache_argument(hf_model: torch.nn.Module) -> str:
    """The name the HF model's ``forward`` takes its KV cache under (``cache`` since transformers 5.24)."""
    import inspect

    params = inspect.signature(hf_model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def returned_cache(output: Any) -> Any:
    """The KV cache a HF model output carries (``output.cache``, or ``past_key_values`` before 5.24)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


#: Booting wraps each HF submodule, so module and parameter names gain this infix.
_WRAPPER_INFIX = "._original_component"


def hf_name(name: str) -> str:
    """The Hugging Face module/parameter name of a name seen after booting (wrapper infixes removed)."""
    return name.replace(_WRAPPER_INFIX, "")


def hook_name(hook: str, layer: int) -> str:
    """The TransformerLens hook name of the site ``hook`` (see :data:`SITES`) at block ``layer``."""
    check_option("hook", hook, HOOKS)
    return SITES[hook].format(layer=layer)


def n_layers(bridge: Any) -> int:
    """Number of transformer blocks."""
    return int(bridge.cfg.n_layers)


def d_model(bridge: Any) -> int:
    """Width of the residual stream."""
    return int(bridge.cfg.d_model)


def site_width(bridge: Any, site: str) -> int:
    """Width of the activations at ``site``: d_mlp for ``mlp_post``, else d_model."""
    hook_name(site, 0)  # validates the site
    return int(bridge.cfg.d_mlp) if site == "mlp_post" else int(bridge.cfg.d_model)


def forward(
    bridge: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    stop_at_layer: int | None = None,
) -> torch.Tensor:
    """Run the model; return logits, or the residual stream if ``stop_at_layer`` is given.

    ``stop_at_layer=k`` runs blocks ``0..k-1`` only.
    """
    return bridge(input_ids, attention_mask=attention_mask, stop_at_layer=stop_at_layer, return_type="logits")


@contextlib.contextmanager
def hooks(bridge: Any, fwd_hooks: Sequence[tuple[str, HookFn]]) -> Iterator[None]:
    """Attach forward hooks for the duration of the block; they are removed even on error."""
    with bridge.hooks(fwd_hooks=list(fwd_hooks), reset_hooks_end=True):
        yield


def hook_point_names(bridge: Any) -> list[str]:
    """All hook point names the bridge exposes (aliases included)."""
    return list(bridge.hook_dict.keys())


def active_hook_count(bridge: Any) -> int:
    """Number of forward/backward hooks currently attached to the bridge's hook points."""
    seen: set[int] = set()
    total = 0
    for point in bridge.hook_dict.values():
        if id(point) in seen:
            continue
        seen.add(id(point))
        total += len(getattr(point, "fwd_hooks", [])) + len(getattr(point, "bwd_hooks", []))
    return total
