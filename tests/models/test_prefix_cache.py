"""models/prefix_cache.py: the longest shared prefix, never a whole prompt, bounded by bytes (LRU)."""

from __future__ import annotations

import torch

from models.prefix_cache import PrefixCache, stack_kv


def _kv(n: int, fill: float) -> torch.Tensor:
    return torch.full((2, 1, 1, n, 2), fill)  # 16 bytes a token


def test_the_longest_shared_prefix_is_found_and_the_last_token_is_always_left_to_prefill() -> None:
    c = PrefixCache(1 << 20)
    c.store([1, 2, 3, 4], _kv(4, 1.0))
    c.store([1, 2, 9], _kv(3, 2.0))
    assert c.lookup([5, 6]) == (0, None)
    n, kv = c.lookup([1, 2, 3, 4, 5])
    assert n == 4 and kv is not None and kv[0, 0, 0, 0, 0] == 1.0
    n, kv = c.lookup([1, 2, 3, 4])  # the same prompt again: its last token is computed for the first logits
    assert n == 3 and kv is not None and kv.shape[3] >= 3
    n, kv = c.lookup([1, 2, 7])  # [1, 2] is in both; the newest entry answers
    assert n == 2 and kv is not None and kv[0, 0, 0, 0, 0] == 2.0
    assert c.lookup([1]) == (0, None)


def test_bounded_by_bytes_least_recently_used_first() -> None:
    c = PrefixCache(3 * 4 * 16)  # three 4-token prompts
    for i in range(3):
        c.store([i, 0, 0, 0], _kv(4, float(i)))
    assert c.lookup([0, 0, 0, 0, 1])[0] == 4  # prompt 0 used: prompt 1 is now the oldest
    c.store([3, 0, 0, 0], _kv(4, 3.0))
    assert len(c) == 3 and c.nbytes == 3 * 4 * 16
    assert c.lookup([1, 0, 0, 0, 1]) == (0, None)
    assert c.lookup([0, 0, 0, 0, 1])[0] == 4 and c.lookup([3, 0, 0, 0, 1])[0] == 4
    c.store(list(range(13)), _kv(13, 1.0))  # larger than the whole cache: not kept, nothing dropped
    assert len(c) == 3
    for i in range(100):  # many prompts through: the bound holds, the index shrinks with the entries
        c.store([100 + i, 1, 2, 3], _kv(4, 0.0))
    assert len(c) == 3 and c.nbytes <= c.max_bytes and len(c._index) <= 3 * 4


def test_an_evicted_prompt_leaves_its_longer_sibling_findable() -> None:
    c = PrefixCache(2 * 4 * 16)
    c.store([1, 2, 3, 4], _kv(4, 1.0))
    c.store([1, 2, 5, 6], _kv(4, 2.0))  # owns [1] and [1, 2] now
    c.store([7, 8, 9, 10], _kv(4, 3.0))  # drops [1, 2, 3, 4] (the oldest)
    assert c.lookup([1, 2, 5, 6, 0])[0] == 4
    assert c.lookup([1, 2, 3, 0]) == (2, c.lookup([1, 2, 5, 6, 0])[1])


def test_stack_kv_orders_keys_then_values_by_layer() -> None:
    keys = [torch.full((2, 3, 4), float(i)) for i in range(2)]
    values = [torch.full((2, 3, 4), 10.0 + i) for i in range(2)]
    kv = stack_kv(keys, values)
    assert kv.shape == (2, 2, 2, 3, 4) and kv[0, 1, 0, 0, 0] == 1.0 and kv[1, 0, 0, 0, 0] == 10.0
