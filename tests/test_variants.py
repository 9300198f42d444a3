"""Kernels of other optimizers (engine/variants.py): the SignGD kernel <g(x), sign(g(x'))> and the Adam-
preconditioned kernel <g(x), g(x') / (sqrt(v) + eps)>, against fp64 per-sample gradients from torch.func formed
here, on our decoder (tied embedding and LM head, two label words), on transformers' GPT-Neo and on a
peft-wrapped GPT-Neo (LoRA adapters only); and the errors that name a bad setting."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from minintk import Decoder, DecoderConfig
from minintk.engine import NTKError, Stats, adam, label_words, ntk, select_params, signgd

pytestmark = pytest.mark.usefixtures("one_thread")


def jacobian(model: nn.Module, X, output, params) -> torch.Tensor:
    """fp64 per-sample Jacobians (n C, P) of output(model(x)) w.r.t. `params` (names), in their order."""
    fixed = {n: p.detach() for n, p in model.named_parameters()}

    def f(ps, x):
        xb = {k: v[None] for k, v in x.items()} if isinstance(x, dict) else x[None]
        out = functional_call(model, {**fixed, **ps}, kwargs=xb) if isinstance(xb, dict) else \
            functional_call(model, {**fixed, **ps}, (xb,))
        return (out if output is None else output(out, xb) if getattr(output, "takes_inputs", False)
                else output(out)).reshape(-1)

    ps = {n: fixed[n] for n in params}
    with sdpa_kernel(SDPBackend.MATH):
        jac = vmap(jacrev(f), in_dims=(None, 0))(ps, X)
    return torch.cat([jac[n].reshape(jac[n].shape[0] * jac[n].shape[1], -1) for n in params], 1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm())


def decoder(**kw) -> Decoder:
    torch.manual_seed(0)
    cfg = dict(vocab_size=31, n_positions=8, d_model=16, n_head=2, n_layer=2, head="label_words",
               label_ids=(3, 5), sigma_b=0.2)
    return Decoder(DecoderConfig(**{**cfg, **kw})).double()


def moments(model: nn.Module, names) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {n: torch.rand(p.shape, generator=g, dtype=torch.float64) ** 2 for n, p in model.named_parameters()
            if n in names}


def full_layout(J1: torch.Tensor, J2: torch.Tensor, C: int) -> torch.Tensor:
    """(n C, n2 C) rows (sample, output) -> (n, n2, C, C), as ntk returns the full multi-output kernel."""
    return (J1 @ J2.T).reshape(J1.shape[0] // C, C, J2.shape[0] // C, C).permute(0, 2, 1, 3)


@pytest.mark.parametrize("precision, tol", [("fp64", 1e-10), ("fp32", 1e-5)])
@pytest.mark.parametrize("cross", [False, True])
def test_decoder_signgd_and_adam_kernels_equal_formed_gradients(precision, tol, cross):
    m = decoder()
    X = torch.randint(0, 31, (5, 6), generator=torch.Generator().manual_seed(2))
    X2 = torch.randint(0, 31, (4, 6), generator=torch.Generator().manual_seed(3)) if cross else None
    names = [n for n, _ in m.named_parameters()]
    J1 = jacobian(m, X, None, names)
    J2 = J1 if X2 is None else jacobian(m, X2, None, names)
    model = m if precision == "fp64" else m.float()
    got = ntk(model, X, X2, precision=precision, kernel="signgd", progress=False)
    assert got.shape == (5, 5 if X2 is None else 4, 2, 2)
    assert rel(got, full_layout(J1, torch.sign(J2), 2)) <= tol
    v = moments(m, names)
    w = torch.cat([1 / (v[n].sqrt() + 1e-8).reshape(-1) for n in names])
    got = ntk(model, X, X2, precision=precision, kernel=adam(v), progress=False)
    assert rel(got, full_layout(J1, J2 * w, 2)) <= tol


def test_trace_and_diagonal_are_read_from_the_full_kernel():
    m = decoder()
    X = torch.randint(0, 31, (4, 5), generator=torch.Generator().manual_seed(4))
    full = ntk(m, X, precision="fp64", kernel="signgd", progress=False)
    diag = ntk(m, X, precision="fp64", kernel="signgd", diagonal=True, progress=False)
    trace = ntk(m, X, precision="fp64", kernel="signgd", trace=True, progress=False)
    d = full.diagonal(dim1=2, dim2=3)
    assert torch.allclose(diag, d, rtol=0, atol=1e-14) and torch.allclose(trace, d.mean(-1), rtol=0, atol=1e-14)
    assert not torch.allclose(full[..., 0, 0], full[..., 0, 0].T), "the SignGD kernel is not symmetric"


def test_reference_strategies_take_the_variant_too():
    m = decoder()
    X = torch.randint(0, 31, (4, 5), generator=torch.Generator().manual_seed(5))
    layerwise = ntk(m, X, precision="fp64", kernel="signgd", progress=False)
    for strategy in ("func", "loop"):
        assert rel(ntk(m, X, precision="fp64", kernel="signgd", strategy=strategy, progress=False),
                   layerwise) <= 1e-12


@pytest.mark.parametrize("precision, tol", [("fp64", 1e-10), ("fp32", 1e-5)])
def test_transformers_gpt_neo(tiny_gpt_neo, precision, tol):
    _, hf = tiny_gpt_neo
    hf = hf.double()
    out = label_words([3, 7], diff=True)
    X = {"input_ids": torch.randint(0, 61, (5, 7), generator=torch.Generator().manual_seed(6)),
         "attention_mask": torch.ones(5, 7, dtype=torch.long)}
    X["attention_mask"][:2, :3] = 0  # left padding
    names = [n for n, p in hf.named_parameters() if p.requires_grad]
    J = jacobian(hf, X, out, names)
    model = hf if precision == "fp64" else hf.float()
    got = ntk(model, X, output=out, precision=precision, kernel="signgd", progress=False)
    assert rel(got, J @ torch.sign(J).T) <= tol


@pytest.mark.parametrize("precision, tol", [("fp64", 1e-10), ("fp32", 1e-5)])
def test_peft_lora_adapters_and_a_frozen_backbone_head(tiny_gpt_neo, precision, tol):
    """LoRA adapters are Linear modules inside peft's wrapper: the kernel of the adapters alone (the default
    selection: the parameters that require grad) and, of a frozen backbone, the kernel of one head parameter."""
    peft = pytest.importorskip("peft")
    _, hf = tiny_gpt_neo
    lora = peft.get_peft_model(hf.double(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            lora_dropout=0.0, init_lora_weights=False)).eval()
    out = label_words([3, 7])
    X = torch.randint(0, 61, (4, 6), generator=torch.Generator().manual_seed(7))
    names = [n for n, _ in select_params(lora)]
    assert names and all("lora_" in n for n in names)
    J = jacobian(lora, X, out, names)
    head = [n for n, _ in lora.named_parameters() if n.endswith("ln_f.weight")]
    Jh = jacobian(lora, X, out, head)
    model = lora if precision == "fp64" else lora.float()
    for kernel, J2 in (("sgd", J), ("signgd", torch.sign(J))):
        got = ntk(model, X, output=out, precision=precision, kernel=kernel, progress=False)
        assert rel(got, full_layout(J, J2, 2)) <= tol, kernel
    got = ntk(model, X, output=out, params=head, precision=precision, kernel="signgd", progress=False)
    assert rel(got, full_layout(Jh, torch.sign(Jh), 2)) <= tol


class _OutsideRead(nn.Module):
    """A parameter read outside any layer: the probe routes it to the reference path."""

    def __init__(self):
        super().__init__()
        self.emb, self.scale = nn.Embedding(11, 4), nn.Parameter(torch.ones(4))
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.emb(x).mean(1) * self.scale)[:, 0]


def test_errors_name_the_setting():
    m = decoder()
    X = torch.randint(0, 31, (3, 4))
    with pytest.raises(NTKError, match="unknown kernel 'lion'; expected one of sgd, signgd, adam"):
        ntk(m, X, kernel="lion", progress=False)
    with pytest.raises(NTKError, match=r"kernel='adam' needs the second moments: pass kernel=adam\(second_moment"):
        ntk(m, X, kernel="adam", progress=False)
    with pytest.raises(NTKError, match="kernel=signgd is the function: pass kernel=signgd"):
        ntk(m, X, kernel=signgd, progress=False)
    with pytest.raises(NTKError, match="second_moment must be a dict"):
        adam([1, 2])
    with pytest.raises(NTKError, match=r"second moments of \['wte.weight'\] hold NaN or inf"):
        adam({"wte.weight": torch.full((31, 16), float("nan"))})
    with pytest.raises(NTKError, match=r"adam kernel: no second moment for \['wte.weight'"):
        ntk(m, X, kernel=adam({}), progress=False)
    with pytest.raises(NTKError, match=r"second moment of wte.weight has shape \(2,\), the parameter \(31, 16\)"):
        ntk(m, X, params="wte.weight", kernel=adam({"wte.weight": torch.ones(2)}), progress=False)
    with pytest.warns(UserWarning, match="scale"), pytest.raises(NTKError, match="pass strategy='func'"):
        ntk(_OutsideRead().double(), torch.randint(0, 11, (3, 5)), precision="fp64", kernel="signgd",
            progress=False)
    K = ntk(_OutsideRead().double(), torch.randint(0, 11, (3, 5)), precision="fp64", kernel="signgd",
            strategy="func", progress=False)
    assert K.shape == (3, 3)


@pytest.mark.parametrize("kernel", ["signgd", "adam"])
def test_many_tiles_and_layer_groups_assemble_the_same_kernel(kernel):
    """Sample tiles of 2 and a budget that splits the layers into groups: every tile of the asymmetric SignGD
    kernel is computed (none mirrored), and the Adam kernel's mirrored tiles are its own."""
    from minintk.engine import plan

    m = decoder()
    X = torch.randint(0, 31, (7, 6), generator=torch.Generator().manual_seed(8))
    names = [n for n, _ in m.named_parameters()]
    var = "signgd" if kernel == "signgd" else adam(moments(m, names))
    whole = ntk(m, X, precision="fp64", kernel=var, progress=False)
    budget = next(b for b in (int(4e6 * 0.8**k) for k in range(40))
                  if len(plan(m, X, X, precision="fp64", max_memory=b, block_size=2).groups) > 1)
    own, cross = Stats(), Stats()
    tiled = ntk(m, X, precision="fp64", kernel=var, block_size=2, max_memory=budget, progress=False, stats=own)
    assert rel(tiled, whole) <= 1e-12
    if kernel == "signgd":  # X with itself: one boundary cache, diagonal tiles captured once, priced so
        copy = ntk(m, X, X.clone(), precision="fp64", kernel=var, block_size=2, max_memory=budget, progress=False,
                   stats=cross)
        assert rel(copy, whole) <= 1e-12 and own.plan.passes < cross.plan.passes, (own.plan, cross.plan)
