"""KV caches of a running batch: merge a new request in, drop finished ones, trim padding.

The five families keep their caches differently: transformers' ``DynamicCache`` (native models,
MiniCPM) or legacy tuples of ``(key, value)`` per layer, with the sequence on dim 2
(``[batch, heads, seq, head_dim]``: InternLM2, XVERSE) or on dim 1 (``[batch, seq, heads,
head_dim]``: Qwen v1, BlueLM). ``BatchCache`` holds plain tensors plus the layout they came in and
gives back the same kind of object the model returned, so the engine never assumes a layout.

Rows are left-padded: every row's real tokens end at the last column; ``mask`` says which
columns are real (1) or padding (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

FAMILY_SEQ_DIM = {"qwen": 1, "bluelm": 1}  # legacy layouts with the sequence on dim 1 (others: 2)


def _layers(past) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(past, "key_cache") and hasattr(past, "value_cache"):  # transformers Cache
        return list(zip(past.key_cache, past.value_cache))
    return [(layer[0], layer[1]) for layer in past]


def detect_seq_dim(past, length: int, default: int = 2) -> int:
    """The sequence dimension of a cache that holds ``length`` tokens per row."""
    k = _layers(past)[0][0]
    candidates = [d for d in (1, 2) if k.shape[d] == length]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(f"cannot find a sequence dimension of length {length} in a cache of shape {tuple(k.shape)}")
    return default  # ambiguous (heads == length): trust the family's known layout


@dataclass
class BatchCache:
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor          # [batch, seq] long, 1 = real token, 0 = left padding
    seq_dim: int
    kind: str                   # "dynamic" | "tuple"

    @classmethod
    def from_model(cls, past, mask: torch.Tensor, seq_dim: int) -> "BatchCache":
        kind = "dynamic" if hasattr(past, "key_cache") else "tuple"
        return cls(_layers(past), mask, seq_dim, kind)

    # -- what the model gets back
    def to_model(self) -> Any:
        if self.kind == "dynamic":
            from transformers import DynamicCache

            return DynamicCache.from_legacy_cache(tuple(self.layers))
        return tuple(self.layers)

    def update(self, past, mask: torch.Tensor) -> None:
        """Take the cache a forward step returned (same rows, one column more)."""
        self.layers = _layers(past)
        self.mask = mask

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    # -- batch surgery
    def _pad_left(self, t: torch.Tensor, extra: int) -> torch.Tensor:
        if extra <= 0:
            return t
        shape = list(t.shape)
        shape[self.seq_dim] = extra
        return torch.cat([t.new_zeros(shape), t], dim=self.seq_dim)

    def merge(self, other: "BatchCache") -> None:
        """Append ``other``'s rows; the shorter side is padded on the left."""
        if other.seq_dim != self.seq_dim or other.kind != self.kind:
            raise ValueError("cannot merge caches of different layouts")
        length = max(self.length, other.length)
        mine, theirs = length - self.length, length - other.length
        self.layers = [
            (torch.cat([self._pad_left(k, mine), self._pad_left(ok, theirs)], 0),
             torch.cat([self._pad_left(v, mine), self._pad_left(ov, theirs)], 0))
            for (k, v), (ok, ov) in zip(self.layers, other.layers)
        ]
        pad = lambda m, n: torch.cat([m.new_zeros((m.shape[0], n)), m], 1) if n > 0 else m  # noqa: E731
        self.mask = torch.cat([pad(self.mask, mine), pad(other.mask, theirs)], 0)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order), then drop columns that are padding in every row."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        layer_index = index.to(self.layers[0][0].device)
        self.layers = [(k.index_select(0, layer_index), v.index_select(0, layer_index)) for k, v in self.layers]
        self._trim()

    def _trim(self) -> None:
        if self.mask.numel() == 0:
            return
        used = self.mask.sum(0) > 0
        first = int(torch.nonzero(used)[0]) if bool(used.any()) else self.length
        if first > 0:
            self.mask = self.mask[:, first:]
            self.layers = [(k.narrow(self.seq_dim, first, k.shape[self.seq_dim] - first),
                            v.narrow(self.seq_dim, first, v.shape[self.seq_dim] - first)) for k, v in self.layers]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes of KV cache one token costs: 2 (key and value) x layers x KV heads x head size x
    bytes per number. About 0.5 MB for a 7B model in fp16."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 1
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or getattr(config, "kv_channels", None) \
        or config.hidden_size // heads
    size = torch.tensor([], dtype=dtype).element_size()
    return int(2 * layers * kv_heads * head_dim * size)
