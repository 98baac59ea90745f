"""Training: teacher fine-tuning and student distillation (used by ``livecopy train``).

Teacher: the pretrained base (SmolLM2-135M-Instruct by default) + style tokens, fully
fine-tuned with next-token CE on the training split (prompt masked), bf16 autocast.

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
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.context import build_prompt, product_context
from models.corpus import Corpus, CorpusConfig, Example, build_corpus
from models.data import IGNORE_INDEX, SpecialIds, assemble, encode_text, special_ids
from models.losses import ctr_loss, lm_ce, sparse_kd_kl
from models.student import ModelMeta, StudentConfig, StudentModel, new_version, save_student, utc_now

log = logging.getLogger(__name__)

Progress = Callable[[int, int, dict[str, float]], None]


# --------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast(device: torch.device, enabled: bool = True) -> Any:
    if not enabled:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    prog = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0)))


def auc(scores: Sequence[float], labels: Sequence[bool | int]) -> float:
    """ROC AUC by the rank statistic (ties averaged); NaN when the labels hold a single class
    (AUC is undefined there: use :func:`auc_or_none` for metrics that end up in JSON)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = s.argsort(kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_or_none(scores: Sequence[float], labels: Sequence[bool | int]) -> float | None:
    """:func:`auc`, or None when it is undefined (no positive or no negative label)."""
    v = auc(scores, labels)
    return None if math.isnan(v) else v


def plot_losses(history: dict[str, list[tuple[int, float]]], path: str | Path, title: str) -> Path:
    """Loss curves as a PNG (matplotlib's object API: no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, pts in history.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, label=name, marker="o" if len(pts) < 40 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(out))
    return out


@dataclass
class EncodedRows:
    """Pre-tokenized corpus rows (prompt ids, copy ids, style id, lm flag, CTR target)."""

    prompt_ids: list[list[int]]
    copy_ids: list[list[int]]
    style_ids: list[int]
    lm: list[bool]
    click_p: list[float]
    clicked: list[bool]

    @classmethod
    def build(cls, tokenizer: Any, rows: Sequence[Example]) -> EncodedRows:
        sid = special_ids(tokenizer)
        return cls(
            prompt_ids=encode_text(tokenizer, [r.prompt for r in rows]),
            copy_ids=encode_text(tokenizer, [r.copy for r in rows]),
            style_ids=[sid.styles[r.style] for r in rows],
            lm=[r.lm for r in rows],
            click_p=[r.click_p for r in rows],
            clicked=[r.clicked for r in rows],
        )

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def batch(self, idx: Sequence[int], sid: SpecialIds, max_len: int) -> dict[str, torch.Tensor]:
        b = assemble(
            [self.prompt_ids[i] for i in idx], [self.copy_ids[i] for i in idx], [self.style_ids[i] for i in idx],
            sid, max_len=max_len, lm_mask=[self.lm[i] for i in idx],
        )
        b["click_p"] = torch.tensor([self.click_p[i] for i in idx], dtype=torch.float32)
        b["clicked"] = torch.tensor([self.clicked[i] for i in idx], dtype=torch.bool)
        return b


def _to(b: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in b.items()}


@torch.no_grad()
def heldout_nll(
    model: Any, rows: EncodedRows, sid: SpecialIds, device: torch.device, max_len: int = 160,
    batch_size: int = 64, bf16: bool = False,
) -> dict[str, float]:
    """Copy NLL (copy tokens + EOS, given prompt and style; nats) and style NLL over ``rows``
    with ``lm`` set."""
    model.eval()
    idx = [i for i in range(len(rows)) if rows.lm[i]]
    tot_copy, n_copy, tot_style, n_rows = 0.0, 0, 0.0, 0
    for s in range(0, len(idx), batch_size):
        b = _to(rows.batch(idx[s : s + batch_size], sid, max_len), device)
        with autocast(device, bf16 and device.type == "cuda"):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        logits = logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.clamp_min(0).reshape(-1), reduction="none"
        ).view(tgt.shape)
        valid = tgt != IGNORE_INDEX
        r = torch.arange(tgt.shape[0], device=device)
        si = b["style_index"]
        style_nll = nll[r, si]
        valid[r, si] = False
        tot_copy += float((nll * valid).sum())
        n_copy += int(valid.sum())
        tot_style += float(style_nll.sum())
        n_rows += tgt.shape[0]
    return {
        "copy_nll": tot_copy / max(n_copy, 1), "copy_ppl": math.exp(tot_copy / max(n_copy, 1)),
        "copy_tokens": float(n_copy), "style_nll": tot_style / max(n_rows, 1),
    }


# --------------------------------------------------------------------------- teacher


@dataclass
class TeacherTrainConfig:
    base: str | None = None
    out: str = "runs/teacher"
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-4
    warmup: int = 20
    weight_decay: float = 0.0
    max_len: int = 160
    seed: int = 0
    eval_every: int = 40
    eval_rows: int = 256
    bf16: bool = True
    device: str = "cpu"
    lora_rank: int = 0  # 0: full fine-tune; > 0: LoRA on every linear layer (+ the added token rows)
    lora_alpha: float = 32.0
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def train_teacher(cfg: TeacherTrainConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Fine-tune the base LM on the corpus; writes ``cfg.out`` (+ loss PNG and history JSON)."""
    from models.teacher import add_livecopy_tokens, load_base, save_teacher
    from models.tokenizer import wrap_fast

    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    t0 = time.monotonic()
    base = load_base(cfg.base)
    model = base.model
    n_before = base.tokenizer.get_vocab_size(with_added_tokens=True)
    tok_raw = add_livecopy_tokens(model, base.tokenizer)
    tok = wrap_fast(tok_raw)
    new_ids = list(range(n_before, tok_raw.get_vocab_size(with_added_tokens=True)))
    sid = special_ids(tok)
    corpus = build_corpus(cfg.corpus)
    train_rows = [r for r in corpus.train if r.lm]
    enc = EncodedRows.build(tok, train_rows)
    held = EncodedRows.build(tok, _eval_subset(corpus.heldout, cfg.eval_rows, cfg.seed))
    model.to(device)
    model.config.use_cache = False
    if cfg.lora_rank > 0:
        from models.lora import add_lora, train_embedding_rows

        add_lora(model, cfg.lora_rank, cfg.lora_alpha)
        train_embedding_rows(model, new_ids)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
    else:
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    rng = random.Random(cfg.seed)
    history: dict[str, list[tuple[int, float]]] = {"train": [], "heldout": []}
    ema: float | None = None
    for step in range(cfg.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup)
        idx = [rng.randrange(len(enc)) for _ in range(cfg.batch_size)]
        b = _to(enc.batch(idx, sid, cfg.max_len), device)
        with autocast(device, cfg.bf16):
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = lm_ce(logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lv = loss.item()
        ema = lv if ema is None else 0.9 * ema + 0.1 * lv
        history["train"].append((step + 1, lv))
        logs = {"loss": ema}
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            h = heldout_nll(model, held, sid, device, cfg.max_len, bf16=cfg.bf16)
            history["heldout"].append((step + 1, h["copy_nll"]))
            logs["heldout"] = h["copy_nll"]
            log.info("teacher step %d loss %.4f heldout %.4f", step + 1, ema, h["copy_nll"])
        if progress:
            progress(step + 1, cfg.steps, logs)
    model.eval()
    out = Path(cfg.out)
    lora: dict[str, torch.Tensor] = {}
    if cfg.lora_rank > 0:
        from models.lora import merge_lora

        lora = merge_lora(model)
        h = heldout_nll(model, held, sid, device, cfg.max_len, bf16=cfg.bf16)  # the merged (saved) weights
        history["heldout"].append((cfg.steps, h["copy_nll"]))
    meta = ModelMeta(
        name="livecopy-teacher", version=new_version(), parent_version=None,
        tokenizer={"type": "byte-level BPE", "source": base.source, "vocab_size": len(tok)},
        data_hash=corpus.data_hash(),
        metrics={"heldout_copy_nll_subset": history["heldout"][-1][1] if history["heldout"] else None,
                 "params": sum(p.numel() for p in model.parameters()),
                 "train_seconds": round(time.monotonic() - t0, 1)},
        training={"kind": "teacher-lora" if cfg.lora_rank > 0 else "teacher-finetune",
                  "config": _jsonable(asdict(cfg)), "created_at": utc_now()},
    )
    model.config.use_cache = True
    save_teacher(model, tok_raw, out, meta)
    if lora:
        from models.lora import ADAPTER_FILE, save_adapter

        emb = model.get_input_embeddings().weight
        save_adapter(out / ADAPTER_FILE, lora, new_ids, emb[new_ids],
                     {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "base": base.source,
                      "teacher_version": meta.version, "added_tokens": [tok_raw.id_to_token(i) for i in new_ids]})
    plot_losses(history, out / "loss.png", "teacher fine-tuning")
    (out / "history.json").write_text(json.dumps(history))
    return meta.to_dict()


def teacher_from_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None) -> dict[str, Any]:
    """Rebuild a LoRA-fine-tuned teacher directory from its adapter directory (``adapter.safetensors``
    + ``livecopy.json``, as written by :func:`train_teacher`): load the base, add the livecopy
    tokens, merge the adapter, save. The result has the same weights as the directory the
    adapter was trained in (same base file, same dequantization)."""
    from models.lora import ADAPTER_FILE, apply_adapter
    from models.teacher import add_livecopy_tokens, load_base, save_teacher

    src = Path(adapter_dir)
    meta = ModelMeta.read(src)
    bt = load_base(base)
    tok_raw = add_livecopy_tokens(bt.model, bt.tokenizer)
    info = apply_adapter(bt.model, src / ADAPTER_FILE)
    bt.model.eval()
    meta.training = {**meta.training, "rebuilt_from_adapter": {"adapter": str(src / ADAPTER_FILE), "info": info,
                                                               "base": bt.source, "at": utc_now()}}
    save_teacher(bt.model, tok_raw, out, meta)
    for extra in (ADAPTER_FILE, "loss.png", "history.json"):
        if (src / extra).exists() and Path(out).resolve() != src.resolve():
            (Path(out) / extra).write_bytes((src / extra).read_bytes())
    return meta.to_dict()


def _eval_subset(rows: Sequence[Example], n: int, seed: int) -> list[Example]:
    lm = [r for r in rows if r.lm]
    if n <= 0 or n >= len(lm):
        return lm
    return random.Random(seed).sample(lm, n)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


# --------------------------------------------------------------------------- student


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

    from models.data import EOS_TOKEN
    from models.styles import STYLE_TOKENS

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
    from livecopy.catalog import Catalog

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
    held = EncodedRows.build(tok, _eval_subset(held_rows, cfg.eval_rows, cfg.seed))

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
        b = _to(enc.batch(idx, sid, cfg.max_len), device)
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
                  "config": _jsonable(asdict(cfg)), "corpus": corpus.stats(),
                  "kd_rows": len(kd_idx), "created_at": utc_now()},
    )
    out_dir = Path(cfg.out)
    save_student(model, tok, out_dir, meta)
    plot_losses(history, out_dir.parent / f"{out_dir.name}-loss.png", f"student ({cfg.kd} KD)")
    (out_dir.parent / f"{out_dir.name}-history.json").write_text(json.dumps(history))
    return out_dir, meta.to_dict()


