"""Package paths (no heavy imports, so the CLI can use them at start-up)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_STUDENT_NAME = "livecopy-student"


def shipped_student_dir() -> Path:
    """The shipped default checkpoint, ``models/shipped/livecopy-student`` inside the package."""
    return Path(__file__).resolve().parent / "shipped" / DEFAULT_STUDENT_NAME


def package_data_dir() -> Path:
    """``models/data``: banned words, teacher-written copy and its provenance."""
    return Path(__file__).resolve().parent / "data"
