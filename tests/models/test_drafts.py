"""Speculative decoding's parts: the n-gram draft table (models/drafts.py) and the acceptance rule
(models.drafts.speculative_pick), whose emitted tokens must have the plain sampling's distribution."""

from __future__ import annotations

import random

import numba
import numpy as np
import pytest
import torch

from models import drafts as drafts_mod
from models.drafts import NGramDrafts, emit_into_rows, emit_tokens, speculative_pick


def test_guesses_chain_the_most_frequent_follower_longest_context_first() -> None:
    d = NGramDrafts(n=2)
    d.learn([1, 2, 3, 4, 5])
    d.learn([9, 2, 3, 4, 5])
    d.learn([7, 3, 8])
    assert d.propose([1, 2], 3) == [3, 4, 5]  # (1, 2) -> 3, (2, 3) -> 4, (3, 4) -> 5
    assert d.propose([7, 3], 2) == [8]  # (7, 3) -> 8 beats (3,) -> 4; then nothing follows (3, 8) or (8,)
    assert d.propose([6, 3], 1) == [4]  # unseen (6, 3): backs off to (3,), seen twice before 4
    assert d.propose([42], 3) == []
    assert d.propose([1, 2], 0) == []


def test_the_table_is_bounded_and_a_copy_is_independent() -> None:
    d = NGramDrafts(n=2, max_contexts=50, max_next=3)
    for i in range(200):
        d.learn([i, i + 1000, i % 7])
    assert len(d) <= 50
    for nxt in range(10):
        d.learn([5, 6, nxt])
        d.learn([5, 6, 0])
    assert len(d.followers([5, 6])) <= 3 and d.propose([5, 6], 1) == [0]
    c = d.copy()
    c.learn([5, 6, 9] * 50)
    assert d.propose([5, 6], 1) == [0] and c.propose([5, 6], 1) == [9]


def _reference(rows: list[list[int]], n: int, max_next: int) -> tuple[dict, dict]:
    """The table's rule in plain Python: per context, the followers' counts in the order first seen
    (past max_next the rarest other one forgotten, the first seen of equals) and the most frequent
    (a tie keeps the earlier best; a forgotten best gives way to the new follower)."""
    counts: dict[tuple[int, ...], dict[int, int]] = {}
    best: dict[tuple[int, ...], int] = {}
    for toks in rows:
        for i in range(1, len(toks)):
            for m in range(1, min(n, i) + 1):
                ctx, nxt = tuple(toks[i - m:i]), toks[i]
                c = counts.setdefault(ctx, {})
                c[nxt] = c.get(nxt, 0) + 1
                b = best.get(ctx)
                if len(c) > max_next:
                    rare = min((t for t in c if t != nxt), key=c.__getitem__)
                    del c[rare]
                    b = None if rare == b else b
                if b is None or c[nxt] > c.get(b, 0):
                    best[ctx] = nxt
    return counts, best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_compiled_table_counts_and_guesses_as_the_plain_rule(seed: int) -> None:
    """Random rows over a small vocabulary (many contexts with more followers than max_next): every
    context's followers and counts, and every chained guess, are the reference's."""
    rng = random.Random(seed)
    rows = [[rng.randrange(12) for _ in range(rng.randint(2, 30))] for _ in range(300)]
    d = NGramDrafts(n=3, max_contexts=100_000, max_next=3)
    for r in rows:
        d.learn(r)
    counts, best = _reference(rows, 3, 3)
    assert len(d) == len(counts)
    for ctx, c in counts.items():
        assert d.followers(list(ctx)) == c
    for r in rows[:100]:
        ctx, want = list(r[:5]), []
        while len(want) < 4:
            g = next((best[tuple(ctx[-m:])] for m in range(min(3, len(ctx)), 0, -1) if tuple(ctx[-m:]) in best), None)
            if g is None:
                break
            want.append(g)
            ctx.append(g)
        assert d.propose(r[:5], 4) == want


def test_a_row_longer_than_the_table_leaves_it_bounded_and_usable() -> None:
    d = NGramDrafts(n=6, max_contexts=8)  # 32 slots; one row brings ~6,000 new contexts
    d.learn(list(range(1000)))
    assert len(d) <= 8
    d.learn([7, 8, 9])  # three more: within the bound
    assert d.propose([7, 8], 1) == [9] and len(d) <= 8


