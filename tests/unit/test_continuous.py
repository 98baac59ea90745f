"""Continuous batching (issue 18): the decoder (models/continuous.py) and the engine loop
(engine/continuous.py) on a real tiny student (CPU), plus the loop's isolation on a scripted executor.

Behaviour only, no timing: a fake clock advanced at every step drives the deadlines. The device is the
CPU; ``LIVECOPY_TEST_DEVICE=cuda`` runs the model tests on a GPU (benchmarks/gpu_check.sh)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from core.catalog import Catalog
from engine.batching import BatchConfig, DeadlineExceeded
from engine.continuous import ContinuousEngine, StepCost
from engine.executor import CopyRequest, CopyResult, load_executor
from models.continuous import MAX_DRAFTS, ContinuousDecoder, FinishedGroup
from models.drafts import NGramDrafts
from models.generate import decode, request_biases
from models.paths import shipped_student_dir
from models.prefix_cache import PrefixCache, stack_kv
from models.sequences import encode_text, special_ids
from models.student import load_student
from models.text.context import build_prompt, product_context
from tests.copygen import copy_settings, save_tiny_student

CAT = Catalog.generate(60, seed=21)
DEVICE = os.environ.get("LIVECOPY_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cont")
    return {"v1": save_tiny_student(root / "v1", "v1", seed=1), "v2": save_tiny_student(root / "v2", "v2", seed=2)}


def requests(n: int, start: int = 0) -> list[CopyRequest]:
    return [CopyRequest(f"u{i}", product_context(CAT.products[i % len(CAT)], "pdp"), profile_version=i)
            for i in range(start, start + n)]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        with self.lock:
            return self.now

    def advance(self, s: float) -> None:
        with self.lock:
            self.now += s


# ------------------------------------------------------------------------------ the decoder

def run_plan(dec: ContinuousDecoder, rows: list[list[int]], first: torch.Tensor, ban: torch.Tensor,
             plan: dict[int, list[int]]) -> dict[int, FinishedGroup]:
    """Admit prompts ``plan[step]`` before that step; step until every prompt finished."""
    got: dict[int, FinishedGroup] = {}
    for step in range(200):
        if step in plan:
            ids = plan[step]
            dec.admit(ids, [rows[i] for i in ids], first[ids], ban[ids])
        for g in dec.step():
            got[g.gid] = g
        if len(got) == len(rows):
            break
    assert sorted(got) == list(range(len(rows)))
    return got


@pytest.mark.parametrize("shapes", ["exact", "static", "buckets"])
def test_prompts_joining_mid_decode_get_what_the_static_decode_gives(dirs: dict[str, Path], shapes: str) -> None:
    """Greedy rows are deterministic: prompts admitted at steps 0, 3 and 7 of a running decode (into
    freed slots too) come out with the tokens, log-likelihoods, EOS flags and CTR hidden states of one
    static decode of all of them."""
    st = load_student(dirs["v1"], device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:7]])
    first, ban = request_biases(m, tok, len(rows))
    allowed = sid.style_id_list
    banned = ban[0].nonzero().squeeze(1).tolist()
    ref = decode(m, rows, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0,
                 first_allowed=allowed, banned=banned, want_hidden=True)
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0,
                            want_hidden=True, max_prompts=2, static_shapes=shapes == "static",
                            shape_buckets=shapes == "buckets")  # grows past 2 slots
    got = run_plan(dec, rows, first, ban, {0: [0, 1], 3: [2, 3, 4], 7: [5], 15: [6]})
    same = 0
    for i, g in got.items():
        for j in range(2):
            r = i * 2 + j
            if DEVICE != "cpu":  # bf16 on a GPU: a near-tie may flip a greedy token; most rows agree
                same += g.tokens[j] == ref.tokens[r]
                continue
            assert g.tokens[j] == ref.tokens[r]
            assert g.finished[j] == ref.finished[r]
            assert g.logprob[j] == pytest.approx(ref.logprob[r], abs=1e-3)
            assert ref.eos_hidden is not None and g.eos_hidden is not None
            assert torch.allclose(g.eos_hidden[j].cpu(), ref.eos_hidden[r].cpu(), atol=1e-4)
    if DEVICE != "cpu":
        assert same >= 0.8 * 2 * len(rows)
    assert dec.gids() == [] and dec.live_rows == 0


def test_prompts_prefilled_on_another_thread_while_the_batch_steps_get_what_the_static_decode_gives(
        dirs: dict[str, Path]) -> None:
    """The engine prefills arrivals on a second thread while the running batch steps: prompts
    prefilled there, concurrently with steps, and admitted afterwards come out with the greedy
    tokens of one static decode of all of them; a prefill is only admitted for its own prompts."""
    from concurrent.futures import ThreadPoolExecutor

    st = load_student(dirs["v1"], device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:5]])
    first, ban = request_biases(m, tok, len(rows))
    ref = decode(m, rows, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0,
                 first_allowed=sid.style_id_list, banned=ban[0].nonzero().squeeze(1).tolist())
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0, max_prompts=2)
    dec.admit([0, 1], rows[:2], first[:2], ban[:2])
    got: dict[int, FinishedGroup] = {}
    with ThreadPoolExecutor(1) as pool:
        later = pool.submit(dec.prefill, rows[2:])
        while not later.done():  # the batch keeps stepping meanwhile
            for g in dec.step():
                got[g.gid] = g
        with pytest.raises(ValueError, match="other prompts"):
            dec.admit([2, 3, 4], rows[1:4], first[2:], ban[2:], prefilled=later.result())
        dec.admit([2, 3, 4], rows[2:], first[2:], ban[2:], prefilled=later.result())
    for _ in range(100):
        for g in dec.step():
            got[g.gid] = g
        if len(got) == len(rows):
            break
    assert sorted(got) == list(range(len(rows)))
    if DEVICE == "cpu":
        assert [t for i in range(len(rows)) for t in got[i].tokens] == ref.tokens


def test_a_step_reads_the_prompt_columns_of_the_longest_prompt_decoding(dirs: dict[str, Path]) -> None:
    """The prompt window follows the running batch: a short prompt decodes alone over its own
    columns; a long one joins (the cache widens under the short one's rows) and a step reads the
    long one's columns; once the long one left, a short one that joined meanwhile decodes over its
    own columns again. Every prompt's greedy rows are what its own static decode gives."""
    st = load_student(dirs["v1"], device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    short, other, late = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:3]])
    rows = [short, other + short, late]  # admitted at steps 0, 3 (the long one) and 8
    first, ban = request_biases(m, tok, 3)
    refs = [decode(m, [r], eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0,
                   first_allowed=sid.style_id_list, banned=ban[0].nonzero().squeeze(1).tolist()) for r in rows]
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0, max_prompts=2)
    got: dict[int, FinishedGroup] = {}
    widths = []
    for step in range(40):
        if step in (0, 3, 8):
            i = (0, 3, 8).index(step)
            dec.admit([i], [rows[i]], first[i:i + 1], ban[i:i + 1])
        for g in dec.step():
            got[g.gid] = g
        widths.append((sorted(dec.gids()), dec.lc))
        if len(got) == 3:
            break
    assert widths[0] == ([0], len(short)) and ([0, 1], len(rows[1])) in widths and ([2], len(late)) in widths
    assert dec.lcap >= len(rows[1]) > max(len(short), len(late))
    assert [got[i].tokens for i in range(3)] == [r.tokens for r in refs]


