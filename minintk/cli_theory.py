"""`minintk spectrum` and `minintk stop`: a saved Gram (and targets) to its eigen-decay, or to the early-stopping
rule, each written as a report folder (docs/theory.md sections 4-5)."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable
from pathlib import Path

from .cli_reports import report, report_dir


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`minintk spectrum` and `minintk stop`; add(name, help=...) makes a subcommand's parser."""
    gram_help = (
        "saved Gram: .safetensors or .npz holding key 'K' (or a single array), or .npy; (n, n), or the (n, n, C, C) "
        "of minintk.ntk, read as (nC, nC) in (sample, output) order"
    )
    spec = add("spectrum", help="eigenvalues of K/n, power-law decay fit with CI, implied rate (JSON + PNG)")
    spec.add_argument("gram", help=gram_help)
    spec.add_argument("--range", dest="index_range", default=None, metavar="FIRST:LAST",
                      help="1-based inclusive fit range (default: after the top --drop-top, up to the numerical floor)")
    spec.add_argument("--drop-top", type=int, default=3, help="eigenvalues left out at the top of the default range")
    spec.add_argument("--level", type=float, default=0.95, help="confidence level of the beta interval")
    spec.add_argument("--bootstrap", type=int, default=0, help="bootstrap resamples for a second interval (0: off)")
    spec.add_argument("--sigma", type=float, default=None, help="noise level: print (sigma^2/n)^(beta/(beta+1))")
    spec.add_argument("--out", default=None, help="report folder (default reports/<gram folder>-<gram name>-spectrum, "
                      "numbered -2, -3, ... if that holds a report)")
    spec.add_argument("--force", action="store_true", help="replace the report already in --out")
    spec.set_defaults(func=_cmd_spectrum)
    stop = add("stop", help="Raskutti-Wainwright-Yu stopping time, critical radius and bound (JSON + PNG)")
    stop.add_argument("gram", help=gram_help)
    stop.add_argument("--y", required=True, help="targets: .npy, .npz / .safetensors (key 'y' or a single array), .txt")
    stop.add_argument("--sigma", required=True,
                      help="noise level of y, or 'auto' to estimate it (GCV kernel ridge, stopping.estimate_sigma)")
    stop.add_argument("--alpha", type=float, default=None,
                      help="constant gradient-descent step on (1/2n)||f - y||^2 (eta_t = alpha t); default "
                      "min(1, 1/mu_1), mu_1 the top eigenvalue of K/n, which is stable (alpha < 2/mu_1)")
    stop.add_argument("--B", type=float, default=1.0, help="bound on ||f*||_H in y's units (the rule runs on y / B)")
    stop.add_argument("--out", default=None, help="report folder (default reports/<gram folder>-<gram name>-stop, "
                      "numbered -2, -3, ... if that holds a report)")
    stop.add_argument("--force", action="store_true", help="replace the report already in --out")
    stop.set_defaults(func=_cmd_stop)


class GramFileError(ValueError):
    """A Gram or target file that cannot be read: missing, unknown format, no such key."""


def _load_array(path: str, key: str):
    """An array from .safetensors / .npz (`key`, or the only array), .npy or text; torch or numpy, dtype kept."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise GramFileError(f"{path}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = load_file(p)
    elif suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif suffix == ".npy":
        return np.load(p, allow_pickle=False)
    elif suffix in (".txt", ".csv", ".tsv"):
        return np.loadtxt(p, delimiter="," if suffix == ".csv" else None, ndmin=1)
    else:
        raise GramFileError(f"{path}: unknown format {suffix!r}; give .safetensors, .npz, .npy (or .txt/.csv for y)")
    if key in arrays:
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise GramFileError(f"{path}: no array named {key!r}; it holds {sorted(arrays)}")


def _load_gram(path: str):
    """The Gram of a file as a 2-D array: (n, n), or (n, n, C, C) flattened to (nC, nC) in (sample, output) order."""
    K = _load_array(path, "K")
    if K.ndim == 4 and K.shape[0] == K.shape[1] and K.shape[2] == K.shape[3]:
        n, _, C, _ = K.shape
        K = K.permute(0, 2, 1, 3) if hasattr(K, "permute") else K.transpose(0, 2, 1, 3)  # torch or numpy
        K = K.reshape(n * C, n * C)
    if K.ndim != 2:
        raise GramFileError(f"{path}: the Gram must be (n, n) or (n, n, C, C), got shape {tuple(K.shape)}")
    return K


def _out_dir(args: argparse.Namespace, suffix: str) -> Path:
    """The report folder of spectrum/stop: --out, or reports/<gram's folder>-<gram name>-<suffix>[-k]."""
    gram = Path(args.gram)
    stem = gram.stem if gram.parent.name in ("", ".") else f"{gram.parent.name}-{gram.stem}"
    return report_dir(args.out, Path("reports") / f"{stem}-{suffix}", f"{suffix}.json", args.force)


