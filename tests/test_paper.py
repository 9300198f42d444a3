"""The paper pipeline (minintk.paper) end to end at toy size, on data files the test writes."""

import json

import pytest
from test_data import write_offline

from minintk.paper import run
from minintk.paper_config import PaperConfig, config

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def toy_config(tmp_path, **kw):
    data = write_offline(tmp_path / "data", n_extra=120)
    base = dict(tasks=("vader", "afinn-sign", "vader-sign"), data_dir=str(data), cache_dir=str(tmp_path / "cache"),
                d_model=16, n_layer=1, n_head=2, vocab_size=300, pretrain_steps=4, pretrain_batch=4, pretrain_seq=16,
                kernel_samples=12, kernel_draws=2, n_val=10, n_test=20, max_len=16, sizes=(10, 30), seeds=(0, 1),
                lr={"full": 1e-2, "tangent": 1e-2, "probe": 1e-1}, batch_size=8, max_steps=10, eval_every=5,
                patience=2, tv_size=30, tangent=True, xi_alphas=(0.0, 1.0), xi_samples=10,
                budget_min=None, threads=1,
                planted_check=dict(sizes=(6, 12), n_test=8, sample=10, k=4, seeds=2, net_steps=30, grid=40))
    return config("default", **(base | kw))


def test_the_pipeline_writes_every_part_of_the_report(tmp_path):
    out = tmp_path / "report"
    res = run(toy_config(tmp_path), out)
    assert res["finished"] and set(res["phases"]) == {"setup", "kernels", "planted", "curves", "vectors"}
    assert len(res["planted"]["rows"]) == 3 * 2 * 2 and res["planted"]["task"] == "vader"
    assert set(res["kernels"]) == {"vader", "afinn-sign", "vader-sign"}
    assert all(len(k["draws"]) == 2 for k in res["kernels"].values())
    assert len(res["curves"]) == 3 * 2 * 2 * 2  # tasks x sizes x seeds x methods
    run0 = res["curves"][0]
    assert {"test", "val", "train", "best_step", "stop_step", "curve"} <= set(run0)
    assert len(run0["curve"]["step"]) == len(run0["curve"]["test_loss"]) >= 2
    corr = res["efficiency"]["correlation"]["full"]["all"]
    assert corr["tasks"] == ["vader", "afinn-sign", "vader-sign"] and "beta_vs_aulc" in corr
    for variant in ("full", "tangent"):
        v = res["vectors"][variant]
        assert len(v["cosine"]) == 3 and len(v["addition_pairs"]) == 3 and set(v["negation"]) == set(v["tasks"])
        assert v["addition_all"]["lambda"] in PaperConfig().tv_grid
        assert len(v["xi"]["grid"]["xi"]) == 2 and len(v["xi"]["pairs_at_1_1"]) == 3
    saved = json.loads((out / "results.json").read_text())
    assert saved["finished"] and saved["model"]["pretrain"]["tokens_seen"] == 4 * 4 * 16
    text = (out / "report.md").read_text()
    for section in ("## 1. Eigen-decay", "## Planted tasks", "## 2. Learning curves", "## 3. Does beta predict",
                    "## 4. Task vectors"):
        assert section in text, section
    assert "Why these models stay at the trivial predictor" in text  # the toy models do not learn (nerr ~1)
    for png in ("decay.png", "learning_curves.png", "decay_vs_efficiency.png", "task_vectors.png",
                "disentanglement.png", "training_curves.png", "planted.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    cached = next((tmp_path / "cache" / "paper").iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "pretrain.json"} <= {p.name for p in cached.iterdir()}


def test_a_checkpoint_brings_its_tokenizer_or_the_run_stops(tmp_path):
    from conftest import make_gpt_neo_checkpoint, make_gpt_neo_with_tokenizer

    from minintk.gptneo import load_tokenizer
    from minintk.paper_config import PaperError
    from minintk.paper_model import build_model
    from minintk.paper_results import Run

    with_tok = make_gpt_neo_with_tokenizer(tmp_path / "with")
    cfg = toy_config(tmp_path, model=str(with_tok), pretrain_steps=0)
    _, tok, rec = build_model(Run(cfg, tmp_path / "a"))
    assert tok("a wonderful film")["input_ids"] == load_tokenizer(with_tok)("a wonderful film")["input_ids"]
    assert rec["tokenizer"].startswith("the model folder's")
    bare, _ = make_gpt_neo_checkpoint(tmp_path / "bare", vocab=400, positions=32)
    with pytest.raises(PaperError, match="has no tokenizer .* --tokenizer fallback"):
        build_model(Run(toy_config(tmp_path, model=str(bare), pretrain_steps=0), tmp_path / "b"))
    _, _, rec = build_model(Run(toy_config(tmp_path, model=str(bare), pretrain_steps=0, tokenizer="fallback"),
                                tmp_path / "c"))
    assert rec["tokenizer"].startswith("fallback byte-level BPE (asked for)")
    with pytest.raises(PaperError, match="tokenizer='gpt2'; expected 'model'"):
        toy_config(tmp_path, tokenizer="gpt2")