def _stopping(path: Path, every: int) -> tuple[Any, Any, list[list[int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The student at ``path``, six prompts, their first-token biases and bans, and a stop mask on
    every ``every``-th token id (the style tokens excluded): rows end at random steps."""
    st = load_student(path, device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:6]])
    first, ban = request_biases(m, tok, len(rows))
    stop = torch.zeros(int(m.config.vocab_size), dtype=torch.bool)
    stop[::every] = True
    stop[sid.style_id_list] = False
    return m, sid, rows, first, ban, stop


def test_a_step_over_the_rows_still_decoding_gives_their_full_step_outputs(dirs: dict[str, Path]) -> None:
    """Rows that left are skipped: the forward over a subset of rows gives those rows' hidden states
    and logits of the forward over all rows; sampled decodes that skip finish every prompt."""
    m, sid, rows, first, ban, stop = _stopping(dirs["v1"], every=5)  # a prompt's rows leave one by one
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=3, max_new_tokens=12, temperature=1.0, seed=4,
                            want_hidden=True, max_prompts=6, stop_mask=stop)
    dec.skip_rows = 1  # skip as soon as one row left
    dec.admit(list(range(6)), rows, first, ban)
    for _ in range(3):
        dec.step()
    n = 6 * 3
    feed, pos = dec.pending[:n].clone(), (dec.pos[:n] + 1).clamp(max=dec.n_positions - 1)
    col = dec.glen[:n].clamp(max=dec.cap - 1)
    t = int(col.max()) + 1
    sub = torch.tensor([0, 2, 3, 7, 8, 17], device=feed.device)
    with torch.inference_mode():  # the decoder's own mode
        h_all, lg_all = dec._forward(feed, pos, col, t)
        h_sub, lg_sub = dec._forward(feed, pos, col, t, sub)
    tol = (1e-4, 1e-3) if DEVICE == "cpu" else (5e-2, 2.5e-1)  # bf16 on a GPU: other shapes round otherwise
    assert torch.allclose(h_sub.float(), h_all[sub].float(), atol=tol[0])
    assert torch.allclose(lg_sub.float(), lg_all[sub].float(), atol=tol[1])
    got: dict[int, FinishedGroup] = {}
    calls: list[bool] = []
    forward = dec._forward

    def counting(*a: Any) -> Any:
        calls.append(len(a) > 4)
        return forward(*a)

    dec._forward = counting  # type: ignore[method-assign]
    for _ in range(40):
        for g in dec.step():
            got[g.gid] = g
    assert sorted(got) == list(range(6)) and any(calls)
    assert all(g.eos_hidden is not None and g.eos_hidden.shape[0] == 3 for g in got.values())


@pytest.mark.parametrize(("model", "views"), [("tiny", True), ("shipped", True), ("shipped", False)])
def test_speculative_steps_give_the_plain_decode(dirs: dict[str, Path], model: str, views: bool) -> None:
    """Greedy, with drafts that are mostly right (learned from the same prompts' decode, EOS
    included) and some wrong (noise learned too): the tokens, log-likelihoods, EOS flags and CTR
    hidden states of the static decode, in fewer steps; guesses were both kept and refused. The
    tiny random student never ends (rows truncated at max_new_tokens); the shipped one ends its
    rows with EOS, often a kept guess (its CTR read is then taken in the same step). ``views``
    False: the path a CUDA decoder takes (the rows' state copied to the host for each step's plan,
    the torch sampling)."""
    st = load_student(dirs["v1"] if model == "tiny" else shipped_student_dir(), device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:5]])
    first, ban = request_biases(m, tok, len(rows))
    banned = ban[0].nonzero().squeeze(1).tolist()
    max_new = 12 if model == "tiny" else 40
    ref = decode(m, rows, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=max_new, temperature=0.0,
                 first_allowed=sid.style_id_list, banned=banned, want_hidden=True)
    assert any(ref.finished) == (model == "shipped")
    drafts = NGramDrafts()
    gen = torch.Generator().manual_seed(0)
    for i, seq in enumerate(ref.tokens):
        ending = [sid.eos] if ref.finished[i] else []
        drafts.learn(list(rows[i // 2][-3:]) + seq + ending)
        noise = torch.randint(0, len(tok), (len(seq),), generator=gen).tolist()
        drafts.learn(list(rows[i // 2][-3:]) + seq[: len(seq) // 2] + noise)  # a wrong follower, half the time
    steps: dict[str, int] = {}
    got: dict[str, dict[int, FinishedGroup]] = {}
    computed: list[tuple[int, int, int]] = []  # per speculative step: positions computed, rows alive, positions fed
    depths: list[int] = []  # per speculative step: places fed per row (1 + drafts)

    class Counting(ContinuousDecoder):
        def _forward(self, feed: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, t: int,
                     rows: torch.Tensor | None = None, per_row: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
            if per_row > 1:
                n = feed.shape[0] // per_row
                computed.append((feed.shape[0] if rows is None else rows.numel(), int(self.alive[:n].sum()),
                                 feed.shape[0]))
                depths.append(per_row)
            return super()._forward(feed, pos, col, t, rows, per_row)

    class Copying(Counting):
        def _rows_alloc(self, n: int) -> None:
            super()._rows_alloc(n)
            self._views = {}

    for name, table in (("plain", None), ("spec", drafts)):
        dec = (Counting if views else Copying)(
            m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=max_new, temperature=0.0, want_hidden=True,
            max_prompts=2, drafts=table, draft_depth=3, spec_rows=64)
        got[name], steps[name] = {}, 0
        dec.admit([0, 1], rows[:2], first[:2], ban[:2])
        while len(got[name]) < len(rows):
            if steps[name] == 2:
                dec.admit([2, 3, 4], rows[2:], first[2:], ban[2:])
            for g in dec.step():
                got[name][g.gid] = g
            steps[name] += 1
        assert bool(dec._views) == (views and DEVICE == "cpu")  # (grown past its 2 prompt slots meanwhile)
    assert steps["spec"] < steps["plain"]
    assert drafts.accepted > 0 and drafts.accepted < drafts.proposed
    # a speculative step computes each live row's token and its own drafts only: rows that left (their
    # prompt's other rows still decoding) and the places of drafts a row has not got are skipped
    assert computed and all(c <= alive * (1 + MAX_DRAFTS) for c, alive, _ in computed)
    assert sum(c for c, _, _ in computed) < sum(fed for _, _, fed in computed)
    # with few rows left a row gets more than draft_depth (3) drafts (spec_places 28: 6 to 4 rows, 8 to 3)
    assert max(depths) > 1 + 3 and max(depths) <= 1 + MAX_DRAFTS
    for i, g in got["spec"].items():
        for j in range(2):
            r = i * 2 + j
            if DEVICE != "cpu":  # bf16 on a GPU rounds otherwise with more rows: a near-tie may flip
                continue
            assert g.tokens[j] == ref.tokens[r] and g.finished[j] == ref.finished[r]
            assert g.logprob[j] == pytest.approx(ref.logprob[r], abs=1e-3)
            assert ref.eos_hidden is not None and g.eos_hidden is not None
            assert torch.allclose(g.eos_hidden[j].cpu(), ref.eos_hidden[r].cpu(), atol=1e-4)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_prompts_reusing_cached_prefixes_get_what_the_static_decode_gives(dirs: dict[str, Path],
                                                                            weights: str) -> None:
    """Prompts admitted after others that share their first line (other slot), the whole prompt
    (the same request again) or nothing, mixed in one admission and in later ones: greedy rows come
    out as the static decode of all of them gives (fp32: same tokens, log-likelihoods, EOS flags, CTR
    hidden states; int8: the activation scale is per call, so a near-tie may flip a token: most rows
    agree). The reused tokens are counted, and so are the prefilled ones."""
    if DEVICE != "cpu" and weights == "int8":
        pytest.skip("int8 products are the CPU path")
    st = load_student(dirs["v1"], device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    a, b = CAT.products[0], CAT.products[1]
    prompts = [build_prompt(product_context(a, "pdp")), build_prompt(product_context(b, "pdp")),
               build_prompt(product_context(a, "feed")), build_prompt(product_context(a, "pdp")),
               build_prompt(product_context(CAT.products[2], "pdp")), build_prompt(product_context(b, None))]
    rows = encode_text(tok, prompts)
    assert rows[0] == rows[3] and rows[0][:8] == rows[2][:8] and rows[0] != rows[2]
    first, ban = request_biases(m, tok, len(rows))
    ref = decode(m, rows, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0,
                 first_allowed=sid.style_id_list, banned=ban[0].nonzero().squeeze(1).tolist(), want_hidden=True,
                 weights=weights)
    cache = PrefixCache(64 << 20)
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, temperature=0.0,
                            want_hidden=True, max_prompts=2, prefix=cache, weights=weights)
    got = run_plan(dec, rows, first, ban, {0: [0, 1], 2: [2, 3, 4], 5: [5]})
    def common(x: list[int], y: list[int]) -> int:
        return next((i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y)))

    # each prompt reuses the longest prefix it shares with one admitted before its own admission, but
    # never its last token: prompt 3 is prompt 0 again (all but one token reused), 2 shares 0's first line
    before = {0: [], 1: [], 2: [0, 1], 3: [0, 1], 4: [0, 1], 5: [0, 1, 2, 3, 4]}
    shared = [min(len(rows[i]) - 1, max((common(rows[i], rows[j]) for j in before[i]), default=0))
              for i in range(len(rows))]
    assert shared[3] == len(rows[3]) - 1 and shared[2] > 0
    assert cache.reused == sum(shared) and cache.computed == sum(map(len, rows)) - sum(shared)
    assert len(cache) == sum(c < len(r) - 1 for c, r in zip(shared, rows, strict=True))  # prompt 3 added nothing
    same = total = 0
    for i, g in got.items():
        for j in range(2):
            r = i * 2 + j
            total += 1
            same += g.tokens[j] == ref.tokens[r]
            if DEVICE != "cpu" or weights == "int8":
                continue
            assert g.tokens[j] == ref.tokens[r] and g.finished[j] == ref.finished[r]
            assert g.logprob[j] == pytest.approx(ref.logprob[r], abs=1e-3)
            assert ref.eos_hidden is not None and g.eos_hidden is not None
            assert torch.allclose(g.eos_hidden[j].cpu(), ref.eos_hidden[r].cpu(), atol=1e-4)
    assert same >= 0.75 * total


@pytest.mark.parametrize("young", [True, False])
@pytest.mark.parametrize("large", [False, True])
def test_the_draft_table_learns_every_candidate_while_young_then_one_per_prompt(dirs: dict[str, Path], large: bool,
                                                                               young: bool) -> None:
    """Rows learn their n-grams as they finish: every candidate of a prompt while the table is young
    (fewer rows learned than ``young_rows``), then one per prompt (the others are samples of the same
    distributions), whether steps speculate or not. Greedy candidates are the same tokens, so the
    table holds each prompt's n-grams K times, or once."""
    st = load_student(dirs["v1"], device=DEVICE)
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:3]])
    first, ban = request_biases(m, tok, len(rows))
    table = NGramDrafts(young_rows=1_000 if young else 0)
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=10, temperature=0.0,
                            want_hidden=True, max_prompts=3, drafts=table, draft_depth=1,
                            spec_rows=4 if large else 64)
    got = run_plan(dec, rows, first, ban, {0: [0, 1, 2]})
    want = NGramDrafts()
    for i, g in got.items():
        assert g.tokens[0] == g.tokens[1]
        for _ in range(2 if young else 1):
            want.learn(list(rows[i][-want.n:]) + g.tokens[0] + ([sid.eos] if g.finished[0] else []))
    assert table.state() == want.state() and table.rows == want.rows


