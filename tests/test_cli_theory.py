"""`minintk spectrum` and `minintk stop` over saved Grams: tables, JSON and PNG reports, clear errors."""

import json
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from minintk.cli import main
from minintk.spectrum import eigenvalues
from minintk.stopping import critical_radius, stopping_time

PNG = b"\x89PNG\r\n\x1a\n"


def power_law_gram(n: int, beta: float, seed: int = 0) -> np.ndarray:
    """K with K/n having eigenvalues exactly i^-beta, in a random eigenbasis."""
    V, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (V * (n * np.arange(1, n + 1) ** -beta)) @ V.T


def sobolev(n: int, sigma: float, seed: int = 0):
    x = np.arange(1, n + 1) / n
    y = np.abs(x - 0.5) - 0.5 + sigma * np.random.default_rng(seed).standard_normal(n)
    return np.minimum.outer(x, x), y


def test_spectrum_on_a_safetensors_gram(tmp_path, capsys):
    K = power_law_gram(60, 1.3)
    save_file({"K": torch.from_numpy(K), "other": torch.zeros(2)}, tmp_path / "gram.safetensors")
    out = tmp_path / "rep"
    rc = main(["spectrum", str(tmp_path / "gram.safetensors"), "--range", "2:50", "--sigma", "0.5", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "beta" in text and "1.3000" in text and "implied rate" in text, text
    rec = json.loads((out / "spectrum.json").read_text())
    assert rec["n"] == 60 and (rec["fit"]["first"], rec["fit"]["last"]) == (2, 50)
    assert rec["fit"]["beta"] == pytest.approx(1.3, abs=1e-8)
    assert rec["implied_rate"]["rate"] == pytest.approx((0.25 / 60) ** (1.3 / 2.3), rel=1e-6)
    assert np.allclose(rec["mu"], np.arange(1, 61) ** -1.3, rtol=1e-8)
    assert (out / "spectrum.png").read_bytes()[:8] == PNG and (out / "spectrum.md").exists()


def test_spectrum_reads_the_four_axis_gram_of_ntk(tmp_path, capsys):
    """(n, n, C, C) as minintk.ntk returns it is read as the (nC, nC) Gram in (sample, output) order."""
    n, C = 12, 3
    A = np.random.default_rng(1).standard_normal((n * C, n * C))
    flat = A @ A.T
    K4 = flat.reshape(n, C, n, C).transpose(0, 2, 1, 3)
    np.savez(tmp_path / "g.npz", K=K4)
    assert main(["spectrum", str(tmp_path / "g.npz"), "--out", str(tmp_path / "r")]) == 0
    rec = json.loads((tmp_path / "r" / "spectrum.json").read_text())
    assert rec["n"] == n * C
    assert np.allclose(rec["mu"], eigenvalues(flat).mu, rtol=1e-10, atol=1e-12)


def test_stop_with_given_and_estimated_sigma(tmp_path, capsys):
    K, y = sobolev(200, 0.5)
    np.savez(tmp_path / "g.npz", K=K)
    np.save(tmp_path / "y.npy", y)
    assert main(["stop", str(tmp_path / "g.npz"), "--y", str(tmp_path / "y.npy"), "--sigma", "0.5",
                 "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "stopping time T_hat" in text and "critical radius eps_n" in text
    rec = json.loads((tmp_path / "a" / "stop.json").read_text())
    mu = np.clip(np.linalg.eigvalsh(K / 200)[::-1], 0, None)
    assert rec["T_hat"] == stopping_time(mu, 0.5) and rec["eps_n"] == pytest.approx(critical_radius(mu, 0.5))
    assert rec["error_bound"] == pytest.approx(12 * rec["eps_n"] ** 2)
    assert rec["train_mse_at_T_hat"] == pytest.approx(0.25, rel=0.3)  # stopped near the noise level, not at 0
    assert (tmp_path / "a" / "stop.png").read_bytes()[:8] == PNG

    save_file({"y": torch.from_numpy(y)}, tmp_path / "y.safetensors")
    assert main(["stop", str(tmp_path / "g.npz"), "--y", str(tmp_path / "y.safetensors"), "--sigma", "auto",
                 "--B", "2", "--alpha", "0.5", "--out", str(tmp_path / "b")]) == 0
    rec = json.loads((tmp_path / "b" / "stop.json").read_text())
    assert rec["sigma_estimate"]["source"] == "estimated" and rec["sigma"] == pytest.approx(0.5, rel=0.15)
    assert rec["T_hat"] == stopping_time(mu, rec["sigma"], 0.5, B=2.0)


@pytest.mark.parametrize(
    "case, match",
    [
        ("y_mismatch", "one target per row"),
        ("sigma_zero", "sigma must be a positive"),
        ("sigma_text", "'auto'"),
        ("not_psd", "positive semi-definite"),
        ("nan", "non-finite"),
        ("asymmetric", "symmetric"),
        ("no_key", "no array named 'K'"),
        ("format", "unknown format"),
        ("missing", "no such file"),
    ],
)
def test_bad_input_gives_a_clear_error(tmp_path, capsys, case, match):
    K, y = sobolev(20, 0.1)
    gram, sigma = tmp_path / "g.npz", "0.1"
    if case == "y_mismatch":
        y = y[:-1]
    elif case == "sigma_zero":
        sigma = "0"
    elif case == "sigma_text":
        sigma = "big"
    elif case == "not_psd":
        K = K - 0.5 * np.eye(20)
    elif case == "nan":
        K[3, 4] = K[4, 3] = np.nan
    elif case == "asymmetric":
        K[0, 5] += 1.0
    elif case == "format":
        gram = tmp_path / "g.pt"
        gram.write_bytes(b"")
    elif case == "missing":
        gram = tmp_path / "absent.npz"
    if case == "no_key":
        np.savez(gram, A=K, B=K)
    elif case not in ("format", "missing"):
        np.savez(gram, K=K)
    np.savetxt(tmp_path / "y.txt", y)
    rc = main(["stop", str(gram), "--y", str(tmp_path / "y.txt"), "--sigma", sigma, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and match in err, err
    if case in ("not_psd", "nan", "no_key"):
        assert main(["spectrum", str(gram), "--out", str(tmp_path / "s")]) == 2
        assert match in capsys.readouterr().err


def raw_gram(n: int = 120, top: float = 450.0, seed: int = 0):
    """A Gram as a real model gives it, unnormalized: K/n has top eigenvalue `top` and decays as i^-2; targets from
    its top eigenvectors plus noise 0.5."""
    rng = np.random.default_rng(seed)
    V, _ = np.linalg.qr(rng.standard_normal((n, n)))
    mu = top * np.arange(1, n + 1, dtype=np.float64) ** -2.0
    K = (V * (n * mu)) @ V.T
    y = V[:, :5] @ rng.standard_normal(5) * np.sqrt(n) + 0.5 * rng.standard_normal(n)
    return K, y, mu


def test_stop_defaults_are_stable_on_a_raw_gram(tmp_path, capsys, monkeypatch):
    """The default step follows the Gram (min(1, 1/mu_1)): a positive stopping time, a training loss that falls,
    no warning; the old default alpha = 1 on the same Gram diverges, and the report says so."""
    K, y, mu = raw_gram()
    monkeypatch.chdir(tmp_path)
    np.save("K.npy", K)
    np.save("y.npy", y)
    assert main(["stop", "K.npy", "--y", "y.npy", "--sigma", "0.5"]) == 0
    text = capsys.readouterr().out
    rec = json.loads((tmp_path / "reports" / "K-stop" / "stop.json").read_text())
    assert rec["alpha"] == pytest.approx(1 / 450) and rec["alpha_source"] == "default" and rec["warnings"] == []
    assert rec["T_hat"] > 0 and rec["train_mse_at_T_hat"] < np.mean(y**2), rec
    assert "K/n" in text and "default min(1, 1/mu_1)" in text
    with pytest.warns(UserWarning, match="diverges"):
        stopping_time(mu, 0.5, 1.0)
    assert main(["stop", "K.npy", "--y", "y.npy", "--sigma", "0.5", "--alpha", "1", "--out", "old"]) == 0
    rec = json.loads((tmp_path / "old" / "stop.json").read_text())
    assert any("diverges" in w for w in rec["warnings"]), rec["warnings"]


def test_stopping_time_default_step_needs_no_tuning():
    _, _, mu = raw_gram()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stopping_time(mu, 0.5) == stopping_time(mu, 0.5, 1 / 450) > 0
