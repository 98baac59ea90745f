"""The copy executor: one micro-batch of copy requests -> one chosen copy per request.

``StudentExecutor.run`` is what :class:`engine.batching.BatchingEngine` calls on its thread:

    prompts (one per request) -> K sampled slotted candidates each, with CTR at EOS (one KV-cached
    decode for the whole batch; a slot the record cannot fill and any spelled number are never
    sampled) -> grounding check of the slotted text, slots filled from the record
    (``models.text.slots.fill``), safety filter at the page slot's length -> policy (Thompson /
    greedy / epsilon / random) over the candidates that passed -> the chosen copy (rendered, and its
    slotted template for serve-time refills), its mean CTR score and the probability the policy had
    of choosing it (propensity), or the deterministic fallback copy (policy ``fallback``,
    propensity 1) when no candidate passed, counted by the commonest rejection.

``load_executor`` loads a checkpoint directory (fp32 on CPU, bf16 autocast on CUDA via
``models.generate``), and ``smoke_check`` runs a fixed batch through a freshly loaded executor
before hot reload may serve it.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.catalog import Product
from core.contracts import MAX_COPY_CHARS, Embedding, GeneratedCopy, now_rfc3339
from core.settings import CopySettings
from core.styles import STYLES, StyleResponse
from engine.policy import Chooser, Posterior
from models import cascade
from models.continuous import ContinuousDecoder, FinishedGroup
from models.drafts import NGramDrafts
from models.generate import (
    Candidate,
    DecodeOutput,
    candidates_from,
    generate_candidates,
    request_biases,
    score_ctr_with_features,
)
from models.prefix_cache import PrefixCache
from models.sequences import encode_text, special_ids
from models.student import LoadedStudent, load_student, resolve_device, trunk_of
from models.style_policy import StylePolicy, choice_offsets
from models.text.context import CopyContext, build_prompt, product_context
from models.text.filter import FilterResult, FilterStats, check_copy, check_grounding, fallback_copy, max_chars
from models.text.slots import MissingSlot, available, fill, values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyRequest:
    """One copy to generate: who, which product, in which context (already built from the profile)."""

    user_id: str
    ctx: CopyContext  # product + persona + slot (models.text.context.context_from_profile / product_context)
    profile_version: int = 0  # 0: cold start (no profile)
    style_response: StyleResponse | None = None  # the shopper's response to copy styles (stream/responses/)

    @property
    def product_id(self) -> str:
        return self.ctx.product_id

    @property
    def slot(self) -> str | None:
        return self.ctx.slot


@dataclass
class CopyResult:
    """The chosen copy of one request (the engine hands exactly one back per request)."""

    copy_id: str
    user_id: str
    product_id: str
    text: str
    style: str | None
    score: float  # mean predicted CTR of the chosen copy
    propensity: float  # probability the policy had of choosing it
    policy: str  # thompson | greedy | epsilon_greedy | random | fallback
    model: str
    model_version: str
    slot: str | None
    features: dict[str, Any]
    candidates: int = 0
    passed: int = 0
    created_at: str = field(default_factory=now_rfc3339)
    template: str | None = None  # the slotted copy ``text`` was filled from (None: the fallback)
    embedding: Embedding | None = None  # the trunk's hidden state at EOS (for the trainer's head refit)

    def to_copy(self) -> GeneratedCopy:
        """The contract record (``livecopy.copy`` and the GET /v1/copy body)."""
        return GeneratedCopy(
            copy_id=self.copy_id, user_id=self.user_id, product_id=self.product_id, text=self.text,
            model=self.model, model_version=self.model_version, score=self.score, policy=self.policy,
            created_at=self.created_at, propensity=self.propensity, slot=self.slot, style=self.style,
            features=self.features, template=self.template, embedding=self.embedding,
        )


def request_features(req: CopyRequest) -> dict[str, Any]:
    """The features logged with the copy: the full context (rebuildable with
    ``models.text.context.context_from_features``) plus the profile version it was built from."""
    f = req.ctx.features()
    f["profile_version"] = req.profile_version
    return f


def new_copy_id() -> str:
    return "c-" + uuid.uuid4().hex




@dataclass(frozen=True)
class Prepared:
    """A request ready for the continuous decoder: its prompt, the prompt's ids, its style factors."""

    prompt: str
    ids: list[int]
    factors: np.ndarray | None


