"""Student distillation (``livecopy train student``).

Student: a fresh :class:`models.student.StudentModel` on the teacher's tokenizer trimmed to the
corpus, trained on the same rows with

    loss = CE(copy | prompt)                                   # corpus incl. teacher-written copy
         + lam * T^2 * KL(teacher_T || student_T)              # on rows with cached teacher top-k
         + ctr_weight * BCE(ctr_head(h_EOS), click_prior)      # all rows, incl. CTR-only rows

``kd`` selects the distillation: ``both`` (default), ``seq`` (teacher-written copy only, no
logits), ``logit`` (logits only, no teacher-written copy), ``none``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from models.corpus import Corpus, CorpusConfig, build_corpus
from models.sequences import IGNORE_INDEX, encode_text, special_ids
from models.student import ModelMeta, StudentConfig, StudentModel, new_version, save_student, utc_now
from models.text.context import build_prompt, product_context
from models.training.common import (
    EncodedRows,
    Progress,
    autocast,
    cosine_lr,
    ctr_metrics,
    eval_subset,
    heldout_nll,
    jsonable,
    plot_losses,
    seed_everything,
    to_device,
)
from models.training.losses import ctr_loss, lm_ce, sparse_kd_kl

log = logging.getLogger(__name__)



@dataclass
class StudentTrainConfig:
    teacher: str | None = "runs/teacher"
    base: str | None = None  # tokenizer source when no teacher directory is used
    kd: str = "both"  # both | seq | logit | none
    out: str = "runs/student"
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1.5e-3
    warmup: int = 200
    weight_decay: float = 0.01
    max_len: int = 160
    n_layer: int = 6
    n_embd: int = 256
    n_head: int = 4
    ctr_hidden: int = 64
    dropout: float = 0.05
    temperature: float = 2.0
    lam: float = 0.5
    ctr_weight: float = 1.0
    mismatch_share: float | None = 0.25  # overrides corpus.mismatch_share (more CTR-only off-product rows)
    kd_rows: int = 8000
    kd_topk: int = 20
    kd_batch_share: float = 0.5
    eval_every: int = 250
    eval_rows: int = 512
    seed: int = 0
    bf16: bool = False  # CPU: fp32 (bf16 autocast does not pay for matrices this small); CUDA: bf16
    device: str = "cpu"
    name: str = "livecopy-student"
    version: str | None = None
    parent_version: str | None = None
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def student_tokenizer(teacher_tok: Any, corpus: Corpus, catalog_prompts: Sequence[str]) -> tuple[Any, list[int]]:
    """The trimmed teacher tokenizer for the student (train text + catalog prompts)."""
    from models.tokenizer import trim_tokenizer, wrap_fast

    texts: list[str] = []
    for r in corpus.train:
        texts.append(r.prompt)
        texts.append(r.copy)
    texts.extend(catalog_prompts)
    trimmed, vmap = trim_tokenizer(teacher_tok.backend_tokenizer, texts)
    return wrap_fast(trimmed), vmap


def _teacher_tokenizer(cfg: StudentTrainConfig) -> tuple[Any, str, str | None]:
    """(teacher fast tokenizer, description, teacher version)."""
    from models.tokenizer import load_tokenizer, wrap_fast

    if cfg.teacher and Path(cfg.teacher, "tokenizer.json").exists():
        meta = ModelMeta.read(cfg.teacher) if Path(cfg.teacher, "livecopy.json").exists() else None
        return load_tokenizer(cfg.teacher), f"teacher:{cfg.teacher}", meta.version if meta else None
    if cfg.kd in ("both", "logit"):
        raise FileNotFoundError(
            f"logit distillation needs a fine-tuned teacher at {cfg.teacher}: run `livecopy train teacher` "
            "first, or use --kd seq"
        )
    from transformers import AutoTokenizer

    from models.teacher import _resolve_gguf, default_base_path

    src = Path(cfg.base) if cfg.base else default_base_path()
    gguf = _resolve_gguf(src)
    if gguf is not None:
        t = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    else:
        t = AutoTokenizer.from_pretrained(str(src), local_files_only=True)
    from tokenizers import AddedToken

    from core.styles import STYLE_TOKENS
    from models.sequences import EOS_TOKEN

    raw = t.backend_tokenizer
    new = [x for x in (EOS_TOKEN, *STYLE_TOKENS) if raw.token_to_id(x) is None]
    raw.add_special_tokens([AddedToken(x, special=True, normalized=False) for x in new])
    return wrap_fast(raw), f"base:{src}", None


def build_kd_cache(
    teacher_dir: str,
    student_tok: Any,
    vmap: Sequence[int],
    rows: EncodedRows,
    row_idx: Sequence[int],
    *,
    topk: int,
    max_len: int,
    cache_dir: Path,
    key: str,
    device: torch.device,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Teacher top-k logits (restricted to the student vocabulary) at every labelled position of
    the given rows: ``row -> (positions, ids (n, k) int, logits (n, k) fp16)``; cached as
    safetensors under ``cache_dir/key``."""
    path = cache_dir / f"kd-{key}.safetensors"
    if path.exists():
        data = load_file(str(path))
        return _unpack_kd(data)
    from models.teacher import load_teacher

    teacher = load_teacher(teacher_dir, device=str(device))
    tsid = special_ids(teacher.tokenizer)
    ssid = special_ids(student_tok)
    vmap_t = torch.tensor(list(vmap), dtype=torch.long, device=device)
    _check_same_tokenization(teacher.tokenizer, student_tok, vmap, rows, list(row_idx[:64]))
    packed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    teacher.model.eval()
    for s in range(0, len(row_idx), batch_size):
        idx = list(row_idx[s : s + batch_size])
        b = rows.batch(idx, ssid, max_len)
        t_ids = vmap_t[b["input_ids"].to(device)]
        t_ids = torch.where(b["attention_mask"].to(device).bool(), t_ids, torch.full_like(t_ids, tsid.pad))
        with torch.no_grad(), autocast(device, True):
            logits = teacher.model(input_ids=t_ids, attention_mask=b["attention_mask"].to(device)).logits
        logits = logits.float().index_select(-1, vmap_t)  # (B, L, V_student)
        labels = b["labels"].to(device)
        for j, r in enumerate(idx):
            pos = (labels[j, 1:] != IGNORE_INDEX).nonzero().squeeze(1)  # logits positions
            if pos.numel() == 0:
                continue
            vals, ids = logits[j, pos].topk(topk, dim=-1)
            packed[r] = (pos.cpu().to(torch.int32), ids.cpu().to(torch.int32), vals.cpu().to(torch.float16))
        if progress:
            progress(min(s + batch_size, len(row_idx)), len(row_idx), {})
    cache_dir.mkdir(parents=True, exist_ok=True)
    save_file(_pack_kd(packed), str(path))
    del teacher
    return packed