@pytest.mark.parametrize("want_hidden", [True, False])
def test_sampled_speculative_steps_finish_every_prompt_within_bounds(dirs: dict[str, Path], want_hidden: bool) -> None:
    """Sampling with drafts, rows ending at random steps (stop tokens) or at max_new_tokens: every
    prompt comes back with k rows (a CTR hidden state each when asked), no banned token after the
    first, no row longer than max_new_tokens; the table learned from the rows that finished."""
    m, sid, rows, first, ban, stop = _stopping(dirs["v1"], every=9)
    drafts = NGramDrafts(n=1)  # unigram guesses: many refused
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=3, max_new_tokens=10, temperature=1.0, seed=7,
                            want_hidden=want_hidden, max_prompts=2, stop_mask=stop, drafts=drafts, draft_depth=4)
    got: dict[int, FinishedGroup] = {}
    for i in range(len(rows)):  # one prompt at a time: the table learns from the earlier ones
        dec.admit([i], [rows[i]], first[i:i + 1], ban[i:i + 1])
        for _ in range(40):
            for g in dec.step():
                got[g.gid] = g
            if i in got:
                break
    assert sorted(got) == list(range(len(rows))) and dec.live_rows == 0
    assert drafts.proposed > 0 and len(drafts) > 0
    for i, g in got.items():
        assert (g.eos_hidden is not None and g.eos_hidden.shape[0] == 3) == want_hidden
        for toks in g.tokens:
            assert 1 <= len(toks) <= 10
            assert not any(ban[i, t] for t in toks[1:]) and not any(stop[t] for t in toks)


