"""What the planted-task check found: per task, the rule's stopping time against the oracles, the error at that
time against the theory's bound and rate, the network against its linearization; verdicts, a markdown
section and a figure (docs/theory.md sections 4, 5, 8). Input: planted_check.run_check's result."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from scipy import stats

LEVEL = 0.95  # the intervals of the fitted exponents
RATIO_OK = 1.5  # "the rule's stopping time within 1.5x of the oracle's" (issue 22)


def _median(vals) -> float | None:
    """The median of the values that are not None (None if there is none)."""
    vals = [v for v in vals if v is not None]
    return float(np.median(vals)) if vals else None


def exponent(rows: list[dict], key: str) -> dict | None:
    """Slope of log(row[key]) on log n over every run, with its LEVEL t-interval (scipy.stats.linregress)."""
    pts = [(math.log(r["n"]), math.log(r[key])) for r in rows if r.get(key) is not None and r[key] > 0]
    if len({x for x, _ in pts}) < 2 or len(pts) < 3:
        return None
    x, z = np.array(pts).T
    fit = stats.linregress(x, z)
    half = float(stats.t.ppf(0.5 + LEVEL / 2, len(pts) - 2)) * fit.stderr
    return {"slope": float(fit.slope), "ci": (float(fit.slope - half), float(fit.slope + half)), "points": len(pts)}


def summarize(result: dict) -> dict:
    """Per task (smoothness s) and size n the medians over seeds; per task the fitted exponents against the
    predicted -beta/(beta+1) (and the target's own -(2s-1)/(2s), a reference: docs/theory.md section 8);
    across tasks the Spearman correlation of s with the mean log relative error;
    and the verdicts."""
    rows = result["rows"]
    tasks = {}
    for s in sorted({r["smoothness"] for r in rows}):
        rs = [r for r in rows if r["smoothness"] == s]
        sizes = sorted({r["n"] for r in rs})
        per_n = []
        for n in sizes:
            rn = [r for r in rs if r["n"] == n]
            keys = ("t_hat", "lin_oracle_in_t", "lin_oracle_test_t", "lin_in_at_t_hat", "bound",
                    "lin_test_at_t_hat", "lin_oracle_test", "net_test_at_t_hat", "null_test", "beta")
            per_n.append({"n": n, **{k: _median(r.get(k) for r in rn) for k in keys},
                          "ratio_in": _median(r["t_hat"] / max(r["lin_oracle_in_t"], 1) for r in rn)})
        beta = per_n[-1]["beta"]
        tasks[s] = {
            "per_n": per_n,
            "exp_lin": exponent(rs, "lin_test_at_t_hat"), "exp_oracle": exponent(rs, "lin_oracle_test"),
            "exp_net": exponent(rs, "net_test_at_t_hat"), "exp_bound": exponent(rs, "bound"),
            "predicted": None if beta is None else -beta / (beta + 1), "beta": beta,
            "predicted_s": -(2 * s - 1) / (2 * s) if s > 0.5 else None,  # docs/theory.md section 8
            "bound_held": sum(r["lin_in_at_t_hat"] <= r["bound"] for r in rs) / len(rs),
            "net_gap": _median(abs(r["net_test_at_t_hat"] / r["lin_test_at_t_hat"] - 1) for r in rs
                               if r.get("net_test_at_t_hat") is not None),
            "rel_error": float(np.mean([math.log(r["lin_test_at_t_hat"] / r["null_test"]) for r in rs])),
        }
    ss = list(tasks)
    rho = float(stats.spearmanr(ss, [tasks[s]["rel_error"] for s in ss]).statistic) if len(ss) > 2 else None
    return {"tasks": tasks, "spearman_smoothness_vs_error": rho, "verdicts": _verdicts(tasks, rho),
            # runs since the network's own oracle was added train past T_hat (planted_check._network)
            "net_past_t_hat": any("net_oracle_test_t" in r for r in rows)}


def _verdicts(tasks: dict, rho: float | None) -> list[tuple[str, bool | None, str]]:
    """(claim, held, evidence) for each prediction the check tests."""
    ratios = [p["ratio_in"] for t in tasks.values() for p in t["per_n"]]
    within = [1 / RATIO_OK <= r <= RATIO_OK for r in ratios]
    out = [("the rule's stopping time is within 1.5x of the linearized model's oracle (in-sample error)",
            all(within), f"T_hat / oracle: median {np.median(ratios):.2f}, range {min(ratios):.2f}-{max(ratios):.2f}")]
    held = [t["bound_held"] for t in tasks.values()]
    out.append(("the error at T_hat is below the bound 12 B^2 eps_n^2", min(held) == 1.0,
                f"held in {100 * float(np.mean(held)):.0f}% of runs"))
    for s, t in tasks.items():
        e, p = t["exp_lin"], t["predicted"]
        ok = None if e is None or p is None else e["ci"][0] <= p <= e["ci"][1]
        ev = "not enough sizes" if e is None else (
            f"measured {e['slope']:.2f} [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}], predicted {p:.2f} (beta {t['beta']:.2f})"
            + ("" if t["predicted_s"] is None else f"; this target's own rate -(2s-1)/(2s) = {t['predicted_s']:.2f}"))
        out.append((f"s={s:g}: the test error at T_hat falls as n^(-beta/(beta+1))", ok, ev))
    gaps = [t["net_gap"] for t in tasks.values() if t["net_gap"] is not None]
    if gaps:
        out.append(("the network trained by gradient descent matches its linearization (test error at T_hat "
                    "within 10%)", max(gaps) <= 0.1, f"largest median gap {100 * max(gaps):.1f}%"))
    out.append(("smoother planted targets are learned with fewer samples (Spearman of s with the error < 0)",
                None if rho is None else rho < 0, "n/a" if rho is None else f"Spearman {rho:+.2f}"))
    return out


def markdown(summary: dict, cfg: dict) -> str:
    """The report section: settings, the verdicts, one table per task."""
    until = "twice the later of T_hat and the linearized oracle time" if summary.get("net_past_t_hat") else "T_hat"
    lines = ["## Planted tasks: the theory where the answer is known", "",
             f"Targets planted in the model's own eNTK RKHS (docs/theory.md section 8): {cfg['k']} eigenfunctions "
             f"of a sample of {cfg['sample']} inputs, coefficients ~ i^-s, noise {cfg['noise']:g} x rms(f*), "
             f"{cfg['seeds']} seeds, {cfg['n_test']} test inputs. Full-batch gradient descent with step "
             "min(1, 1/mu_1); the linearized model in closed form"
             + (f", the network trained up to {until} (at most {cfg['net_steps']} steps; sizes "
                f"{cfg.get('net_sizes') or 'all'}, {cfg.get('net_seeds', 1)} seed(s))." if cfg["network"]
                else "; the network not trained (network=False)."), "",
             "| claim | held | evidence |", "|---|---|---|"]
    for claim, ok, ev in summary["verdicts"]:
        lines.append(f"| {claim} | {'n/a' if ok is None else 'yes' if ok else 'no'} | {ev} |")
    lines += ["", "The rule balances worst-case bias and variance bounds over the ball ||f||_H <= B with the "
              "constants of Raskutti et al. (2e, 12); with B the norm of the whole target it stops earlier than "
              "the oracle by a factor the table shows.", ""]
    for s, t in summary["tasks"].items():
        lines += [f"### s = {s:g}", "",
                  "| n | T_hat | oracle t (in-sample) | oracle t (test) | error at T_hat | oracle error | "
                  "network's error at T_hat | bound (in-sample) | null |", "|---|---|---|---|---|---|---|---|---|"]
        for p in t["per_n"]:
            lines.append("| " + " | ".join(_fmt(p[k]) for k in (
                "n", "t_hat", "lin_oracle_in_t", "lin_oracle_test_t", "lin_test_at_t_hat", "lin_oracle_test",
                "net_test_at_t_hat", "bound", "null_test")) + " |")
        lines.append("")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.3g}"
    return f"{int(v)}"


def plot(summary: dict, path: str | Path) -> Path:
    """Test error at T_hat and at the oracle time against n (log-log), per task, with the predicted slope."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    ax = fig.subplots()
    for i, (s, t) in enumerate(summary["tasks"].items()):
        n = np.array([p["n"] for p in t["per_n"]], dtype=float)
        err = np.array([p["lin_test_at_t_hat"] for p in t["per_n"]])
        orc = np.array([p["lin_oracle_test"] for p in t["per_n"]])
        color = f"C{i}"
        ax.loglog(n, err, "o-", color=color, label=f"s={s:g}: at T_hat")
        ax.loglog(n, orc, "s:", color=color, alpha=0.7, label=f"s={s:g}: oracle")
        if t["predicted"] is not None:
            ax.loglog(n, err[0] * (n / n[0]) ** t["predicted"], "--", color=color, lw=0.8,
                      label=f"s={s:g}: slope {t['predicted']:.2f} (predicted)")
    ax.set_xlabel("training size n")
    ax.set_ylabel("test mean squared error against f*")
    ax.set_title("Planted tasks: gradient descent stopped by the rule and by the oracle")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    out = Path(path)
    fig.savefig(out, dpi=130)
    return out