class StudentExecutor:
    """Generates copies with one loaded student; implements ``engine.batching.Executor``."""

    def __init__(
        self,
        student: LoadedStudent,
        cfg: CopySettings,
        *,
        posterior: Posterior | None = None,
        version: str | None = None,
        name: str | None = None,
        generate: Callable[..., list[list[Candidate]]] = generate_candidates,
    ) -> None:
        self.student = student
        self.generate = generate
        self.cfg = cfg
        self.version = version or student.meta.version
        self.name = name or student.meta.name
        self.chooser = Chooser(cfg.policy, epsilon=cfg.epsilon, mc_draws=cfg.mc_draws)
        self.posterior = posterior if posterior is not None else _posterior_for(student)
        self.style_policy = StylePolicy.load(student.path) if student.path is not None else None
        self.trunk = trunk_of(student.meta)  # logged with each copy's embedding
        self.rng = np.random.default_rng(cfg.seed)
        self._seed = cfg.seed
        self.filter_stats = FilterStats()
        # draft tokens for the continuous decoder's speculative steps: shared by its decoders, carried across a hot
        # swap (a guess changes a step's speed, never a copy)
        self.drafts = NGramDrafts() if cfg.draft_tokens > 0 else None
        # prompts' keys/values, shared by its decoders; not carried across a hot swap (they belong to these weights)
        self.prompt_cache = PrefixCache(cfg.prompt_cache_mb << 20) if cfg.prompt_cache_mb > 0 else None
        self.copies = 0
        self._lock = threading.Lock()  # run() is called from one engine thread; smoke checks share it
        config = getattr(student.model, "config", None)
        self.max_positions = int(getattr(config, "n_positions", 0) or getattr(config, "max_position_embeddings", 0)
                                 or 10**9)

    @property
    def device(self) -> torch.device:
        return next(self.student.model.parameters()).device

    def run(self, requests: Sequence[CopyRequest]) -> list[CopyResult]:
        if not requests:
            return []
        with self._lock:
            self._seed += 1
            seed = self._seed
            prompts = [self._fit(r.ctx) for r in requests]
            factors = [self._style_factors(r) for r in requests]
            extra: dict[str, Any] = {}
            bias = [self._style_bias(r, f) for r, f in zip(requests, factors, strict=True)]
            if any(b is not None for b in bias):
                extra["style_bias"] = bias
            if self.generate is generate_candidates:
                extra["weights"] = self.cfg.cpu_weights
            with torch.inference_mode():  # as the continuous decoder: no autograd bookkeeping per operation
                groups = self.generate(
                    self.student.model, self.student.tokenizer, prompts, k=self.cfg.candidates,
                    max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature,
                    top_k=self.cfg.top_k, top_p=self.cfg.top_p, seed=seed,
                    slots_ok=[available(r.ctx) for r in requests], **extra,
                )
            return self._choose_all(requests, prompts, factors, groups)

    def _style_bias(self, req: CopyRequest, factors: np.ndarray | None) -> dict[str, float] | None:
        """Logits added to the style tokens: the version's style policy, plus the shopper's style
        response (its first Thompson draw / ``style_response_temperature``)."""
        out = dict.fromkeys(STYLES, 0.0)
        if self.style_policy is not None:
            out = self.style_policy.bias(req.ctx)
        if factors is not None:
            t = self.cfg.style_response_temperature
            out = {st: out[st] + float(v) / t for st, v in zip(STYLES, factors[0], strict=True)}
        return out if (self.style_policy is not None or factors is not None) else None

    def _choose_all(self, requests: Sequence[CopyRequest], prompts: Sequence[str],
                    factors: Sequence[np.ndarray | None], groups: Sequence[Sequence[Candidate]]) -> list[CopyResult]:
        """Filter, policy and fallback of decoded candidate groups (one per request)."""
        results: list[CopyResult | None] = []
        fallbacks: list[int] = []
        for i, (req, group) in enumerate(zip(requests, groups, strict=True)):
            res = self._choose(req, group, factors[i])
            if res is None:
                fallbacks.append(i)
            results.append(res)
        if fallbacks:
            self._fill_fallbacks(requests, prompts, fallbacks, results, len(groups[0]) if groups else 0)
        self.copies += len(requests)
        return [r for r in results if r is not None]

    def _choose(self, req: CopyRequest, group: Sequence[Candidate], f: np.ndarray | None) -> CopyResult | None:
        """The chosen copy of one request's candidates; None when none passed the filter (counted)."""
        ok = np.zeros(len(group), bool)
        shown: list[str] = []
        rejected: Counter[str] = Counter()
        for j, cand in enumerate(group):
            text, res = self.render(cand.text, req.ctx)
            shown.append(text)
            self.filter_stats.record(res)
            ok[j] = res.ok
            if not res.ok:
                rejected[(res.reason or "unknown").split(":", 1)[0]] += 1
        if not ok.any():
            self.filter_stats.fallbacks += 1
            why = rejected.most_common(1)[0][0] if rejected else "no_candidate"
            self.filter_stats.fallback_reasons[why] += 1
            return None
        scores = np.array([c.ctr if c.ctr is not None else 0.5 for c in group], dtype=np.float64)
        feats = np.stack([
            c.ctr_features if c.ctr_features is not None else np.zeros(1, np.float32) for c in group
        ])
        posterior = self.posterior if self.posterior is not None and feats.shape[1] + 1 == \
            self.posterior.dim else None
        chooser = self.chooser
        if chooser.policy == "thompson" and posterior is None:
            chooser = Chooser("greedy")
        offsets = choice_offsets(self.style_policy, req.ctx, [c.style for c in group], f, self.chooser.mc_draws + 1)
        choice = chooser.choose(feats, scores, posterior, self.rng, ok, offsets=offsets)
        cand = group[choice.index]
        return self._result(req, shown[choice.index], cand.style, choice.score, choice.propensity,
                            chooser.policy, len(group), int(ok.sum()), template=cand.text, hidden=cand.hidden)

    # -- the continuous engine's three parts: prepare, decode (engine.continuous), finish -------------
    @property
    def supports_continuous(self) -> bool:
        """Whether the continuous engine can serve this executor: a GPT-2 trunk, the default generate
        function, and :meth:`run` not overridden (a subclass that wraps ``run`` expects the static path)."""
        return (type(self).run is StudentExecutor.run and self.generate is generate_candidates
                and cascade.supports(self.student.model))

    def decoder(self, max_prompts: int = 32, *, static_shapes: bool | None = None) -> ContinuousDecoder:
        """A fresh running batch for this model, with this executor's sampling settings (static shapes
        on CUDA by default: every step attends over the preallocated columns, no host sync for lengths)."""
        if static_shapes is None:
            static_shapes = self.device.type == "cuda"
        with self._lock:
            self._seed += 1
            seed = self._seed
        sid = special_ids(self.student.tokenizer)
        dec = ContinuousDecoder(
            self.student.model, eos_id=sid.eos, pad_id=sid.pad, k=self.cfg.candidates,
            max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_k=self.cfg.top_k,
            top_p=self.cfg.top_p, seed=seed, want_hidden=hasattr(self.student.model, "ctr_from_hidden"),
            max_prompts=max_prompts, static_shapes=static_shapes, shape_buckets=self.cfg.compile_decode,
            weights=self.cfg.cpu_weights, drafts=self.drafts, draft_depth=self.cfg.draft_tokens,
            spec_rows=self.cfg.draft_max_rows, spec_places=self.cfg.draft_tail_places,
            first_drafts=self.cfg.draft_first_tokens, prefix=self.prompt_cache,
        )
        if self.cfg.compile_decode:
            dec.compile()
        dec.warmup()  # the caches at their full width now (and every shape compiled), not on a request's time
        return dec

    def prepare(self, requests: Sequence[CopyRequest]) -> tuple[list[Prepared], torch.Tensor, torch.Tensor]:
        """Per request: its prompt (fitted), token ids and style factors; and the decode constraints
        (first-token bias (n, V), bans after the first token (n, V)) as ``models.generate`` builds them."""
        with self._lock:
            prompts = [self._fit(r.ctx) for r in requests]
            factors = [self._style_factors(r) for r in requests]
        ids = encode_text(self.student.tokenizer, prompts)
        first, ban = request_biases(
            self.student.model, self.student.tokenizer, len(requests),
            style_bias=[self._style_bias(r, f) for r, f in zip(requests, factors, strict=True)],
            slots_ok=[available(r.ctx) for r in requests])
        return [Prepared(p, i, f) for p, i, f in zip(prompts, ids, factors, strict=True)], first, ban

    def finish(self, items: Sequence[tuple[CopyRequest, Prepared, FinishedGroup]]) -> list[CopyResult]:
        """The chosen copy of each decoded request (candidates, CTR at EOS, filter, policy, fallback)."""
        if not items:
            return []
        k = self.cfg.candidates
        hidden = [g.eos_hidden for _, _, g in items]
        out = DecodeOutput(
            tokens=[t for _, _, g in items for t in g.tokens], logprob=[x for _, _, g in items for x in g.logprob],
            sample_logprob=[x for _, _, g in items for x in g.sample_logprob],
            finished=[x for _, _, g in items for x in g.finished],
            eos_hidden=None if any(h is None for h in hidden) else torch.cat([h for h in hidden if h is not None]),
        )
        groups = candidates_from(self.student.model, self.student.tokenizer, out, len(items), k)
        with self._lock:
            return self._choose_all([r for r, _, _ in items], [p.prompt for _, p, _ in items],
                                    [p.factors for _, p, _ in items], groups)

    @staticmethod
    def render(template: str, ctx: CopyContext) -> tuple[str, FilterResult]:
        """A candidate's shown text (its slots filled from the record) and the filter's verdict:
        grounding of the slotted text first, then the copy rules at the page slot's length."""
        if len(template) > MAX_COPY_CHARS:
            return template[:MAX_COPY_CHARS], FilterResult(False, "too_long")
        res = check_grounding(template, ctx)
        if not res.ok:
            return template, res
        try:
            text = fill(template, ctx, values(ctx))
        except MissingSlot as exc:
            return template, FilterResult(False, f"missing_field:{exc}")
        return text, check_copy(text, ctx, limit=min(max_chars(ctx.slot), MAX_COPY_CHARS))

    def _fit(self, ctx: CopyContext) -> str:
        """The prompt of ``ctx`` within the model's positions (with room for the copy): text fields a
        shopper or a catalog controls (title, noun, brand, category, attributes, likes) are shortened
        until it fits, so a long or token-dense field (CJK, emoji) cannot fail a batch."""
        prompt = build_prompt(ctx)
        budget = self.max_positions - self.cfg.max_new_tokens - 2
        if budget <= 0 or len(prompt) <= budget:  # at least one character per token: it fits
            return prompt
        limit = 64
        while len(encode_text(self.student.tokenizer, [prompt])[0]) > budget and limit >= 1:
            ctx = replace(ctx, title=ctx.title[:limit], noun=ctx.noun[:limit], brand=ctx.brand[:limit],
                          category=ctx.category[:limit], attributes=tuple(a[:limit] for a in ctx.attributes[:4]),
                          likes=tuple(x[:limit] for x in ctx.likes[:4]))
            prompt = build_prompt(ctx)
            limit //= 2
        return prompt

    def _style_factors(self, req: CopyRequest) -> np.ndarray | None:
        """(mc_draws + 1, len(STYLES)) log multipliers of the shopper's style response: Thompson
        samples (row 0 also tilts the style tokens), posterior means for the greedy policies."""
        strength = self.cfg.style_response_strength
        if req.style_response is None or strength <= 0 or self.chooser.policy == "random":
            return None
        rng = self.rng if self.chooser.policy == "thompson" else None
        return req.style_response.log_factors(list(STYLES), strength, rng, self.chooser.mc_draws + 1)

    def _fill_fallbacks(
        self, requests: Sequence[CopyRequest], prompts: Sequence[str], idx: list[int],
        results: list[CopyResult | None], k: int,
    ) -> None:
        texts = [fallback_copy(requests[i].ctx)[:MAX_COPY_CHARS] for i in idx]
        try:
            probs, _ = score_ctr_with_features(
                self.student.model, self.student.tokenizer, [prompts[i] for i in idx], texts,
                styles=["practical"] * len(idx),
            )
        except Exception:  # a model without a CTR head: neutral score
            log.exception("scoring fallback copy failed")
            probs = [0.5] * len(idx)
        for i, text, p in zip(idx, texts, probs, strict=True):
            results[i] = self._result(requests[i], text, "practical", p, 1.0, "fallback", k, 0)

    def _result(
        self, req: CopyRequest, text: str, style: str | None, score: float, propensity: float, policy: str,
        k: int, passed: int, template: str | None = None, hidden: np.ndarray | None = None,
    ) -> CopyResult:
        score = float(score)
        if not math.isfinite(score):
            score = 0.5
        return CopyResult(
            copy_id=new_copy_id(), user_id=req.user_id, product_id=req.product_id, text=text.strip(),
            style=style, score=min(1.0, max(0.0, score)), propensity=float(propensity), policy=policy,
            model=self.name, model_version=self.version, slot=req.slot, features=request_features(req),
            candidates=k, passed=passed, template=template.strip() if template is not None else None,
            embedding=None if hidden is None else Embedding.pack(hidden, self.trunk),
        )


