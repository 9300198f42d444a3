"""The layerwise NTK engine against an independent fp64 torch.func Jacobian (docs/theory.md section 2)."""

import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev, vmap

from minintk import Decoder, DecoderConfig
from minintk.engine import NTKError, label_words, last_blocks, ntk, select_params


def reference_gram(model, X, X2=None, output=None, params=None):
    """fp64 K = J J^T from torch.func.jacrev, one sample at a time: (n, n2, C, C) or (n, n2)."""
    model = model.double() if next(model.parameters()).dtype != torch.float64 else model
    names = [n for n, _ in select_params(model, params)]
    full = dict(model.named_parameters())

    def f(ps, x):
        out = functional_call(model, {**full, **ps}, (x[None],))
        out = output(out) if output is not None else out
        return out[0]

    def jac(Xs):
        ps = {n: full[n].detach() for n in names}
        J = vmap(jacrev(f), in_dims=(None, 0))(ps, Xs)
        rows = [
            J[n].reshape(Xs.shape[0], -1, full[n].numel())
            if J[n].dim() > full[n].dim() + 1
            else J[n].reshape(Xs.shape[0], 1, full[n].numel())
            for n in names
        ]
        return torch.cat(rows, -1)  # (n, C, P)

    J1 = jac(X)
    J2 = J1 if X2 is None else jac(X2)
    K = torch.einsum("icp,jdp->ijcd", J1, J2)
    return K


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def small_decoder(seed=0, **kw):
    torch.manual_seed(seed)
    base = dict(vocab_size=37, n_positions=12, d_model=16, n_head=2, n_layer=2, sigma_b=0.3)
    base.update(kw)
    return Decoder(DecoderConfig(**base))


@given(
    width=st.sampled_from([8, 16, 24]),
    heads=st.sampled_from([1, 2, 4]),
    depth=st.integers(1, 2),
    T=st.integers(1, 9),
    n=st.integers(1, 5),
    window=st.sampled_from([None, 2]),
    param=st.sampled_from(["standard", "ntk"]),
    head=st.sampled_from(["scalar", "label_words", "classes"]),
    scale=st.sampled_from(["1/d", "1/sqrt(d)", "none"]),
    block=st.sampled_from([None, 2]),
)
def test_fp64_matches_torch_func(width, heads, depth, T, n, window, param, head, scale, block):
    m = small_decoder(
        d_model=width,
        n_head=heads,
        n_layer=depth,
        attention_windows=(window, None),
        parameterization=param,
        head=head,
        label_ids=(3, 5),
        label_diff=True,
        n_classes=3,
        attn_scale=scale,
    ).double()
    X = torch.randint(0, 37, (n, T))
    K = ntk(m, X, precision="fp64", block_size=block, progress=False)
    R = reference_gram(m, X)
    R = R[:, :, 0, 0] if head != "classes" else R
    assert K.dtype == torch.float64 and K.shape == R.shape
    assert rel(K, R) <= 1e-10, f"relative Frobenius error {rel(K, R):.2e} > 1e-10"


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialized", "loop", "func"])
def test_fp32_every_strategy(strategy):
    m = small_decoder(head="label_words", label_ids=(1, 2), label_diff=True, attention_windows=(3, None))
    X = torch.randint(0, 37, (6, 10))
    K = ntk(m, X, precision="fp32", strategy=strategy, progress=False)
    R = reference_gram(m, X)[:, :, 0, 0]
    assert K.dtype == torch.float32
    assert rel(K, R) <= 1e-5, f"{strategy}: relative error {rel(K, R):.2e} > 1e-5"
    if strategy in ("loop", "func"):
        assert torch.allclose(K, K.T, rtol=0, atol=1e-6 * K.abs().max()), "K is not symmetric"
    else:  # the layerwise engine symmetrizes its Gram
        assert torch.equal(K, K.T), "K is not exactly symmetric"
    eig = torch.linalg.eigvalsh(K.double())
    assert eig.min() >= -1e-5 * eig.max(), f"K is not PSD: smallest eigenvalue {eig.min():.2e}"


