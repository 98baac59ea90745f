"""Helpers for the copy-generation tests: a tiny random student saved like a real checkpoint
(toy BPE tokenizer trained on catalog prompts), and engine/settings builders. No network."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from core.catalog import Catalog
from core.settings import CopySettings
from models.student import ModelMeta, save_student
from models.text.context import build_prompt, product_context
from models.text.filter import fallback_copy

MODEL_NAME = "livecopy-student"
_TOKENIZER: list[Any] = []


def toy_tokenizer() -> Any:
    if not _TOKENIZER:
        from models.tokenizer import wrap_fast
        from tests.models.conftest import train_toy_bpe

        cat = Catalog.generate(120, seed=3)
        texts = [build_prompt(product_context(p)) for p in cat] + [fallback_copy(product_context(p)) for p in cat]
        _TOKENIZER.append(wrap_fast(train_toy_bpe(texts, vocab_size=600)))
    return _TOKENIZER[0]


def save_tiny_student(out: Path, version: str, *, seed: int = 0, name: str = MODEL_NAME,
                      break_weights: bool = False) -> Path:
    """A 2-layer x 32 random student with a CTR head, saved with livecopy.json (name, version)."""
    from models.sequences import EOS_TOKEN
    from tests.models.conftest import make_student

    tok = toy_tokenizer()
    model = make_student(len(tok), tok.convert_tokens_to_ids(EOS_TOKEN), seed=seed)
    if break_weights:
        with torch.no_grad():
            model.ctr_head.out.weight.fill_(float("nan"))
    return save_student(model, tok, out, ModelMeta(name=name, version=version), storage_dtype=None)


def copy_settings(**over: object) -> CopySettings:
    base: dict[str, object] = {"device": "cpu", "candidates": 3, "max_new_tokens": 12, "max_wait_ms": 2.0,
                               "timeout_ms": 30_000.0, "mc_draws": 50}
    base.update(over)
    return CopySettings.model_validate(base)


class ServerThread:
    """An ASGI app served by uvicorn on a free loopback port in a thread (real HTTP, real
    concurrency, lifespan run): ``with ServerThread(app) as base_url: ...``."""

    def __init__(self, app: object, api: object = None) -> None:
        import uvicorn

        from core.settings import ApiSettings
        from livecopy.devstack import free_port
        from services.api.server import server_config

        self.port = free_port()  # served as `livecopy serve` serves it (its protocol and limits)
        config = server_config(app, api if isinstance(api, ApiSettings) else ApiSettings(), host="127.0.0.1",
                               port=self.port)
        self.server = uvicorn.Server(config)
        import threading

        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        import time

        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
