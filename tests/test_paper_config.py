"""Paper-run settings (minintk.paper_config): presets with overrides, and errors that say what would run."""

import re

import pytest

from minintk.paper_config import PRESETS, PaperError, config


def test_presets_and_overrides():
    quick = config("quick")
    assert quick.preset == "quick" and quick.sizes == (50, 200, 800) and quick.tv_size in quick.sizes
    assert config("default", seeds=None).seeds == (0, 1), "None overrides keep the preset's value"
    assert config("quick", sizes=[800, 50]).sizes == (50, 800), "sizes are sorted"
    assert set(PRESETS) == {"quick", "default", "gpu"}


@pytest.mark.parametrize("preset, overrides, says", [
    ("huge", {}, "unknown preset 'huge'; expected one of quick, default, gpu"),
    ("default", {"widths": 3}, "unknown settings ['widths']"),
    ("default", {"tasks": ("sst5",)}, "unknown tasks ['sst5']; offline: vader"),
    ("default", {"methods": ("probe",)}, "methods must include 'full'"),
    ("default", {"tv_size": 7}, "tv_size=7 must be one of the sizes"),
    ("default", {"seeds": ()}, "at least one task, one training size and one seed"),
])
def test_bad_settings_are_clear_errors(preset, overrides, says):
    with pytest.raises(PaperError, match=re.escape(says)):
        config(preset, **overrides)
