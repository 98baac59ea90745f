"""Online fine-tuning of the student from CTR feedback (in-process core, no Kafka).

API (used by ``livecopy worker trainer``, the tests and benchmarks/trainer.py)::

    trainer = OnlineTrainer(student_dir, TrainerSettings(registry_dir=...))
    report = trainer.update(records)       # list[FeedbackRecord] -> UpdateReport (0..n optimizer steps)
    mv = trainer.maybe_publish()           # ModelVersion | None (every ``eval_every`` steps: evaluate, gate, save)
    trainer.model, trainer.tokenizer       # the model being trained (score with models.generate.score_ctr)
    trainer.serving_version                # the version last published (or loaded)
    trainer.last_eval                      # EvalReport of the last evaluation (why it did or did not publish)

Two modes (``trainer.mode``). ``head`` (the default, seconds on a CPU): every ``refit_every``
records, the CTR head is refitted on the newest ``window`` training rows from the trunk's
embedding at EOS that the generator logged with each copy (recomputed when absent or from another
trunk), its Thompson posterior is the Laplace one of that window, and the style policy
(:class:`models.style_policy.StylePolicy`) is fitted to the refitted head's log-CTR of each shown
copy; the candidate is gated like a full one (held-out log-loss, KL of p(style), SNIPS) and a
version keeps its parent's trunk (``training.trunk``). ``full``: the gradient fine-tune below.

Start: the registry's current version when there is one (a restarted trainer resumes from what
serves), else ``student_dir`` (default ``cfg.base_dir``, else the shipped student) is imported as
the first version.

Each record becomes ``prompt(features) + <s:style> + copy + EOS`` (the same sequence the
generator scored). Records are de-duplicated by ``impression_id`` (the joiner is at-least-once);
a fixed share (``heldout_fraction``, by a hash of ``impression_id``) goes to the held-out slice
and is never trained on. Full mini-batches of ``batch_size`` train one step each on

``loss = ctr_weight * BCE(ctr_head, clicked)``
``     + lm_weight * sum_i w_i NLL_i / sum_i w_i``   with ``w_i = clicked_i * min(1/propensity_i, ips_clip)``
``     + kd_weight * T^2 * KL(anchor_T || student_T)``  per copy token, anchor = the serving version (frozen)

-- BCE calibrates the CTR head; the click-weighted likelihood (reward-weighted regression,
importance-weighted by the logged propensity so the chooser's bias does not compound) makes
clicked copies (their style token included) more likely; the KL anchor keeps each version close
to its parent so fluency is not traded for a few clicks.

Every ``eval_every`` steps :meth:`maybe_publish` evaluates the candidate and the serving version
on the held-out slice and publishes only when: at least ``min_heldout`` rows; candidate CTR
log-loss <= serving's + ``logloss_tolerance``; mean KL(serving || candidate) per copy token <=
``max_kl``; and (when ``min_snips_ratio`` > 0) the SNIPS estimate of the candidate's CTR >=
``min_snips_ratio`` x the logged CTR. Otherwise it keeps training and logs why.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.contracts import FeedbackRecord, ModelVersion
from core.settings import TrainerSettings
from core.styles import STYLES, classify_style
from models.generate import score_ctr, style_distribution
from models.paths import shipped_student_dir
from models.posterior import Posterior
from models.registry import Registry
from models.sequences import encode_pairs
from models.student import (
    ModelMeta,
    StudentModel,
    load_student,
    new_version,
    resolve_device,
    save_student,
    trunk_of,
)
from models.style_policy import StylePolicy
from models.text.context import CopyContext, build_prompt, context_from_features
from models.training.common import auc
from models.training.losses import ctr_loss, kd_loss
from models.training.offpolicy import OffPolicyEstimate, estimate

log = logging.getLogger(__name__)

EVAL_BATCH = 128
KL_ROWS = 256  # held-out rows the KL(serving || candidate) is measured on


@dataclass(frozen=True)
class TrainRow:
    impression_id: str
    prompt: str
    text: str
    style: str
    clicked: bool
    propensity: float | None
    ctx: CopyContext | None = None
    embedding: np.ndarray | None = None  # the trunk's hidden state at EOS (head mode)
    trunk: str | None = None  # the trunk that embedding came from


def row_of(rec: FeedbackRecord) -> TrainRow | None:
    """The training row of a feedback record; None when its features cannot rebuild the prompt."""
    try:
        ctx = context_from_features(rec.features)
        prompt = build_prompt(ctx)
    except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError):  # e.g. int(inf) from a 1e400
        return None
    style = rec.style if rec.style in STYLES else classify_style(rec.text)
    p = rec.propensity
    emb: np.ndarray | None = None
    if rec.embedding is not None:
        try:
            emb = rec.embedding.vector()
        except ValueError:  # not base64 of float16: recomputed
            emb = None
        if emb is not None and not np.all(np.isfinite(emb)):
            emb = None
    return TrainRow(rec.impression_id, prompt, rec.template or rec.text, style, rec.clicked,
                    p if p is not None and 0.0 < p <= 1.0 else None, ctx, emb,
                    rec.embedding.trunk if emb is not None and rec.embedding is not None else None)


def _stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in (its config.json), float16 when it does not say."""
    import json

    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return torch.float16
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name, torch.float16)


