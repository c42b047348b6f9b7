from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_APIS = Path(os.environ.get("SYNCD_SHARED_APIS", ROOT.parent / "shared" / "apis"))


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn, which serves the simulators and webhooks, runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="session")
def shared_apis() -> Path:
    """The recorded API contracts (``../shared/apis`` beside the repository)."""
    if not (SHARED_APIS / "README.md").exists():
        pytest.fail(f"API contracts not found at {SHARED_APIS}; set SYNCD_SHARED_APIS")
    return SHARED_APIS
