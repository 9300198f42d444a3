"""Classifiers on a precomputed kernel: kernel SVM and kernel logistic regression, both fitted by scikit-learn
(docs/theory.md section 3.5). With K = ntk(model, X, output=label_words(ids, diff=True)) they are the kernel
analogues of prompt-based fine-tuning with label words (Malladi et al. 2023); with kernel="signgd" or adam(...)
those of the other optimizers. Regression predictors (kernel ridge, gradient descent and flow) are in dynamics.

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
        return float(np.mean(self.predict(K_test) == np.asarray(y)))


def _labels(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y)
    if y.shape != (n,):
        raise ClassifierError(f"y must be ({n},) labels for the {n} training inputs, got shape {y.shape}")
    if len(np.unique(y)) < 2:
        raise ClassifierError("y holds one class only; a classifier needs two or more")
    return y


def kernel_svm(K: Any, y: Any, C: float = 1.0, tol: float = 1e-3) -> KernelClassifier:
    """Support vector machine on the (n, n) training kernel K (symmetric PSD; fp32 Grams are fine) and labels y
    (n,): scikit-learn's SVC(kernel="precomputed", C=C, tol=tol) (one-vs-one for more than two classes).
    ClassifierError for bad shapes or one class."""
    from sklearn.svm import SVC

    K = check_kernel(K)
    y = _labels(y, K.shape[0])
    return KernelClassifier(SVC(kernel="precomputed", C=C, tol=tol).fit(K, y), None, K.shape[0])


def kernel_logistic(K: Any, y: Any, C: float = 1.0, intercept: bool = True, tol: float = 1e-10,
                    max_iter: int = 10_000) -> KernelClassifier:
    """Logistic regression in the RKHS of K (module docstring), by scikit-learn's LogisticRegression (L2, lbfgs;
    multinomial for more than two classes) on K's eigen-features. K (n, n) symmetric PSD, y (n,) labels.
    ClassifierError for bad shapes or one class."""
    from sklearn.linear_model import LogisticRegression

    lam, V = kernel_eigh(K)  # with the tolerance of K's own dtype
    y = _labels(y, V.shape[0])
    keep = lam > psd_tolerance(V.shape[0], input_eps(K)) * max(lam.max(), 0.0)  # above the rounding floor
    K = check_kernel(K)
    basis = V[:, keep] / np.sqrt(lam[keep])
    est = LogisticRegression(C=C, fit_intercept=intercept, tol=tol, max_iter=max_iter)
    return KernelClassifier(est.fit(K @ basis, y), basis, K.shape[0])
