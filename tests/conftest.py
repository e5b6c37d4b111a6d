"""Suite-wide pytest hooks.

- ``@pytest.mark.slow`` tests are skipped unless ``ASYNC_CKPT_SLOW=1`` (``make test-full``).
- ``@pytest.mark.gpu`` tests are skipped unless ``torch.cuda.is_available()``.
- A run that collected no test fails (exit status 5), whatever else happened.

Multi-process tests use ``tests.helpers.spawn.run_ranks``.
"""

from __future__ import annotations

import os

import pytest

SLOW_ENV = "ASYNC_CKPT_SLOW"


def _cuda_available() -> bool:
    import torch  # imported only when a gpu test was collected

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = os.environ.get(SLOW_ENV) == "1"
    skip_slow = pytest.mark.skip(reason=f"slow test: set {SLOW_ENV}=1 (make test-full)")
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    skip_gpu = None
    if gpu_items and not _cuda_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if not run_slow and item.get_closest_marker("slow") is not None:
            item.add_marker(skip_slow)
        if skip_gpu is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Keep "no test collected" a failure: CI must never pass on an empty run."""
    if session.testscollected == 0 and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.NO_TESTS_COLLECTED
