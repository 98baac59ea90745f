"""In-process copy policies for the closed loop: random, static, online and oracle on one impression stream.

Every impression is answered by all four policies at once, on the same candidates:

* a :class:`CandidatePool` holds ``pool_size`` copies sampled by the student for each
  (product, persona bucket, slot) key, with the trunk's hidden state at EOS cached per copy, so a
  CTR head (static or updated) can re-score them without running the trunk; each impression draws
  ``k`` of them (as the copy service samples K candidates per request);
* ``random`` picks one uniformly, ``static`` picks with the shipped CTR head and its Thompson
  posterior (:class:`engine.policy.Chooser`), ``online`` serves the version the online trainer
  last published -- :class:`models.training.online.OnlineTrainer`, the class, settings and gate
  `livecopy worker trainer` runs, fed the feedback records the joiner would write -- with its CTR
  head, posterior and style policy, loaded from the registry as the generator loads them, and each
  shopper's style response (:class:`core.styles.StyleResponse`, as the copy service does);
  ``oracle`` picks the best candidate under the hidden click model (only the simulator knows it).

Only the online policy's copy is *shown*: the shopper clicks (or not) on it, its events flow on,
and the trainer learns from its feedback record. The other policies are scored counterfactually
with the expected hidden CTR of what they would have shown (no sampling noise, same impressions).
The trainer never sees the hidden model: only feedback records (features, copy, style, clicked,
propensity, and the trunk's embedding the generator logs with each copy).

Pooling is the speed trade-off that makes 100,000+ impressions feasible on two CPU cores: the
student writes copy for a representative shopper of each bucket (the first one seen), not for
every impression; buckets are what the prompt says about the shopper (price sensitivity, new or
returning, eco-minded) and the slot.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch

from core.catalog import Catalog
from core.contracts import Embedding, Event, FeedbackRecord, format_ts
from core.settings import ProfileSettings
from core.styles import STYLES, StyleResponse, classify_style
from engine.executor import StudentExecutor, _posterior_for
from engine.policy import Chooser, Posterior
from livecopy.sim.population import PopulationConfig, click_probability
from livecopy.sim.shoppers import CopyAsk, ShownCopy
from models.generate import _banned_after_first, decode, slot_bans, style_distribution
from models.sequences import encode_text, special_ids
from models.student import LoadedStudent, load_student, trunk_of
from models.style_policy import StylePolicy, choice_offsets
from models.text.context import CopyContext, build_prompt, context_from_profile
from models.text.slots import available
from models.training.online import OnlineTrainer
from stream.profile.logic import ProfileState, apply_event, render

ARMS = ("random", "static", "online", "oracle")
EXTRA_ARMS = ("rerank_only",)


class ProfileBook:
    """Profiles of the simulated shoppers, kept in memory with the very merge the profile worker
    runs (:mod:`stream.profile.logic`), from the events the simulator emits."""

    def __init__(self, catalog: Catalog, cfg: ProfileSettings | None = None) -> None:
        # a short dedupe window: simulated ids never repeat, and the seen-set stays small
        self.cfg = cfg or ProfileSettings(dedupe_window_s=1)
        self.catalog = catalog
        self.states: dict[str, ProfileState] = {}

    def apply(self, event: dict[str, Any]) -> None:
        ev = Event.model_validate(event)
        st = self.states.get(ev.user_id) or ProfileState()
        self.states[ev.user_id], _ = apply_event(st, ev, ev.ts, self.cfg)

    def context(self, ask: CopyAsk) -> CopyContext:
        st = self.states.get(ask.shopper.user_id)
        prof = render(ask.shopper.user_id, st, self.cfg) if st is not None and st.first_ms is not None else None
        now = datetime.fromtimestamp(ask.ts_ms / 1000.0, UTC)
        return context_from_profile(ask.product, prof, ask.slot, now=now, lookup=self.catalog.get)


def bucket_key(ctx: CopyContext) -> tuple[str, ...]:
    return (ctx.product_id, ctx.price_sensitivity, "eco" if ctx.eco_minded else "-")


@dataclass
class Pooled:
    """The copies sampled for one bucket, ``per_style`` per style the student would write there:
    texts, styles, hidden states at EOS (n, d), filter verdicts, and the student's p(style | prompt)."""

    texts: list[str]
    templates: list[str]  # the slotted copies the texts were filled from (what the generator logs)
    styles: list[str]  # the style token each copy was written under
    seen: list[str]  # the style a reader sees in the text (core.styles.classify_style)
    hidden: np.ndarray
    ok: np.ndarray  # passed the safety filter
    style_p: dict[str, float]
    version: str
    groups: dict[str, np.ndarray] = field(default_factory=dict)  # style -> indices of eligible copies

    def __post_init__(self) -> None:
        out: dict[str, list[int]] = {}
        for i, (st, ok) in enumerate(zip(self.styles, self.ok, strict=True)):
            if ok:
                out.setdefault(st, []).append(i)
        if not out:  # nothing passed the filter: keep everything rather than show nothing
            for i, st in enumerate(self.styles):
                out.setdefault(st, []).append(i)
        self.groups = {k: np.array(v) for k, v in out.items()}