@pytest.mark.parametrize(("weights", "fused"), [("fp32", True), ("fp32", False), ("int8", True), ("int8", False)])
def test_the_scripted_step_is_the_eager_step(weights: str, fused: bool) -> None:
    """models/scripted.py runs the step's forward as TorchScript on a CPU: the same hidden states,
    logits and KV-cache writes as the eager forward, over all rows, a subset, and speculative rows;
    ``fused`` with models/cpu_ops.py's attention and GELU (float rounding apart, the same function:
    with int8 products a rounding can move an activation across a quantization step, which the
    next layers carry, so there the same up to that)."""
    st = load_student(shipped_student_dir())
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, "pdp")) for p in CAT.products[:3]])
    first, ban = request_biases(m, tok, len(rows))
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, seed=3, max_prompts=3,
                            weights=weights)
    assert dec._script is not None and dec._fused
    dec._fused = fused
    tol_kv, tol = (0.5, 0.5) if fused and weights == "int8" else (1e-5, 1e-4)
    dec.admit([0, 1, 2], rows, first, ban)
    for _ in range(3):
        dec.step()
    n = 6
    feed, pos = dec.pending[:n].clone(), (dec.pos[:n] + 1).clamp(max=dec.n_positions - 1)
    col = dec.glen[:n].clamp(max=dec.cap - 1)
    t = int(col.max()) + 2
    spec = (feed.repeat_interleave(2), pos.repeat_interleave(2) + torch.tensor([0, 1] * n),
            col.repeat_interleave(2) + torch.tensor([0, 1] * n), t, None, 2)
    for args in ((feed, pos, col, t - 1), (feed, pos, col, t - 1, torch.tensor([0, 3, 5])), spec):
        kv = [c.clone() for c in dec.kv]
        with torch.inference_mode():  # the decoder's own mode
            h_s, lg_s = dec._forward(*args)
            kv_s, dec.kv = dec.kv, [c.clone() for c in kv]
            script, dec._script, dec._fused = dec._script, None, False
            h_e, lg_e = dec._forward(*args)
            dec._script, dec._fused = script, fused
        assert torch.allclose(h_s, h_e, atol=tol_kv) and torch.allclose(lg_s, lg_e, atol=tol)
        assert (lg_s.argmax(-1) == lg_e.argmax(-1)).float().mean() >= 0.9
        assert all(torch.allclose(a, b, atol=tol_kv) for a, b in zip(kv_s, dec.kv, strict=True))


