"""The student: a small GPT-2-style causal LM with a CTR head on the same trunk.

* LM head: tied to the token embedding (``logits = h @ wte.T``), so it adds no parameters.
* CTR head: ``LayerNorm -> Linear(d, ctr_hidden) -> GELU -> Linear(ctr_hidden, 1)`` on the
  trunk's final hidden state at the EOS that closes ``prompt + <s:style> + copy + EOS``; the
  ``ctr_hidden`` activations are the *features* a serving policy can put a Bayesian last layer
  on (:meth:`StudentModel.ctr_features`, :meth:`StudentModel.ctr_from_hidden`).

Checkpoints are plain ``save_pretrained`` directories (``config.json``, ``model.safetensors``,
``tokenizer.json`` ...) plus ``livecopy.json`` (:class:`ModelMeta`). Nothing is unpickled.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2Config, GPT2Model
from transformers.modeling_outputs import ModelOutput
from transformers.models.gpt2.modeling_gpt2 import GPT2PreTrainedModel

from core.styles import STYLES
from models.paths import shipped_student_dir

__all__ = [
    "META_FILE", "CTRHead", "LoadedStudent", "ModelMeta", "StudentConfig", "StudentModel", "StudentOutput",
    "load_student", "save_student", "shipped_student_dir", "trunk_of",
]

META_FILE = "livecopy.json"
DEFAULT_NAME = "livecopy-student"


class StudentConfig(GPT2Config):
    """GPT-2 config plus ``ctr_hidden`` (CTR head width) and ``styles`` (the style tokens'
    names, in id order of :data:`core.styles.STYLES`)."""

    model_type = "livecopy_student"

    @classmethod
    def small(
        cls,
        vocab_size: int,
        *,
        n_embd: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        n_positions: int = 192,
        ctr_hidden: int = 64,
        dropout: float = 0.05,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
    ) -> StudentConfig:
        kwargs: dict[str, Any] = {
            "vocab_size": vocab_size, "n_embd": n_embd, "n_layer": n_layer, "n_head": n_head,
            "n_positions": n_positions, "n_inner": 4 * n_embd, "resid_pdrop": dropout, "embd_pdrop": dropout,
            "attn_pdrop": dropout, "bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id, "ctr_hidden": ctr_hidden, "styles": list(STYLES),
            "tie_word_embeddings": True,
        }
        return cls(**kwargs)


@dataclass
class StudentOutput(ModelOutput):
    """``logits``: LM logits (B, L', V) for the kept positions; ``past_key_values``: cache when
    ``use_cache``; ``hidden_states``: final hidden states (B, L, d) when ``return_hidden``."""

    logits: torch.Tensor | None = None
    past_key_values: Any = None
    hidden_states: torch.Tensor | None = None


class CTRHead(nn.Module):
    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, hidden)
        self.out = nn.Linear(hidden, 1)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(self.norm(h)))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(h)
        return self.out(f).squeeze(-1), f


class StudentModel(GPT2PreTrainedModel):
    config_class = StudentConfig
    base_model_prefix = "transformer"

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.ctr_head = CTRHead(config.n_embd, int(getattr(config, "ctr_hidden", 64)))
        self.post_init()

    # -- transformers plumbing
    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        assert isinstance(value, nn.Embedding)
        self.transformer.wte = value

    # -- forward passes
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_hidden: bool = False,
        **_: Any,
    ) -> StudentOutput:
        """LM forward. ``logits_to_keep=n`` computes logits for the last n positions only
        (0: all). ``position_ids`` are needed with left padding."""
        out = self.transformer(
            input_ids=input_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            use_cache=use_cache, position_ids=position_ids,
        )
        h = out.last_hidden_state
        hk = h[:, -logits_to_keep:] if logits_to_keep else h
        logits = F.linear(hk, self.transformer.wte.weight)
        return StudentOutput(
            logits=logits, past_key_values=out.past_key_values if use_cache else None,
            hidden_states=h if return_hidden else None,
        )

    def ctr_from_hidden(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logit, features)`` of the CTR head from final hidden states (..., d)."""
        logit, feats = self.ctr_head(h)
        return logit, feats

    @staticmethod
    def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
        """Index of each row's last real token (works for left and right padding)."""
        idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        return (attention_mask.long() * (idx + 1)).argmax(-1)

    def _hidden_at(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor | None
    ) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        h = out.last_hidden_state
        idx = self.last_index(attention_mask) if index is None else index
        return h[torch.arange(h.shape[0], device=h.device), idx]

    def ctr_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Penultimate CTR features (B, ctr_hidden) at ``index`` (default: last real token)."""
        return self.ctr_head.features(self._hidden_at(input_ids, attention_mask, index))

    def ctr_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """CTR logits (B,) at ``index`` (default: last real token, i.e. EOS)."""
        logit, _ = self.ctr_head(self._hidden_at(input_ids, attention_mask, index))
        return logit

    def num_parameters_split(self) -> dict[str, int]:
        emb = self.transformer.wte.weight.numel()
        pos = self.transformer.wpe.weight.numel()
        ctr = sum(p.numel() for p in self.ctr_head.parameters())
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "token_embedding": emb, "position_embedding": pos, "ctr_head": ctr,
                "trunk": total - emb - pos - ctr}


# --------------------------------------------------------------------------- metadata


def utc_now() -> str:
    return datetime.now(tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_version() -> str:
    """A timestamped version id, e.g. ``20261123T014400Z``."""
    return datetime.now(tz=UTC).strftime("%Y%m%dT%H%M%S%fZ")


@dataclass
class ModelMeta:
    """``livecopy.json``: what this checkpoint is and where it came from."""

    name: str = DEFAULT_NAME
    version: str = "1.0.0"
    parent_version: str | None = None
    tokenizer: dict[str, Any] = field(default_factory=dict)
    data_hash: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=utc_now)
    styles: list[str] = field(default_factory=lambda: list(STYLES))
    training: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def read(cls, path: str | Path) -> ModelMeta:
        p = Path(path)
        p = p / META_FILE if p.is_dir() else p
        return cls.from_dict(json.loads(p.read_text(encoding="utf-8")))

    def write(self, directory: str | Path) -> None:
        p = Path(directory) / META_FILE
        tmp = p.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, p)


def trunk_of(meta: ModelMeta) -> str:
    """The version whose trunk (everything but the CTR head and the style policy) this checkpoint
    carries: its own, or for a version the online trainer refitted heads-only, its ancestor's."""
    return str(meta.training.get("trunk") or meta.version)


@dataclass
class LoadedStudent:
    model: StudentModel
    tokenizer: Any
    meta: ModelMeta
    path: Path | None = None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(name: str) -> str:
    """A device setting (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` ...) as a torch device string:
    ``auto`` is CUDA when available, else CPU."""
    return default_device() if name == "auto" else name


def load_student(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedStudent:
    """Load a student directory (weights in any float dtype on disk; ``dtype`` default fp32 --
    on CUDA the decode loop autocasts to bf16)."""
    from models.tokenizer import load_tokenizer

    p = Path(path)
    if not (p / "config.json").exists():
        raise FileNotFoundError(f"{p} is not a model directory (no config.json)")
    model = StudentModel.from_pretrained(str(p), dtype=dtype or torch.float32)
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    tok = load_tokenizer(p)
    meta = ModelMeta.read(p) if (p / META_FILE).exists() else ModelMeta()
    return LoadedStudent(model=model, tokenizer=tok, meta=meta, path=p)


def save_student(
    model: StudentModel | LoadedStudent,
    tokenizer: Any,
    path: str | Path,
    meta: ModelMeta | None = None,
    *,
    storage_dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Write a self-describing checkpoint: safetensors weights (``storage_dtype``, default fp16
    to keep the shipped model small; None keeps the model's dtype), config, tokenizer files and
    ``livecopy.json``. The in-memory model is not modified."""
    if isinstance(model, LoadedStudent):
        meta = meta or model.meta
        tokenizer = tokenizer or model.tokenizer
        model = model.model
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    to_save = model
    if storage_dtype is not None and next(model.parameters()).dtype != storage_dtype:
        to_save = copy.deepcopy(model).to(device="cpu", dtype=storage_dtype)  # type: ignore[call-arg]
    to_save.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    (meta or ModelMeta()).write(out)
    return out
