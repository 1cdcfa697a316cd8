"""Shared fixtures: the offline tiny pair (built once per cache folder) and small fusers for it."""

import pytest
import torch

from c2c.align import layer_map
from c2c.fuser import C2CFuser, FuserConfig
from c2c.models import load_model


@pytest.fixture(scope="session")
def tiny_receiver():
    return load_model("tiny-receiver")


@pytest.fixture(scope="session")
def tiny_sharer():
    return load_model("tiny-sharer")


def make_fuser(receiver_model, sharer_model, seed=0, gate_logit=None, **options) -> C2CFuser:
    """A small random fuser for a model pair, in eval mode; gate_logit sets every gate logit."""
    defaults = dict(hidden_dim=32, intermediate_dim=24)
    config = FuserConfig.for_models(receiver_model.config, sharer_model.config,
                                    layer_map(receiver_model.config.num_hidden_layers, sharer_model.config.num_hidden_layers),
                                    **{**defaults, **options})
    torch.manual_seed(seed)
    fuser = C2CFuser(config).eval()
    if gate_logit is not None:
        with torch.no_grad():
            fuser.gate_logit.fill_(gate_logit)
    return fuser
