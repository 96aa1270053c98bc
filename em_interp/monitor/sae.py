"""A TopK sparse autoencoder on one layer's activations, trained offline with sae-lens (a monitor baseline).

The trait-space monitoring paper compares its trait monitor with the drift of a 256-latent SAE's features. This module
trains sae-lens's ``TopKTrainingSAE`` on activations of the base model that em_interp has already
cached, with sae-lens's own training loss (``training_forward_pass``: reconstruction MSE plus the
TopK auxiliary loss for dead latents). Why not ``sae_lens``'s ``LanguageModelSAETrainingRunner``:
it streams a hub dataset through a ``HookedTransformer`` (this package runs offline, on
``TransformerBridge`` hooks, and already holds the activations), so the loop here is the few lines
of Adam over shuffled activation rows that the runner would do.

Inputs are divided by their mean L2 norm (stored with the SAE) so the SAE sees unit-scale rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from em_interp.errors import EmInterpError


@dataclass
class ActivationSAE:
    """A trained TopK SAE and the input scale it was trained with."""

    sae: Any  # sae-lens TopKTrainingSAE (a torch.nn.Module with cfg, encode)
    scale: float
    layer: int
    final_mse: float
    dead_fraction: float

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return int(self.sae.cfg.d_sae)

    @torch.no_grad()
    def features(self, acts: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_sae"]:
        """Latent activations of activation rows."""
        if acts.ndim != 2 or acts.shape[1] != self.sae.cfg.d_in:
            raise EmInterpError(f"acts must be (n, {self.sae.cfg.d_in}) for this SAE, got {tuple(acts.shape)}")
        return self.sae.encode(acts.float() / self.scale)


def train_topk_sae(acts: Float[Tensor, "n d_model"], layer: int, d_sae: int = 256, k: int = 16, steps: int = 2000,
                   batch_size: int = 512, learning_rate: float = 1e-3, seed: int = 0) -> ActivationSAE:
    """Train a sae-lens TopK SAE (``d_sae`` latents, ``k`` active) on activation rows; seeded."""
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    if acts.ndim != 2 or len(acts) < 2:
        raise EmInterpError(f"acts must be (n >= 2, d_model) activation rows, got {tuple(acts.shape)}")
    if not 1 <= k <= d_sae:
        raise EmInterpError(f"k={k} must be between 1 and d_sae={d_sae}")
    if steps < 1 or batch_size < 1:
        raise EmInterpError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    x = acts.detach().float()
    if not torch.isfinite(x).all():
        raise EmInterpError("acts has NaN or infinite values")
    scale = float(x.norm(dim=1).mean())
    if not scale > 0:
        raise EmInterpError("acts are all zero")
    x = x / scale
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, dtype="float32", device="cpu"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    last_fired = torch.zeros(d_sae, dtype=torch.long)
    mse = float("nan")
    for step in range(steps):
        batch = x[torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)]
        dead = (step - last_fired) > 200  # latents silent for 200 steps get the auxiliary loss
        out = sae.training_forward_pass(TrainStepInput(sae_in=batch, coefficients={}, dead_neuron_mask=dead,
                                                       n_training_steps=step, is_logging_step=False))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        last_fired[(out.feature_acts > 0).any(0)] = step
        mse = float(out.losses["mse_loss"].detach())
    with torch.no_grad():
        fired = (sae.encode(x) > 0).any(0)
    sae.eval()
    return ActivationSAE(sae, scale, layer, mse, float((~fired).float().mean()))