@pytest.mark.parametrize(("weights", "fused"), [("fp32", True), ("fp32", False), ("int8", True), ("int8", False)])
def test_the_scripted_prefill_is_the_eager_prefill(weights: str, fused: bool) -> None:
    """The prefill's forward as TorchScript: the keys/values, valid columns, positions and logits of
    the eager one, with no prefix reused and with cached prefixes of several lengths in one batch
    (``fused``: its GELU by models/cpu_ops.py; with int8, the same up to quantization steps)."""
    st = load_student(shipped_student_dir())
    m, tok = st.model, st.tokenizer
    sid = special_ids(tok)
    rows = encode_text(tok, [build_prompt(product_context(p, s)) for p in CAT.products[:2] for s in ("pdp", "feed")])
    dec = ContinuousDecoder(m, eos_id=sid.eos, pad_id=sid.pad, k=2, max_new_tokens=12, max_prompts=4,
                            weights=weights)
    assert dec._script is not None and dec._fused
    dec._fused = fused
    tol_kv, tol = (0.5, 0.5) if fused and weights == "int8" else (1e-5, 1e-4)
    with torch.inference_mode():  # the decoder's own mode
        full = dec._prefill(rows)
        kv = [stack_kv([t[i][:, full[2][i]] for t in full[0]], [t[i][:, full[2][i]] for t in full[1]])
              for i in range(len(rows))]
    reuse = [(0, None), (len(rows[1]) - 1, kv[1]), (5, kv[0]), (12, kv[2])]
    for args in ((rows,), (rows, reuse)):
        with torch.inference_mode():  # the decoder's own mode
            got = dec._prefill(*args)
            script, dec._script = dec._script, None
            ref = dec._prefill(*args)
            dec._script = script
        for a, b in zip(got[0] + got[1], ref[0] + ref[1], strict=True):
            assert torch.allclose(a, b, atol=tol_kv)
        assert torch.equal(got[2], ref[2]) and torch.equal(got[3], ref[3])
        assert torch.allclose(got[4], ref[4], atol=tol)


def test_a_dropped_prompt_leaves_at_once_and_the_others_finish(dirs: dict[str, Path]) -> None:
    st = load_student(dirs["v1"], device=DEVICE)
    sid = special_ids(st.tokenizer)
    rows = encode_text(st.tokenizer, [build_prompt(product_context(p)) for p in CAT.products[:3]])
    first, ban = request_biases(st.model, st.tokenizer, 3)
    dec = ContinuousDecoder(st.model, eos_id=sid.eos, pad_id=sid.pad, k=3, max_new_tokens=10, want_hidden=True)
    dec.admit([10, 11, 12], rows, first, ban)
    dec.step()
    dec.drop([11])
    assert sorted(dec.gids()) == [10, 12] and dec.live_rows <= 6
    done: list[int] = []
    for _ in range(50):
        done += [g.gid for g in dec.step()]
    assert sorted(done) == [10, 12]


# ------------------------------------------------------------------------------ the engine

def _engine(path: Path, clock: FakeClock | None = None, **over: Any) -> ContinuousEngine[CopyRequest, CopyResult]:
    cfg = copy_settings(**{"device": DEVICE, "candidates": 2, "max_new_tokens": 40, "temperature": 0.0, "mc_draws": 20,
                           **over})
    ex = load_executor(path, cfg)
    kw: dict[str, Any] = {}
    if clock is not None:
        kw = {"clock": clock, "on_step": lambda: clock.advance(0.01)}  # 10 ms of fake time per step
    return ContinuousEngine(ex, BatchConfig(max_batch_size=cfg.max_batch_size, max_queue=cfg.max_queue,
                                            default_timeout_ms=cfg.timeout_ms), **kw)


def test_a_deadline_is_answered_mid_decode_before_the_long_decode_finishes(dirs: dict[str, Path]) -> None:
    """Two requests decode together; the one with a 50 ms deadline is answered DeadlineExceeded (503) after
    five steps, while the other (greedy, 40 tokens) is still decoding; that one then gets its copy."""
    clock = FakeClock()
    engine = _engine(dirs["v1"], clock)
    long_req, short_req = requests(2)
    seen: dict[str, Any] = {}
    slow: Future[CopyResult] = engine.submit(long_req, timeout_ms=1e9)
    fast: Future[CopyResult] = engine.submit(short_req, timeout_ms=50)
    fast.add_done_callback(lambda f: seen.update(long_done=slow.done(), at=clock()))
    engine.start()
    try:
        with pytest.raises(DeadlineExceeded, match="during generation"):
            fast.result(60)
        result = slow.result(60)
    finally:
        engine.stop()
    assert seen["long_done"] is False  # answered while the long decode was still running
    assert 0.05 <= seen["at"] <= 0.07  # at the first step past its deadline (fake clock: 10 ms a step)
    assert result.user_id == long_req.user_id and result.text
    assert engine.stats.expired == 1 and engine.stats.requests == 1


def test_a_request_joining_mid_decode_is_answered_correctly(dirs: dict[str, Path]) -> None:
    """A request submitted at the third step of a running decode joins it (both decode together) and gets
    its own copy: the same one it gets alone (greedy decoding, greedy policy)."""
    first, joiner = requests(2, start=3)
    alone = _engine(dirs["v1"], policy="greedy").start()
    try:
        expected = alone.submit(joiner).result(60)
    finally:
        alone.stop()
    engine = _engine(dirs["v1"], policy="greedy")
    futs: dict[str, Future[CopyResult]] = {}
    running: list[int] = []

    def on_step() -> None:
        running.append(engine.running())
        if len(running) == 3:
            futs["joiner"] = engine.submit(joiner)

    engine.on_step = on_step
    futs["first"] = engine.submit(first)
    engine.start()
    try:
        a = futs["first"].result(60)
        while "joiner" not in futs:
            threading.Event().wait(0.01)
        b = futs["joiner"].result(60)
    finally:
        engine.stop()
    assert running[:3] == [1, 1, 1] and 2 in running  # the joiner decoded beside the first
    assert a.user_id == first.user_id and b.user_id == joiner.user_id
    assert b.text and b.product_id == joiner.product_id
    if DEVICE == "cpu":  # (bf16 GEMMs of other shapes may round a near-tie the other way on a GPU)
        assert (b.text, b.style, b.template) == (expected.text, expected.style, expected.template)