def test_cross_kernel_and_tiles():
    m = small_decoder(head="scalar", parameterization="ntk").double()
    X, X2 = torch.randint(0, 37, (5, 7)), torch.randint(0, 37, (3, 7))
    K = ntk(m, X, X2, precision="fp64", block_size=2, progress=False)
    R = reference_gram(m, X, X2)[:, :, 0, 0]
    assert K.shape == (5, 3) and rel(K, R) <= 1e-10, f"cross kernel error {rel(K, R):.2e}"


def test_multi_output_with_and_without_trace():
    m = small_decoder(head="classes", n_classes=3).double()
    X = torch.randint(0, 37, (4, 6))
    K = ntk(m, X, precision="fp64", progress=False)
    R = reference_gram(m, X)
    assert K.shape == (4, 4, 3, 3) and rel(K, R) <= 1e-10, f"multi-output error {rel(K, R):.2e}"
    Kt = ntk(m, X, precision="fp64", trace=True, block_size=3, progress=False)
    Rt = R.diagonal(dim1=2, dim2=3).mean(-1)  # the mean over outputs (neural-tangents' convention)
    assert Kt.shape == (4, 4) and rel(Kt, Rt) <= 1e-10, f"traced error {rel(Kt, Rt):.2e}"


@pytest.mark.parametrize("which", ["attention", "last_block", "head_module", "predicate"])
def test_parameter_subsets(which):
    m = small_decoder(head="label_words", label_ids=(4, 9), n_layer=3).double()
    params = {
        "attention": "blocks.*.attn.*",
        "last_block": last_blocks(m, 1),
        "head_module": m.ln_f,
        "predicate": lambda name, p: name.startswith("wte"),  # the tied embedding / LM head
    }[which]
    X = torch.randint(0, 37, (4, 8))
    K = ntk(m, X, params=params, precision="fp64", progress=False)
    R = reference_gram(m, X, params=params)
    assert rel(K, R) <= 1e-10, f"{which}: error {rel(K, R):.2e}"


def test_tied_head_has_cross_terms():
    m = small_decoder(head="label_words", label_ids=(4, 9), label_diff=True).double()
    X = torch.randint(0, 37, (4, 8))
    K = ntk(m, X, params="wte.*", precision="fp64", progress=False)
    # without the cross terms: the embedding use and the head use as if they were separate parameters
    untied = small_decoder(head="label_words", label_ids=(4, 9), label_diff=True).double()
    untied.lm_head.weight = nn.Parameter(m.wte.weight.detach().clone())
    Ku = ntk(untied, X, params=["wte.*", "lm_head.*"], precision="fp64", progress=False)
    R = reference_gram(m, X, params="wte.*")[:, :, 0, 0]
    assert rel(K, R) <= 1e-10 and rel(Ku, R) > 1e-3, f"tied {rel(K, R):.2e}, untied {rel(Ku, R):.2e}"


def test_untied_head_config_is_exact():
    m = small_decoder(head="label_words", label_ids=(4, 9), tie_lm_head=False).double()
    assert m.lm_head.weight is not m.wte.weight
    X = torch.randint(0, 37, (4, 8))
    for params in (None, ["wte.*", "lm_head.*"]):
        K, R = ntk(m, X, params=params, precision="fp64", progress=False), reference_gram(m, X, params=params)
        assert rel(K, R) <= 1e-10, f"untied head, params={params}: error {rel(K, R):.2e}"