@torch.no_grad()
def ctr_metrics(
    model: StudentModel, rows: EncodedRows, sid: SpecialIds, device: torch.device, max_len: int = 160,
    batch_size: int = 128,
) -> dict[str, float | None]:
    """CTR head on every row (incl. CTR-only rows): AUC against the sampled synthetic clicks,
    the AUC the prior's own probabilities reach on the same clicks (the ceiling), log loss and
    calibration. Both AUCs are None (JSON null, with a warning) when the rows' clicks are all one
    class -- AUC is undefined there; ``ctr_clicks`` says how many clicks the rows hold."""
    model.eval()
    preds: list[float] = []
    for s in range(0, len(rows), batch_size):
        idx = list(range(s, min(s + batch_size, len(rows))))
        b = _to(rows.batch(idx, sid, max_len), device)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=1,
                    return_hidden=True)
        h = out.hidden_states[torch.arange(len(idx), device=device), b["eos_index"]].float()
        logit, _ = model.ctr_from_hidden(h)
        preds.extend(torch.sigmoid(logit).tolist())
    y = np.asarray(rows.clicked, dtype=bool)
    p = np.clip(np.asarray(preds), 1e-6, 1 - 1e-6)
    prior = np.asarray(rows.click_p)
    n_clicks = int(y.sum())
    if n_clicks in (0, len(y)):
        log.warning("CTR AUC undefined: %d of %d held-out rows clicked (one class only)", n_clicks, len(y))
    return {
        "ctr_auc_heldout": auc_or_none(p.tolist(), y.tolist()),
        "ctr_auc_prior_ceiling": auc_or_none(prior.tolist(), y.tolist()),
        "ctr_logloss_heldout": float(-(y * np.log(p) + (~y) * np.log(1 - p)).mean()),
        "ctr_mean_pred": float(p.mean()), "ctr_mean_clicked": float(y.mean()), "ctr_rows": float(len(y)),
        "ctr_clicks": float(n_clicks),
    }
