"""The Gram is exact, or refused with a named reason, on the models and inputs researchers bring: padding ids,
left/right padding, frozen and converted parameters, checkpointing, zero gradients, fp64 end to end, meta
devices, long inputs, layouts that flatten or reorder samples. Reference: fp64 autograd, one sample at a time."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import gpt_neo_scores_in_model_dtype, make_gpt_neo_checkpoint
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.checkpoint import checkpoint

from minintk import Decoder, DecoderConfig
from minintk.engine import NTKError, label_words, ntk, select_params
from minintk.gptneo import load_gpt_neo

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"fp64": 1e-10, "fp32": 1e-5}


def per_sample_gram(model, X, params=None, output=None):
    """fp64 K = J J^T, J's rows from one autograd backward per sample (run alone, batch of 1) and output:
    (n, n) for one output per sample, (n, n, C, C) for C. params: as ntk's, chosen on the model given."""
    names = [n for n, _ in select_params(model, params)]
    model = copy.deepcopy(model).double()
    by_name = dict(model.named_parameters())
    ps = [by_name[n] for n in names]
    for p in ps:
        p.requires_grad_(True)
    n = X.shape[0] if isinstance(X, torch.Tensor) else next(iter(X.values())).shape[0]
    rows, C = [], 1
    for i in range(n):
        x = X[i : i + 1] if isinstance(X, torch.Tensor) else {k: v[i : i + 1] for k, v in X.items()}
        x = x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        out = model(**x) if isinstance(x, dict) else model(x)
        f = (out if output is None else output(out, x) if getattr(output, "takes_inputs", False) else output(out))
        C = f.shape[1] if f.dim() == 2 else 1
        f = f.reshape(-1)
        for c in range(f.shape[0]):
            gs = torch.autograd.grad(f[c], ps, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(gs, ps)]))
    J = torch.stack(rows)
    K = (J @ J.T).reshape(n, C, n, C).permute(0, 2, 1, 3)
    return K[:, :, 0, 0] if C == 1 else K


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def quiet_ntk(*args, **kw):
    """ntk, failing on any warning (the paths here must stay layerwise and silent)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ntk(*args, progress=False, **kw)


# ----------------------------------------------------------------------------------------- padding ids


class PadLM(nn.Module):
    """Token embedding with a padding id, optionally tied to the output head; two label logits of the mean."""

    def __init__(self, vocab, d, pad, tied, **emb):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=pad, **emb)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x))).mean(1))[:, [1, 2]]


def padded_ids(n, T, vocab, pad, where, seed):
    """Token ids (n, T) without `pad` except where asked: in the first sample, the last, nowhere, everywhere."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, vocab - 1, (n, T), generator=g)
    X = X + (X >= pad).long()  # every id but pad
    rows = {"first": [0], "last": [n - 1], "nowhere": [], "everywhere": list(range(n))}[where]
    for i in rows:
        X[i, torch.randint(0, T, (max(1, T // 2),), generator=g)] = pad
    return X


@given(
    where=st.sampled_from(["first", "last", "nowhere", "everywhere"]),
    n=st.integers(2, 5),
    T=st.integers(1, 6),
    d=st.sampled_from([3, 8]),
    pad=st.sampled_from([0, 5, 12]),
    tied=st.booleans(),
    subset=st.sampled_from([None, "emb.*"]),
    precision=st.sampled_from(["fp64", "fp32"]),
    seed=st.integers(0, 2**16),
)
def test_padding_idx_rows_get_no_gradient(where, n, T, d, pad, tied, subset, precision, seed):
    torch.manual_seed(seed)
    model = PadLM(13, d, pad, tied)
    X = padded_ids(n, T, 13, pad, where, seed)
    K = quiet_ntk(model, X, params=subset, precision=precision)
    R = per_sample_gram(model, X, params=subset)
    assert rel(K, R) <= TOL[precision], f"pad {where}: relative error {rel(K, R):.2e} ({precision}, tied={tied})"


def test_scale_grad_by_freq_is_exact_by_the_reference_path():
    torch.manual_seed(0)
    model = PadLM(13, 4, 0, tied=False, scale_grad_by_freq=True)
    X = torch.tensor([[3, 3, 3, 4], [5, 6, 7, 8], [0, 3, 9, 9]])
    with pytest.warns(UserWarning, match="emb has scale_grad_by_freq=True"):
        K = ntk(model, X, precision="fp64", progress=False)
    R = per_sample_gram(model, X)
    assert rel(K, R) <= 1e-10, f"relative error {rel(K, R):.2e}"


def test_max_norm_is_refused_with_the_fix():
    model = PadLM(13, 4, 0, tied=False, max_norm=1.0)
    with pytest.raises(NTKError, match=r"emb is an Embedding with max_norm=1.0: .*emb.max_norm = None"):
        ntk(model, torch.randint(0, 13, (3, 4)), progress=False)


# ----------------------------------------------------------------------------------------- padded batches


def masks(n, T, side, seed):
    """(n, T) attention masks with each sample's length drawn in [1, T], padded on `side`."""
    lengths = torch.randint(1, T + 1, (n,), generator=torch.Generator().manual_seed(seed))
    at = torch.arange(T)[None]
    if side == "none":
        return torch.ones(n, T, dtype=torch.long)
    return (at < lengths[:, None] if side == "right" else at >= T - lengths[:, None]).long()


@given(
    side=st.sampled_from(["left", "right", "none"]),
    n=st.integers(1, 4),
    T=st.integers(1, 7),
    pool=st.sampled_from(["last", "mean"]),
    diff=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_decoder_pools_each_samples_own_tokens(side, n, T, pool, diff, seed):
    torch.manual_seed(seed)
    cfg = DecoderConfig(vocab_size=29, n_positions=8, d_model=8, n_head=2, n_layer=1, head="label_words",
                        label_ids=(3, 7), label_diff=diff, pool=pool)
    model = Decoder(cfg).double()
    X = {"idx": torch.randint(0, 29, (n, T)), "attention_mask": masks(n, T, side, seed)}
    K = quiet_ntk(model, X, precision="fp64")
    R = per_sample_gram(model, X)
    assert rel(K, R) <= 1e-10, f"{side} padding, pool {pool}: relative error {rel(K, R):.2e}"


def last_attended(ids, diff=False):
    """Reference output, written here: logits of `ids` at each sample's last attended position (n, k), or the
    difference of two (n,)."""

    def f(out, x):
        logits = getattr(out, "logits", out)
        pos = logits.shape[1] - 1 - x["attention_mask"].flip(1).argmax(1)  # the first 1 seen from the right
        z = logits[torch.arange(logits.shape[0]), pos][:, list(ids)]
        return z[:, 1] - z[:, 0] if diff else z

    f.takes_inputs = True
    return f


@given(side=st.sampled_from(["left", "right", "none"]), n=st.integers(1, 4), T=st.integers(1, 7),
       diff=st.booleans(), seed=st.integers(0, 2**16))
def test_label_word_head_reads_each_samples_last_token(side, n, T, diff, seed):
    """The label-word head's Gram equals that of the LM's logits read at each sample's last attended token."""
    torch.manual_seed(seed)
    base = dict(vocab_size=29, n_positions=8, d_model=8, n_head=2, n_layer=2)
    model = Decoder(DecoderConfig(**base, head="label_words", label_ids=(3, 7), label_diff=diff)).double()
    lm = Decoder(DecoderConfig(**base, head="lm")).double()
    lm.load_state_dict(model.state_dict())
    X = {"idx": torch.randint(0, 29, (n, T)), "attention_mask": masks(n, T, side, seed)}
    K = quiet_ntk(model, X, precision="fp64")
    R = per_sample_gram(lm, X, output=last_attended((3, 7), diff))
    assert rel(K, R) <= 1e-10, f"{side} padding: relative error {rel(K, R):.2e}"


def test_right_padding_gives_the_unpadded_samples_kernel():
    """With right padding and causal attention, each sample's output is that of its unpadded tokens alone."""
    torch.manual_seed(0)
    cfg = DecoderConfig(vocab_size=29, n_positions=8, d_model=8, n_head=2, n_layer=2, head="label_words",
                        label_ids=(3, 7), label_diff=True)
    model = Decoder(cfg).double()
    lengths = [2, 6, 4]
    X = {"idx": torch.randint(0, 29, (3, 6)), "attention_mask": masks(3, 6, "right", 0)}
    X["attention_mask"] = (torch.arange(6)[None] < torch.tensor(lengths)[:, None]).long()
    K = quiet_ntk(model, X, precision="fp64")
    ps = list(model.parameters())
    J = []
    for i, L in enumerate(lengths):
        gs = torch.autograd.grad(model(X["idx"][i : i + 1, :L])[0], ps)
        J.append(torch.cat([g.reshape(-1) for g in gs]))
    J = torch.stack(J)
    assert rel(K, J @ J.T) <= 1e-10, f"relative error {rel(K, J @ J.T):.2e}"


def test_fully_masked_rows_are_refused_by_name():
    model = Decoder(DecoderConfig(vocab_size=29, n_positions=8, d_model=8, n_head=2, n_layer=1))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1] = 0
    with pytest.raises(NTKError, match=r"rows \[1\] mask every token"):
        ntk(model, {"idx": torch.zeros(3, 5, dtype=torch.long), "attention_mask": mask}, progress=False)


@given(side=st.sampled_from(["left", "right", "none"]), n=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_transformers_gpt_neo_with_pad_token_and_padded_batches(tmp_path_factory, side, n, seed):
    """transformers' GPT-Neo, padded as its tokenizer pads (left for generation): label words at each sample's
    last attended token, fp64 end to end (its fp32 score cast removed, see conftest)."""
    with pytest.MonkeyPatch.context() as mp:
        gpt_neo_scores_in_model_dtype(mp)
        _, hf = make_gpt_neo_checkpoint(tmp_path_factory.mktemp("neo"), vocab=41, positions=10, d=16, layers=2,
                                        heads=2, window=3, seed=seed % 7)
        hf = hf.double()
        hf.config.pad_token_id = 0
        mask = masks(n, 9, side, seed)
        X = {"input_ids": torch.randint(1, 41, (n, 9)).masked_fill(mask == 0, 0), "attention_mask": mask}
        K = quiet_ntk(hf, X, output=label_words([7, 11], diff=True), precision="fp64")
        R = per_sample_gram(hf, X, output=last_attended([7, 11], diff=True))
    assert rel(K, R) <= 1e-10, f"{side} padding: relative error {rel(K, R):.2e}"


def test_transformers_fully_masked_rows_are_refused(tiny_gpt_neo):
    _, hf = tiny_gpt_neo
    mask = torch.ones(2, 4, dtype=torch.long)
    mask[0] = 0
    with pytest.raises(NTKError, match=r"rows \[0\] mask every token"):
        ntk(hf, {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": mask},
            output=label_words([1, 2]), progress=False)


# ----------------------------------------------------------------------------------------- a tied, padded embedding


def tiny_opt(seed=0):
    """transformers' OPT: a padded token embedding tied to the LM head, q/k/v biases (the key bias gets exactly
    zero gradient), MLPs on (n T, d) rows, and a positional Embedding subclass fed the attention mask."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=20, pad_token_id=1, word_embed_proj_dim=16, dropout=0.0)
    model = OPTForCausalLM(cfg).eval().double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("side", ["left", "right"])
def test_transformers_opt_tied_padded_embedding_and_qkv_biases(side):
    model = tiny_opt()
    mask = masks(4, 7, side, 3)
    X = {"input_ids": torch.randint(2, 50, (4, 7)).masked_fill(mask == 0, 1), "attention_mask": mask}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K = ntk(model, X, output=label_words([3, 5]), precision="fp64", progress=False)
    said = " ".join(str(w.message) for w in caught)
    assert "embed_positions is a OPTLearnedPositionalEmbedding" in said and "k_proj" not in said, said
    R = per_sample_gram(model, X, output=last_attended([3, 5]))
    assert rel(K, R) <= 1e-10, f"OPT, {side} padding: relative error {rel(K, R):.2e}"


# ----------------------------------------------------------------------------------------- parameter selection


def small_decoder(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=31, n_positions=8, d_model=8, n_head=2, n_layer=2, head="classes", n_classes=2)
    return Decoder(DecoderConfig(**{**cfg, **kw}))


def test_frozen_parameters_named_are_differentiated_and_stay_frozen():
    model = small_decoder()
    for p in model.blocks.parameters():
        p.requires_grad_(False)
    X = torch.randint(0, 31, (3, 5))
    K = quiet_ntk(model, X, params="blocks.1.*", precision="fp64")
    R = per_sample_gram(model, X, params="blocks.1.*")
    assert rel(K, R) <= 1e-10, f"frozen block: relative error {rel(K, R):.2e}"
    assert not any(p.requires_grad for p in model.blocks.parameters()), "ntk left frozen parameters trainable"
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(NTKError, match="no parameter of the model requires grad"):
        ntk(model, X, progress=False)


@pytest.mark.parametrize("which", ["module", "modules", "parameter", "parameters"])
def test_objects_select_on_a_converted_model(which):
    """An fp32 model asked for fp64 is converted; modules and parameters of the caller's model still select."""
    model = small_decoder()
    params = {"module": model.blocks[0], "modules": [model.ln_f, model.blocks[1].mlp],
              "parameter": model.head.weight, "parameters": [model.wte.weight, model.blocks[0].ln_1.bias]}[which]
    X = torch.randint(0, 31, (3, 5))
    K = quiet_ntk(model, X, params=params, precision="fp64")
    R = per_sample_gram(model, X, params=params)
    assert rel(K, R) <= 1e-10, f"{which}: relative error {rel(K, R):.2e}"


def test_floating_inputs_follow_the_models_conversion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.LayerNorm(7), nn.Linear(7, 1), nn.Flatten(0))
    X = torch.randn(4, 5)
    K = quiet_ntk(model, X, precision="fp64")
    assert rel(K, per_sample_gram(model, X)) <= 1e-10


# ----------------------------------------------------------------------------------------- checkpointing


class Checkpointed(nn.Module):
    def __init__(self, reentrant, raw):
        super().__init__()
        self.emb, self.l1, self.l2, self.out = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 1)
        self.raw = nn.Parameter(torch.randn(6, 6) / 3) if raw else None
        self.reentrant = reentrant

    def block(self, h):
        h = torch.tanh(self.l2(torch.tanh(self.l1(h))))
        return F.linear(h, self.raw) if self.raw is not None else h  # raw: a parameter outside the layers

    def forward(self, x):
        return self.out(checkpoint(self.block, self.emb(x), use_reentrant=self.reentrant)).mean(1)[:, 0]


@pytest.mark.parametrize("strategy", ["auto", "loop", "func"])
def test_reentrant_checkpointing_is_refused_with_the_fix(strategy):
    torch.manual_seed(0)
    with pytest.raises(NTKError, match="reentrant|strategy='loop'"):
        ntk(Checkpointed(True, False), torch.randint(0, 11, (3, 4)), strategy=strategy, progress=False)


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_non_reentrant_checkpointing_works_on_every_path(raw, strategy):
    torch.manual_seed(0)
    model = Checkpointed(False, raw).double()
    X = torch.randint(0, 11, (4, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # raw: the fallback's warnings
        K = ntk(model, X, precision="fp64", strategy=strategy, progress=False)
    R = per_sample_gram(model, X)
    assert rel(K, R) <= 1e-10, f"checkpointed, raw={raw}, {strategy}: relative error {rel(K, R):.2e}"


# ----------------------------------------------------------------------------------------- zero gradients, fp64


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_zero_gradient_biases_stay_layerwise(precision):
    """softmax ignores the key bias: its gradient is exactly zero, and the engine must neither warn nor fall back."""
    model = small_decoder(qkv_bias=True, sigma_b=0.5)
    X = torch.randint(0, 31, (4, 6))
    K = quiet_ntk(model, X, precision=precision)
    R = per_sample_gram(model, X)
    assert rel(K, R) <= TOL[precision], f"relative error {rel(K, R):.2e}"


def test_fp64_is_fp64_end_to_end_on_a_loaded_gpt_neo(tiny_gpt_neo, monkeypatch):
    """Our fp64 GPT-Neo keeps its scores in fp64: its Gram matches a reference on transformers' GPT-Neo with the
    fp32 score cast removed (an independent implementation) to fp64 accuracy."""
    folder, hf = tiny_gpt_neo
    ours = load_gpt_neo(folder, head="label_words", label_ids=(4, 9), label_diff=True)
    X = torch.randint(0, 61, (4, 12))
    K = quiet_ntk(ours, X, precision="fp64")
    gpt_neo_scores_in_model_dtype(monkeypatch)
    R = per_sample_gram(hf, X, output=label_words([4, 9], diff=True))
    assert rel(K, R) <= 1e-10, f"relative error {rel(K, R):.2e}"


def test_fp64_warns_when_the_model_narrows(tiny_gpt_neo):
    _, hf = tiny_gpt_neo
    with pytest.warns(UserWarning, match="computes part of its forward in torch.float32"):
        ntk(hf, torch.randint(0, 61, (2, 6)), output=label_words([4, 9]), precision="fp64", progress=False)


# ----------------------------------------------------------------------------------------- shapes and layouts


@given(T=st.integers(1, 6), n=st.integers(1, 4), precision=st.sampled_from(["fp64", "fp32"]))
def test_time_major_layers_are_routed_not_mixed(T, n, precision):
    """A Linear applied to (T, n, d) rows keeps no sample dimension first: the engine must not read its rows as
    samples (whether or not T is a multiple of n), and the Gram stays exact."""

    class TimeMajor(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mid, self.out = nn.Embedding(9, 4), nn.Linear(4, 4), nn.Linear(4, 1)

        def forward(self, x):
            h = torch.tanh(self.mid(self.emb(x).transpose(0, 1))).transpose(0, 1)
            return self.out(h).sum(1)[:, 0]

    torch.manual_seed(T)
    model = TimeMajor()
    X = torch.randint(0, 9, (n, T))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        K = ntk(model, X, precision=precision, progress=False)
    R = per_sample_gram(model, X)
    assert rel(K, R) <= TOL[precision], f"relative error {rel(K, R):.2e}"


class WideNorm(nn.Module):
    """A LayerNorm over two dimensions: (n, T, 2, 3)."""

    def __init__(self):
        super().__init__()
        self.lin, self.norm, self.out = nn.Linear(6, 6), nn.LayerNorm((2, 3)), nn.Linear(6, 1)
        with torch.no_grad():
            self.norm.weight.normal_()
            self.norm.bias.normal_()

    def forward(self, x):
        h = self.norm(self.lin(x).unflatten(-1, (2, 3))).flatten(-2)
        return self.out(torch.tanh(h)).sum((1, 2))


def test_layernorm_over_several_dimensions():
    torch.manual_seed(0)
    model = WideNorm()
    X = torch.randn(4, 5, 6)
    K = quiet_ntk(model, X, precision="fp64")
    assert rel(K, per_sample_gram(model, X)) <= 1e-10, f"relative error {rel(K, per_sample_gram(model, X)):.2e}"


# ----------------------------------------------------------------------------------------- what cannot run


def test_meta_device_models_are_refused():
    with torch.device("meta"):
        model = small_decoder()
    with pytest.raises(NTKError, match="meta device"):
        ntk(model, torch.zeros(2, 3, dtype=torch.long), progress=False)


def test_long_inputs_that_cannot_fit_are_refused_before_allocating():
    """A model whose attention materializes its T x T scores (as transformers' eager GPT-Neo does; ours is fused
    and linear in T): the probe's fit of its graph size refuses T = 60000 before running it."""
    model = small_decoder(n_positions=None, n_layer=1)
    for block in model.blocks:
        block.attn.forward = explicit_attention(block.attn)
    X = torch.randint(0, 31, (4, 60_000))
    with pytest.raises(NTKError, match=r"length T=60000 needs ~\d+\.\d GiB .* over the memory budget of 1\.0 GiB"):
        ntk(model, X, max_memory=1 << 30, progress=False)


def explicit_attention(attn):
    """attn's forward with the scores and probabilities formed, (n, H, T, T), as eager attention does."""

    def forward(x, key_mask=None):
        n, T, d = x.shape
        v = attn.v_proj(x).view(n, T, attn.n_head, attn.d_head).transpose(1, 2)
        return attn.out_proj((attn.scores(x, key_mask) @ v).transpose(1, 2).reshape(n, T, d))

    return forward


# ----------------------------------------------------------------------------------------- data-dependent structure


class OutputOne(nn.Module):
    """A raw parameter that only output 1 of 2 reads: the probe's gradient of output 0 cannot see it."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 1)
        self.w1 = nn.Parameter(torch.randn(6))

    def forward(self, x):
        h = torch.tanh(self.emb(x)).mean(1)
        return torch.cat([self.head(h), (h * self.w1).sum(-1, keepdim=True)], 1)


class SpecialToken(nn.Module):
    """A raw vector replaces token 10's embedding: only samples holding token 10 read it."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 6), nn.Linear(6, 1)
        self.vec = nn.Parameter(torch.randn(6))

    def forward(self, x):
        e = torch.where((x == 10)[..., None], self.vec.expand(*x.shape, 6), self.emb(x))
        return self.head(torch.tanh(e).mean(1))[:, 0]


class Unpadded(nn.Module):
    """A Linear run on the attended tokens only (h[mask]): its rows depend on each sample's length."""

    def __init__(self):
        super().__init__()
        self.emb, self.mlp, self.head = nn.Embedding(11, 6), nn.Linear(6, 6), nn.Linear(6, 1)

    def forward(self, idx, attention_mask):
        e = self.emb(idx)
        rows = torch.tanh(self.mlp(e[attention_mask.bool()]))
        h = torch.zeros_like(e).masked_scatter(attention_mask.bool()[..., None], rows)
        return self.head(h.sum(1))[:, 0]


class SoftPrompt(nn.Module):
    """A learned prompt embedded once (a batch of 1) and repeated for every sample."""

    def __init__(self):
        super().__init__()
        self.prompt, self.emb, self.head = nn.Embedding(3, 6), nn.Embedding(11, 6), nn.Linear(6, 1)

    def forward(self, x):
        p = self.prompt(torch.arange(3)[None]).repeat(x.shape[0], 1, 1)
        return self.head(torch.tanh(torch.cat([p, self.emb(x)], 1)).mean(1))[:, 0]


def unpadded_inputs():
    lengths = torch.tensor([3, 5, 5, 3])  # the probe's first and last rows have equal lengths, the others not
    mask = (torch.arange(5)[None] < lengths[:, None]).long()
    return {"idx": torch.randint(0, 11, (4, 5)), "attention_mask": mask}


@pytest.mark.parametrize("case", ["output one", "special token", "unpadded", "soft prompt"])
@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_structure_that_depends_on_outputs_or_data_is_routed(case, precision):
    """What the probe's few samples and its first output cannot show is still routed by structure: parameters
    read outside a contracted layer, rows whose count depends on the data, embeddings of a batch of 1."""
    torch.manual_seed(0)
    model, X = {
        "output one": (OutputOne(), torch.randint(0, 11, (4, 5))),
        "special token": (SpecialToken(), torch.tensor([[1, 2, 3], [4, 5, 6], [7, 10, 8], [9, 1, 2], [3, 4, 5]])),
        "unpadded": (Unpadded(), unpadded_inputs()),
        "soft prompt": (SoftPrompt(), torch.randint(0, 11, (3, 4))),
    }[case]
    with pytest.warns(UserWarning, match="per-sample gradients of the whole model"):
        K = ntk(model, X, precision=precision, progress=False)
    R = per_sample_gram(model, X)
    assert rel(K, R) <= TOL[precision], f"{case}: relative error {rel(K, R):.2e}"


@pytest.mark.parametrize("params", ["l1.*", ["l1.*", "out.*"], None])
def test_reentrant_checkpointing_is_refused_for_any_parameter_subset(params):
    torch.manual_seed(0)
    with pytest.raises(NTKError, match="reentrant activation checkpointing"):
        ntk(Checkpointed(True, False), torch.randint(0, 11, (3, 4)), params=params, progress=False)


def test_fallback_warning_once_per_model_at_the_callers_line():
    torch.manual_seed(0)
    X = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 10, 8], [9, 1, 2], [3, 4, 5]])
    first, second = SpecialToken(), SpecialToken()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for model in (first, first, second):
            ntk(model, X, progress=False)
    fallback = [w for w in seen if "per-sample gradients of the whole model" in str(w.message)]
    assert len(fallback) == 2, f"expected one warning per model, got {len(fallback)}"
    assert all(w.filename == __file__ for w in fallback), [w.filename for w in fallback]
    assert "transformers' Conv1D" in str(fallback[0].message), "Conv1D must not read as torch.nn.Conv1d"


class TokenMLP(nn.Module):
    """Linear layers over tokens, mean-pooled: the materialized form's shapes with a few parameters."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).mean(1)[:, 0]


@pytest.mark.parametrize("precision", ["fp64", "fp32"])
def test_many_samples_take_the_symmetric_gram_in_bands(precision):
    """n above SYRK_BLOCK: the diagonal tile's Gram is computed in bands on and above its diagonal, then mirrored."""
    from minintk.kernels import SYRK_BLOCK

    torch.manual_seed(0)
    n = 2 * SYRK_BLOCK + 37  # two bands and a ragged stripe
    model, X = TokenMLP(), torch.randn(n, 2, 3)
    K = ntk(model, X, precision=precision, strategy="materialized", progress=False, block_size=n)
    R = per_sample_gram(model, X)
    assert torch.equal(K, K.transpose(0, 1))
    assert rel(K, R) <= TOL[precision], f"error {rel(K, R):.2e}"
