from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The API contracts the tests hold syncd and the simulators to (see apis/README.md).
APIS = ROOT / "apis"


@pytest.fixture
def anyio_backend() -> str:
    # uvicorn, which serves the simulators and webhooks, runs on asyncio only.
    return "asyncio"


@pytest.fixture(scope="session")
def apis() -> Path:
    """The recorded API contracts, kept in the repository's ``apis/`` folder."""
    return APIS