def test_transformers_gpt_neo_label_word_difference(tmp_path):
    from conftest import make_gpt_neo_checkpoint

    _, hf = make_gpt_neo_checkpoint(tmp_path, vocab=41, positions=10, d=16, layers=2, heads=2, window=3)
    hf = hf.double()
    out = label_words([7, 11], diff=True)
    X = torch.randint(0, 41, (5, 10))
    K = ntk(hf, X, output=out, precision="fp64", block_size=3, progress=False)

    def f(o):
        return out(o)

    names = [n for n, _ in hf.named_parameters()]
    full = dict(hf.named_parameters())

    def one(ps, x):
        return f(functional_call(hf, {**full, **ps}, (x[None],)))[0]

    J = vmap(jacrev(one), in_dims=(None, 0))({n: full[n].detach() for n in names}, X)
    Jm = torch.cat([J[n].reshape(5, -1) for n in names], 1)
    R = Jm @ Jm.T
    assert rel(K, R) <= 1e-10, f"transformers GPT-Neo NTK error {rel(K, R):.2e}"


class RawParamModel(nn.Module):
    """A layer the engine does not know (a raw parameter through F.linear) next to one it does."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.w = nn.Parameter(torch.randn(6, 6) / 3)
        self.out = nn.Linear(6, 1)

    def forward(self, x):
        return self.out(torch.tanh(F.linear(self.emb(x), self.w))).mean(1)[:, 0]


def test_unknown_layers_fall_back_to_torch_func_with_a_warning():
    torch.manual_seed(0)
    m = RawParamModel().double()
    X = torch.randint(0, 11, (4, 5))
    with pytest.warns(UserWarning, match=r"w is not a parameter of a layer the engine contracts"):
        K = ntk(m, X, precision="fp64", progress=False)
    R = reference_gram(m, X)[:, :, 0, 0]
    assert rel(K, R) <= 1e-10, f"fallback error {rel(K, R):.2e}"


@pytest.mark.parametrize("precision,noise,passes", [("fp32", 1e-3, False), ("tf32", 1e-3, True),
                                                   ("tf32", 0.3, False), ("bf16", 1e-2, True), ("fp64", 1e-12, True)])
def test_probe_tolerates_the_rounding_of_its_precision(precision, noise, passes):
    """The probe compares the layers' implied gradients with autograd's: TF32's ~1e-3 rounding (which reaches
    the backward pass on GPUs) must not send every layer to the reference path, while an O(1) mismatch must; the
    error is relative to the sum of the terms' magnitudes (the scale of rounding), so a gradient that cancels
    to zero passes."""
    from minintk.engine.checks import implied_matches
    from minintk.engine.precision import TOLERANCE

    g = torch.Generator().manual_seed(0)
    terms = torch.randn(50, 8, 8, generator=g, dtype=torch.float64)
    terms[-1] = -terms[:-1].sum(0)  # the terms cancel: the gradient is exactly zero
    implied, magnitude = terms.sum(0), terms.abs().sum(0)
    ref = implied + noise * magnitude * torch.rand(8, 8, generator=g, dtype=torch.float64)
    assert implied_matches(implied, magnitude, ref, TOLERANCE[precision]) == passes


def test_normalize_by_width():
    m = small_decoder().double()
    X = torch.randint(0, 37, (3, 4))
    K = ntk(m, X, precision="fp64", progress=False)
    assert torch.allclose(ntk(m, X, precision="fp64", normalize=True, progress=False), K / 16)


@pytest.mark.parametrize(
    "X,output,match",
    [
        (torch.rand(3, 4), None, "must be an integer tensor"),
        (torch.zeros(3, dtype=torch.long), None, r"must have shape \(n, T\)"),
        (torch.tensor([[1, 99]]), None, r"must lie in \[0, 37\), got min 1, max 99"),
        (torch.zeros(3, 4, dtype=torch.long), lambda out: out.sum(), "one value"),
    ],
)
def test_bad_input_is_named(X, output, match):
    m = small_decoder()
    with pytest.raises(NTKError, match=match):
        ntk(m, X, output=output, progress=False)


def test_nan_dropout_and_unknown_settings_are_refused():
    m = small_decoder()
    X = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(NTKError, match="unknown precision 'fp16'"):
        ntk(m, X, precision="fp16")
    drop = nn.Sequential(nn.Embedding(37, 4), nn.Dropout(0.1), nn.Flatten(), nn.Linear(12, 1))
    with pytest.raises(NTKError, match=r"dropout \(p=0.1\) in training mode"):
        ntk(drop, X[:, :3].repeat(1, 1), progress=False)
    with torch.no_grad():
        m.blocks[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(NTKError, match=r"blocks\.0\.mlp\.c_fc\.weight holds NaN"):
        ntk(m, X, progress=False)


def test_peak_memory_stays_under_max_memory_as_n_grows():
    """A subprocess measures its own peak RSS: the tiled run's growth stays under max_memory."""
    code = textwrap.dedent(
        """
        import resource, sys, torch
        from minintk import Decoder, DecoderConfig
        from minintk.engine import ntk
        torch.manual_seed(0)
        m = Decoder(DecoderConfig(vocab_size=50, n_positions=64, d_model=64, n_head=4, n_layer=2))
        n, budget = int(sys.argv[1]), 24 << 20
        ntk(m, torch.randint(0, 50, (4, 64)), progress=False, max_memory=budget)  # warm-up
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        K = ntk(m, torch.randint(0, 50, (n, 64)), progress=False, max_memory=budget)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        print(peak - base, K.shape[0])
        """
    )
    growth = {}
    for n in (32, 128):
        out = subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True, text=True, check=True)
        growth[n] = int(out.stdout.split()[0])
    # captures of all 128 samples untiled would take ~128 * 64 tokens * ~3.4k floats * 4 B ~ 110 MiB
    # RSS also counts the allocator's slack (freed blocks malloc keeps): allow 25% over the budget, far below 110 MiB
    assert max(growth.values()) <= 1.25 * (24 << 20), f"peak growth {growth} exceeds the 24 MiB budget by > 25%"


