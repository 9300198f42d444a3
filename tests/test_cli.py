import json

from conftest import make_gpt_neo_checkpoint

from minintk.cli import main


def test_info_builtin_gpt_neo_1_3b(capsys):
    assert main(["info", "gpt-neo-1.3B", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["total_parameters"] == 1_315_575_808  # GPT-Neo-1.3B's published count
    assert d["attn_scale"] == "none" and d["attention_windows"][:2] == [None, 256]


def test_info_on_a_checkpoint_folder(tmp_path, capsys):
    folder, hf = make_gpt_neo_checkpoint(tmp_path / "neo")
    assert main(["info", str(folder), "--attn-scale", "1/d"]) == 0
    out = capsys.readouterr().out
    assert "attn_scale          1/d" in out and f"{sum(p.numel() for p in hf.transformer.parameters()):,}" in out
