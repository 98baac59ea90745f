"""Low-rank adapters (LoRA, Hu et al. 2021) for teacher fine-tuning, written by hand (no peft).

Why: the fine-tuned teacher has to exist in two places -- on the machine that trains it and on
the one that benchmarks it -- and a full fine-tune (135M parameters, 270 MB in bf16) cannot
travel between them, while an adapter (rank 16 on every linear layer of the decoder: ~4.9M
parameters, ~10 MB in bf16) can. :func:`add_lora` wraps every ``nn.Linear`` (not the LM head);
:func:`merge_lora` folds ``W += scale * B @ A`` back in and returns the adapter tensors, which
:func:`save_adapter` writes as safetensors and :func:`apply_adapter` merges into a freshly
loaded base to rebuild exactly the same teacher. The adapter also carries the trained rows of
the token embedding (the added style / end tokens), the only embedding rows that train.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

ADAPTER_FILE = "adapter.safetensors"


class LoRALinear(nn.Module):
    """``base(x) + scale * (x @ A^T) @ B^T`` with ``A`` (r, in), ``B`` (out, r) = 0 at start."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.rank = rank
        self.scale = alpha / rank
        dev, dt = base.weight.device, torch.float32
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=dev, dtype=dt))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=dev, dtype=dt))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_a.to(x.dtype)
        b = self.lora_b.to(x.dtype)
        return self.base(x) + (x @ a.t() @ b.t()) * self.scale


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


def add_lora(model: nn.Module, rank: int = 16, alpha: float = 32.0) -> list[str]:
    """Freeze ``model`` and wrap each ``nn.Linear`` except the output head; returns the names."""
    for p in model.parameters():
        p.requires_grad_(False)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for n in names:
        parent, leaf = _parent(model, n)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha))
    return names


def train_embedding_rows(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Let only rows ``ids`` of the (possibly tied) input embedding train: a gradient hook zeroes
    the rest (use weight decay 0 for it, so the frozen rows stay bit-identical)."""
    w = model.get_input_embeddings().weight  # type: ignore[operator]
    w.requires_grad_(True)
    keep = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
    keep[ids] = 1.0
    w.register_hook(lambda g: g * keep.to(g.dtype))
    return w


@torch.no_grad()
def merge_lora(model: nn.Module) -> dict[str, torch.Tensor]:
    """Round each adapter to bf16 (what is saved), fold it into its base weight, unwrap the
    module; returns ``{name.lora_a / name.lora_b: bf16 tensor}``."""
    out: dict[str, torch.Tensor] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        parent, leaf = _parent(model, n)
        m: LoRALinear = getattr(parent, leaf)
        a, b = m.lora_a.to(torch.bfloat16), m.lora_b.to(torch.bfloat16)
        out[f"{n}.lora_a"], out[f"{n}.lora_b"] = a.cpu().contiguous(), b.cpu().contiguous()
        _merge_into(m.base, a, b, m.scale)
        setattr(parent, leaf, m.base)
    return out


def _merge_into(lin: nn.Linear, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    delta = (b.float().to(lin.weight.device) @ a.float().to(lin.weight.device)) * scale
    lin.weight.add_(delta.to(lin.weight.dtype))


def save_adapter(path: str | Path, lora: dict[str, torch.Tensor], embed_ids: list[int], embed_rows: torch.Tensor,
                 info: dict[str, Any]) -> Path:
    tensors = dict(lora)
    tensors["embed.ids"] = torch.tensor(embed_ids, dtype=torch.int64)
    tensors["embed.rows"] = embed_rows.detach().float().cpu().contiguous()
    p = Path(path)
    save_file(tensors, str(p), metadata={"livecopy": json.dumps(info, sort_keys=True)})
    return p


@torch.no_grad()
def apply_adapter(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Merge a saved adapter into ``model`` (the same base + added tokens it was trained on)."""
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("livecopy", "{}"))
        keys = list(f.keys())
        scale = float(info["alpha"]) / float(info["rank"])
        mods = dict(model.named_modules())
        for k in keys:
            if k.endswith(".lora_a"):
                name = k[: -len(".lora_a")]
                lin = mods[name]
                if not isinstance(lin, nn.Linear):
                    raise ValueError(f"{name} is not a linear layer")
                _merge_into(lin, f.get_tensor(k), f.get_tensor(name + ".lora_b"), scale)
        ids = f.get_tensor("embed.ids")
        rows = f.get_tensor("embed.rows")
    w = model.get_input_embeddings().weight  # type: ignore[operator]
    w[ids] = rows.to(w.dtype).to(w.device)
    return info
