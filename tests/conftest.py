"""Shared fixtures: the offline tiny pair (built once per cache folder) and small fusers for it."""

import pytest
import torch
from threadpoolctl import threadpool_limits

from c2c.fuser import C2CFuser, random_fuser
from c2c.models import load_model


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One intra-op thread for the whole session, set before any fixture computes anything.

    The tiny models are overhead-bound, so one thread is faster (far faster on a busy machine). It must
    be session-wide: float32 reductions (matmul, sdpa) add in an order that depends on the thread count,
    so a module-scoped fixture computed with the default threads and a test re-computing the same logits
    with one thread differ in the last bits (seen as ~1e-7 in the oracle's bit-exactness tests).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_receiver():
    return load_model("tiny-receiver")


@pytest.fixture(scope="session")
def tiny_sharer():
    return load_model("tiny-sharer")


def make_fuser(receiver_model, sharer_model, seed=0, gate_logit=None, **options) -> C2CFuser:
    """A small random fuser for a model pair, in eval mode; gate_logit sets every gate logit."""
    return random_fuser(receiver_model.config, sharer_model.config, seed=seed, gate_logit=gate_logit,
                        **{"hidden_dim": 32, "intermediate_dim": 24, **options})


def count_calls(monkeypatch, owner, name: str) -> list:
    """Record (first argument after self, batch size) of each call of ``owner.name`` (a method taking
    ``(self, method, batch, ...)``), calling it as before."""
    calls, real = [], getattr(owner, name)

    def counting(self, method, batch, *args, **kwargs):
        calls.append((method, len(batch)))
        return real(self, method, batch, *args, **kwargs)

    monkeypatch.setattr(owner, name, counting)
    return calls
