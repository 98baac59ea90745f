"""Student distillation (``livecopy train student``).

Student: a fresh :class:`models.student.StudentModel` on the teacher's tokenizer trimmed to the
corpus plus the slot tokens, trained on the slotted corpus with

    loss = CE(copy | prompt)                                   # incl. teacher-written copy, delexicalized
         + ctr_weight * BCE(ctr_head(h_EOS), click_prior)      # all rows

``kd`` selects the distillation: ``seq`` (default: sequence-level, the teacher-written copy) or
``none`` (templates only). Logit distillation is gone with the slotted corpus: the teacher
cannot read slots (docs/models.md).

``init_from``: fine-tune a shipped student instead of starting fresh (its tokenizer gains the slot
tokens, their embeddings start at the mean row); the CPU path to a new version in under an hour.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.corpus import Corpus, CorpusConfig, build_corpus
from models.sequences import special_ids
from models.student import (
    LoadedStudent,
    ModelMeta,
    StudentConfig,
    StudentModel,
    load_student,
    new_version,
    save_student,
    utc_now,
)
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
from models.training.losses import ctr_loss, lm_ce

log = logging.getLogger(__name__)



@dataclass
class StudentTrainConfig:
    teacher: str | None = "runs/teacher"
    base: str | None = None  # tokenizer source when no teacher directory is used
    kd: str = "seq"  # seq | none (both | logit: refused for the slotted corpus)
    init_from: str | None = None  # a student checkpoint to fine-tune (e.g. models/shipped/livecopy-student)
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
    ctr_weight: float = 1.0
    eval_every: int = 250
    eval_rows: int = 512
    seed: int = 0
    bf16: bool = False  # CPU: fp32 (bf16 autocast does not pay for matrices this small); CUDA: bf16
    device: str = "cpu"
    name: str = "livecopy-student"
    version: str | None = None
    parent_version: str | None = None
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


def add_slot_tokens(tok: Any) -> int:
    """Add the slot tokens (``{title}``, ...) as whole tokens (not special: decoding keeps them);
    returns how many were new."""
    from models.text.slots import SLOT_TOKENS

    missing = [t for t in SLOT_TOKENS if t not in tok.get_vocab()]
    return int(tok.add_tokens(missing)) if missing else 0


def student_tokenizer(teacher_tok: Any, corpus: Corpus, catalog_prompts: Sequence[str]) -> tuple[Any, list[int]]:
    """The trimmed teacher tokenizer for the student (train text + catalog prompts) plus the slot
    tokens (``vocab_map`` covers the trimmed part)."""
    from models.text.slots import SLOT_RE
    from models.tokenizer import trim_tokenizer, wrap_fast

    texts: list[str] = []
    for r in corpus.train:
        texts.append(r.prompt)
        texts.append(SLOT_RE.sub(" ", r.copy))
    texts.extend(catalog_prompts)
    trimmed, vmap = trim_tokenizer(teacher_tok.backend_tokenizer, texts)
    tok = wrap_fast(trimmed)
    add_slot_tokens(tok)
    return tok, vmap


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
    with torch.no_grad():  # the rows past the trimmed vocabulary (slot tokens) keep their init
        model.transformer.wte.weight[: proj.shape[0]].copy_(proj)


def train_student(cfg: StudentTrainConfig, progress: Progress | None = None) -> tuple[Path, dict[str, Any]]:
    """Distil the student; writes ``cfg.out`` (checkpoint, loss PNG, history). Returns
    ``(path, metrics)``."""
    from core.catalog import Catalog

    if cfg.kd not in ("seq", "none"):
        raise ValueError(f"kd must be seq|none for the slotted corpus (the teacher cannot read slots), not {cfg.kd!r}")
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    t0 = time.monotonic()
    ccfg = CorpusConfig(**asdict(cfg.corpus))
    if cfg.kd == "none":
        ccfg.teacher_share = 0.0
    corpus = build_corpus(ccfg)
    parent: LoadedStudent | None = None
    if cfg.init_from:
        parent = load_student(cfg.init_from, device=str(device))
        tok = parent.tokenizer
        add_slot_tokens(tok)
        tok_source = f"{parent.meta.tokenizer.get('source', '?')} + slot tokens (from {parent.meta.version})"
        teacher_version = parent.meta.training.get("teacher_version")
        teacher_vocab = parent.meta.tokenizer.get("teacher_vocab_size")
    else:
        teacher_tok, tok_source, teacher_version = _teacher_tokenizer(cfg)
        teacher_vocab = len(teacher_tok)
        cat = Catalog.generate(ccfg.catalog_size, ccfg.catalog_seed)
        catalog_prompts = [build_prompt(product_context(p)) for p in cat]
        tok, vmap = student_tokenizer(teacher_tok, corpus, catalog_prompts)
    sid = special_ids(tok)
    enc = EncodedRows.build(tok, corpus.train)
    held_rows = corpus.heldout
    held = EncodedRows.build(tok, eval_subset(held_rows, cfg.eval_rows, cfg.seed))

    if parent is not None:
        model = parent.model
        old = model.get_input_embeddings().weight.shape[0]
        if len(tok) != old:
            mean = model.get_input_embeddings().weight.detach()[:old].mean(0)
            model.resize_token_embeddings(len(tok), mean_resizing=False)
            with torch.no_grad():
                model.get_input_embeddings().weight[old:] = mean
        model.config.vocab_size = len(tok)
    else:
        config = StudentConfig.small(
            len(tok), n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head, ctr_hidden=cfg.ctr_hidden,
            dropout=cfg.dropout, eos_token_id=sid.eos, pad_token_id=sid.pad, n_positions=max(192, cfg.max_len),
        )
        model = StudentModel(config)
        if cfg.teacher and Path(cfg.teacher, "model.safetensors").exists():
            _init_embeddings_from_teacher(model, cfg.teacher, vmap)
    model.to(device)  # type: ignore[arg-type]

    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "ln" in n_ or "norm" in n_ or "wpe" in n_ else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.98),
    )
    rng = random.Random(cfg.seed)
    history: dict[str, list[tuple[int, float]]] = {"train_ce": [], "train_ctr": [], "heldout_ce": []}
    ema: dict[str, float] = {}
    for step in range(cfg.steps):
        model.train()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup)
        idx = [rng.randrange(len(enc)) for _ in range(cfg.batch_size)]
        b = to_device(enc.batch(idx, sid, cfg.max_len), device)
        with autocast(device, cfg.bf16):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], return_hidden=True)
        logits = out.logits.float()
        ce = lm_ce(logits, b["labels"])
        h = out.hidden_states[torch.arange(len(idx), device=device), b["eos_index"]].float()
        ctr_logit, _ = model.ctr_from_hidden(h)
        l_ctr = ctr_loss(ctr_logit, b["click_p"])
        loss = ce + cfg.ctr_weight * l_ctr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        for name, v in (("ce", ce.item()), ("ctr", l_ctr.item())):
            ema[name] = v if name not in ema else 0.95 * ema[name] + 0.05 * v
        if (step + 1) % 10 == 0:
            history["train_ce"].append((step + 1, ema["ce"]))
            history["train_ctr"].append((step + 1, ema["ctr"]))
        logs = dict(ema)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            hres = heldout_nll(model, held, sid, device, cfg.max_len)
            history["heldout_ce"].append((step + 1, hres["copy_nll"]))
            logs["heldout"] = hres["copy_nll"]
            log.info("student step %d ce %.4f ctr %.4f heldout %.4f", step + 1, ema["ce"], ema["ctr"],
                     hres["copy_nll"])
        if progress:
            progress(step + 1, cfg.steps, logs)
    model.eval()
    train_s = time.monotonic() - t0

    # final held-out metrics on the whole held-out split
    held_all = EncodedRows.build(tok, held_rows)
    hres = heldout_nll(model, held_all, sid, device, cfg.max_len)
    ctr_res = ctr_metrics(model, held_all, sid, device, cfg.max_len)
    metrics: dict[str, Any] = {
        "heldout_copy_ppl": hres["copy_ppl"], "heldout_copy_nll": hres["copy_nll"],
        "heldout_style_nll": hres["style_nll"], "heldout_copy_tokens": int(hres["copy_tokens"]),
        **ctr_res, **{f"params_{k}": v for k, v in model.num_parameters_split().items()},
        "train_seconds": round(train_s, 1),
    }
    meta = ModelMeta(
        name=cfg.name, version=cfg.version or new_version(),
        parent_version=cfg.parent_version or (parent.meta.version if parent is not None else None),
        tokenizer={"type": "trimmed byte-level BPE (teacher merges subset) + slot tokens", "source": tok_source,
                   "vocab_size": len(tok), "teacher_vocab_size": teacher_vocab, "slots": True},
        data_hash=corpus.data_hash(), metrics=metrics,
        training={"kind": "student-finetune" if parent is not None else "student-distillation", "kd": cfg.kd,
                  "teacher_version": teacher_version,
                  "config": jsonable(asdict(cfg)), "corpus": corpus.stats(),
                  "created_at": utc_now()},
    )
    out_dir = Path(cfg.out)
    save_student(model, tok, out_dir, meta)
    plot_losses(history, out_dir.parent / f"{out_dir.name}-loss.png", f"student ({cfg.kd} KD)")
    (out_dir.parent / f"{out_dir.name}-history.json").write_text(json.dumps(history))
    return out_dir, meta.to_dict()