def test_hot_swap_under_continuous_batching_drops_nothing(dirs: dict[str, Path]) -> None:
    """A swap at the second step: the 6 requests decoding finish on v1 (stepped beside the new batch),
    the 6 submitted after the swap run on v2; all 12 are answered."""
    engine = _engine(dirs["v1"], max_batch_size=16)
    v2 = load_executor(dirs["v2"], engine.executor.cfg)  # type: ignore[attr-defined]
    before = [engine.submit(r) for r in requests(6)]
    after: list[Future[CopyResult]] = []
    versions: list[str] = []
    steps = [0]

    def on_step() -> None:
        steps[0] += 1
        if steps[0] == 2:
            engine.swap_executor(v2)
            after.extend(engine.submit(r) for r in requests(6, start=6))

    engine.on_step = on_step
    engine.on_batch = lambda n, s, v: versions.append(v)
    engine.start()
    try:
        old = [f.result(60) for f in before]
        while len(after) < 6:
            threading.Event().wait(0.01)
        new = [f.result(60) for f in after]
    finally:
        engine.stop()
    assert [r.model_version for r in old] == ["v1"] * 6
    assert [r.model_version for r in new] == ["v2"] * 6
    assert all(r.text for r in old + new)
    assert "v1" in versions[versions.index("v2"):]  # v1's rows kept stepping beside v2's: no pause, no drop


# ------------------------------------------------------------------------------ isolation (scripted executor)

class ScriptedDecoder:
    """Each admitted prompt finishes after `length` steps; a prompt id listed in `explode` fails the step."""

    def __init__(self, length: int = 3, explode: int | None = None) -> None:
        self.left: dict[int, int] = {}
        self.ids: dict[int, list[int]] = {}
        self.length = length
        self.explode = explode

    def admit(self, gids: Sequence[int], prompt_rows: Sequence[Sequence[int]], first_bias: torch.Tensor,
              ban: torch.Tensor) -> None:
        for g, r in zip(gids, prompt_rows, strict=True):
            self.left[g], self.ids[g] = self.length, list(r)

    def step(self) -> list[FinishedGroup]:
        if self.explode is not None and any(self.ids[g] == [self.explode] for g in self.left):
            raise RuntimeError("step failed")
        out = []
        for g in list(self.left):
            self.left[g] -= 1
            if self.left[g] == 0:
                del self.left[g]
                out.append(FinishedGroup(g, [self.ids[g]], [0.0], [0.0], [True], None))
        return out

    def drop(self, gids: Sequence[int]) -> None:
        for g in gids:
            self.left.pop(g, None)


class ScriptedExecutor:
    version = "s1"

    def __init__(self, bad_prepare: str = "", bad_finish: str = "", explode: str = "") -> None:
        self.bad_prepare, self.bad_finish, self.explode = bad_prepare, bad_finish, explode
        self.alone: list[str] = []

    def decoder(self, max_prompts: int) -> ScriptedDecoder:
        return ScriptedDecoder(explode=1 if self.explode else None)

    def prepare(self, reqs: Sequence[str]) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        if self.bad_prepare in reqs:
            raise ValueError("cannot prepare")

        prepared = [SimpleNamespace(ids=[1] if r == self.explode else [0]) for r in reqs]
        return prepared, torch.zeros(len(reqs), 1), torch.zeros(len(reqs), 1, dtype=torch.bool)

    def finish(self, items: Sequence[tuple[str, Any, FinishedGroup]]) -> list[str]:
        if any(r == self.bad_finish for r, _, _ in items):
            raise KeyError("cannot finish")
        return [r.upper() for r, _, _ in items]

    def run(self, reqs: Sequence[str]) -> list[str]:
        self.alone.extend(reqs)
        if self.explode in reqs:
            raise RuntimeError("fails alone too")
        return [r.upper() + "!" for r in reqs]


def _answers(futs: list[Future[str]]) -> list[str]:
    out = []
    for f in futs:
        try:
            out.append(f.result(30))
        except Exception as exc:
            out.append(type(exc).__name__)
    return out


@pytest.mark.parametrize(("kw", "expected"), [
    ({"bad_prepare": "c"}, ["A", "B", "ValueError", "D"]),
    ({"bad_finish": "b"}, ["A", "KeyError", "C", "D"]),
    ({"explode": "d"}, ["A!", "B!", "C!", "RuntimeError"]),  # a failed step reruns its requests one by one
])
def test_one_bad_request_fails_alone_in_the_running_batch(kw: dict[str, str], expected: list[str]) -> None:
    ex = ScriptedExecutor(**kw)
    eng: ContinuousEngine[str, str] = ContinuousEngine(ex, BatchConfig(max_batch_size=32))
    futs = [eng.submit(r) for r in "abcd"]
    eng.start()
    try:
        assert _answers(futs) == expected
    finally:
        eng.stop()


