"""Shared fixtures: the offline tiny pair (built once per cache folder) and small fusers for it."""

import pytest
import torch
from threadpoolctl import threadpool_limits

from c2c.fuser import C2CFuser, random_fuser
from c2c.models import load_model


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny models are overhead-bound: one intra-op thread is faster, and far faster on a busy machine."""
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