def test_plan_reports_tiles_and_memory():
    from minintk.engine import plan

    m = small_decoder()
    p = plan(m, torch.randint(0, 37, (64, 12)), max_memory=256 << 10)
    assert p.block < 64 and p.bytes_captures + p.bytes_graph_chunk <= 256 << 10, str(p)
    assert "NTK plan: n=64" in str(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K = ntk(m, torch.randint(0, 37, (64, 12)), max_memory=256 << 10, progress=False)
    assert K.shape == (64, 64)


def test_bf16_mode_is_close_and_keeps_fp32_scores():
    """bf16 autocast forward, bf16 factors, fp32 accumulation: within 5% of the fp64 Gram on a small model."""
    model = small_decoder(3)
    X = torch.randint(0, 37, (6, 9))
    K = ntk(model, X, precision="bf16", progress=False)
    assert K.dtype == torch.float32
    err = rel(K, reference_gram(model, X)[:, :, 0, 0])
    assert err < 5e-2, err


def test_discovery_is_cached_per_model_and_cleared():
    """The probe runs once per model, parameters, output and input shape: a second call runs fewer forward
    passes, a new sequence length and clear_cache() probe again."""
    from minintk.engine import clear_cache

    model = small_decoder(4)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))

    def passes(X):
        calls.clear()
        K = ntk(model, X, precision="fp32", progress=False)
        return len(calls), K

    X = torch.randint(0, 37, (5, 7))
    first, K1 = passes(X)
    again, K2 = passes(torch.randint(0, 37, (5, 7)))
    longer, _ = passes(torch.randint(0, 37, (5, 8)))
    clear_cache()
    cleared, K3 = passes(X)
    assert again < first and longer == first and cleared == first, (first, again, longer, cleared)
    torch.testing.assert_close(K3, K1, rtol=1e-6, atol=1e-6)
    assert not torch.equal(K2, K1)