def _vec(row: TrainRow) -> np.ndarray:
    assert row.embedding is not None
    return row.embedding


def is_heldout(impression_id: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(impression_id.encode(), digest_size=8).digest(), "big")
    return (h % 1_000_000) < fraction * 1_000_000


@dataclass
class UpdateReport:
    records: int = 0  # records passed in
    duplicates: int = 0  # impression ids seen before
    skipped: int = 0  # records whose features could not rebuild the prompt
    heldout: int = 0  # records put in the held-out slice
    steps: int = 0  # optimizer steps taken in this call
    pending: int = 0  # training rows waiting for a full batch
    clicks: int = 0  # clicked rows trained on
    loss: float = float("nan")  # means over this call's steps
    ctr_loss: float = float("nan")
    lm_loss: float = float("nan")
    kl: float = float("nan")
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalReport:
    n: int
    candidate_logloss: float
    serving_logloss: float
    candidate_auc: float
    serving_auc: float
    kl: float  # mean KL(serving || candidate) per copy token
    offpolicy: OffPolicyEstimate | None  # SNIPS/IPS of the candidate's CTR from logged propensities
    offpolicy_serving: OffPolicyEstimate | None  # the same estimator for the serving version
    publish: bool
    reasons: list[str] = field(default_factory=list)
    codes: list[str] = field(default_factory=list)  # one per reason: heldout_small, logloss, kl, snips
    seconds: float = 0.0
    logloss_se: float = float("nan")  # standard error of the paired log-loss difference

    def metrics(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "heldout_n": self.n, "heldout_ctr_logloss": self.candidate_logloss,
            "parent_heldout_ctr_logloss": self.serving_logloss, "heldout_ctr_auc": self.candidate_auc,
            "parent_heldout_ctr_auc": self.serving_auc, "kl_to_parent": self.kl,
        }
        if self.offpolicy is not None:
            d.update({f"ope_{k}": v for k, v in self.offpolicy.to_dict().items()})
        if self.offpolicy_serving is not None:
            d.update({"parent_ope_ips": self.offpolicy_serving.ips, "parent_ope_snips": self.offpolicy_serving.snips})
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in d.items()}


def _paired_se(cand: Sequence[float], serv: Sequence[float], y: Sequence[bool]) -> float:
    """Standard error of the mean per-row log-loss difference (candidate - serving) on the same rows."""
    if len(cand) < 2:
        return float("nan")
    eps = 1e-7

    def ll(p: float, yi: bool) -> float:
        return -math.log(min(max(p if yi else 1 - p, eps), 1 - eps))

    d = np.array([ll(c, yi) - ll(s_, yi) for c, s_, yi in zip(cand, serv, y, strict=True)])
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def _logloss(p: Sequence[float], y: Sequence[bool]) -> float:
    if not p:
        return float("nan")
    eps = 1e-7
    return -sum(math.log(min(max(pi, eps), 1 - eps)) if yi else math.log(min(max(1 - pi, eps), 1 - eps))
                for pi, yi in zip(p, y, strict=True)) / len(p)


