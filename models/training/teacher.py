"""Teacher fine-tuning (``livecopy train teacher``).

Teacher: the pretrained base (SmolLM2-135M-Instruct by default) + style tokens, fully
fine-tuned with next-token CE on the training split (prompt masked), bf16 autocast.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.corpus import CorpusConfig, build_corpus
from models.sequences import special_ids
from models.student import ModelMeta, new_version, utc_now
from models.training.common import (
    EncodedRows,
    Progress,
    autocast,
    cosine_lr,
    eval_subset,
    heldout_nll,
    jsonable,
    plot_losses,
    seed_everything,
    to_device,
)
from models.training.losses import lm_ce

log = logging.getLogger(__name__)



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
    held = EncodedRows.build(tok, eval_subset(corpus.heldout, cfg.eval_rows, cfg.seed))
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
        b = to_device(enc.batch(idx, sid, cfg.max_len), device)
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
                  "config": jsonable(asdict(cfg)), "created_at": utc_now()},
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
