"""`minintk ntk`: the progress of a tile folder, and what the command says when its inputs are wrong."""

from minintk.cli import main


def test_status_of_a_finished_folder(tiled_reference, capsys):
    assert main(["ntk", "--status", str(tiled_reference[3])]) == 0
    text = capsys.readouterr().out
    assert "21 / 21 done, 0 left" in text and "recomputed tiles  0" in text and "gram.safetensors" in text


def test_bad_data_labels_or_folder(tmp_path, capsys):
    assert main(["ntk", "tiny", "random:8", "--labels", "3", "--out", str(tmp_path / "a")]) == 2
    assert "random:N:T[:vocab][:seed]" in capsys.readouterr().err
    assert main(["ntk", "tiny", "random:8:4", "--out", str(tmp_path / "b")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert main(["ntk", "--status", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err
