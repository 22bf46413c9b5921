"""A flow-matching action expert on HFVLA (pi0 / SmolVLA's action head), as a small adapter class.

It shows what a different action head has to change for the whole pipeline to work on it: the decision
tokens also carry the noisy chunk x_t and the flow time t, the readout is the velocity (noise - action),
the per-sample error is its training loss (MSE), and `predict` integrates from noise to a chunk. The
towers, the trunk, `heads()`, identification's staging, steering and deltas are HFVLA's, unchanged.

For identification the noise and t of a demo frame are fixed by its episode and frame index, so the
clean, ablated and corrupted runs score the same draw; training draws them afresh each step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from edge_steer.models.modeling_hfvla import HFVLA
from edge_steer.models.vla import action_chunk, observation_batch


class FlowMatchingVLA(HFVLA):
    model_type = "hf_vla_flow"

    def __init__(self, config, *args, **kw):
        super().__init__(config, *args, **kw)
        self.noisy_in = nn.Linear(config.action_dim + 1, self.queries.shape[-1])

    def _draw(self, batch: Mapping[str, Any], fresh: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise (B, chunk, A), t (B, 1, 1)): fresh, or fixed per demo frame."""
        c, n = self.config, len(batch["task"])
        if fresh:
            return torch.randn(n, c.chunk, c.action_dim), torch.rand(n, 1, 1)
        out = []
        for ep, fr in zip(np.asarray(batch["episode_index"]), np.asarray(batch["frame_index"])):
            g = torch.Generator().manual_seed(int(ep) * 1_000_003 + int(fr))
            out.append((torch.randn(c.chunk, c.action_dim, generator=g), torch.rand(1, 1, generator=g)))
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])

    def _noisy(self, batch, inputs: dict[str, torch.Tensor], fresh: bool) -> torch.Tensor:
        """Adds x_t and t to `inputs`; returns the velocity target."""
        action, _ = super().action_target(batch)
        noise, t = self._draw(batch, fresh)
        inputs["x_t"], inputs["t"] = t * noise + (1 - t) * action, t
        return noise - action

    def prepare(self, batch: Mapping[str, Any], train: bool = False) -> dict[str, torch.Tensor]:
        inputs = super().prepare(batch, train)
        if "action" in batch and not train:     # identification: x_t from the demo, fixed per frame
            self._noisy(batch, inputs, fresh=False)
        return inputs

    def embed(self, images, state, lang, lang_mask, x_t=None, t=None):
        x, mask = super().embed(images, state, lang, lang_mask)
        c = self.config
        q = self.noisy_in(torch.cat([x_t, t.expand(-1, c.chunk, 1)], -1).to(x.dtype))
        return torch.cat([x[:, :-c.chunk], x[:, -c.chunk:] + q], 1), mask

    def forward(self, images, state, lang, lang_mask, x_t=None, t=None):
        return self.readout(self.trunk(*self.embed(images, state, lang, lang_mask, x_t, t)))

    def action_target(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The velocity noise - action (normalised units) of the frame's fixed draw."""
        action, valid = super().action_target(batch)
        noise, _ = self._draw(batch, fresh=False)
        return noise - action, valid

    def action_error(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return ((pred.float() - target) ** 2).mean(-1).mul(valid).sum(-1) / valid.sum(-1).clamp_min(1)

    def loss(self, batch: Mapping[str, Any], train: bool = True) -> torch.Tensor:
        inputs = super().prepare(batch, train)
        target = self._noisy(batch, inputs, fresh=train)
        _, valid = super().action_target(batch)
        return self.action_error(self(**inputs), target, valid).mean()

    @torch.no_grad()
    def predict(self, observation: Mapping[str, Any], instruction: str, steps: int = 10) -> np.ndarray:
        """Euler integration of the velocity from noise (t = 1) to a chunk (t = 0)."""
        was_training = self.training
        self.eval()
        inputs = super().prepare(observation_batch(observation, instruction))
        x = torch.randn(1, self.config.chunk, self.config.action_dim)
        for i in range(steps, 0, -1):
            x = x - self(**inputs, x_t=x, t=torch.full((1, 1, 1), i / steps)) / steps
        self.train(was_training)
        return action_chunk(x[0].float().numpy(), self.action_mean.numpy(), self.action_std.numpy())