def _cmd_spectrum(args: argparse.Namespace) -> int:
    from .plots import plot_spectrum
    from .spectrum import SpectrumError, eigenvalues, fit_power_law, implied_rate

    K = _load_gram(args.gram)
    spec = eigenvalues(K)
    index_range = None
    if args.index_range:
        try:
            first, last = (int(v) for v in args.index_range.split(":"))
        except ValueError:
            raise SpectrumError(f"--range must be FIRST:LAST, 1-based integers; got {args.index_range!r}") from None
        index_range = (first, last)
    if args.sigma is not None and not args.sigma > 0:
        raise SpectrumError(f"--sigma must be positive, got {args.sigma}")
    try:
        fit = fit_power_law(spec.mu, index_range=index_range, floor=spec.floor, drop_top=args.drop_top,
                            level=args.level, bootstrap=args.bootstrap)
        fit_error = None
    except SpectrumError as e:
        if index_range is not None:
            raise
        fit, fit_error = None, str(e)
    n = spec.mu.size
    out = _out_dir(args, "spectrum")
    rows = [("n", str(n)), ("dtype", str(K.dtype)), ("mu_1 (largest of K/n)", f"{spec.mu[0]:.6g}"),
            ("numerical floor", f"{spec.floor:.3g}"), ("eigenvalues above floor", str(spec.n_above_floor))]
    if spec.min_raw < 0:
        rows.append(("most negative (clipped to 0)", f"{spec.min_raw:.3g}"))
    record: dict = {"gram": str(args.gram), "n": n, "dtype": str(K.dtype), "floor": spec.floor,
                    "min_raw": spec.min_raw, "n_above_floor": spec.n_above_floor, "mu": spec.mu.tolist()}
    if fit is None:
        rows.append(("power-law fit", f"not possible: {fit_error}"))
        record["fit"] = None
    else:
        lo, hi = fit.beta_ci
        rows += [("fit range (1-based)", f"{fit.first}..{fit.last}"),
                 ("beta", f"{fit.beta:.4f}  [{lo:.4f}, {hi:.4f}] ({fit.level:.0%} regression CI)"),
                 ("C", f"{fit.C:.4g}"), ("r^2 (log-log)", f"{fit.r2:.5f}")]
        if fit.bootstrap_ci is not None:
            rows.append(("beta bootstrap CI", f"[{fit.bootstrap_ci[0]:.4f}, {fit.bootstrap_ci[1]:.4f}]"))
        record["fit"] = fit._asdict()
        if args.sigma is not None:
            rate = implied_rate(fit.beta, args.sigma, n)
            rows.append(("implied rate", f"(sigma^2/n)^(beta/(beta+1)) = {rate:.4g}  (sigma = {args.sigma:g})"))
            record["implied_rate"] = {"sigma": args.sigma, "rate": rate}
    top = ", ".join(f"{v:.3g}" for v in spec.mu[:8])
    rows.append(("top eigenvalues", top + (", ..." if n > 8 else "")))
    title = f"Spectrum of K/n: {Path(args.gram).name}"
    plot_spectrum(spec.mu, fit, out / "spectrum.png", floor=spec.floor, title=title)
    report(out, "spectrum", f"minintk spectrum: {args.gram}", rows, record)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    import numpy as np

    from .dynamics import gradient_descent_mse, step_sums
    from .plots import plot_stopping
    from .spectrum import eigenvalues
    from .stopping import (
        StoppingError,
        bound_curve,
        critical_radius,
        default_step,
        error_bound,
        estimate_sigma,
        stopping_time,
    )

    K = _load_gram(args.gram)
    y = _load_array(args.y, "y")
    y = np.asarray(y.double().numpy() if hasattr(y, "double") else y, dtype=np.float64).reshape(-1)
    n = K.shape[0]
    if y.size != n:
        raise StoppingError(f"--y has {y.size} values but the Gram is {n} x {n}; give one target per row of K")
    spec = eigenvalues(K)
    if args.sigma == "auto":
        est = estimate_sigma(K, y)
        sigma, sigma_note = est.sigma, f"estimated (GCV kernel ridge, lam = {est.lam:.3g}, dof = {est.dof:.1f})"
        sigma_record = {"source": "estimated", "lam": est.lam, "dof": est.dof}
    else:
        try:
            sigma = float(args.sigma)
        except ValueError:
            raise StoppingError(f"--sigma must be a positive number or 'auto', got {args.sigma!r}") from None
        sigma_note, sigma_record = "given", {"source": "given"}
    alpha = default_step(spec.mu) if args.alpha is None else args.alpha
    eps_n = critical_radius(spec.mu, sigma, B=args.B)
    bound = error_bound(spec.mu, sigma, B=args.B)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t_hat = stopping_time(spec.mu, sigma, alpha, B=args.B)
    curve = bound_curve(spec.mu, sigma, step_sums(alpha, np.array([t_hat])), B=args.B)
    u = gradient_descent_mse(K, y, alpha)(t_hat)
    train_mse, start_mse = float(np.mean((u - y) ** 2)), float(np.mean(y**2))
    notes = list(dict.fromkeys(str(w.message) for w in caught))
    if train_mse > start_mse:
        notes.append(f"the training loss grows: train MSE {train_mse:.4g} at T_hat against {start_mse:.4g} at t = 0")
    eta = float(alpha * t_hat)
    out = _out_dir(args, "stop")
    rows = [
        ("n", str(n)),
        ("kernel", f"eigenvalues mu of K/n (the Gram divided by n); mu_1 = {spec.mu[0]:.4g}"),
        ("sigma", f"{sigma:.4g}  ({sigma_note})"),
        ("B (||f*||_H bound)", f"{args.B:g}"),
        ("step alpha", f"{alpha:.4g}  (" + ("given" if args.alpha is not None else "default min(1, 1/mu_1)")
         + f"; alpha mu_1 = {alpha * spec.mu[0]:.3g}, stable below 2)"),
        ("critical radius eps_n", f"{eps_n:.4g}"),
        ("bound 12 B^2 eps_n^2", f"{bound:.4g}  (on ||f_T - f*||_n^2, units of y^2)"),
        ("stopping time T_hat", f"{t_hat}  (eta_T = {eta:.4g})"),
        ("bias / variance bound at T", f"{curve.bias[0]:.4g} / {curve.variance[0]:.4g}"),
        ("train MSE at T (from f_0 = 0)", f"{train_mse:.4g}  (at t = 0: {start_mse:.4g})"),
    ] + [("warning", note) for note in notes]
    record = {"gram": str(args.gram), "y": str(args.y), "n": n, "sigma": sigma, "sigma_estimate": sigma_record,
              "B": args.B, "alpha": alpha, "alpha_source": "given" if args.alpha is not None else "default",
              "mu_1": float(spec.mu[0]), "warnings": notes, "eps_n": eps_n, "error_bound": bound, "T_hat": t_hat,
              "eta_T_hat": eta, "bias_bound": float(curve.bias[0]), "variance_bound": float(curve.variance[0]),
              "train_mse_at_T_hat": train_mse, "floor": spec.floor, "n_above_floor": spec.n_above_floor}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said above
        plot_stopping(spec.mu, sigma, alpha, out / "stop.png", B=args.B)
    report(out, "stop", f"minintk stop: {args.gram}", rows, record)
    return 0