@pytest.mark.parametrize("bad", ["n", "ntok", "tail_len"])
def test_a_step_plan_refuses_state_its_loop_would_read_past(bad: str) -> None:
    d = NGramDrafts(n=2)
    d.learn([1, 2, 3, 4])
    alive, closing = np.array([True, True]), np.array([False, False])
    ntok, tail_len, z = np.array([1, 1]), np.array([2, 2]), np.zeros(2, np.int64)
    tokens, tail = np.array([[2, 0, 0], [2, 0, 0]]), np.array([[0, 1], [0, 1]])
    args = dict(n=2, ntok=ntok, tail_len=tail_len)
    ok = d.plan_step(2, alive, closing, ntok, z, z, z + 2, tokens, tail, tail_len, 2, 0, 8, 10, 50, 60, 9, 10)
    assert ok.guesses.tolist() == [[3, 4], [3, 4]]  # (1, 2) -> 3, (2, 3) -> 4
    args[bad] = 3 if bad == "n" else np.array([1, 4 if bad == "ntok" else 3])
    with pytest.raises(ValueError):
        d.plan_step(args["n"], alive, closing, args["ntok"], z, z, z + 2, tokens, tail, args["tail_len"], 2, 0, 8, 10,
                    50, 60, 9, 10)


def test_a_count_near_its_int32_bound_halves_its_contexts_counts() -> None:
    d = NGramDrafts(n=1)
    d.learn([1, 2, 1, 3, 1, 3])  # (1,) -> 2 once, 3 twice
    s = drafts_mod._find(d._keys, np.array([1]))
    d._cnt[s, 1] = drafts_mod._MAX_COUNT - 1  # as after ~1e9 counts of (1,) -> 3
    d.learn([1, 3])
    assert d.followers([1]) == {2: 1, 3: drafts_mod._MAX_COUNT // 2} and d.propose([1], 1) == [3]


@pytest.mark.parametrize("guesses", [[0, 1], [3, 0], [4, 2], [-1, -1]])
def test_speculative_pick_emits_what_plain_sampling_would(guesses: list[int]) -> None:
    """40,000 rows with the same distributions at two positions: the first emitted token follows
    p0; among rows that kept the first guess, the second emitted token follows p1; a guess the
    distribution rules out (or none) is never kept."""
    torch.manual_seed(0)
    n, gen = 40_000, torch.Generator().manual_seed(1)
    p0 = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    p1 = torch.tensor([0.05, 0.6, 0.3, 0.05, 0.0])
    p2 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])
    idx = torch.arange(5).expand(n, 3, 5)
    probs = torch.stack([p0, p1, p2]).expand(n, 3, 5)
    drafts = torch.tensor(guesses).expand(n, 2)
    acc, em, pe = speculative_pick(idx, probs, drafts, torch.rand((n, 3), generator=gen))
    first = torch.bincount(em[:, 0].clamp(min=0), minlength=5).float() / n
    assert torch.allclose(first, p0, atol=0.012)
    kept1 = acc >= 1
    if guesses[0] >= 0:
        assert abs(kept1.float().mean().item() - p0[guesses[0]].item()) < 0.012
        second = torch.bincount(em[kept1, 1].clamp(min=0), minlength=5).float() / int(kept1.sum())
        assert torch.allclose(second, p1, atol=0.02)
    else:
        assert not kept1.any()
    if guesses[1] == 4 or guesses[1] < 0:  # p1 rules it out: never kept
        assert not (acc == 2).any()
    # each emitted token's probability is the one of its position's distribution (what the decode logs)
    assert torch.allclose(pe[:, 0], p0[em[:, 0]])
    assert torch.allclose(pe[kept1, 1], p1[em[kept1, 1]]) and (pe[:, 0] > 0).all()


def test_contexts_seen_again_outlive_the_ones_seen_once() -> None:
    d = NGramDrafts(n=1, max_contexts=10)
    d.learn([1, 2])  # (1,) -> 2: the first context learned
    for i in range(100, 130):
        d.learn([1, 2])  # seen again and again
        d.learn([i, i + 1])  # one-off contexts that push the table over its bound
    assert d.propose([1], 1) == [2] and len(d) <= 10