def _segmented_budget(model, X, X2=None, starts=False, **kw):
    """A memory budget under which the planner picks a segmented plan with several layer groups (whose runs
    start from cached hidden states, with starts=True), or None."""
    from minintk.engine import plan

    for k in range(40):
        budget = int(64e6 * 0.8**k)
        try:
            p = plan(model, X, X2, max_memory=budget, **kw)
        except NTKError:
            break
        if p.segmented and len(p.groups) > 1 and (bool(p.starts) or not starts):
            return budget, p
    return None, None


class ListBlocks(nn.Module):
    """A chain of blocks that return their hidden state in a list: a run cannot rebuild such an output, so the
    engine recomputes a forward-only prefix instead of starting from a cached state."""

    def __init__(self, n_layer=4, d=16):
        super().__init__()
        self.emb = nn.Embedding(37, d)
        self.blocks = nn.ModuleList(_ListBlock(d) for _ in range(n_layer))
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)[0]
        return self.head(h[:, -1])


class _ListBlock(nn.Module):
    """Token mixing (softmax(h h^T) h, as attention's scores) and an MLP, returning [h]."""

    def __init__(self, d):
        super().__init__()
        self.ln, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, h):
        z = self.ln(h)
        z = torch.softmax(z @ z.transpose(1, 2) / z.shape[-1] ** 0.5, -1) @ z
        return [h + self.out(torch.tanh(self.fc(z)))]


@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_segmented_capture_matches_torch_func(cross, skip):
    """Block-boundary gradients from one full pass, then each layer group recomputed from its own blocks: from
    cached hidden states (skip), or after a forward-only prefix (blocks whose outputs the engine cannot rebuild)."""
    from minintk.engine import Stats

    torch.manual_seed(0)
    if skip:
        m = small_decoder(n_layer=4, head="label_words", label_ids=(4, 9), label_diff=False, n_positions=16).double()
    else:
        m = ListBlocks().double()
    X = torch.randint(0, 37, (16, 12))
    X2 = torch.randint(0, 37, (9, 12)) if cross else None
    budget, p = _segmented_budget(m, X, X2, starts=skip, precision="fp64")
    assert p is not None, "no budget gave a segmented plan"
    assert p.boundaries and "segmented" in str(p)
    assert bool(p.starts) == skip and ("hidden states" in str(p)) == skip
    stats = Stats()
    K = ntk(m, X, X2, precision="fp64", max_memory=budget, progress=False, stats=stats)
    assert stats.plan.segmented and stats.seconds["boundary"] > 0
    R = reference_gram(m, X, X2)
    R = R if R.dim() == 4 and R.shape[-1] > 1 else R.reshape(K.shape)
    assert rel(K, R) <= 1e-10, f"segmented plan {p}: error {rel(K, R):.2e}"


def test_segmented_bf16_runs_from_cached_hidden_states_stay_within_the_mode_error():
    """bf16: runs from cached (fp32 residual) hidden states give a Gram as close to fp64 as one full pass."""
    torch.manual_seed(0)
    m = small_decoder(n_layer=4, head="label_words", label_ids=(4, 9), label_diff=False, n_positions=16)
    X = torch.randint(0, 37, (16, 12))
    budget, p = _segmented_budget(m, X, starts=True, precision="bf16")
    assert p is not None and p.starts
    K = ntk(m, X, precision="bf16", max_memory=budget, progress=False)
    R = reference_gram(m.double(), X, None)
    one = rel(ntk(m, X, precision="bf16", progress=False), R)
    assert rel(K, R) <= max(2 * one, 1e-2), (rel(K, R), one)


