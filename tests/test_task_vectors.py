"""Task arithmetic (minintk.task_vectors): exact on parameters, cosines against numpy, and the weight
disentanglement error: zero for a model linear in disjoint parameter blocks, the closed form otherwise."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minintk.task_vectors import (
    TaskVectorError,
    add,
    choose_coef,
    combine,
    cosine_matrix,
    disagreement,
    disentanglement_error,
    negate,
    norm,
    squared,
    task_vector,
)

F64 = torch.float64


def dyadic(shape, seed: int, dtype=F64) -> torch.Tensor:
    """Values k / 16 with |k| < 64: sums, differences and halvings of them are exact in fp32 and fp64."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-63, 64, shape, generator=g).to(F64) / 16).to(dtype)


def params(seed: int, dtype=F64) -> dict:
    return {"a.weight": dyadic((3, 4), seed, dtype), "a.bias": dyadic((3,), seed + 1, dtype),
            "b.weight": dyadic((2, 2, 2), seed + 2, dtype)}


@given(seed=st.integers(0, 1000), lam=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
       dtype=st.sampled_from([torch.float32, F64]))
def test_arithmetic_on_parameters_is_exact(seed, lam, dtype):
    pre, ft1, ft2 = params(seed, dtype), params(seed + 7, dtype), params(seed + 13, dtype)
    tau1, tau2 = task_vector(ft1, pre), task_vector(ft2, pre)
    for k in pre:
        assert tau1[k].dtype == dtype and torch.equal(tau1[k], ft1[k] - pre[k])
    back = add(pre, [tau1], 1.0)
    assert all(torch.equal(back[k], ft1[k]) for k in pre), "theta_pre + tau != theta_ft"
    both = add(pre, [tau1, tau2], lam)
    neg = negate(pre, tau1, lam)
    for k in pre:
        assert torch.equal(both[k], pre[k] + lam * (ft1[k] - pre[k]) + lam * (ft2[k] - pre[k])), k
        assert torch.equal(neg[k], pre[k] - lam * (ft1[k] - pre[k])), k
    per = combine(pre, [tau1, tau2], [lam, -0.5])
    assert all(torch.equal(per[k], pre[k] + lam * tau1[k] - 0.5 * tau2[k]) for k in pre)


def test_vectors_over_a_subset_leave_the_rest_pretrained():
    pre, ft = params(0), params(1)
    tau = task_vector(ft, pre, keys=["a.weight"])
    out = add(pre, [tau], 1.0)
    assert torch.equal(out["a.weight"], ft["a.weight"]) and torch.equal(out["b.weight"], pre["b.weight"])
    assert norm(tau) == pytest.approx(float((ft["a.weight"] - pre["a.weight"]).norm()))
    with pytest.raises(TaskVectorError, match="missing"):
        task_vector(ft, pre, keys=["c.weight"])
    with pytest.raises(TaskVectorError, match="shape"):
        task_vector({"a.weight": torch.zeros(2)}, {"a.weight": torch.zeros(3)})
    with pytest.raises(TaskVectorError, match="coefficients"):
        combine(pre, [tau], [1.0, 2.0])


@given(k=st.integers(1, 5), seed=st.integers(0, 100))
def test_cosine_matrix_matches_numpy(k, seed):
    rng = np.random.default_rng(seed)
    vecs = [{"x": torch.from_numpy(rng.standard_normal((3, 2))), "y": torch.from_numpy(rng.standard_normal(5))}
            for _ in range(k)]
    flat = np.stack([np.concatenate([v["x"].numpy().ravel(), v["y"].numpy().ravel()]) for v in vecs])
    ref = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in flat] for a in flat])
    got = cosine_matrix(vecs)
    np.testing.assert_allclose(got, ref, atol=1e-12, err_msg=f"max error {np.abs(got - ref).max():.3g}")


def test_choose_coef_takes_the_best_validation_score_first_on_ties():
    lam, scores = choose_coef(lambda x: -(x - 0.6) ** 2, [0.2, 0.4, 0.6, 0.8])
    assert lam == 0.6 and len(scores) == 4
    assert choose_coef(lambda x: 1.0, [0.3, 0.5])[0] == 0.3
    assert choose_coef(lambda x: float("nan") if x < 0.5 else x, [0.2, 0.7])[0] == 0.7


def linear_in_blocks(theta: dict, X: torch.Tensor) -> torch.Tensor:
    """f(x) = x[:, :3] . a + x[:, 3:] . b: linear, with disjoint parameter blocks a and b."""
    return X[:, :3] @ theta["a"] + X[:, 3:] @ theta["b"]


@given(a1=st.floats(-2, 2), a2=st.floats(-2, 2), seed=st.integers(0, 100))
def test_disentanglement_error_is_zero_for_disjoint_linear_blocks(a1, a2, seed):
    g = torch.Generator().manual_seed(seed)
    pre = {"a": torch.randn(3, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)}
    tau1 = {"a": torch.randn(3, generator=g, dtype=F64)}  # task 1 moves only block a ...
    tau2 = {"b": torch.randn(4, generator=g, dtype=F64)}  # ... task 2 only block b
    X1 = torch.cat([torch.randn(20, 3, generator=g, dtype=F64), torch.zeros(20, 4, dtype=F64)], 1)  # reads a
    X2 = torch.cat([torch.zeros(30, 3, dtype=F64), torch.randn(30, 4, generator=g, dtype=F64)], 1)  # reads b
    xi = disentanglement_error(linear_in_blocks, pre, (tau1, tau2), (a1, a2), (X1, X2))
    assert xi == 0.0, f"xi = {xi} for disentangled tasks"


def test_disentanglement_error_matches_its_closed_form_when_tasks_interfere():
    g = torch.Generator().manual_seed(0)
    pre = {"a": torch.randn(3, generator=g, dtype=F64), "b": torch.randn(4, generator=g, dtype=F64)}
    tau1, tau2 = {"a": torch.randn(3, generator=g, dtype=F64)}, {"b": torch.randn(4, generator=g, dtype=F64)}
    X1, X2 = torch.randn(20, 7, generator=g, dtype=F64), torch.randn(30, 7, generator=g, dtype=F64)
    a1, a2 = 0.7, -1.3
    # task 1's outputs move by a2 X1[:, 3:] tau2 when tau2 is added, task 2's by a1 X2[:, :3] tau1
    ref = float(((a2 * X1[:, 3:] @ tau2["b"]) ** 2).mean() + ((a1 * X2[:, :3] @ tau1["a"]) ** 2).mean())
    xi = disentanglement_error(linear_in_blocks, pre, (tau1, tau2), (a1, a2), (X1, X2))
    assert xi == pytest.approx(ref, rel=1e-12), f"xi {xi} vs closed form {ref}"
    flips = disentanglement_error(linear_in_blocks, pre, (tau1, tau2), (a1, a2), (X1, X2), dist=disagreement)
    assert 0 <= flips <= 2


def test_distances():
    a, b = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([1.5, 2.0, 0.5])
    assert squared(a, b).tolist() == [0.25, 16.0, 0.0]
    assert disagreement(a, b).tolist() == [0.0, 1.0, 0.0]
    assert disagreement(torch.eye(3), torch.eye(3).flip(0)).tolist() == [1.0, 0.0, 1.0]