def test_emit_keeps_guesses_as_sampling_would_and_stops_at_eos() -> None:
    """models.drafts.emit_tokens (what the decoder's steps run): logits = log p at T=1 with no top-k
    or top-p cut, so the sampling distributions are p0, p1, p2; token 4 is EOS. The first emitted
    token follows p0; a kept EOS guess ends the row there (consumed with it, not kept as a token)."""
    run = emit_tokens
    n, gen = 40_000, torch.Generator().manual_seed(2)
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.05, 0.1, 0.1, 0.7], [0.2, 0.2, 0.2, 0.2, 0.2]])
    logits = p.log().expand(n, 3, 5).contiguous()
    drafts = torch.tensor([0, 4]).expand(n, 2).contiguous()
    acc, em, n_emit, n_keep, ended, first_end, lps = run(logits, drafts, torch.rand((n, 3), generator=gen),
                                                         1.0, 0, 1.0, 4, None)
    first = torch.bincount(em[:, 0], minlength=5).float() / n
    assert torch.allclose(first, p[0], atol=0.012)
    both = acc == 2  # 0 kept (p 0.5), then EOS kept (p 0.7): the row ends at the EOS guess
    assert abs(both.float().mean().item() - 0.35) < 0.012
    assert (ended[both] & (first_end[both] == 1) & (n_emit[both] == 2) & (n_keep[both] == 1)).all()
    assert torch.allclose(lps[both, 0], torch.tensor(0.5 * 0.7).log().double().expand(int(both.sum())), atol=1e-5)
    none = (acc == 0) & (em[:, 0] != 4)
    assert (~ended[none] & (n_emit[none] == 1) & (n_keep[none] == 1)).all()


@pytest.mark.parametrize("top_k,top_p", [(50, 0.95), (0, 0.9), (5, 1.0), (300, 0.5)])
def test_the_compiled_cpu_emit_is_the_eager_emit(top_k: int, top_p: float) -> None:
    """models/cpu_emit.py runs emit_into_rows (a step's sampling and its writes into the rows' state)
    as one compiled loop on the CPU decoder, reading each place's logits where the step left them
    and adding the rows' bans itself: the same outputs and the same state for the same draws, on
    peaked rows, flat ones, masked ones, with and without guesses (kept, refused, absent), a stop
    mask, bans, truncation at max_new, greedy; top-k narrow, wide (a whole-row sort) and off."""
    from models import cpu_emit

    gen = torch.Generator().manual_seed(5)
    v, n_rows, max_new = 300, 12, 9
    for m, qn in ((4, 4), (6, 1), (3, 2), (5, 6)):
        x = torch.randn((m, qn, v), generator=gen) * 2
        x[0, :, 7] += 15.0  # peaked: its guesses (7) are kept
        x[-1, :, 50:] = float("-inf")  # masked to a few ids
        drafts = torch.randint(-1, v, (m, qn - 1), generator=gen)
        drafts[0, :] = 7
        u = torch.rand((m, qn), generator=gen)
        stop = torch.zeros(v, dtype=torch.bool)
        stop[[3, 11]] = True
        rows = torch.randperm(n_rows, generator=gen)[:m]
        state = [torch.rand(n_rows, dtype=torch.float64), torch.rand(n_rows, dtype=torch.float64),  # lp, slp
                 torch.full((n_rows, max_new), -1), torch.randint(0, 4, (n_rows,)),  # tokens, ntok
                 torch.zeros(n_rows, dtype=torch.long), torch.randint(40, 50, (n_rows,)),  # pending, pos
                 torch.randint(0, 4, (n_rows,)), torch.zeros(n_rows, dtype=torch.bool),  # glen, fin
                 torch.zeros(n_rows, dtype=torch.bool)]  # closing
        # the logits as a step leaves them: one row per computed place, read through ``place``; bans by decoder row
        order = torch.randperm(m * qn, generator=gen)
        logits = torch.empty((m * qn, v))
        logits[order] = x.reshape(m * qn, v)
        place = order.view(m, qn)
        ban = torch.zeros((n_rows, v))
        ban[:, 200:] = float("-inf")
        for temperature, stop_mask, advance, banned in ((0.9, None, True, None), (0.9, stop, False, ban),
                                                        (1.3, stop, True, None), (0.0, None, True, ban)):
            mine, ref_state = [t.clone() for t in state], [t.clone() for t in state]
            got = cpu_emit.emit_into_rows(rows, logits, place, banned, drafts, u, temperature, top_k, top_p, 5,
                                          stop_mask, advance, max_new, *mine)
            xb = x if banned is None else x + banned[rows][:, None]
            ref = emit_into_rows(rows, xb, drafts, u, temperature, top_k, top_p, 5, stop_mask, advance, max_new,
                                 *ref_state)
            for a, b in zip([*got, *mine], [*ref, *ref_state], strict=True):
                assert torch.allclose(a.double(), b.double(), atol=1e-5), (m, qn, temperature)
            if temperature > 0 and qn > 1:  # the peaked row keeps every guess, the random ones are mostly refused
                assert int(got[0][0]) == qn - 1 and int(got[0][1:].sum()) < (m - 1) * (qn - 1)


