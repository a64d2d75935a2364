"""Shared test setup: one CPU thread for the whole suite, and the tiny models of tiny.py as fixtures.

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