def test_transformers_blocks_are_segments(tmp_path):
    """transformers' GPT-Neo blocks (tuple outputs, keyword masks) pass the segmentation check; the Gram of a
    segmented plan is exact."""
    from conftest import make_gpt_neo_checkpoint

    from minintk.engine import layer_structure

    _, hf = make_gpt_neo_checkpoint(tmp_path, vocab=41, positions=10, d=16, layers=4, heads=2, window=3)
    hf = hf.double()
    out = label_words([7, 11], diff=True)
    X = torch.randint(0, 41, (12, 10))
    st = layer_structure(hf, X, output=out, precision="fp64")
    segs = [u.segment for u in st.uses]
    assert st.chain.L == 4
    assert segs == sorted(segs) and segs[0] == 0 and segs[-1] == 5  # embeddings ... lm_head after the last block
    assert st.skip_prefix  # runs start from cached hidden states: skipped blocks return transformers' form
    budget, p = _segmented_budget(hf, X, output=out, starts=True, precision="fp64")
    assert p is not None and p.starts
    K = ntk(hf, X, output=out, precision="fp64", max_memory=budget, progress=False)
    R = reference_gram(hf, X, output=lambda o: out(o))
    assert rel(K, R[:, :, 0, 0] if R.dim() == 4 else R) <= 1e-10


@pytest.mark.parametrize("kind", ["decoder", "transformers"])
def test_segmented_runs_from_cached_hidden_states_with_padding_masks(tmp_path, kind):
    """Runs that start from cached hidden states keep the keyword/positional masks the model passes its blocks."""
    from conftest import make_gpt_neo_checkpoint

    torch.manual_seed(0)
    mask = torch.ones(12, 10, dtype=torch.long)
    mask[:4, :3] = 0
    if kind == "transformers":
        m = make_gpt_neo_checkpoint(tmp_path, vocab=41, positions=10, d=16, layers=4, heads=2, window=3)[1].double()
        out, X = label_words([7, 11], diff=True), {"input_ids": torch.randint(0, 41, (12, 10)), "attention_mask": mask}
    else:
        m = small_decoder(n_layer=4, head="label_words", label_ids=(4, 9), label_diff=True, n_positions=16).double()
        out, X = None, {"idx": torch.randint(0, 37, (12, 10)), "attention_mask": mask}
    budget, p = _segmented_budget(m, X, output=out, starts=True, precision="fp64")
    assert p is not None and p.starts
    K = ntk(m, X, output=out, precision="fp64", max_memory=budget, progress=False)
    assert rel(K, ntk(m, X, output=out, precision="fp64", progress=False)) <= 1e-12


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_layers_reading_one_input_store_it_once(precision):
    """q/k/v projections read the same LayerNorm output: the capture keeps one copy (also across chunks, and in
    bf16, where the copy is a cast), and the planner counts it once."""
    from minintk.engine import Spec, layer_structure
    from minintk.engine.capture import capture
    from minintk.engine.layers import capture_bytes

    m = small_decoder(n_layer=2)
    X = torch.randint(0, 37, (6, 5))
    st = layer_structure(m, X, precision=precision)
    by = {u.label: u for u in st.uses}
    q, k, v = (f"blocks.0.attn.{p}_proj" for p in "qkv")
    assert by[q].shares_x == "" and by[k].shares_x == q and by[v].shares_x == q
    assert by["blocks.0.mlp.c_fc"].shares_x == ""
    spec = Spec(m, None, tuple(select_params(m)), precision, torch.device("cpu"))
    cap = capture(spec, st, X, 0, 6, list(st.uses), chunk=4)  # two chunks: preallocated buffers
    # k and v keep every step; so may q, whose gradient at position 0 (a one-key softmax row) is zero only up to
    # the fused attention kernel's rounding; where it is exactly zero, q's input is sliced to the steps it keeps
    assert cap.B[k] is cap.B[v] and cap.A[k] is not cap.A[v]
    assert cap.B[q] is cap.B[k] if cap.B[q].shape[1] == 5 else torch.equal(cap.B[q], cap.B[k][:, 1:])
    elem = spec.cap_dtype.itemsize
    shared = [by[q], by[k], by[v]]
    assert capture_bytes(shared, elem, 1) == sum(u.bytes_per_sample(elem, 1) for u in shared) - 2 * 5 * 16 * elem
    K = ntk(m, X, precision=precision, block_size=3, progress=False)  # two sample tiles: cross captures too
    R = reference_gram(m.double(), X)[:, :, 0, 0]
    assert rel(K, R) <= (1e-5 if precision == "fp32" else 2e-2)


