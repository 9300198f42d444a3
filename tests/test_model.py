"""The decoder: config validation, the paper's 1/d attention, NTK parameterization, heads, bad input."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minintk import ConfigError, Decoder, DecoderConfig, ModelInputError
from minintk.model import Embedding, Linear


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(d_model=30, n_head=4), "not divisible by n_head=4"),
        (dict(attn_scale="1/d_head"), "unknown attn_scale '1/d_head'"),
        (dict(parameterization="mup"), "unknown parameterization"),
        (dict(attention_windows=(None, 0)), "window must be None"),
        (dict(head="label_words"), "needs label_ids"),
        (dict(head="label_words", label_ids=(1, 999)), r"label_ids \[999\] are outside"),
        (dict(head="label_words", label_ids=(1, 2, 3), label_diff=True), "exactly 2 label_ids"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(activation="swish"), "unknown activation"),
    ],
)
def test_config_errors_name_the_problem(kw, match):
    with pytest.raises(ConfigError, match=match):
        DecoderConfig(**kw)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ConfigError, match=r"unknown DecoderConfig fields \['widht'\]"):
        DecoderConfig.from_dict({"widht": 3})


def _max_deviation_from_uniform(d_model: int, scale: str, seed: int = 0) -> float:
    torch.manual_seed(seed)
    m = Decoder(DecoderConfig(d_model=d_model, n_head=4, n_layer=1, attn_scale=scale, vocab_size=64, n_positions=16))
    idx = torch.randint(0, 64, (4, 16))
    p = m.attention_probs(idx)[0]  # (n, H, T, T)
    allowed = torch.tril(torch.ones(16, 16, dtype=torch.bool))
    uniform = allowed / allowed.sum(1, keepdim=True)
    return (p - uniform).abs().max().item()


def test_paper_scaling_makes_attention_uniform_as_width_grows():
    dev = {d: _max_deviation_from_uniform(d, "1/d") for d in (64, 256, 1024)}
    assert dev[1024] < dev[256] < dev[64], f"1/d attention did not approach uniform with width: {dev}"
    assert dev[1024] < 0.5 * dev[64], f"deviation shrank too little from width 64 to 1024: {dev}"
    usual = _max_deviation_from_uniform(1024, "1/sqrt(d)")
    assert usual > 2 * dev[1024], f"1/sqrt(d) should stay far from uniform ({usual:.3f} vs {dev[1024]:.3f})"


@pytest.mark.parametrize("head", ["scalar", "classes", "lm", "label_words"])
def test_ntk_parameterization_equals_standard_with_scaled_weights(head):
    kw = dict(d_model=32, n_head=4, n_layer=2, head=head, label_ids=(3, 7), n_classes=3, sigma_w=1.3, sigma_b=0.2)
    torch.manual_seed(0)
    ntk = Decoder(DecoderConfig(parameterization="ntk", **kw)).double()
    std = Decoder(DecoderConfig(parameterization="standard", **kw)).double()
    if head in ("lm", "label_words"):
        # A tied weight cannot carry two multipliers in the standard model: untie to compare.
        std.lm_head.weight = torch.nn.Parameter(ntk.wte.weight * ntk.lm_head.w_mult)
    with torch.no_grad():
        sp = dict(std.named_parameters())
        for name, mod in ntk.named_modules():
            if isinstance(mod, (Linear, Embedding)) and not (name == "lm_head" and head in ("lm", "label_words")):
                sp[f"{name}.weight"].copy_(mod.weight * mod.w_mult)
                if getattr(mod, "bias", None) is not None:
                    sp[f"{name}.bias"].copy_(mod.bias * mod.b_mult)
            elif isinstance(mod, torch.nn.LayerNorm):
                sp[f"{name}.weight"].copy_(mod.weight)
                sp[f"{name}.bias"].copy_(mod.bias)
    fan = ntk.blocks[0].mlp.c_proj
    assert math.isclose(fan.w_mult, 1.3 / math.sqrt(4 * 32)) and fan.b_mult == 0.2
    assert abs(ntk.blocks[0].attn.q_proj.weight.std().item() - 1.0) < 0.1, "NTK omega should be N(0, 1)"
    idx = torch.randint(0, 256, (3, 11))
    err = (ntk(idx) - std(idx)).abs().max().item()
    assert err < 1e-12, f"NTK and standard parameterizations differ by {err:.2e}"


def test_standard_init_variance():
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(d_model=256, n_head=4, sigma_w=2.0))
    w = m.blocks[0].mlp.c_proj.weight
    assert abs(w.std().item() - 2.0 / math.sqrt(4 * 256)) < 0.01 * 2.0 / math.sqrt(4 * 256) * 5


@given(
    n=st.integers(1, 3),
    T=st.integers(1, 12),
    heads=st.sampled_from([1, 2, 4]),
    depth=st.integers(1, 3),
    window=st.sampled_from([None, 1, 3]),
    head=st.sampled_from(["scalar", "classes", "lm", "label_words"]),
    pool=st.sampled_from(["last", "mean"]),
)
def test_shapes_train_eval_and_sample_independence(n, T, heads, depth, window, head, pool):
    cfg = DecoderConfig(
        d_model=8 * heads,
        n_head=heads,
        n_layer=depth,
        attention_windows=(None, window),
        head=head,
        pool=pool,
        n_classes=3,
        label_ids=(1, 2),
        vocab_size=32,
        n_positions=12,
    )
    m = Decoder(cfg)
    idx = torch.randint(0, 32, (n, T))
    out = m.train()(idx)
    expect = {"scalar": (n,), "classes": (n, 3), "lm": (n, T, 32), "label_words": (n, 2)}[head]
    assert out.shape == expect
    assert torch.equal(out, m.eval()(idx)), "train and eval modes differ: the decoder must have no dropout"
    one = torch.cat([m(idx[i : i + 1]) for i in range(n)])
    assert torch.allclose(one, out, atol=1e-6), "samples interact inside a batch"


def test_right_padding_reads_the_last_real_token():
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(head="scalar")).double()
    a = torch.randint(0, 256, (1, 5))
    padded = torch.cat([a, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    err = (m(padded, attention_mask=mask) - m(a)).abs().max().item()
    assert err < 1e-12, f"padding changed the output by {err:.2e}"


def test_local_window_limits_what_a_token_sees():
    m = Decoder(DecoderConfig(attention_windows=(3,), n_layer=1, n_positions=None))
    p = m.attention_probs(torch.randint(0, 256, (1, 8)))[0][0, 0]
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    outside = (j > i) | (i - j >= 3)
    assert p[outside].abs().max() == 0 and torch.allclose(p.sum(-1), torch.ones(8))


@given(T=st.integers(1, 12), window=st.sampled_from([None, 1, 3, 20]), pads=st.lists(st.integers(0, 11), min_size=3,
       max_size=3), left=st.booleans())
def test_fused_attention_equals_the_explicit_softmax(T, window, pads, left):
    """forward (scaled_dot_product_attention) against softmax(scores) V at every attended position, fp64, with
    local windows and left or right padding (each sample keeps at least one token)."""
    torch.manual_seed(T)
    cfg = DecoderConfig(d_model=16, n_head=2, n_layer=1, attention_windows=(window,), n_positions=None)
    attn = Decoder(cfg).double().blocks[0].attn
    x = torch.randn(3, T, 16, dtype=torch.float64)
    keep = [T - min(p, T - 1) for p in pads]
    mask = torch.tensor([[int((t >= T - k) if left else (t < k)) for t in range(T)] for k in keep])
    v = attn.v_proj(x).view(3, T, 2, 8).transpose(1, 2)
    expect = attn.out_proj((attn.scores(x, mask) @ v).transpose(1, 2).reshape(3, T, 16))
    got = attn(x, mask)
    real = mask.bool()
    assert torch.isfinite(got).all()
    assert (got - expect)[real].abs().max() < 1e-12


def test_bad_inputs():
    m = Decoder(DecoderConfig(vocab_size=10, n_positions=6))
    with pytest.raises(ModelInputError, match=r"token ids must lie in \[0, 10\)"):
        m(torch.tensor([[-1, 3]]))
    with pytest.raises(ModelInputError, match="exceeds the model's n_positions=6"):
        m(torch.zeros(2, 7, dtype=torch.long))
    with pytest.raises(ModelInputError, match=r"shape \(n, T\)"):
        m(torch.zeros(7, dtype=torch.long))
    with pytest.raises(ModelInputError, match="attention_mask shape"):
        m(torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4))
