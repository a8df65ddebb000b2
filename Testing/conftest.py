"""Shared fixtures: the real development CT and phantom cases generated once per session (fixed seeds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from LumbarBMDLib.phantom import PhantomCase, generate_case


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Folder of the real abdominal CT with TotalSegmentator vertebra labels (3 mm, T11–sacrum)."""
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "totalseg-example"
    assert (path / "ct.nii.gz").is_file(), f"real example CT missing: {path}"
    return path


@pytest.fixture(scope="session")
def small_case() -> PhantomCase:
    """A small (192², 2 mm, 2.5 mm slices) standard phantom case on vendor A."""
    return generate_case(11, "A", "small")


@pytest.fixture(scope="session")
def full_normal_case() -> PhantomCase:
    """A full-size (512², ~0.8 mm, 1 mm slices) standard phantom case with normal BMD on vendor A (~7 s)."""
    return generate_case(101, "A", "full", category="normal")