class ParallelBlocks(nn.Module):
    """A ModuleList whose members are not a chain (all read the embedding): not segmentable."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(13, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        h = self.emb(x)
        return self.out(sum(b(h) for b in self.blocks)).mean(1)[:, 0]


def test_blocks_that_are_not_a_chain_are_not_segmented():
    from minintk.engine import layer_structure

    torch.manual_seed(0)
    m = ParallelBlocks().double()
    X = torch.randint(0, 13, (6, 5))
    assert layer_structure(m, X, precision="fp64").chain.blocks == ()
    K = ntk(m, X, precision="fp64", max_memory=1 << 16, progress=False)
    assert rel(K, reference_gram(m, X)[:, :, 0, 0]) <= 1e-10


def test_global_tf32_flags_do_not_leak_into_fp32(monkeypatch):
    """Every backward pass of an fp32 Gram runs with TF32 off, even when the caller turned it on globally (and the
    caller's flags come back afterwards)."""
    m = small_decoder(head="label_words", label_ids=(4, 9), label_diff=True)
    seen = []
    real = torch.autograd.grad

    def spy(*a, **k):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32))
        return real(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        ntk(m, torch.randint(0, 37, (5, 8)), progress=False)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(old)
    assert seen and all(s == ("highest", False) for s in seen), seen


def test_segmented_cache_in_host_memory_is_exact_and_saves_passes():
    """A plan whose boundary cache (hidden states, output-gradients) would crowd the device keeps it in host
    memory (on CUDA; allowed on CPU here through the cost model, where the copies go host to host) and needs
    fewer passes or fewer sample tiles than the best plan with the cache on the device; the Gram stays exact."""
    from minintk.engine import CostModel, Stats, plan

    torch.manual_seed(0)
    m = small_decoder(n_layer=4, head="label_words", label_ids=(4, 9), label_diff=False, n_positions=16).double()
    X = torch.randint(0, 37, (16, 12))
    X2 = torch.randint(0, 37, (9, 12))
    host = CostModel(host_bytes_per_s=1e18, host_cache=True)  # copies priced at ~0 passes
    found = None
    for k in range(40):
        budget = int(64e6 * 0.8**k)
        try:
            p = plan(m, X, X2, max_memory=budget, precision="fp64", cost=host)
        except NTKError:
            break
        if p.host_cache:
            found = (budget, p, plan(m, X, X2, max_memory=budget, precision="fp64", cost=CostModel(host_cache=False)))
            break
    assert found is not None, "no budget gave a host-memory cache"
    budget, p, dev = found
    assert "in host memory" in str(p) and not dev.host_cache
    # the device left free buys fewer passes, or larger sample tiles (fewer per-sample gradient formations)
    assert p.passes < dev.passes or p.block > dev.block, (str(p), str(dev))
    stats = Stats()
    K = ntk(m, X, X2, precision="fp64", max_memory=budget, progress=False, stats=stats, cost=host)
    assert stats.plan.host_cache
    assert rel(K, reference_gram(m, X, X2)) <= 1e-10


def test_plan_of_an_fp32_model_in_fp64_is_the_plan_ntk_uses():
    """plan() converts the model to the precision's dtype as ntk() does (an fp32 model probed in fp64 failed the
    probe's fp64 check and planned every parameter for the torch.func fallback)."""
    from minintk.engine import Stats, plan

    m = small_decoder(n_layer=2, head="label_words", label_ids=(4, 9), label_diff=True, n_positions=16)
    X = torch.randint(0, 37, (6, 12))
    p = plan(m, X, precision="fp64")
    stats = Stats()
    ntk(m, X, precision="fp64", progress=False, stats=stats)
    assert p.fallback == () and str(p) == str(stats.plan)