class PrefillingDecoder(ScriptedDecoder):
    """Prefills on the caller's thread (recorded), waiting for ``gate``; a prompt ``[1]`` fails to prefill
    and to be admitted. Each step takes 2 ms."""

    def __init__(self, gate: threading.Event, length: int) -> None:
        super().__init__(length=length)
        self.gate = gate
        self.threads: list[str] = []
        self.prefill_concurrent = True

    def prefill(self, rows: Sequence[Sequence[int]]) -> Any:
        self.threads.append(threading.current_thread().name)
        self.gate.wait(30)
        if [1] in [list(r) for r in rows]:
            raise RuntimeError("cannot prefill")
        return SimpleNamespace(rows=[list(r) for r in rows])

    def admit(self, gids: Sequence[int], prompt_rows: Sequence[Sequence[int]], first_bias: torch.Tensor,
              ban: torch.Tensor, prefilled: Any = None) -> None:
        if [1] in [list(r) for r in prompt_rows]:
            raise ValueError("bad prompt")
        assert prefilled is None or prefilled.rows == [list(r) for r in prompt_rows]
        super().admit(gids, prompt_rows, first_bias, ban)

    def step(self) -> list[FinishedGroup]:
        time.sleep(0.002)
        return super().step()


class PrefillingExecutor(ScriptedExecutor):
    def __init__(self, length: int, bad_prepare: str = "") -> None:
        super().__init__(bad_prepare=bad_prepare, explode="x")  # "x" gets the prompt [1]
        self.gate = threading.Event()
        self.dec = PrefillingDecoder(self.gate, length)
        self.prepared_on: list[str] = []

    def prepare(self, reqs: Sequence[str]) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        self.prepared_on.append(threading.current_thread().name)
        return super().prepare(reqs)

    def decoder(self, max_prompts: int) -> ScriptedDecoder:
        return self.dec


def _prefilling_engine(bad_prepare: str = "") -> tuple[PrefillingExecutor, ContinuousEngine[str, str], Future[str]]:
    """An engine whose first request "a" decodes for ~0.4 s (200 steps of 2 ms), running when this returns."""
    ex = PrefillingExecutor(length=200, bad_prepare=bad_prepare)
    ex.gate.set()
    eng: ContinuousEngine[str, str] = ContinuousEngine(ex, BatchConfig(max_batch_size=32))
    eng.start()
    first = eng.submit("a")
    deadline = time.monotonic() + 10
    while eng.running() < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert eng.running() == 1
    return ex, eng, first


def test_a_slow_prefill_does_not_stall_the_running_decode() -> None:
    """A request that arrives while another decodes is prefilled on the prefill thread: the running
    one keeps stepping and is answered while that prefill is still blocked; the new one joins once
    its prefill is done."""
    ex, eng, first = _prefilling_engine()
    try:
        ex.gate.clear()
        b = eng.submit("b")
        assert first.result(30) == "A"  # its 200 steps, while b's prefill waits
        assert not b.done() and ex.dec.threads == ["continuous-prefill_0"]
        ex.gate.set()
        assert b.result(30) == "B"
    finally:
        ex.gate.set()
        eng.stop()


@pytest.mark.parametrize("bad", ["x", "y"])
def test_a_batch_that_fails_to_prefill_is_admitted_one_by_one(bad: str) -> None:
    """Three requests prepared and prefilled together on the prefill thread, one of them with a
    prompt that cannot be prefilled ("x") or a request that cannot be prepared ("y"): the batch is
    admitted again request by request, and only that one fails."""
    ex, eng, first = _prefilling_engine(bad_prepare="y")
    try:
        with eng._cond:  # the three arrive together: one batch
            futs = [eng.submit(r) for r in ("b", bad, "c")]
        assert _answers([first, *futs]) == ["A", "B", "ValueError", "C"]
        assert ex.prepared_on.count("continuous-prefill_0") == 1  # the batch; then one by one on the loop
    finally:
        eng.stop()
    assert eng.stats.failed_batches == 1


def test_queue_is_bounded_and_a_queued_request_past_its_deadline_is_refused() -> None:
    from engine.batching import Overloaded

    clock = FakeClock()
    eng: ContinuousEngine[str, str] = ContinuousEngine(ScriptedExecutor(), BatchConfig(max_batch_size=1, max_queue=2),
                                                       clock=clock, on_step=lambda: clock.advance(0.01))
    a = eng.submit("a", timeout_ms=1e6)
    b = eng.submit("b", timeout_ms=5)  # will wait behind a (one at a time): 30 ms of steps > 5 ms
    with pytest.raises(Overloaded):
        eng.submit("c")
    eng.start()
    try:
        assert a.result(30) == "A"
        with pytest.raises(DeadlineExceeded):
            b.result(30)
    finally:
        eng.stop()
    assert eng.stats.rejected == 1 and eng.stats.expired == 1


# ------------------------------------------------------------------------------ admission control

def test_step_cost_learns_a_line_and_falls_back_to_proportional() -> None:
    cost = StepCost(min_steps=4)
    assert cost.step_s(4) is None and cost.decode_s(4) is None  # nothing seen yet
    for n in (1, 4, 8, 16, 2, 32, 8, 1):
        cost.observe_step(n, 0.003 + 0.002 * n)
    assert cost.step_s(10) == pytest.approx(0.023, rel=1e-6)
    assert cost.decode_s(10) is None  # no request finished yet
    cost.observe_request(30)
    assert cost.decode_s(10, done_steps=10) == pytest.approx(20 * 0.023, rel=1e-6)
    assert cost.decode_s(10, done_steps=40) == pytest.approx(0.023, rel=1e-6)  # at least one step left
    flat = StepCost(min_steps=2)
    for _ in range(5):
        flat.observe_step(4, 0.02)  # one batch size only: a line cannot be fitted
    assert flat.step_s(8) == pytest.approx(0.04)


