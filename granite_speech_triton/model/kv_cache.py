"""KV cache of the AR decoding engine: one row per live request, in tensors grown on demand.

Per layer, keys and values are [rows, kv_heads, capacity, head_dim]. Live requests occupy rows
0..n-1: when a request leaves, the last live row moves into its place, so a decode step reads the
views [:n, :, :longest] without gathering anything. Positions past a row's own length hold stale
values (finite: the pool starts zeroed) and are masked out by the engine.

Memory: 2 * layers * rows * capacity * kv_heads * head_dim * element size. The pool grows only
when a request needs more rows or positions than it has, and never past `max_rows` x
`max_tokens`, so `max_bytes()` bounds it (granite-speech-4.1-2b: 160 KiB per position in
float32, 80 KiB in bfloat16).

transformers' attention layers call `past_key_values.update(keys, values, layer_idx)` and attend
over what it returns; `PrefillWriter` and `DecodeWriter` are the two objects the engine passes
as `past_key_values`, one per forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch

GROWTH_STEP = 256  # positions are allocated in multiples of this


@dataclass(frozen=True)
class KVLayout:
    """What one position of one row costs: per layer a key and a value of kv_heads x head_dim."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_llm_config(cls, config) -> KVLayout:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, config.num_key_value_heads, head_dim)

    def bytes_per_position(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


class KVPool:
    """Rows of keys and values for every layer; `lengths[r]` positions of row r are filled."""

    def __init__(
        self, layout: KVLayout, max_rows: int, max_tokens: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.layout = layout
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.dtype = dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(max_rows, dtype=torch.long, device=self.device)
        self._allocate(0, 0)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def max_bytes(self) -> int:
        """The most memory the pool can ever take."""
        return self.max_rows * self.max_tokens * self.layout.bytes_per_position(self.dtype)

    def allocated_bytes(self) -> int:
        return self.rows * self.capacity * self.layout.bytes_per_position(self.dtype)

    def reserve(self, rows: int, tokens: int) -> None:
        """Make room for `rows` rows of `tokens` positions each, keeping what the pool holds."""
        if rows > self.max_rows or tokens > self.max_tokens:
            raise ValueError(f"{rows} rows x {tokens} positions exceed the pool ({self.max_rows} x {self.max_tokens})")
        if rows <= self.rows and tokens <= self.capacity:
            return
        new_rows = min(self.max_rows, max(rows, 2 * self.rows))
        new_capacity = max(self.capacity, min(self.max_tokens, -(-tokens // GROWTH_STEP) * GROWTH_STEP))
        old_keys, old_values = self.keys, self.values
        self._allocate(new_rows, new_capacity)
        for old, new in zip(old_keys + old_values, self.keys + self.values, strict=True):
            new[: old.shape[0], :, : old.shape[2]] = old

    def _allocate(self, rows: int, capacity: int) -> None:
        shape = (rows, self.layout.kv_heads, capacity, self.layout.head_dim)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.layout.layers)]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.layout.layers)]

    def move_row(self, source: int, target: int) -> None:
        """Copy row `source` (its filled positions) into row `target`."""
        n = int(self.lengths[source])
        for tensor in self.keys + self.values:
            tensor[target, :, :n] = tensor[source, :, :n]
        self.lengths[target] = n
        self.lengths[source] = 0

    def copy_rows(self, targets: list[int], sources: list[int]) -> None:
        """Row targets[i] takes the content of row sources[i]; every source is read before any write."""
        span = int(self.lengths[sources].max())
        target, source = torch.tensor(targets, device=self.device), torch.tensor(sources, device=self.device)
        for tensor in self.keys + self.values:
            tensor[target, :, :span] = tensor[source, :, :span]
        self.lengths[target] = self.lengths[source]


class PrefillWriter:
    """`past_key_values` of a packed prefill: stores each prompt's keys and values in its row.

    The packed sequence attends over its own keys (the engine's block-diagonal mask keeps prompts
    apart), so `update` returns them unchanged.
    """

    def __init__(self, pool: KVPool, rows: list[int], lengths: list[int]) -> None:
        self.pool = pool
        starts = [0, *accumulate(lengths)][:-1]
        self.segments = list(zip(rows, starts, lengths, strict=True))  # (row, start in the pack, length)

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """keys, values [1, kv_heads, sum L, head_dim] -> the same, after storing each segment."""
        for row, start, n in self.segments:
            self.pool.keys[layer_idx][row, :, :n] = keys[0, :, start : start + n]
            self.pool.values[layer_idx][row, :, :n] = values[0, :, start : start + n]
        return keys, values

    def commit(self) -> None:
        for row, _, n in self.segments:
            self.pool.lengths[row] = n


class DecodeWriter:
    """`past_key_values` of one decode step of rows 0..n-1: appends one position to each row."""

    def __init__(self, pool: KVPool, n: int) -> None:
        self.pool = pool
        self.index = torch.arange(n, device=pool.device)
        self.positions = pool.lengths[:n].clone()  # [n]: where each row's new key goes
        self.span = int(self.positions.max()) + 1  # positions every row may attend to, padding included

    def update(self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args, **kwargs):
        """keys, values [n, kv_heads, 1, head_dim] -> each row's cache [n, kv_heads, span, head_dim]."""
        n = self.index.shape[0]
        pool_keys, pool_values = self.pool.keys[layer_idx], self.pool.values[layer_idx]
        pool_keys[self.index, :, self.positions] = keys[:, :, 0]
        pool_values[self.index, :, self.positions] = values[:, :, 0]
        return pool_keys[:n, :, : self.span], pool_values[:n, :, : self.span]

    def attention_mask(self) -> torch.Tensor:
        """[n, 1, 1, span] bool: each row sees its own filled positions and the new one."""
        return (torch.arange(self.span, device=self.pool.device) <= self.positions[:, None])[:, None, None, :]

    def commit(self) -> None:
        self.pool.lengths[: self.index.shape[0]] += 1
