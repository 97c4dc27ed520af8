"""KV caches of a running batch: merge a new request in, drop finished ones, trim padding.

The five families keep their caches differently: transformers' ``DynamicCache`` (native models,
MiniCPM) or legacy tuples of ``(key, value)`` per layer, with the sequence on dim 2
(``[batch, heads, seq, head_dim]``: InternLM2, XVERSE) or on dim 1 (``[batch, seq, heads,
head_dim]``: Qwen v1, BlueLM). ``BatchCache`` holds plain tensors plus the layout they came in and
gives back the same kind of object the model returned, so the engine never assumes a layout.

Rows are left-padded: every row's real tokens end at the last column; ``mask`` says which
columns are real (1) or padding (0).

Most models take each row's positions from ``position_ids``, so padding in front of a row changes
nothing. Qwen v1's remote code ignores them and rotates by the column (the cache length): there a
row moved right by padding (when it joins a longer batch) or left (when padding columns are
trimmed) has its cached keys turned by the same number of positions (``Rotary``), which is what
they would be had the row been computed at those columns.
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


class Rotary:
    """Turns cached keys by a number of positions with the model's rotary embedding (RoPE, the
    rotate-half form of Llama, Qwen and transformers): rotating by ``a`` then ``b`` equals rotating
    by ``a + b``, so keys computed at column ``c`` become the keys of column ``c + shift``."""

    def __init__(self, inv_freq: torch.Tensor):
        self.inv_freq = inv_freq.detach().float()
        self.dim = 2 * self.inv_freq.shape[0]  # the leading head dims that rotate

    @classmethod
    def from_model(cls, model) -> "Rotary | None":
        """The rotary embedding of ``model`` (its ``inv_freq`` buffer), or None if it has no single one."""
        found = {id(m.inv_freq): m.inv_freq for m in model.modules()
                 if isinstance(getattr(m, "inv_freq", None), torch.Tensor)}
        freqs = list(found.values())
        if not freqs or any(f.shape != freqs[0].shape or not torch.equal(f, freqs[0]) for f in freqs[1:]):
            return None
        return cls(freqs[0])

    def shift(self, keys: torch.Tensor, positions: int) -> torch.Tensor:
        if positions == 0:
            return keys
        angles = positions * self.inv_freq.to(keys.device)
        emb = torch.cat([angles, angles])
        cos, sin = emb.cos(), emb.sin()
        turning, rest = keys[..., :self.dim].float(), keys[..., self.dim:]
        half = self.dim // 2
        rotated = torch.cat([-turning[..., half:], turning[..., :half]], dim=-1)
        turned = (turning * cos + rotated * sin).to(keys.dtype)
        return torch.cat([turned, rest], dim=-1) if rest.shape[-1] else turned


@dataclass
class BatchCache:
    layers: list[tuple[torch.Tensor, torch.Tensor]]
    mask: torch.Tensor          # [batch, seq] long, 1 = real token, 0 = left padding
    seq_dim: int
    kind: str                   # "dynamic" | "tuple"
    rotary: Rotary | None = None  # set for models whose positions follow the columns (Qwen v1)
    padded: bool = False        # some row has padding (the model needs the mask)
    past: Any = None            # the model's own cache object, while no batch surgery changed the layers

    @classmethod
    def from_model(cls, past, mask: torch.Tensor, seq_dim: int, rotary: Rotary | None = None) -> "BatchCache":
        kind = "dynamic" if hasattr(past, "key_cache") else "tuple"
        return cls(_layers(past), mask, seq_dim, kind, rotary, padded=not bool(mask.all()), past=past)

    def _turn(self, k: torch.Tensor, positions: int) -> torch.Tensor:
        return self.rotary.shift(k, positions) if self.rotary is not None else k

    # -- what the model gets back
    def to_model(self) -> Any:
        if self.kind == "dynamic":
            if self.past is not None:  # what the model returned last: give it back as it is
                return self.past
            from transformers import DynamicCache

            return DynamicCache.from_legacy_cache(tuple(self.layers))
        return tuple(self.layers)

    def update(self, past, mask: torch.Tensor) -> None:
        """Take the cache a forward step returned (same rows, one column more: the padding
        stays as it was)."""
        self.layers = _layers(past)
        self.mask = mask
        self.past = past

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
            (torch.cat([self._pad_left(self._turn(k, mine), mine), self._pad_left(self._turn(ok, theirs), theirs)], 0),
             torch.cat([self._pad_left(v, mine), self._pad_left(ov, theirs)], 0))
            for (k, v), (ok, ov) in zip(self.layers, other.layers)
        ]
        pad = lambda m, n: torch.cat([m.new_zeros((m.shape[0], n)), m], 1) if n > 0 else m  # noqa: E731
        self.mask = torch.cat([pad(self.mask, mine), pad(other.mask, theirs)], 0)
        self.padded = self.padded or other.padded or mine > 0 or theirs > 0
        self.past = None

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order), then drop columns that are padding in every row."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        layer_index = index.to(self.layers[0][0].device)
        self.layers = [(k.index_select(0, layer_index), v.index_select(0, layer_index)) for k, v in self.layers]
        self.past = None
        self._trim()
        self.padded = self.mask.numel() > 0 and not bool(self.mask.all())

    def _trim(self) -> None:
        if self.mask.numel() == 0:
            return
        used = self.mask.sum(0) > 0
        first = int(torch.nonzero(used)[0]) if bool(used.any()) else self.length
        if first > 0:
            self.mask = self.mask[:, first:]
            self.layers = [(self._turn(k.narrow(self.seq_dim, first, k.shape[self.seq_dim] - first), -first),
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