def test_step_cost_counts_a_requests_steps_by_the_batch_it_decoded_in() -> None:
    """Speculative steps at small batches take a request through in fewer steps than at large ones:
    the steps a request takes are learned per batch bucket, and a batch not seen yet takes the
    nearest one seen."""
    cost = StepCost(min_steps=1)
    cost.observe_step(1, 0.01)
    for _ in range(20):
        cost.observe_request(10, batch=1.3)  # calm: speculative
    assert cost.steps(1) == cost.steps(30) == pytest.approx(10)  # only small batches seen so far
    for _ in range(20):
        cost.observe_request(28, batch=27.5)  # overload: plain steps
    assert cost.steps(1) == pytest.approx(10, rel=1e-3) and cost.steps(2) == pytest.approx(10, rel=1e-3)
    assert cost.steps(30) == pytest.approx(28, rel=1e-3) and cost.steps(12) == pytest.approx(28, rel=1e-3)
    assert cost.decode_s(30) == pytest.approx(28 * cost.step_s(30), rel=1e-3)  # type: ignore[operator]


class CostlyDecoder(ScriptedDecoder):
    """Each step advances the fake clock by 1 ms + 2 ms per request decoding (a CPU's cost)."""

    def __init__(self, clock: FakeClock, length: int, gate: threading.Event) -> None:
        super().__init__(length=length)
        self.clock, self.gate = clock, gate

    def step(self) -> list[FinishedGroup]:
        self.gate.wait(30)  # closed while the test submits a burst: no fake time passes in between
        self.clock.advance(0.001 + 0.002 * len(self.left))
        return super().step()


class CostlyExecutor(ScriptedExecutor):
    def __init__(self, clock: FakeClock) -> None:
        super().__init__()
        self.clock = clock
        self.gate = threading.Event()
        self.gate.set()

    def decoder(self, max_prompts: int) -> ScriptedDecoder:
        return CostlyDecoder(self.clock, length=10, gate=self.gate)


def _overload(cost: StepCost) -> tuple[ContinuousEngine[str, str], list[Any], list[float]]:
    """Two requests alone (the engine learns), then 40 at once with 200 ms deadlines."""
    clock = FakeClock()
    ex = CostlyExecutor(clock)
    eng: ContinuousEngine[str, str] = ContinuousEngine(ex, BatchConfig(max_batch_size=32), clock=clock,
                                                       finish_in_thread=False)
    eng.cost = cost
    eng.start()
    try:
        assert _answers([eng.submit(r, timeout_ms=1e6) for r in "ab"]) == ["A", "B"]
        start = clock()
        when: list[float] = []
        ex.gate.clear()  # all 40 arrive at the same fake time (a step started meanwhile waits)
        try:
            futs = [eng.submit(f"r{i}", timeout_ms=200) for i in range(40)]
        finally:
            ex.gate.set()
        for f in futs:
            f.add_done_callback(lambda _f: when.append(clock() - start))
        out = _answers(futs)
    finally:
        eng.stop()
    return eng, out, when


class RecordingExecutor(CostlyExecutor):
    """Records the fake time at which each request was admitted (prepared)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.admitted: dict[str, float] = {}

    def prepare(self, reqs: Sequence[str]) -> tuple[list[Any], torch.Tensor, torch.Tensor]:
        self.admitted.update((r, self.clock()) for r in reqs)
        return super().prepare(reqs)


def test_under_overload_a_younger_request_that_fits_is_admitted_before_older_ones_that_wait() -> None:
    """Four requests decoding; then ten with 60 ms left (each would finish alone, none in this batch)
    and four with a second left. The four that fit join at once, ahead of the ten that wait (more
    than one admission's worth of them: only looking at the oldest left the batch half empty)."""
    clock = FakeClock()
    ex = RecordingExecutor(clock)
    eng: ContinuousEngine[str, str] = ContinuousEngine(ex, BatchConfig(max_batch_size=32), clock=clock,
                                                       finish_in_thread=False)
    eng.start()
    try:
        assert _answers([eng.submit(r, timeout_ms=1e6) for r in "ab"]) == ["A", "B"]  # the engine learns
        ex.gate.clear()
        fill = [eng.submit(f"f{i}", timeout_ms=1e6) for i in range(4)]
        deadline = time.monotonic() + 10
        while eng.running() < 4 and time.monotonic() < deadline:  # admitted; the next step waits for the gate
            time.sleep(0.001)
        assert eng.running() == 4
        start = clock()
        old = [eng.submit(f"o{i}", timeout_ms=60) for i in range(10)]
        young = [eng.submit(f"y{i}", timeout_ms=1000) for i in range(4)]
        ex.gate.set()
        assert _answers(young) == ["Y0", "Y1", "Y2", "Y3"]
        assert _answers(fill) == ["F0", "F1", "F2", "F3"]
        assert all(a in ("DeadlineExceeded",) or a.startswith("O") for a in _answers(old))
    finally:
        eng.stop()
    # at the first admission after the burst (one 9 ms step), not once the old ones were shed (45 ms later)
    assert all(ex.admitted[f"y{i}"] - start < 0.02 for i in range(4)), ex.admitted
    assert not any(f"o{i}" in ex.admitted for i in range(10))  # none of them would have finished in time


def test_under_overload_requests_that_cannot_make_their_deadline_are_not_started() -> None:
    """40 requests with 200 ms deadlines on a decode whose step cost grows with the batch: admitting
    them all (the engine before it learned costs) makes every one of them miss; with admission
    control the engine decodes as many as fit and answers the rest DeadlineExceeded early."""
    _, blind_out, _ = _overload(StepCost(min_steps=10**9))  # never learns: admits whatever has room
    eng, out, when = _overload(StepCost())
    done = [o for o in out if o != "DeadlineExceeded"]
    assert blind_out.count("DeadlineExceeded") == 40  # every admitted decode ran past its deadline
    assert len(done) >= 5 and all(o.startswith("R") for o in done)
    assert eng.stats.shed >= 20 and eng.stats.shed + len(done) + (eng.stats.expired - eng.stats.shed) == 40
    assert sorted(when)[len(done) + eng.stats.shed - 1] < 0.2  # answered, copy or 503, before the deadline
