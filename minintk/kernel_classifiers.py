"""Classifiers on a precomputed kernel: kernel SVM and kernel logistic regression, both fitted by scikit-learn
(docs/theory.md section 3.6). With K = ntk(model, X, output=label_words(ids, diff=True)) they are the kernel
analogues of prompt-based fine-tuning with label words (Malladi et al. 2023); with kernel=adam(...) those of Adam
with a frozen preconditioner. They need a symmetric positive semi-definite kernel: the SignGD kernel is asymmetric,
and agreement.py fits it by kernel regression instead. Regression predictors (kernel ridge, gradient descent and
flow) are in dynamics.

Kernel logistic regression minimizes C sum_i log(1 + exp(-y_i f(x_i))) + (1/2) ||f||_H^2 over f = K a (+ an
intercept). With K = Phi Phi^T (Phi = V sqrt(Lambda) from K's eigendecomposition, eigenvalues above the rounding
floor) and f = Phi w, ||f||_H^2 = ||w||^2, so scikit-learn's L2-penalized LogisticRegression on Phi solves it
exactly; test inputs get Phi(x) = K(x, X) V Lambda^(-1/2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .dynamics import check_kernel, input_eps, kernel_eigh, psd_tolerance


class ClassifierError(ValueError):
    """A kernel, label vector or setting the classifiers cannot use."""


@dataclass
class KernelClassifier:
    """A fitted classifier on a precomputed kernel. K_test: (m, n) kernel between test and training inputs (the
    same kernel, e.g. ntk(model, X_test, X_train))."""

    estimator: Any  # the fitted scikit-learn estimator
    basis: np.ndarray | None = None  # logistic: V Lambda^(-1/2), (n, r); None: the estimator reads K itself
    n_train: int = 0

    def _inputs(self, K_test: Any) -> np.ndarray:
        K_test = np.asarray(K_test, dtype=np.float64)
        if K_test.ndim != 2 or K_test.shape[1] != self.n_train:
            raise ClassifierError(f"K_test must be (m, {self.n_train}) against the training inputs, got shape "
                                  f"{K_test.shape}")
        return K_test if self.basis is None else K_test @ self.basis

    def decision_function(self, K_test: Any) -> np.ndarray:
        """(m,) signed scores for two classes, (m, classes) otherwise (scikit-learn's convention)."""
        return self.estimator.decision_function(self._inputs(K_test))

    def predict(self, K_test: Any) -> np.ndarray:
        return self.estimator.predict(self._inputs(K_test))

    def accuracy(self, K_test: Any, y: Any) -> float:
        pred, y = self.predict(K_test), np.asarray(y)
        if y.shape != pred.shape:
            raise ClassifierError(f"y must be {pred.shape} labels for the rows of K_test, got shape {y.shape}")
        return float(np.mean(pred == y))


def _labels(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ClassifierError(f"y must be ({n},) labels for the {n} training inputs, got shape {y.shape}")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ClassifierError("y must hold class labels (integers, booleans or strings), got non-integral floats; "
                              "for real-valued targets use dynamics.kernel_ridge")
    if len(np.unique(y)) < 2:
        raise ClassifierError("y holds one class only; a classifier needs two or more")
    return y


def _kernel(K: Any, C: float) -> np.ndarray:
    """K as a symmetric fp64 matrix; ClassifierError for C <= 0, an asymmetric K (the SignGD kernel) or a zero K."""
    if not (C > 0 and np.isfinite(C)):
        raise ClassifierError(f"C={C}: expected a finite number > 0")
    A = np.asarray(K, dtype=np.float64)
    if A.ndim == 2 and A.shape[0] == A.shape[1] and A.size:
        scale = float(np.max(np.abs(A)))
        if scale == 0:
            raise ClassifierError("K is zero: no sample moves any output")
        if float(np.max(np.abs(A - A.T))) > 1e-5 * scale:
            raise ClassifierError("K is not symmetric (the SignGD kernel is not): kernel SVM and logistic regression "
                                  "need a symmetric PSD kernel; fit an asymmetric one by kernel regression "
                                  "(agreement.py) or use the eNTK / adam(...) kernel")
    return check_kernel(K)


def kernel_svm(K: Any, y: Any, C: float = 1.0, tol: float = 1e-3) -> KernelClassifier:
    """Support vector machine on the (n, n) training kernel K (symmetric PSD; fp32 Grams are fine) and labels y
    (n,): scikit-learn's SVC(kernel="precomputed", C=C, tol=tol) (one-vs-one for more than two classes).
    ClassifierError for bad shapes or one class."""
    from sklearn.svm import SVC

    K = _kernel(K, C)
    y = _labels(y, K.shape[0])
    return KernelClassifier(SVC(kernel="precomputed", C=C, tol=tol).fit(K, y), None, K.shape[0])


def kernel_logistic(K: Any, y: Any, C: float = 1.0, intercept: bool = True, tol: float = 1e-10,
                    max_iter: int = 10_000) -> KernelClassifier:
    """Logistic regression in the RKHS of K (module docstring), by scikit-learn's LogisticRegression (L2, lbfgs;
    multinomial for more than two classes) on K's eigen-features. K (n, n) symmetric PSD, y (n,) labels.
    ClassifierError for bad shapes or one class."""
    from sklearn.linear_model import LogisticRegression

    _kernel(K, C)
    lam, V = kernel_eigh(K)  # with the tolerance of K's own dtype
    y = _labels(y, V.shape[0])
    keep = lam > psd_tolerance(V.shape[0], input_eps(K)) * max(lam.max(), 0.0)  # above the rounding floor
    K = check_kernel(K)
    basis = V[:, keep] / np.sqrt(lam[keep])
    est = LogisticRegression(C=C, fit_intercept=intercept, tol=tol, max_iter=max_iter)
    return KernelClassifier(est.fit(K @ basis, y), basis, K.shape[0])
