"""Prompt prefix caching for the continuous decoder: the keys/values of prompts prefilled before (bounded).

A copy prompt is built from a product's attributes and the shopper's coarse persona buckets
(:mod:`models.text.context`), not from names, so many requests share a prompt, or its first line.
:class:`PrefixCache` keeps the per-layer keys/values of recently prefilled prompts; a new prompt
reuses those of the longest prefix it shares with one of them and prefills only the rest (at least
its last token, whose logits the first sample needs). The keys/values of a prefix depend on that
prefix alone (causal attention), so a reused prefix gives what prefilling it again would (up to the
int8 products' per-batch activation scale, as any batching does). Bounded by bytes, least recently
used entry dropped first; one cache per executor (keys/values belong to one set of weights).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor


class PrefixCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[int, ...], Tensor] = OrderedDict()  # prompt -> (2, layers, H, L, dh)
        self._index: dict[tuple[int, ...], tuple[int, ...]] = {}  # every prefix of an entry's prompt -> the prompt
        self._bytes = 0
        self._lock = threading.Lock()
        self.reused = 0  # prompt tokens whose keys/values came from the cache
        self.computed = 0  # prompt tokens prefilled

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, ids: Sequence[int]) -> tuple[int, Tensor | None]:
        """(c, keys/values (2, layers, H, >= c, dh) whose first ``c`` columns are ``ids[:c]``'s) for the
        longest cached prefix of ``ids`` shorter than ``ids`` (the last token is always prefilled); (0, None)."""
        ids = tuple(int(t) for t in ids)
        with self._lock:
            for c in range(len(ids) - 1, 0, -1):
                owner = self._index.get(ids[:c])
                if owner is not None:
                    self._entries.move_to_end(owner)
                    return c, self._entries[owner]
        return 0, None

    def copy(self) -> PrefixCache:
        """A cache with these entries (the tensors shared: entries are never written), counters at 0."""
        out = PrefixCache(self.max_bytes)
        with self._lock:
            out._entries = OrderedDict(self._entries)
            out._index = dict(self._index)
            out._bytes = self._bytes
        return out

    def count(self, reused: int, computed: int) -> None:
        with self._lock:
            self.reused += int(reused)
            self.computed += int(computed)

    def store(self, ids: Sequence[int], kv: Tensor) -> None:
        """Keep ``kv`` (2, layers, H, len(ids), dh), the keys/values of prompt ``ids``."""
        key = tuple(int(t) for t in ids)
        size = kv.numel() * kv.element_size()
        if size > self.max_bytes or not key:
            return
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return
            self._entries[key] = kv
            self._bytes += size
            for c in range(1, len(key) + 1):  # the newest entry answers for every prefix it has
                self._index[key[:c]] = key
            while self._bytes > self.max_bytes:
                old, t = self._entries.popitem(last=False)
                self._bytes -= t.numel() * t.element_size()
                for c in range(1, len(old) + 1):
                    if self._index.get(old[:c]) == old:
                        del self._index[old[:c]]


def stack_kv(keys: Sequence[Tensor], values: Sequence[Tensor]) -> Tensor:
    """Per-layer keys and values (H, L, dh) of one prompt -> (2, layers, H, L, dh), contiguous."""
    return torch.stack([torch.stack(list(keys)), torch.stack(list(values))]).contiguous()
