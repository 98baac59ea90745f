"""Smoke-size training runs (seconds): the whole pipeline on a tiny corpus with a toy teacher."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from models.corpus import CorpusConfig, build_corpus
from models.sequences import special_ids
from models.student import StudentModel, load_student
from models.text.slots import SLOT_TOKENS
from models.training.common import EncodedRows, auc, auc_or_none, ctr_metrics
from models.training.student import StudentTrainConfig, train_student
from models.training.teacher import TeacherTrainConfig, train_teacher

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "ctr_hidden": 8, "batch_size": 8, "eval_rows": 32}
# 40 products x 6 rows: the held-out split (3 products, 18 rows) holds clicked and unclicked rows,
# so the held-out CTR AUC is defined (30 x 4 gave 8 held-out rows without a single click)
SMOKE_CORPUS = CorpusConfig(max_products=40, per_product=6)


def _cfg(tmp: Path, teacher: Path, **kw: object) -> StudentTrainConfig:
    base: dict[str, object] = {
        "teacher": str(teacher), "out": str(tmp / "student"), "steps": 40, "eval_every": 20, "lr": 3e-3, "warmup": 5,
        "corpus": dataclasses.replace(SMOKE_CORPUS), **TINY,
    }
    base.update(kw)
    return StudentTrainConfig(**base)  # type: ignore[arg-type]


def test_student_distillation_smoke(tmp_path: Path, toy_teacher_dir: Path) -> None:
    cfg = _cfg(tmp_path, toy_teacher_dir, kd="seq")
    held = build_corpus(dataclasses.replace(SMOKE_CORPUS)).heldout
    assert 0 < sum(r.clicked for r in held) < len(held)  # both classes: the AUC below is defined
    path, meta = train_student(cfg)
    ls = load_student(path)
    assert ls.meta.name == "livecopy-student" and ls.meta.data_hash == meta["data_hash"]
    assert meta["training"]["kd"] == "seq" and meta["tokenizer"]["slots"]
    m = meta["metrics"]
    assert m["heldout_copy_ppl"] > 1 and 0 <= m["ctr_auc_heldout"] <= 1 and 0 <= m["ctr_auc_prior_ceiling"] <= 1
    assert 0 < m["ctr_clicks"] < m["ctr_rows"] == len(held)
    hist = json.loads((tmp_path / "student-history.json").read_text())
    assert hist["train_ce"][-1][1] < hist["train_ce"][0][1]
    assert (tmp_path / "student-loss.png").stat().st_size > 1000
    assert len(ls.tokenizer) < 1300  # trimmed from the toy teacher's vocabulary
    vocab = ls.tokenizer.get_vocab()
    assert all(t in vocab for t in SLOT_TOKENS)  # each slot one whole token
    assert ls.tokenizer.decode(ls.tokenizer("the {title} for {price}.", add_special_tokens=False)["input_ids"]) \
        == "the {title} for {price}."
    with pytest.raises(ValueError, match="slots"):
        train_student(_cfg(tmp_path, toy_teacher_dir, kd="both", steps=1))


def test_fine_tune_from_a_checkpoint_keeps_its_weights_and_records_the_parent(tmp_path: Path,
                                                                             toy_teacher_dir: Path) -> None:
    parent, _ = train_student(_cfg(tmp_path, toy_teacher_dir, kd="none", steps=2, version="1.0.0"))
    before = load_student(parent)
    n = len(before.tokenizer)
    child, meta = train_student(_cfg(tmp_path, toy_teacher_dir, init_from=str(parent), out=str(tmp_path / "child"),
                                     steps=3, version="2.0.0"))
    after = load_student(child)
    assert meta["parent_version"] == "1.0.0" and meta["training"]["kind"] == "student-finetune"
    assert len(after.tokenizer) == n  # the slot tokens were there already: same vocabulary
    # trained on: moved from the parent's weights, not re-initialised
    w0, w1 = before.model.transformer.h[0].attn.c_attn.weight, after.model.transformer.h[0].attn.c_attn.weight
    assert 0 < float((w0 - w1).detach().abs().max()) < 0.5


def test_sequence_kd_needs_no_teacher_model(tmp_path: Path, toy_teacher_dir: Path) -> None:
    tok_only = tmp_path / "tok"
    tok_only.mkdir()
    (tok_only / "tokenizer.json").write_bytes((toy_teacher_dir / "tokenizer.json").read_bytes())
    (tok_only / "tokenizer_config.json").write_bytes((toy_teacher_dir / "tokenizer_config.json").read_bytes())
    path, meta = train_student(_cfg(tmp_path, tok_only, kd="seq", steps=5))
    assert meta["training"]["kd"] == "seq" and (path / "model.safetensors").exists()


def test_teacher_finetune_smoke(tmp_path: Path, toy_teacher_dir: Path) -> None:
    cfg = TeacherTrainConfig(
        base=str(toy_teacher_dir), out=str(tmp_path / "teacher"), steps=4, batch_size=4, eval_every=2,
        eval_rows=16, bf16=False, corpus=CorpusConfig(max_products=20, per_product=3),
    )
    meta = train_teacher(cfg)
    out = tmp_path / "teacher"
    assert {"config.json", "model.safetensors", "tokenizer.json", "livecopy.json", "loss.png"} <= {
        p.name for p in out.iterdir()
    }
    assert meta["metrics"]["params"] > 0 and meta["data_hash"]


def test_auc() -> None:
    assert auc([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert auc([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auc([0.1, 0.3, 0.2, 0.4], [0, 1, 0, 1]) == 1.0
    assert math.isnan(auc([0.1, 0.2], [0, 0])) and math.isnan(auc([0.1, 0.2], [1, 1]))
    assert auc_or_none([0.1, 0.2], [0, 0]) is None and auc_or_none([0.1, 0.2], [0, 1]) == 1.0


def test_ctr_metrics_single_class_is_undefined_not_nan(small_corpus, toy_tokenizer, tiny_student: StudentModel) -> None:
    rows = [dataclasses.replace(r, clicked=False) for r in small_corpus.heldout[:12]]
    m = ctr_metrics(tiny_student, EncodedRows.build(toy_tokenizer, rows), special_ids(toy_tokenizer),
                    torch.device("cpu"))
    assert m["ctr_auc_heldout"] is None and m["ctr_auc_prior_ceiling"] is None
    assert m["ctr_clicks"] == 0 and m["ctr_rows"] == 12
    json.dumps(m, allow_nan=False)  # valid JSON in livecopy.json


def test_cli_train_and_eval(tmp_path: Path, toy_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from livecopy.cli import cli, register

    register(cli)
    monkeypatch.setenv("LIVECOPY_MODELS__TEACHER_DIR", str(toy_teacher_dir))
    monkeypatch.setenv("LIVECOPY_MODELS__DEVICE", "cpu")
    out = tmp_path / "cli-student"
    runner = CliRunner()
    res = runner.invoke(cli, ["train", "student", "--kd", "seq", "--steps", "3", "--max-products", "20",
                              "--layers", "1", "--d-model", "32", "--heads", "2",
                              "--out", str(out), "--version", "0.0.1"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output[res.output.index("{"):])["version"] == "0.0.1"
    res = runner.invoke(cli, ["eval", str(out), "--rows", "16", "--samples", "2", "--no-speed",
                              "--json-out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["kind"] == "student" and len(report["samples"]) == 2
    assert {"heldout_ppl", "heldout_bits_per_byte", "params", "disk_mb", "ctr_auc_heldout"} <= set(report["metrics"])
