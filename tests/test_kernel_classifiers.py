"""kernel_classifiers: on a linear kernel K = Z Z^T the kernel SVM and kernel logistic regression are the
linear SVM and logistic regression of scikit-learn on the features Z (an independent fit), to 1e-6; on an eNTK
of our decoder with label words they fit and score; bad inputs are named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.svm import SVC

from minintk import Decoder, DecoderConfig, ntk
from minintk.dynamics import DynamicsError
from minintk.engine import label_words
from minintk.kernel_classifiers import ClassifierError, kernel_logistic, kernel_svm


def data(n=60, m=25, d=5, classes=2, seed=0):
    g = np.random.default_rng(seed)
    Z, Zt = g.normal(size=(n, d)), g.normal(size=(m, d))
    W = g.normal(size=(d, classes))
    label = lambda A: np.argmax(A @ W + 0.5 * g.normal(size=(A.shape[0], classes)), 1)  # noqa: E731
    return Z, label(Z), Zt, label(Zt)


@pytest.mark.parametrize("classes", [2, 3])
def test_logistic_on_a_linear_kernel_is_linear_logistic_regression(classes):
    Z, y, Zt, _ = data(classes=classes)
    clf = kernel_logistic(Z @ Z.T, y, C=0.7)
    ref = LogisticRegression(C=0.7, tol=1e-12, max_iter=100_000).fit(Z, y)
    np.testing.assert_allclose(clf.decision_function(Zt @ Z.T), ref.decision_function(Zt), atol=1e-6, rtol=0)
    assert (clf.predict(Zt @ Z.T) == ref.predict(Zt)).all()


@pytest.mark.parametrize("classes", [2, 3])
def test_svm_on_a_linear_kernel_is_the_linear_svm(classes):
    Z, y, Zt, yt = data(classes=classes, seed=1)
    clf = kernel_svm(Z @ Z.T, y, C=0.5, tol=1e-10)
    ref = SVC(kernel="linear", C=0.5, tol=1e-10).fit(Z, y)
    np.testing.assert_allclose(clf.decision_function(Zt @ Z.T), ref.decision_function(Zt), atol=1e-6, rtol=0)
    assert clf.accuracy(Zt @ Z.T, yt) == pytest.approx(float(np.mean(ref.predict(Zt) == yt)))


def test_label_word_entk_of_the_decoder():
    """The prompt-style use: the kernel of the label-word logit difference, train x train and test x train."""
    torch.manual_seed(0)
    m = Decoder(DecoderConfig(vocab_size=31, n_positions=8, d_model=16, n_head=2, n_layer=1, head="lm")).double()
    X = torch.randint(0, 31, (30, 6), generator=torch.Generator().manual_seed(1))
    out = label_words([3, 5], diff=True)
    y = (m(X)[:, -1, 5] > m(X)[:, -1, 3]).long().numpy()  # the untrained model's own decision: learnable
    K, Kt = ntk(m, X[:20], output=out, progress=False), ntk(m, X[20:], X[:20], output=out, progress=False)
    for clf in (kernel_svm(K, y[:20], C=10.0), kernel_logistic(K, y[:20], C=10.0)):
        assert clf.accuracy(K, y[:20]) >= 0.9
        assert clf.predict(Kt).shape == (10,)


def test_bad_inputs_are_named():
    Z, y, _, _ = data()
    K = Z @ Z.T
    with pytest.raises(ClassifierError, match=r"y must be \(60,\) labels"):
        kernel_svm(K, y[:5])
    with pytest.raises(ClassifierError, match="one class only"):
        kernel_logistic(K, np.zeros(60))
    with pytest.raises(ClassifierError, match=r"K_test must be \(m, 60\)"):
        kernel_svm(K, y).predict(K[:, :5])
    with pytest.raises(ClassifierError, match="K is not symmetric .the SignGD kernel is not."):
        kernel_logistic(K + np.triu(np.ones_like(K)), y)
    with pytest.raises(ClassifierError, match="C=0: expected a finite number > 0"):
        kernel_svm(K, y, C=0)
    with pytest.raises(ClassifierError, match="non-integral floats"):
        kernel_svm(K, y + 0.5)
    with pytest.raises(ClassifierError, match="K is zero"):
        kernel_logistic(np.zeros_like(K), y)
    with pytest.raises(ClassifierError, match=r"y must be \(60,\) labels for the rows of K_test"):
        kernel_svm(K, y).accuracy(K, y[:-1])
    with pytest.raises(DynamicsError, match="square"):
        kernel_svm(K[:, :5], y)
