"""LM pretraining (minintk.pretrain): GPT-Neo's initialisation, and a loss that falls on a learnable stream."""

import pytest
import torch
import torch.nn.functional as F

from minintk import Decoder, DecoderConfig
from minintk.pretrain import PretrainConfig, PretrainError, gpt_init, heldout_loss, lm_loss, pretrain


def lm(**kw) -> Decoder:
    cfg = dict(vocab_size=12, n_positions=16, d_model=32, n_layer=1, n_head=2, head="lm", attn_scale="none")
    return Decoder(DecoderConfig(**(cfg | kw)))


def test_gpt_init_draws_every_weight_with_std_002():
    m = gpt_init(lm(n_layer=2), std=0.02)
    w = torch.cat([p.reshape(-1) for n, p in m.named_parameters() if n.endswith("weight") and "ln" not in n])
    assert abs(float(w.std()) - 0.02) < 1e-3 and abs(float(w.mean())) < 1e-3
    assert all(float(p.abs().max()) == 0 for n, p in m.named_parameters() if n.endswith("bias"))
    assert m.lm_head.weight is m.wte.weight


def test_lm_loss_is_next_token_cross_entropy():
    m = gpt_init(lm())
    batch = torch.randint(0, 12, (3, 9))
    logits = m(batch[:, :-1])
    ref = sum(F.cross_entropy(logits[i], batch[i, 1:]) for i in range(3)) / 3
    torch.testing.assert_close(lm_loss(m, batch), ref)


def test_pretraining_learns_a_periodic_stream():
    torch.manual_seed(0)
    m = gpt_init(lm())
    stream = torch.arange(12).repeat(300)  # 0 1 2 ... 11 0 1 ...: the next token is determined
    rec = pretrain(m, stream, PretrainConfig(steps=30, batch_size=8, seq_len=12, lr=2e-2, warmup=3,
                                             val_fraction=0.1), progress=False)
    assert rec["heldout_loss_after"] < 0.2 < 2.0 < rec["heldout_loss_before"], rec
    assert rec["heldout_loss_after"] == pytest.approx(heldout_loss(m, stream[-360:], 12), rel=1e-5)
    with pytest.raises(PretrainError, match="LM head"):
        pretrain(lm(head="scalar"), stream, PretrainConfig(steps=1))
    with pytest.raises(PretrainError, match="n_positions"):
        pretrain(m, stream, PretrainConfig(steps=1, seq_len=32))
