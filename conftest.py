"""Shared test setup: one CPU thread for the whole suite, the tiny models of tiny.py as fixtures, a spy.

The tiny models are far too small for intra-op parallelism to pay: with torch's default thread count
the suite runs several times slower than with one thread, so the count is pinned here, once.
"""
import pytest
import torch

from tiny import make_lm, make_rm, make_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="session")
def lm(tok):
    return make_lm(tok)


@pytest.fixture(scope="session")
def rm(tok):
    return make_rm(tok)


@pytest.fixture
def forked(monkeypatch) -> list:
    """The devices whose random state each torch.random.fork_rng keeps, on a machine pretending to have two GPUs."""
    calls, fork_rng = [], torch.random.fork_rng
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.random, "fork_rng", lambda devices, **kw: calls.append(list(devices)) or fork_rng([]))
    return calls