def _posterior_for(student: LoadedStudent) -> Posterior | None:
    """The shipped posterior (``ctr_posterior.safetensors``) or a prior around the CTR head."""
    if student.path is not None:
        post = Posterior.load(student.path)
        if post is not None:
            return post
    head = getattr(student.model, "ctr_head", None)
    if head is None:
        return None
    return Posterior.of_head(head)


def load_executor(path: str | Path, cfg: CopySettings, *, version: str | None = None) -> StudentExecutor:
    """Load a student checkpoint directory as an executor (fp32 weights; bf16 autocast on CUDA)."""
    student = load_student(path, device=resolve_device(cfg.device))
    return StudentExecutor(student, cfg, version=version)


# ----------------------------------------------------------------------------------- smoke check

SMOKE_PRODUCTS = (
    Product("smoke-1", "Aurora Wireless Headphones", "electronics/audio", "Aurora", 129.99, ("wireless",),
            4.6, 1234, False, 20, "headphones"),
    Product("smoke-2", "Hearthwood Cast-Iron Skillet", "home/kitchen", "Hearthwood", 49.99, ("non-stick",),
            4.4, 310, False, 0, "cast-iron skillet"),
    Product("smoke-3", "Northloom Organic Linen Shirt", "fashion/apparel", "Northloom", 59.99, ("organic",),
            4.1, 42, True, 0, "linen shirt"),
)