def _check_same_tokenization(
    teacher_tok: Any, student_tok: Any, vmap: Sequence[int], rows: EncodedRows, idx: Sequence[int]
) -> None:
    """The student's ids mapped through ``vmap`` must be the teacher's own ids for the same text."""
    for i in idx:
        for ids in (rows.prompt_ids[i], rows.copy_ids[i]):
            text = student_tok.decode(ids)
            mine = [vmap[t] for t in ids]
            theirs = encode_text(teacher_tok, [text])[0]
            if mine != theirs:
                raise ValueError(f"student and teacher tokenize {text[:60]!r} differently")


def _pack_kd(packed: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    rows = sorted(packed)
    lens = [packed[r][0].numel() for r in rows]
    return {
        "rows": torch.tensor(rows, dtype=torch.int64),
        "lens": torch.tensor(lens, dtype=torch.int64),
        "pos": torch.cat([packed[r][0] for r in rows]) if rows else torch.zeros(0, dtype=torch.int32),
        "ids": torch.cat([packed[r][1] for r in rows]) if rows else torch.zeros((0, 1), dtype=torch.int32),
        "logits": torch.cat([packed[r][2] for r in rows]) if rows else torch.zeros((0, 1), dtype=torch.float16),
    }


def _unpack_kd(data: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    out: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    off = 0
    for r, n in zip(data["rows"].tolist(), data["lens"].tolist(), strict=True):
        out[int(r)] = (data["pos"][off : off + n], data["ids"][off : off + n], data["logits"][off : off + n])
        off += n
    return out


def _kd_targets(
    idx: Sequence[int], kd: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], width: int, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, width-1, k) teacher ids/logits aligned with the student's logits[:, :-1], and a mask."""
    n = len(idx)
    ids = torch.full((n, width - 1, k), -1, dtype=torch.long)
    vals = torch.zeros((n, width - 1, k), dtype=torch.float32)
    valid = torch.zeros((n, width - 1), dtype=torch.bool)
    for j, r in enumerate(idx):
        entry = kd.get(r)
        if entry is None:
            continue
        pos, tid, tv = entry
        keep = pos < width - 1
        p = pos[keep].long()
        ids[j, p] = tid[keep].long()
        vals[j, p] = tv[keep].float()
        valid[j, p] = True
    return ids, vals, valid


def _init_embeddings_from_teacher(model: StudentModel, teacher_dir: str, vmap: Sequence[int]) -> None:
    """Initialise the student's token embeddings with a PCA projection of the teacher's rows
    (scaled to the student's init std): related tokens start out close."""
    from safetensors import safe_open

    path = Path(teacher_dir) / "model.safetensors"
    if not path.exists():
        return
    with safe_open(str(path), framework="pt") as f:
        key = next((k for k in f.keys() if k.endswith("embed_tokens.weight")), None)  # noqa: SIM118
        if key is None:
            return
        w = f.get_tensor(key).float()[torch.tensor(list(vmap))]
    d = model.config.n_embd
    if w.shape[1] < d or w.shape[0] < d:
        return
    w = w - w.mean(0, keepdim=True)
    _, _, v = torch.pca_lowrank(w, q=d, center=False, niter=4)
    proj = w @ v[:, :d]
    proj = proj / proj.std() * model.config.initializer_range
    with torch.no_grad():
        model.transformer.wte.weight.copy_(proj)


def train_student(cfg: StudentTrainConfig, progress: Progress | None = None,
                  kd_progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Distil the student; writes ``cfg.out`` (checkpoint, loss PNG, history). Returns
    ``(path, metrics)``."""
    from core.catalog import Catalog

    if cfg.kd not in ("both", "seq", "logit", "none"):
        raise ValueError(f"kd must be both|seq|logit|none, not {cfg.kd!r}")
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    t0 = time.monotonic()
    ccfg = CorpusConfig(**asdict(cfg.corpus))
    if cfg.mismatch_share is not None:
        ccfg.mismatch_share = cfg.mismatch_share
    if cfg.kd in ("logit", "none"):
        ccfg.teacher_share = 0.0
    corpus = build_corpus(ccfg)
    teacher_tok, tok_source, teacher_version = _teacher_tokenizer(cfg)
    cat = Catalog.generate(ccfg.catalog_size, ccfg.catalog_seed)
    catalog_prompts = [build_prompt(product_context(p)) for p in cat]
    tok, vmap = student_tokenizer(teacher_tok, corpus, catalog_prompts)
    sid = special_ids(tok)
    enc = EncodedRows.build(tok, corpus.train)
    held_rows = corpus.heldout
    held = EncodedRows.build(tok, eval_subset(held_rows, cfg.eval_rows, cfg.seed))

    config = StudentConfig.small(
        len(tok), n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, ctr_hidden=cfg.ctr_hidden,
        dropout=cfg.dropout, eos_token_id=sid.eos, pad_token_id=sid.pad, n_positions=max(192, cfg.max_len),
    )
    model = StudentModel(config)
    if cfg.teacher and Path(cfg.teacher, "model.safetensors").exists():
        _init_embeddings_from_teacher(model, cfg.teacher, vmap)
    model.to(device)  # type: ignore[arg-type]

    kd: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    kd_idx: list[int] = []
    use_logits = cfg.kd in ("both", "logit") and cfg.lam > 0
    if use_logits:
        assert cfg.teacher is not None
        lm_rows = [i for i in range(len(enc)) if enc.lm[i]]
        kd_idx = sorted(random.Random(cfg.seed + 1).sample(lm_rows, min(cfg.kd_rows, len(lm_rows))))
        key = hashlib.sha256(
            json.dumps([corpus.data_hash(), teacher_version, str(cfg.teacher), cfg.kd_topk, cfg.max_len,
                        kd_idx[:50], len(kd_idx), len(tok)]).encode()
        ).hexdigest()[:16]
        kd = build_kd_cache(
            cfg.teacher, tok, vmap, enc, kd_idx, topk=cfg.kd_topk, max_len=cfg.max_len,
            cache_dir=Path(cfg.out).parent / "kd_cache", key=key, device=device, progress=kd_progress,
        )
        kd_idx = sorted(kd)

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "ln" in n_ or "norm" in n_ or "wpe" in n_ else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    rng = random.Random(cfg.seed)
    history: dict[str, list[tuple[int, float]]] = {"train_ce": [], "train_kl": [], "train_ctr": [], "heldout_ce": []}
    ema: dict[str, float] = {}
    n_kd = round(cfg.batch_size * cfg.kd_batch_share) if kd_idx else 0
    for step in range(cfg.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup)
        idx = [rng.choice(kd_idx) for _ in range(n_kd)] + [
            rng.randrange(len(enc)) for _ in range(cfg.batch_size - n_kd)
        ]
        b = to_device(enc.batch(idx, sid, cfg.max_len), device)
        with autocast(device, cfg.bf16):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
        logits = out.logits.float()
        ce = lm_ce(logits, b["labels"])
        h = out.hidden_states[torch.arange(len(idx), device=device), b["eos_index"]].float()
        ctr_logit, _ = model.ctr_from_hidden(h)
        l_ctr = ctr_loss(ctr_logit, b["click_p"])
        loss = ce + cfg.ctr_weight * l_ctr
        kl = torch.zeros((), device=device)
        if n_kd:
            t_ids, t_vals, t_valid = _kd_targets(idx, kd, logits.shape[1], cfg.kd_topk)
            t_ids, t_vals, t_valid = t_ids.to(device), t_vals.to(device), t_valid.to(device)
            sl = logits[:, :-1][t_valid]
            kl = sparse_kd_kl(sl, t_ids[t_valid], t_vals[t_valid], torch.ones(sl.shape[0], dtype=torch.bool,
                                                                              device=device), cfg.temperature)
            loss = loss + cfg.lam * cfg.temperature**2 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for name, v in (("ce", ce.item()), ("kl", kl.item()), ("ctr", l_ctr.item())):
            ema[name] = v if name not in ema else 0.95 * ema[name] + 0.05 * v
        if (step + 1) % 10 == 0:
            history["train_ce"].append((step + 1, ema["ce"]))
            history["train_ctr"].append((step + 1, ema["ctr"]))
            if n_kd:
                history["train_kl"].append((step + 1, ema["kl"]))
        logs = dict(ema)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hres = heldout_nll(model, held, sid, device, cfg.max_len)
            history["heldout_ce"].append((step + 1, hres["copy_nll"]))
            logs["heldout"] = hres["copy_nll"]
            log.info("student step %d ce %.4f kl %.4f ctr %.4f heldout %.4f", step + 1, ema["ce"], ema["kl"],
                     ema["ctr"], hres["copy_nll"])
        if progress:
            progress(step + 1, cfg.steps, logs)
    model.eval()
    train_s = time.monotonic() - t0

    # final held-out metrics on the whole held-out split
    held_all = EncodedRows.build(tok, held_rows)
    hres = heldout_nll(model, held_all, sid, device, cfg.max_len)
    ctr_res = ctr_metrics(model, held_all, sid, device, cfg.max_len)
    if ccfg.mismatch_share != cfg.corpus.mismatch_share:
        # the same metrics on the held-out split at the corpus's own off-product share (comparable
        # across students trained with different shares)
        std_rows = EncodedRows.build(tok, build_corpus(cfg.corpus).heldout)
        std = ctr_metrics(model, std_rows, sid, device, cfg.max_len)
        ctr_res.update({f"{k}_mix{cfg.corpus.mismatch_share:g}": v for k, v in std.items()
                        if k in ("ctr_auc_heldout", "ctr_auc_prior_ceiling", "ctr_logloss_heldout")})
    metrics: dict[str, Any] = {
        "heldout_copy_ppl": hres["copy_ppl"], "heldout_copy_nll": hres["copy_nll"],
        "heldout_style_nll": hres["style_nll"], "heldout_copy_tokens": int(hres["copy_tokens"]),
        **ctr_res, **{f"params_{k}": v for k, v in model.num_parameters_split().items()},
        "train_seconds": round(train_s, 1),
    }
    meta = ModelMeta(
        name=cfg.name, version=cfg.version or new_version(), parent_version=cfg.parent_version,
        tokenizer={"type": "trimmed byte-level BPE (teacher merges subset)", "source": tok_source,
                   "vocab_size": len(tok), "teacher_vocab_size": len(teacher_tok)},
        data_hash=corpus.data_hash(), metrics=metrics,
        training={"kind": "student-distillation", "kd": cfg.kd, "teacher_version": teacher_version,
                  "config": jsonable(asdict(cfg)), "corpus": corpus.stats(),
                  "kd_rows": len(kd_idx), "created_at": utc_now()},
    )
    out_dir = Path(cfg.out)
    save_student(model, tok, out_dir, meta)
    plot_losses(history, out_dir.parent / f"{out_dir.name}-loss.png", f"student ({cfg.kd} KD)")
    (out_dir.parent / f"{out_dir.name}-history.json").write_text(json.dumps(history))
    return out_dir, meta.to_dict()