@torch.no_grad()
def sample_pooled(student: LoadedStudent, contexts: Sequence[CopyContext], per_style: int, *, seed: int,
                  min_style_p: float = 0.03, max_new_tokens: int = 40, temperature: float = 0.9, top_k: int = 50,
                  top_p: float = 0.95, version: str = "", weights: str = "fp32") -> list[Pooled]:
    """For each context: the student's p(style | prompt), then ``per_style`` sampled copies for
    every style with p >= ``min_style_p`` (the style token is put after the prompt, exactly
    where the student would have sampled it), each with the trunk's hidden state at EOS; ``weights``
    as the serving decode (``generation.cpu_weights``)."""
    tok, model = student.tokenizer, student.model
    sid = special_ids(tok)
    prompts = [build_prompt(c) for c in contexts]
    dists = style_distribution(model, tok, prompts)
    base = encode_text(tok, prompts)
    rows: list[list[int]] = []
    owner: list[tuple[int, str]] = []
    for i, d in enumerate(dists):
        for st in STYLES:
            if d[st] >= min_style_p:
                rows.append([*base[i], sid.styles[st]])
                owner.append((i, st))
    vocab = int(model.get_input_embeddings().weight.shape[0])
    out = decode(model, rows, eos_id=sid.eos, pad_id=sid.pad, k=per_style, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, first_allowed=None,
                 banned=_banned_after_first(tok, sid), want_hidden=True,
                 banned_rows=slot_bans(tok, [available(contexts[i]) for i, _ in owner], vocab), weights=weights)
    assert out.eos_hidden is not None
    hidden = out.eos_hidden.float().cpu().numpy()
    texts = [t.strip() for t in tok.batch_decode(out.tokens, skip_special_tokens=True)]
    parts: dict[int, list[int]] = {}
    for r, (i, _) in enumerate(owner):
        parts.setdefault(i, []).extend(range(r * per_style, (r + 1) * per_style))
    pools = []
    for i, ctx in enumerate(contexts):
        idx = parts.get(i, [])
        rendered = [StudentExecutor.render(texts[j], ctx) for j in idx]  # slots filled, grounding + filter
        tx = [t for t, _ in rendered]
        written = [owner[j // per_style][1] for j in idx]
        ok = np.array([bool(t) and res.ok for t, res in rendered], dtype=bool)
        d = {k: v for k, v in dists[i].items() if v >= min_style_p}
        z = sum(d.values())
        pools.append(Pooled(tx, [texts[j] for j in idx], written, [classify_style(t) for t in tx], hidden[idx], ok,
                            {k: v / z for k, v in d.items()}, version))
    return pools


class CtrHeadScorer:
    """A CTR head (a copy of the student's) applied to cached hidden states, with its posterior."""

    def __init__(self, head: torch.nn.Module, posterior: Posterior | None = None, prior_std: float = 0.1) -> None:
        self.head = head
        self.head.eval()
        self.prior_std = prior_std
        self.posterior = posterior or self._prior()

    def _prior(self) -> Posterior:
        return Posterior.of_head(self.head, self.prior_std)

    @torch.no_grad()
    def score(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mean CTR (n,), features (n, h))."""
        logit, f = self.head(torch.from_numpy(hidden).float())
        return torch.sigmoid(logit).double().numpy(), f.double().numpy()


class ServedVersion:
    """What the generator serves of a version: its CTR head and Thompson posterior, its style policy,
    loaded from the checkpoint with the copy service's own loaders."""

    def __init__(self, student: LoadedStudent) -> None:
        self.version = student.meta.version
        self.trunk = trunk_of(student.meta)
        self.scorer = CtrHeadScorer(student.model.ctr_head, _posterior_for(student))
        self.style_policy = StylePolicy.load(student.path) if student.path is not None else None


@dataclass
class ArmStats:
    """Expected (hidden) CTR per policy, and the online policy's realised clicks, over time."""

    arms: tuple[str, ...] = ARMS + EXTRA_ARMS
    p_sum: dict[str, list[float]] = field(default_factory=dict)
    clicks: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    styles: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.p_sum = {a: [] for a in self.arms}
        self.styles = {a: dict.fromkeys(STYLES, 0) for a in self.arms}

    def add(self, arm_p: dict[str, float], clicked: bool, version: str, arm_style: dict[str, str]) -> None:
        for a in self.arms:
            self.p_sum[a].append(arm_p[a])
            self.styles[a][arm_style[a]] += 1
        self.clicks.append(int(clicked))
        self.versions.append(version)

    def __len__(self) -> int:
        return len(self.clicks)

    def ctr(self, arm: str, start: int = 0, end: int | None = None) -> float:
        xs = self.p_sum[arm][start:end]
        return float(np.mean(xs)) if xs else math.nan

    def realised(self, start: int = 0, end: int | None = None) -> float:
        xs = self.clicks[start:end]
        return float(np.mean(xs)) if xs else math.nan


class ClosedLoopArms:
    """The copy source of the closed-loop benchmark: answers asks with the online policy's copy,
    records what every policy would have earned, and feeds the online trainer.

    Candidates: ``k`` per impression, drawn the way the student samples them -- a style from
    p(style | prompt), then a copy written under it. ``static`` and ``random`` draw with the
    shipped student's p(style | prompt); ``online`` draws with it tilted as the copy service tilts
    the style tokens: by the served version's style policy and the shopper's style response.
    ``oracle`` picks the best eligible copy of the whole pool under the hidden model (the ceiling
    for anything choosing among these copies); ``rerank_only`` (diagnostic) is the served CTR head
    choosing among the static candidates.
    """

    def __init__(self, student: LoadedStudent, book: ProfileBook, pop_cfg: PopulationConfig, trainer: OnlineTrainer,
                 *, k: int = 4, per_style: int = 2, seed: int = 0, gen_batch: int = 32, max_new_tokens: int = 40,
                 user_style_strength: float = 0.0, user_style_half_life_ms: float = 0.0,
                 user_style_temperature: float = 0.3, feedback_batch: int = 128, weights: str = "fp32") -> None:
        self.student = student
        self.weights = weights  # the decode's CPU weights (generation.cpu_weights)
        self.book = book
        self.pop_cfg = pop_cfg
        self.k = k
        self.per_style = per_style
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.gen_batch = gen_batch
        self.max_new_tokens = max_new_tokens
        # > 0: the online policy also uses each shopper's response to copy styles (StyleResponse)
        self.user_style_strength = user_style_strength
        self.user_style_half_life_ms = user_style_half_life_ms  # as `livecopy worker responses` ages them
        self.user_style_temperature = user_style_temperature  # as the copy service tilts the style tokens
        self.responses: dict[str, StyleResponse] = {}
        self.static = CtrHeadScorer(copy.deepcopy(student.model.ctr_head))
        self.trainer = trainer
        self.served = ServedVersion(student)
        self.versions: list[str] = [self.served.version]
        self.feedback_batch = feedback_batch  # records per trainer.update (what one poll of the worker takes)
        self._records: list[FeedbackRecord] = []
        self.thompson = Chooser("thompson", mc_draws=20)
        self.pools: dict[tuple[str, ...], Pooled] = {}
        self.stats = ArmStats()
        self.generated = 0
        self._shown: dict[int, FeedbackRecord] = {}
        # CTR-head scores of each pool: the static head never changes, the served one per version
        self._static_scores: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        self._online_scores: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    def _ensure_pools(self, ctxs: Sequence[CopyContext]) -> None:
        missing: dict[tuple[str, ...], CopyContext] = {}
        for c in ctxs:
            key = bucket_key(c)
            if key not in self.pools and key not in missing:
                missing[key] = c
        items = list(missing.items())
        for i in range(0, len(items), self.gen_batch):
            chunk = items[i : i + self.gen_batch]
            self.seed += 1
            pools = sample_pooled(self.student, [c for _, c in chunk], self.per_style, seed=self.seed,
                                  max_new_tokens=self.max_new_tokens, version=self.student.meta.version,
                                  weights=self.weights)
            for (key, _), pool in zip(chunk, pools, strict=True):
                self.pools[key] = pool
                self.generated += len(pool.texts)

    def _draw(self, pool: Pooled, style_p: dict[str, float]) -> np.ndarray:
        """``k`` candidate indices: a style from ``style_p`` (over the styles present), then one of its copies."""
        names = [st for st in pool.groups if style_p.get(st, 0.0) > 0] or list(pool.groups)
        w = np.array([style_p.get(st, 1.0) for st in names], dtype=np.float64)
        w = w / w.sum()
        picks = self.rng.choice(len(names), size=self.k, p=w)
        return np.array([int(self.rng.choice(pool.groups[names[j]])) for j in picks])

    def online_style_p(self, pool: Pooled, ctx: CopyContext, factors: np.ndarray | None) -> dict[str, float]:
        """The student's p(style | prompt) with the logits the copy service adds to the style tokens:
        the served style policy's, and the shopper's style response (first draw / temperature)."""
        bias = self.served.style_policy.bias(ctx) if self.served.style_policy is not None else {}
        if factors is not None:
            for st, v in zip(STYLES, factors[0], strict=True):
                bias[st] = bias.get(st, 0.0) + float(v) / self.user_style_temperature
        if not bias:
            return pool.style_p
        top = max(bias.get(st, 0.0) for st in pool.style_p)
        w = {st: p * math.exp(bias.get(st, 0.0) - top) for st, p in pool.style_p.items()}
        z = sum(w.values()) or 1.0
        return {st: v / z for st, v in w.items()}

    def _scores(self, key: tuple[str, ...], pool: Pooled) -> tuple[tuple[np.ndarray, np.ndarray],
                                                                     tuple[np.ndarray, np.ndarray]]:
        """(static, served) CTR-head (scores, features) of ``pool``, each computed once per head version."""
        s = self._static_scores.get(key)
        if s is None:
            s = self._static_scores[key] = self.static.score(pool.hidden)
        o = self._online_scores.get(key)
        if o is None:
            o = self._online_scores[key] = self.served.scorer.score(pool.hidden)
        return s, o

    def __call__(self, asks: Sequence[CopyAsk]) -> list[ShownCopy | None]:
        ctxs = [self.book.context(a) for a in asks]
        self._ensure_pools(ctxs)
        out: list[ShownCopy | None] = []
        for ask, ctx in zip(asks, ctxs, strict=True):
            key = bucket_key(ctx)
            pool = self.pools[key]
            p_true = np.array([click_probability(self.pop_cfg, ask.shopper, ask.product, t, ask.slot, st)
                               for t, st in zip(pool.texts, pool.seen, strict=True)])
            (s_scores, s_feats), (o_scores, o_feats) = self._scores(key, pool)
            s_idx = self._draw(pool, pool.style_p)
            factors = self._user_factors(ask.shopper.user_id, ask.ts_ms)
            o_idx = self._draw(pool, self.online_style_p(pool, ctx, factors))
            o_off = choice_offsets(self.served.style_policy, ctx, [pool.styles[i] for i in o_idx], factors,
                                   self.thompson.mc_draws + 1)
            eligible = np.concatenate(list(pool.groups.values()))
            post_s, post_o = self.static.posterior, self.served.scorer.posterior
            online = self.thompson.choose(o_feats[o_idx], o_scores[o_idx], post_o, self.rng, offsets=o_off)
            picks = {
                "random": int(s_idx[self.rng.integers(len(s_idx))]),
                "static": int(s_idx[self.thompson.choose(s_feats[s_idx], s_scores[s_idx], post_s, self.rng).index]),
                "online": int(o_idx[online.index]),
                "oracle": int(eligible[np.argmax(p_true[eligible])]),
                "rerank_only": int(s_idx[self.thompson.choose(o_feats[s_idx], o_scores[s_idx], post_o,
                                                              self.rng).index]),
            }
            j = picks["online"]
            shown = ShownCopy(
                copy_id=f"c-sim-{ask.seq}", text=pool.texts[j], model_version=self.served.version,
                policy="thompson", style=pool.seen[j], arm_p={a: float(p_true[i]) for a, i in picks.items()},
                arm_style={a: pool.seen[i] for a, i in picks.items()},
            )
            out.append(shown)
            # the record the joiner would write for this impression (clicked is set on feedback)
            self._shown[ask.seq] = FeedbackRecord(
                impression_id=f"i-sim-{ask.seq}", copy_id=shown.copy_id, user_id=ask.shopper.user_id,
                product_id=ask.product.product_id, model_version=self.served.version, text=pool.texts[j],
                clicked=False, impression_ts=format_ts(ask.ts_ms), features=ctx.features(),
                model=self.student.meta.name, policy="thompson", propensity=online.propensity,
                score=float(o_scores[j]), style=pool.styles[j], template=pool.templates[j], slot=ask.slot,
                embedding=Embedding.pack(pool.hidden[j], self.served.trunk),
            )
        return out

    def _user_factors(self, user_id: str, now_ms: int) -> np.ndarray | None:
        """(draws, len(STYLES)) log multipliers of the shopper's style response, one Thompson sample
        per draw (row 0 also tilts the style draw); None when not used."""
        if self.user_style_strength <= 0:
            return None
        resp = self.responses.get(user_id)
        if resp is None:
            return None
        resp = resp.aged(now_ms, self.user_style_half_life_ms)  # as the copy service reads it
        return resp.log_factors(list(STYLES), self.user_style_strength, self.rng, self.thompson.mc_draws + 1)

    def feedback(self, ask: CopyAsk, shown: ShownCopy) -> None:
        """The outcome of one impression: statistics, the shopper's style response, and the trainer's record."""
        assert shown.arm_p is not None and shown.arm_style is not None
        self.stats.add(shown.arm_p, shown.clicked, shown.model_version, shown.arm_style)
        rec = self._shown.pop(ask.seq).model_copy(update={"clicked": shown.clicked})
        if self.user_style_strength > 0:  # as `livecopy worker responses` keeps it
            resp = self.responses.setdefault(rec.user_id, StyleResponse.empty())
            resp.decay_to(ask.ts_ms, self.user_style_half_life_ms)
            resp.observe(str(rec.style), float(rec.score or 0.0), shown.clicked)
        self._records.append(rec)
        if len(self._records) >= self.feedback_batch:
            self.flush()

    def flush(self) -> None:
        """Hand the pending records to the trainer (one poll's worth), then publish and swap as the
        trainer worker and the generator would."""
        recs, self._records = self._records, []
        if recs:
            self.trainer.update(recs)
        mv = self.trainer.maybe_publish()
        if mv is None:
            return
        student = load_student(mv.path, device="cpu")
        served = ServedVersion(student)
        if served.trunk != self.served.trunk:  # a full fine-tune: new copies from the new student
            self.student = student
            self.pools.clear()
            self._static_scores.clear()
        self.served = served
        self._online_scores.clear()
        self.versions.append(served.version)
