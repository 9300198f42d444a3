"""The public API: every name the README shows imports from `minintk`; the old `minintk.ntk` path still works for
one release, with a DeprecationWarning, and stays callable as the function."""

import subprocess
import sys

import minintk


def test_every_public_name_resolves():
    missing = [name for name in minintk.__all__ if getattr(minintk, name, None) is None]
    assert not missing, f"minintk.__all__ names that do not resolve: {missing}"
    assert callable(minintk.ntk) and callable(minintk.load_gpt_neo) and callable(minintk.stopping_time)


def test_old_import_path_warns_and_still_computes():
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "try:\n"
        "    import minintk.ntk\n"
        "    raise SystemExit('no DeprecationWarning')\n"
        "except DeprecationWarning as w:\n"
        "    assert 'from minintk import ntk' in str(w)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "from minintk.ntk import ntk as old\n"
        "import minintk\n"
        "from minintk import Decoder, DecoderConfig\n"
        "from minintk.engine import ntk\n"
        "m = Decoder(DecoderConfig(vocab_size=11, n_positions=4, d_model=8, n_head=2, n_layer=1)).double()\n"
        "X = torch.randint(0, 11, (3, 4))\n"
        "K = ntk(m, X, precision='fp64', progress=False)\n"
        "assert torch.equal(old(m, X, precision='fp64', progress=False), K)\n"
        "assert torch.equal(minintk.ntk(m, X, precision='fp64', progress=False), K)  # the module, called\n"
        "print('ok')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