class SmokeCheckFailed(Exception):
    pass


def smoke_check(executor: StudentExecutor, *, min_pass_rate: float = 0.0, expected_name: str | None = None) -> dict[
    str, Any
]:
    """Run a fixed batch through ``executor`` (not yet serving); raise ``SmokeCheckFailed`` when
    the weights are not finite, the batch fails, a result is malformed, or fewer than
    ``min_pass_rate`` of the sampled candidates pass the safety filter."""
    if expected_name is not None and executor.name != expected_name:
        raise SmokeCheckFailed(f"model name {executor.name!r} is not {expected_name!r}")
    for name, p in executor.student.model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise SmokeCheckFailed(f"non-finite weights in {name}")
    reqs = [CopyRequest(f"smoke-user-{i}", product_context(p, "pdp")) for i, p in enumerate(SMOKE_PRODUCTS)]
    before = FilterStats(executor.filter_stats.checked, executor.filter_stats.passed)
    try:
        results = executor.run(reqs)
    except Exception as exc:
        raise SmokeCheckFailed(f"generation failed: {type(exc).__name__}: {exc}") from exc
    if len(results) != len(reqs):
        raise SmokeCheckFailed(f"{len(results)} results for {len(reqs)} requests")
    for r in results:
        if not r.text or len(r.text) > MAX_COPY_CHARS:
            raise SmokeCheckFailed(f"bad copy text {r.text[:60]!r}")
        if not (0.0 <= r.score <= 1.0) or not (0.0 < r.propensity <= 1.0):
            raise SmokeCheckFailed(f"bad score/propensity {r.score}/{r.propensity}")
    checked = executor.filter_stats.checked - before.checked
    passed = executor.filter_stats.passed - before.passed
    rate = passed / checked if checked else 0.0
    if rate < min_pass_rate:
        raise SmokeCheckFailed(f"filter pass rate {rate:.2f} below {min_pass_rate:.2f}")
    return {"pass_rate": rate, "copies": [r.text for r in results]}
