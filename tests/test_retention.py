"""Retention (picollm/model/mixers/retention.py) against RetNet's formula written out by hand; the shared
mixer contract (tests/test_mixer_contract.py) covers its forms, decoding and state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from picollm.model import mixers
from picollm.model.config import ModelConfig
from picollm.model.mixers.base import LayerCache

CFG = {"attention": "retention", "d_model": 8, "n_heads": 2, "vocab_size": 16, "linear_chunk_size": 4}


def _mixer(**kw):
    torch.manual_seed(0)
    mixer = mixers.mixer_class("retention")(ModelConfig(**CFG | kw))
    with torch.no_grad():
        for p in mixer.parameters():
            p.normal_(0.0, 0.5)
    return mixer.eval()


def test_retention_is_retnet_written_out():
    """o_t = RMSNorm_h(sum_j gamma_h^(t-j) (q_t.k_j / sqrt(d)) v_j) * swish(W_g x_t), then W_o; every position."""
    mixer = _mixer()
    x = torch.randn(1, 9, 8, generator=torch.Generator().manual_seed(1))
    q, k, v = (t.transpose(1, 2) for t in mixer.split_qkv(x))  # (1, H, N, dh)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(2.0))
    n, d = 9, 4
    dist = torch.arange(n)[:, None] - torch.arange(n)[None, :]
    decay = torch.where(dist >= 0, gamma.view(2, 1, 1) ** dist.clamp(min=0), 0.0)  # (H, N, N)
    o = (q @ k.transpose(-1, -2) / math.sqrt(d) * decay) @ v  # (1, H, N, dh)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + mixer.cfg.linear_eps)
    gated = o.transpose(1, 2) * F.silu(mixer.g(x)).view(1, n, 2, d)
    want = mixer.out(gated.reshape(1, n, 8))
    key_mask = torch.ones(1, n, dtype=torch.bool)
    for form in ("chunk", "quadratic", "recurrent"):
        torch.testing.assert_close(mixer(x, key_mask, form=form), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["alibi", "none", "learned"])
def test_retention_decays_each_head_by_its_own_gamma_whatever_the_positions(pos):
    mixer = _mixer(pos_encoding=pos)
    torch.testing.assert_close(mixer.fixed_log_decay().exp(), torch.tensor([1 - 2**-5, 1 - 2**-6]))
    cache = LayerCache()
    mixer(torch.randn(1, 5, 8), torch.ones(1, 5, dtype=torch.bool), cache)
    assert cache.state.shape == (1, 2, 4, 4) and cache.z is None  # S only: no normaliser state
    assert mixers.state_floats(mixer.cfg, 5) == 2 * 4 * 4


@pytest.mark.parametrize("option", [{"feature_map": "taylor"}, {"normalizer": "rmsnorm"}, {"window": 8}])
def test_retention_takes_none_of_the_other_mixers_options(option):
    with pytest.raises(ValidationError, match="does not apply to attention=retention"):
        ModelConfig(**CFG | option)
