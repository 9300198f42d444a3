"""Width-scan settings (minintk.width_config): variants, presets, and errors that say what is accepted."""

import pytest

from minintk.width_config import ScanConfig, Variant, WidthScanError, preset, star


def test_variants_star_and_product():
    base = star(("ntk", "standard"), ("1/d", "1/sqrt(d)"), ("random", "pretrained", "linear_head"))
    assert [v.key for v in base] == ["ntk|1/d|random", "standard|1/d|random", "ntk|1/sqrt(d)|random",
                                     "ntk|1/d|pretrained", "ntk|1/d|linear_head"]
    assert len(star(("ntk", "standard"), ("1/d", "1/sqrt(d)"), ("random", "pretrained"), product=True)) == 8
    assert Variant.from_key("standard|1/sqrt(d)|linear_head") == Variant("standard", "1/sqrt(d)", "linear_head")


@pytest.mark.parametrize("bad, match", [
    (dict(widths=(12, 30)), "multiples of n_head"),
    (dict(seeds=1), ">= 2 seeds"),
    (dict(times=(0.3,), lr=0.25), "multiples of lr"),
    (dict(times=(5.0, 2.5)), "increasing"),
    (dict(variants=("ntk|1/d|warm",)), "unknown start"),
    (dict(variants=("ntk|none|random",)), "unknown attn_scale"),
    (dict(lr=-1.0), "lr must be a positive number"),
])
def test_bad_settings_are_clear_errors(bad, match):
    with pytest.raises(WidthScanError, match=match):
        ScanConfig(**bad)
    with pytest.raises(WidthScanError, match="unknown preset"):
        preset("tpu")


def test_presets():
    gpu = preset("gpu")
    assert max(gpu.widths) >= 2048 and gpu.device == "cuda" and gpu.budget_s is not None
    cpu = preset("cpu")
    assert (min(cpu.widths), max(cpu.widths)) == (32, 512) and cpu.device == "cpu" and len(cpu.variants) == 5
    assert preset("cpu", lr=None, seeds=4).seeds == 4, "None overrides keep the preset's value"