def test_the_compiled_loop_needs_no_writable_cache_directory() -> None:
    """Where numba finds no directory to cache machine code in (a read-only install without a
    home; here: a function whose source file is not on disk, which numba refuses the same way, with
    RuntimeError when the function is decorated, i.e. at import), the loop is compiled in the
    process and runs."""
    from models import cpu_emit

    scope: dict[str, object] = {}
    exec("def twice(x):\n    return 2.0 * x\n", scope)  # a function without a file
    with pytest.raises(RuntimeError, match="no locator"):
        numba.njit(cache=True)(scope["twice"])
    twice = cpu_emit.compiled(fastmath=True)(scope["twice"])
    assert twice(1.5) == 3.0


@pytest.mark.parametrize("bad", ["place", "row", "guess", "stop", "ban"])
def test_the_compiled_loop_refuses_indices_out_of_range(bad: str) -> None:
    """The compiled loop reads and writes without bounds checks: a place, row, guess, stop mask or
    ban table that does not fit is refused before it runs (ValueError), the state left as it was."""
    from models import cpu_emit

    v, n_rows, max_new = 20, 4, 6
    logits = torch.randn((6, v))
    place = torch.arange(6).view(2, 3)
    rows = torch.tensor([0, 3])
    drafts = torch.tensor([[1, 2], [3, -1]])
    stop: torch.Tensor | None = None
    ban: torch.Tensor | None = torch.zeros((n_rows, v))
    if bad == "place":
        place = place + 1  # reads past the logits
    elif bad == "row":
        rows = torch.tensor([0, n_rows])
    elif bad == "guess":
        drafts = torch.tensor([[1, v], [3, -1]])
    elif bad == "stop":
        stop = torch.zeros(v - 1, dtype=torch.bool)
    else:
        ban = torch.zeros((n_rows, v + 1))
    state = [torch.zeros(n_rows, dtype=torch.float64), torch.zeros(n_rows, dtype=torch.float64),
             torch.full((n_rows, max_new), -1), torch.zeros(n_rows, dtype=torch.long),
             torch.zeros(n_rows, dtype=torch.long), torch.zeros(n_rows, dtype=torch.long),
             torch.zeros(n_rows, dtype=torch.long), torch.zeros(n_rows, dtype=torch.bool),
             torch.zeros(n_rows, dtype=torch.bool)]
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match="out of range"):
        cpu_emit.emit_into_rows(rows, logits, place, ban, drafts, torch.rand((2, 3)), 0.9, 5, 0.95, 2, stop, True,
                                max_new, *state)
    assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_a_rows_first_step_gets_at_most_first_guesses() -> None:
    """A row that has emitted one token (the one sampled from its prompt) is guessed for at most
    ``first`` tokens; a row further on gets the step's depth."""
    d = NGramDrafts(n=2)
    d.learn([1, 2, 3, 4, 5, 6])
    alive, closing = np.array([True, True]), np.array([False, False])
    ntok, tail_len, z = np.array([1, 2]), np.array([2, 1]), np.zeros(2, np.int64)
    tokens, tail = np.array([[3, 0, 0], [2, 3, 0]]), np.array([[1, 2], [1, 0]])  # both rows' context ends (2, 3)
    plan = d.plan_step(2, alive, closing, ntok, z, z, z + 2, tokens, tail, tail_len, 3, 0, 8, 10, 50, 60, 9, 10,
                       first=1)
    assert plan.lens.tolist() == [1, 3] and plan.guesses.tolist() == [[4, -1, -1], [4, 5, 6]]
    uncapped = d.plan_step(2, alive, closing, ntok, z, z, z + 2, tokens, tail, tail_len, 3, 0, 8, 10, 50, 60, 9, 10)
    assert uncapped.lens.tolist() == [3, 3]
    none = d.plan_step(2, alive, closing, ntok, z, z, z + 2, tokens, tail, tail_len, 3, 0, 8, 10, 50, 60, 9, 10,
                       first=0)
    assert none.lens.tolist() == [0, 3]