class OnlineTrainer:
    def __init__(self, student_dir: str | Path | None, cfg: TrainerSettings, *, seed: int = 0) -> None:
        self.cfg = cfg
        self.device = torch.device(resolve_device(cfg.device))
        # dropout draws from the trainer's own generator state, not the process's global one
        self._rng_devices = [self.device.index or 0] if self.device.type == "cuda" else []
        self._rng_cpu = torch.Generator().manual_seed(seed).get_state()
        self._rng_cuda = torch.Generator(self.device).manual_seed(seed).get_state() if self._rng_devices else None
        self.registry = Registry(cfg.registry_dir, cfg.model_name)
        cur = self.registry.current()
        if cur is None:
            src = Path(student_dir or cfg.base_dir or shipped_student_dir())
            meta = ModelMeta.read(src)
            self.registry.import_base(src, meta.version, meta.metrics)
            cur = meta.version
        self._load(cur)
        self.heldout: deque[TrainRow] = deque(maxlen=cfg.heldout_size)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._pending: list[TrainRow] = []
        self.steps = 0  # optimizer steps since start
        self.steps_since_eval = 0
        self.records_trained = 0
        self.last_eval: EvalReport | None = None
        self.published: list[ModelVersion] = []
        # head mode: the training window, and the refitted (CTR head, posterior, style policy) awaiting the gate
        self._window: deque[TrainRow] = deque(maxlen=cfg.window)
        self._since_refit = 0
        self.refits = 0
        self._candidate: tuple[torch.nn.Module, Posterior, StylePolicy] | None = None

    # -- state -----------------------------------------------------------------------------------
    def _load(self, version: str) -> None:
        loaded = load_student(self.registry.path_of(version), device=self.device)
        self.model: StudentModel = loaded.model
        self.tokenizer = loaded.tokenizer
        self.meta = loaded.meta
        self.serving_version = version
        self.model.train()
        self.anchor = self._frozen_copy()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=0.0)
        self._serving_cache: dict[str, float] = {}  # impression_id -> the serving version's CTR probability
        self.steps_since_eval = 0
        path = self.registry.path_of(version)
        self.trunk = trunk_of(self.meta)
        self.style_policy = StylePolicy.load(path)
        self.posterior = Posterior.load(path)
        self._p0: dict[str, dict[str, float]] = {}  # impression_id -> the LM's p(style | prompt) (head mode)
        self._candidate = None

    def _frozen_copy(self) -> StudentModel:
        m = copy.deepcopy(self.model).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def follow_registry(self) -> bool:
        """Reload when an operator promoted or rolled back another version; True when it did."""
        cur = self.registry.current()
        if cur is None or cur == self.serving_version:
            return False
        log.warning("registry serves %s, not %s (promote/rollback): training continues from %s",
                    cur, self.serving_version, cur)
        self._load(cur)
        return True

    # -- training --------------------------------------------------------------------------------
    def _dedupe(self, impression_id: str) -> bool:
        if impression_id in self._seen:
            return True
        self._seen[impression_id] = None
        if len(self._seen) > self.cfg.dedupe_size:
            self._seen.popitem(last=False)
        return False

    def update(self, records: Sequence[FeedbackRecord]) -> UpdateReport:
        """Take feedback records; ``full``: train one step per full mini-batch of ``batch_size`` rows;
        ``head``: refit the heads every ``refit_every`` training rows."""
        if self.cfg.mode == "head":
            return self._update_head(records)
        t0 = time.perf_counter()
        rep = UpdateReport(records=len(records))
        for rec in records:
            if self._dedupe(rec.impression_id):
                rep.duplicates += 1
                continue
            row = row_of(rec)
            if row is None:
                rep.skipped += 1
                continue
            if is_heldout(rec.impression_id, self.cfg.heldout_fraction):
                self.heldout.append(row)
                rep.heldout += 1
            else:
                self._pending.append(row)
        sums = [0.0, 0.0, 0.0, 0.0]
        bs = self.cfg.batch_size
        while len(self._pending) >= bs:
            batch = self._pending[:bs]
            with self._own_rng():
                losses = self._step(batch)
            del self._pending[:bs]  # only once trained on: a step that raised leaves its rows pending
            for i, v in enumerate(losses):
                sums[i] += v
            rep.steps += 1
            rep.clicks += sum(r.clicked for r in batch)
        if rep.steps:
            rep.loss, rep.ctr_loss, rep.lm_loss, rep.kl = (s / rep.steps for s in sums)
        rep.pending = len(self._pending)
        rep.seconds = time.perf_counter() - t0
        return rep

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with the trainer's RNG state as the global one; the global state is restored after."""
        with torch.random.fork_rng(devices=self._rng_devices):
            torch.set_rng_state(self._rng_cpu)
            if self._rng_cuda is not None:
                torch.cuda.set_rng_state(self._rng_cuda, self._rng_devices[0])
            yield
            self._rng_cpu = torch.get_rng_state()
            if self._rng_cuda is not None:
                self._rng_cuda = torch.cuda.get_rng_state(self._rng_devices[0])

    def _batch(self, rows: Sequence[TrainRow]) -> dict[str, torch.Tensor]:
        b = encode_pairs(self.tokenizer, [r.prompt for r in rows], [r.text for r in rows],
                         styles=[r.style for r in rows])
        return {k: v.to(self.device) for k, v in b.items()}

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def _step(self, rows: Sequence[TrainRow]) -> tuple[float, float, float, float]:
        cfg = self.cfg
        b = self._batch(rows)
        ids, mask, labels = b["input_ids"], b["attention_mask"], b["labels"]
        rix = torch.arange(ids.shape[0], device=self.device)
        y = torch.tensor([float(r.clicked) for r in rows], device=self.device)
        w = torch.tensor([float(r.clicked) * min(1.0 / r.propensity if r.propensity else 1.0, cfg.ips_clip)
                          for r in rows], device=self.device)
        self.model.train()
        with self._autocast():
            out = self.model(input_ids=ids, attention_mask=mask, return_hidden=True)
            assert out.logits is not None and out.hidden_states is not None
            ctr_logit, _ = self.model.ctr_from_hidden(out.hidden_states[rix, b["eos_index"]])
            with torch.no_grad():
                anchor_logits = self.anchor(input_ids=ids, attention_mask=mask).logits
        logits = out.logits.float()
        l_ctr = ctr_loss(ctr_logit, y)
        # Per-row mean NLL of style token + copy + EOS.
        s, t = logits[:, :-1], labels[:, 1:]
        valid = t != -100
        nll = torch.nn.functional.cross_entropy(s.reshape(-1, s.shape[-1]), t.clamp_min(0).reshape(-1),
                                                reduction="none").view(t.shape)
        nll_row = (nll * valid).sum(-1) / valid.sum(-1).clamp_min(1)
        l_lm = (w * nll_row).sum() / w.sum() if float(w.sum()) > 0 else logits.new_zeros(())
        kl = kd_loss(logits, anchor_logits.float(), labels, temperature=cfg.kd_temperature, lam=1.0).kl
        loss = cfg.ctr_weight * l_ctr + cfg.lm_weight * l_lm + cfg.kd_weight * cfg.kd_temperature**2 * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.steps += 1
        self.steps_since_eval += 1
        self.records_trained += len(rows)
        return float(loss.detach()), float(l_ctr.detach()), float(l_lm.detach()), float(kl.detach())

    # -- head mode -------------------------------------------------------------------------------
    def _update_head(self, records: Sequence[FeedbackRecord]) -> UpdateReport:
        t0 = time.perf_counter()
        rep = UpdateReport(records=len(records))
        rows: list[TrainRow] = []
        for rec in records:
            if self._dedupe(rec.impression_id):
                rep.duplicates += 1
                continue
            row = row_of(rec)
            if row is None:
                rep.skipped += 1
                continue
            rows.append(row)
        rows = self._with_embeddings(rows)
        train = 0
        for row in rows:
            if is_heldout(row.impression_id, self.cfg.heldout_fraction):
                self.heldout.append(row)
                rep.heldout += 1
            else:
                self._window.append(row)
                train += 1
                rep.clicks += row.clicked
        self._since_refit += train
        self.records_trained += train
        if self._since_refit >= self.cfg.refit_every and self._window:
            with self._own_rng():
                rep.steps, rep.ctr_loss = self._refit()
            rep.loss = rep.ctr_loss
        rep.pending = self._since_refit
        rep.seconds = time.perf_counter() - t0
        return rep

    @torch.no_grad()
    def _with_embeddings(self, rows: list[TrainRow]) -> list[TrainRow]:
        """Rows whose logged embedding is missing or from another trunk get one from this trunk."""
        todo = [i for i, r in enumerate(rows) if r.embedding is None or r.trunk != self.trunk
                or r.embedding.shape != (self.model.config.n_embd,)]
        if not todo:
            return rows
        out = list(rows)
        self.model.eval()
        try:
            for i in range(0, len(todo), EVAL_BATCH):
                part = [rows[j] for j in todo[i:i + EVAL_BATCH]]
                b = self._batch(part)
                rix = torch.arange(b["input_ids"].shape[0], device=self.device)
                with self._autocast():
                    o = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1,
                                   return_hidden=True)
                assert o.hidden_states is not None
                h = o.hidden_states[rix, b["eos_index"]].float().cpu().numpy()
                for j, v in zip(todo[i:i + EVAL_BATCH], h, strict=True):
                    out[j] = replace(rows[j], embedding=v, trunk=self.trunk)
        finally:
            self.model.train()
        return out

    def _refit(self) -> tuple[int, float]:
        """A candidate (CTR head, posterior, style policy) from the window; returns (optimizer steps, mean loss)."""
        cfg = self.cfg
        self._since_refit = 0
        rows = list(self._window)
        x = torch.from_numpy(np.stack([_vec(r) for r in rows]).astype(np.float32)).to(self.device)
        y = torch.tensor([float(r.clicked) for r in rows], device=self.device)
        head = copy.deepcopy(self.model.ctr_head).float()
        head.train()
        opt = torch.optim.Adam(head.parameters(), lr=cfg.head_lr, weight_decay=1e-4)
        # MAP under a Gaussian prior around the serving head: its pull is 1 / window size per row, so a
        # few dozen records move the head a little (no overfit refused by the gate) and 40,000 freely
        anchor = [p.detach().clone() for p in head.parameters()]
        pull = 1.0 / (2.0 * cfg.head_anchor_std ** 2 * len(rows))
        steps, total = 0, 0.0
        per_epoch = -(-len(rows) // cfg.head_batch)
        for _ in range(max(cfg.head_epochs, -(-cfg.head_min_steps // per_epoch))):
            perm = torch.randperm(len(rows))
            for i in range(0, len(rows), cfg.head_batch):
                idx = perm[i:i + cfg.head_batch].to(self.device)
                logit, _ = head(x[idx])
                loss = ctr_loss(logit, y[idx]) + pull * sum(
                    ((p - a) ** 2).sum() for p, a in zip(head.parameters(), anchor, strict=True))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
                total += float(loss.detach())
        head.eval()
        for p in head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            logit, feats = head(x)
        probs = torch.sigmoid(logit).double().cpu().numpy()
        post = Posterior.of_head(head, cfg.prior_std)
        post.observe(feats.double().cpu().numpy(), probs)
        p = np.clip(probs, 1e-6, 1.0)
        residual = cfg.style_residual * (y.double().cpu().numpy() - p) / p  # ~ log(CTR / p): what the head missed
        has = [r.ctx is not None for r in rows]
        policy = StylePolicy.fit([r.ctx for r in rows if r.ctx is not None],
                                 [r.style for r in rows if r.ctx is not None],
                                 (np.log(p) + residual)[has], temperature=cfg.style_temperature,
                                 max_tilt=cfg.max_style_tilt, residuals=residual[has] if cfg.style_residual else None)
        self._candidate = (head, post, policy)
        self.refits += 1
        self.steps += steps
        self.steps_since_eval += steps
        return steps, total / max(1, steps)

    def style_probs_of(self, rows: Sequence[TrainRow], policy: StylePolicy | None) -> list[dict[str, float]]:
        """p(style | prompt) as serving samples it: the LM's, tilted by ``policy`` (cached per impression)."""
        todo = [r for r in rows if r.impression_id not in self._p0]
        if todo:
            self.model.eval()
            try:
                for r, d in zip(todo, style_distribution(self.model, self.tokenizer, [r.prompt for r in todo]),
                                strict=True):
                    self._p0[r.impression_id] = d
            finally:
                self.model.train()
        keep = {r.impression_id for r in self.heldout}
        if len(self._p0) > 2 * max(1, len(keep)):
            self._p0 = {k: v for k, v in self._p0.items() if k in keep}
        out = []
        for r in rows:
            p0 = self._p0[r.impression_id]
            out.append(policy.tilt(r.ctx, p0) if policy is not None and r.ctx is not None else p0)
        return out

    def _evaluate_head(self) -> EvalReport:
        t0 = time.perf_counter()
        cfg = self.cfg
        assert self._candidate is not None
        head, _, policy = self._candidate
        rows = [r for r in self.heldout if r.embedding is not None and r.trunk == self.trunk]
        y = [r.clicked for r in rows]
        cand_p: list[float] = []
        serv_p: list[float] = []
        if rows:
            x = torch.from_numpy(np.stack([_vec(r) for r in rows]).astype(np.float32)).to(self.device)
            with torch.no_grad():
                cand_p = torch.sigmoid(head(x)[0]).tolist()
                serv_p = torch.sigmoid(self.model.ctr_head.float()(x)[0]).tolist()
        serv_d = self.style_probs_of(rows, self.style_policy)
        cand_d = self.style_probs_of(rows, policy)
        kls = [sum(p * math.log(p / max(c.get(st, 0.0), 1e-12)) for st, p in s_.items() if p > 0)
               for s_, c in zip(serv_d, cand_d, strict=True)]
        kl = float(np.mean(kls)) if kls else float("nan")
        ope = ope_serving = None
        logged = [i for i, r in enumerate(rows) if r.propensity is not None]
        if logged:
            rewards = [float(rows[i].clicked) for i in logged]
            ope = estimate(rewards, [cand_d[i][rows[i].style] / float(rows[i].propensity or 1.0) for i in logged],
                           clip=cfg.ips_clip)
            ope_serving = estimate(rewards, [serv_d[i][rows[i].style] / float(rows[i].propensity or 1.0)
                                             for i in logged], clip=cfg.ips_clip)
        rep = EvalReport(
            n=len(rows), candidate_logloss=_logloss(cand_p, y), serving_logloss=_logloss(serv_p, y),
            candidate_auc=auc(cand_p, y), serving_auc=auc(serv_p, y), kl=kl, offpolicy=ope,
            offpolicy_serving=ope_serving, publish=False, logloss_se=_paired_se(cand_p, serv_p, y),
        )
        self._gate(rep, cfg.max_style_kl, "KL of p(style) to serving", "max_style_kl")
        rep.seconds = time.perf_counter() - t0
        return rep

    def _gate(self, rep: EvalReport, max_kl: float, kl_name: str, setting: str) -> None:
        cfg = self.cfg
        ope = rep.offpolicy
        if rep.n < cfg.min_heldout:
            rep.codes.append("heldout_small")
            rep.reasons.append(f"held-out slice has {rep.n} rows < min_heldout {cfg.min_heldout}")
        else:
            margin = cfg.gate_z * rep.logloss_se if math.isfinite(rep.logloss_se) else 0.0
            if not rep.candidate_logloss <= rep.serving_logloss + cfg.logloss_tolerance + margin:
                rep.codes.append("logloss")
                rep.reasons.append(f"held-out CTR log-loss {rep.candidate_logloss:.4f} > serving "
                                   f"{rep.serving_logloss:.4f} + {cfg.logloss_tolerance} + {cfg.gate_z} x "
                                   f"{rep.logloss_se:.4f} (standard error)")
            if not rep.kl <= max_kl:
                rep.codes.append("kl")
                rep.reasons.append(f"{kl_name} {rep.kl:.4f} nats > {setting} {max_kl}")
            if cfg.min_snips_ratio > 0:
                if ope is None or ope.n == 0:
                    rep.codes.append("snips")
                    rep.reasons.append("no logged propensities for the SNIPS gate")
                elif not ope.snips >= cfg.min_snips_ratio * ope.logged_ctr:
                    rep.codes.append("snips")
                    rep.reasons.append(f"SNIPS CTR {ope.snips:.4f} < {cfg.min_snips_ratio} x logged "
                                       f"{ope.logged_ctr:.4f}")
        rep.publish = not rep.reasons

    def _publish_head(self, ev: EvalReport, ope_txt: str) -> ModelVersion:
        assert self._candidate is not None
        head, post, policy = self._candidate
        self._candidate = None
        version = new_version()
        parent = self.serving_version
        # stored as the parent is, so the trunk stays bit-identical (the logged embeddings stay valid)
        dtype = _stored_dtype(self.registry.path_of(parent))
        self.model.ctr_head.load_state_dict({k: v.to(dtype).float() for k, v in head.state_dict().items()})
        training = {"kind": "online-head", "trunk": self.trunk, "refits": self.refits,
                    "records_trained": self.records_trained, "window": len(self._window),
                    "config": self.cfg.model_dump(mode="json")}
        meta = ModelMeta(name=self.cfg.model_name, version=version, parent_version=parent,
                         tokenizer=self.meta.tokenizer, data_hash=None, metrics=ev.metrics(), training=training)
        path = self.registry.path_of(version)
        save_student(self.model, self.tokenizer, path, meta, storage_dtype=None if dtype == torch.float32 else dtype)
        post.save(path)
        policy.save(path)
        mv = self.registry.add(version, parent, ev.metrics(), promote=True,
                               reason=f"online trainer (head): logloss {ev.candidate_logloss:.4f} <= "
                                      f"{ev.serving_logloss:.4f}, KL(style) {ev.kl:.4f}")
        self.meta = meta
        self.serving_version = version
        self.style_policy, self.posterior = policy, post
        self.published.append(mv)
        log.info("published %s (parent %s, heads only): held-out logloss %.4f vs %.4f, KL(style) %.4f, %s", version,
                 parent, ev.candidate_logloss, ev.serving_logloss, ev.kl, ope_txt)
        return mv

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def _ctr_probs(self, model: StudentModel, rows: Sequence[TrainRow]) -> list[float]:
        """CTR probability per row (no LM logits computed)."""
        probs: list[float] = []
        for i in range(0, len(rows), EVAL_BATCH):
            b = self._batch(rows[i:i + EVAL_BATCH])
            rix = torch.arange(b["input_ids"].shape[0], device=self.device)
            with self._autocast():
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1,
                            return_hidden=True)
                assert out.hidden_states is not None
                logit, _ = model.ctr_from_hidden(out.hidden_states[rix, b["eos_index"]])
            probs.extend(torch.sigmoid(logit.float()).tolist())
        return probs

    @torch.no_grad()
    def _joint_pass(self, rows: Sequence[TrainRow]) -> tuple[list[float], list[float], float]:
        """One forward of the candidate and of the serving version per chunk: their CTR
        probabilities and the mean KL(serving || candidate) per copy token."""
        cand: list[float] = []
        serv: list[float] = []
        tot, n = 0.0, 0
        for i in range(0, len(rows), EVAL_BATCH):
            b = self._batch(rows[i:i + EVAL_BATCH])
            rix = torch.arange(b["input_ids"].shape[0], device=self.device)
            with self._autocast():
                oc = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
                oa = self.anchor(input_ids=b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
                assert oc.hidden_states is not None and oa.hidden_states is not None
                lc, _ = self.model.ctr_from_hidden(oc.hidden_states[rix, b["eos_index"]])
                la, _ = self.anchor.ctr_from_hidden(oa.hidden_states[rix, b["eos_index"]])
            assert oc.logits is not None and oa.logits is not None
            cand.extend(torch.sigmoid(lc.float()).tolist())
            serv.extend(torch.sigmoid(la.float()).tolist())
            k = int((b["labels"][:, 1:] != -100).sum())
            tot += float(kd_loss(oc.logits.float(), oa.logits.float(), b["labels"], temperature=1.0, lam=1.0).kl) * k
            n += k
        return cand, serv, (tot / n if n else float("nan"))

    def evaluate(self) -> EvalReport:
        """Candidate (the model being trained) vs serving version on the held-out slice, and the gate.
        The newest ``KL_ROWS`` rows get one forward of each model (CTR + KL); older rows the
        candidate's CTR only, the serving version's CTR being cached per row."""
        t0 = time.perf_counter()
        cfg = self.cfg
        rows = list(self.heldout)
        recent = rows[-KL_ROWS:]
        older = rows[:len(rows) - len(recent)]
        self.model.eval()
        try:
            cand_recent, serv_recent, kl = self._joint_pass(recent)
            cand_older = self._ctr_probs(self.model, older)
            todo = [r for r in older if r.impression_id not in self._serving_cache]
            for r, p in zip(todo, self._ctr_probs(self.anchor, todo), strict=True):
                self._serving_cache[r.impression_id] = p
            for r, p in zip(recent, serv_recent, strict=True):
                self._serving_cache[r.impression_id] = p
            keep = {r.impression_id for r in rows}
            self._serving_cache = {k: v for k, v in self._serving_cache.items() if k in keep}
            serv_p = [self._serving_cache[r.impression_id] for r in rows]
            cand_p = cand_older + cand_recent
        finally:
            self.model.train()
        y = [r.clicked for r in rows]
        ope, ope_serving = self._offpolicy(rows)
        rep = EvalReport(
            n=len(rows), candidate_logloss=_logloss(cand_p, y), serving_logloss=_logloss(serv_p, y),
            candidate_auc=auc(cand_p, y), serving_auc=auc(serv_p, y), kl=kl, offpolicy=ope,
            offpolicy_serving=ope_serving, publish=False, logloss_se=_paired_se(cand_p, serv_p, y),
        )
        self._gate(rep, cfg.max_kl, "KL to serving per copy token", "max_kl")
        rep.seconds = time.perf_counter() - t0
        return rep

    def _offpolicy(self, rows: Sequence[TrainRow]) -> tuple[OffPolicyEstimate | None, OffPolicyEstimate | None]:
        """IPS/SNIPS of the candidate's and the serving version's CTR on the held-out rows that
        carry a logged propensity. The action is the copy's style: ``w = p_model(style | prompt) /
        propensity`` (see docs/feedback.md for what this approximates)."""
        logged = [r for r in rows if r.propensity is not None]
        if not logged:
            return None, None
        prompts = [r.prompt for r in logged]
        rewards = [float(r.clicked) for r in logged]
        out: list[OffPolicyEstimate] = []
        self.model.eval()
        try:
            for m in (self.model, self.anchor):
                probs = style_distribution(m, self.tokenizer, prompts)
                ratios = [p[r.style] / float(r.propensity or 1.0) for p, r in zip(probs, logged, strict=True)]
                out.append(estimate(rewards, ratios, clip=self.cfg.ips_clip))
        finally:
            self.model.train()
        return out[0], out[1]

    # -- publication -----------------------------------------------------------------------------
    def maybe_publish(self, force_eval: bool = False) -> ModelVersion | None:
        """Every ``eval_every`` steps (or now with ``force_eval``): evaluate, and if the gate passes
        save a new version (parent: the serving one), make it current in the registry and return its
        ModelVersion record (the caller announces it on ``livecopy.model-updates``)."""
        if self.follow_registry():
            return None
        head = self.cfg.mode == "head"
        if head:
            if self._candidate is None:
                return None
        elif self.steps_since_eval == 0 or (self.steps_since_eval < self.cfg.eval_every and not force_eval):
            return None
        ev = self._evaluate_head() if head else self.evaluate()
        self.last_eval = ev
        self.steps_since_eval = 0
        ope = ev.offpolicy
        ope_txt = (f"off-policy CTR estimate SNIPS {ope.snips:.4f} IPS {ope.ips:.4f} (serving SNIPS "
                   f"{ev.offpolicy_serving.snips if ev.offpolicy_serving else float('nan'):.4f}), logged CTR "
                   f"{ope.logged_ctr:.4f}, ess {ope.ess:.0f}/{ope.n}" if ope is not None else "no propensities")
        if not ev.publish:
            log.info("not publishing after %d steps: %s (%s)", self.steps, "; ".join(ev.reasons), ope_txt)
            self._candidate = None
            return None
        return self._publish_head(ev, ope_txt) if head else self._publish(ev, ope_txt)

    def _publish(self, ev: EvalReport, ope_txt: str) -> ModelVersion:
        version = new_version()
        parent = self.serving_version
        metrics = ev.metrics()
        training = {"kind": "online-feedback", "steps": self.steps, "records_trained": self.records_trained,
                    "config": self.cfg.model_dump(mode="json")}
        meta = ModelMeta(name=self.cfg.model_name, version=version, parent_version=parent,
                         tokenizer=self.meta.tokenizer, data_hash=None, metrics=metrics, training=training)
        save_student(self.model, self.tokenizer, self.registry.path_of(version), meta)
        mv = self.registry.add(version, parent, metrics, promote=True,
                               reason=f"online trainer: logloss {ev.candidate_logloss:.4f} <= "
                                      f"{ev.serving_logloss:.4f}, KL {ev.kl:.4f}")
        self.meta = meta
        self.serving_version = version
        self.anchor = self._frozen_copy()
        self._serving_cache = {}
        self.published.append(mv)
        log.info("published %s (parent %s): held-out logloss %.4f vs %.4f, KL %.4f, %s", version, parent,
                 ev.candidate_logloss, ev.serving_logloss, ev.kl, ope_txt)
        return mv

    # -- scoring helpers -------------------------------------------------------------------------
    def score(self, prompts: Sequence[str], copies: Sequence[str], styles: Sequence[str | None] | None = None,
              ) -> list[float]:
        """The trained model's CTR probability per (prompt, copy)."""
        self.model.eval()
        try:
            return score_ctr(self.model, self.tokenizer, prompts, copies, styles)
        finally:
            self.model.train()

    def style_probs(self, prompts: Sequence[str]) -> list[dict[str, float]]:
        """p(style | prompt) of the trained model."""
        self.model.eval()
        try:
            return style_distribution(self.model, self.tokenizer, prompts)
        finally:
            self.model.train()
