"""GPT-Neo loading: logits equal transformers' on checkpoints written by save_pretrained; bad input is named."""

import json

import pytest
import torch
from conftest import gpt_neo_scores_in_model_dtype, make_gpt_neo_checkpoint
from transformers import GPTNeoForCausalLM

from minintk.gptneo import CheckpointError, load_gpt_neo, load_tokenizer, save_gpt_neo
from minintk.model import ModelInputError

CONFIGS = [  # (vocab, positions, d, layers, heads, window, T, batch)
    dict(vocab=61, positions=16, d=32, layers=2, heads=4, window=4, T=16, n=3),  # T at the position limit
    dict(vocab=50, positions=24, d=48, layers=3, heads=6, window=5, T=20, n=2),  # odd depth, window < T
    dict(vocab=33, positions=12, d=16, layers=1, heads=1, window=3, T=9, n=4),  # one local layer, one head
    dict(vocab=70, positions=32, d=64, layers=4, heads=8, window=1, T=32, n=2),  # window 1: a token sees itself
]


@pytest.mark.parametrize("c", CONFIGS, ids=lambda c: f"d{c['d']}-L{c['layers']}-H{c['heads']}-w{c['window']}")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_logits_match_transformers(tmp_path, monkeypatch, c, dtype, tol):
    if dtype == torch.float64:
        gpt_neo_scores_in_model_dtype(monkeypatch)
    folder, hf = make_gpt_neo_checkpoint(
        tmp_path,
        vocab=c["vocab"],
        positions=c["positions"],
        d=c["d"],
        layers=c["layers"],
        heads=c["heads"],
        window=c["window"],
    )
    ours = load_gpt_neo(folder, dtype=dtype)
    x = torch.randint(0, c["vocab"], (c["n"], c["T"]), generator=torch.Generator().manual_seed(1))
    ref = hf.to(dtype)(x).logits
    err = (ours(x) - ref).abs().max().item()
    assert err <= tol, f"max |logit difference| {err:.3e} > {tol:.0e} ({dtype})"
    assert ref.abs().max() > 1.0, "logits too small to make the comparison discriminating"


def test_fp64_stays_fp64_where_gpt_neo_narrows_its_scores(tiny_gpt_neo):
    """Our fp64 decoder computes its attention scores in fp64; transformers' GPT-Neo casts them to fp32, so the two
    differ at fp32 level, not at fp64's."""
    folder, hf = tiny_gpt_neo
    x = torch.randint(0, 61, (2, 16))
    ref = hf.double()(x).logits
    err = (load_gpt_neo(folder, dtype=torch.float64)(x) - ref).abs().max().item()
    assert 1e-13 < err < 1e-5, f"fp64 scores should differ from GPT-Neo's fp32 scores at fp32 level, got {err:.2e}"


def test_round_trip_save_then_from_pretrained(tiny_gpt_neo, tmp_path):
    folder, hf = tiny_gpt_neo
    ours = load_gpt_neo(folder)
    out = save_gpt_neo(ours, tmp_path / "saved")
    hf2 = GPTNeoForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, 61, (3, 16))
    assert torch.equal(hf2(x).logits, hf(x).logits), "save_gpt_neo -> from_pretrained changed the logits"
    back = load_gpt_neo(out)
    assert torch.equal(back(x), ours(x)), "save_gpt_neo -> load_gpt_neo changed the logits"


def test_single_safetensors_file_and_bin(tiny_gpt_neo, tmp_path):
    folder, hf = tiny_gpt_neo
    x = torch.randint(0, 61, (2, 10))
    a = load_gpt_neo(folder / "model.safetensors")(x)
    binf = tmp_path / "bin"
    binf.mkdir()
    (binf / "config.json").write_text((folder / "config.json").read_text())
    torch.save(hf.state_dict(), binf / "pytorch_model.bin")
    b = load_gpt_neo(binf)(x)
    assert torch.equal(a, b), "the .bin and .safetensors of one checkpoint load to different models"


def test_label_word_head_reads_tied_logits(tiny_gpt_neo):
    folder, hf = tiny_gpt_neo
    m = load_gpt_neo(folder, head="label_words", label_ids=(5, 9), label_diff=True)
    x = torch.randint(0, 61, (3, 12))
    logits = hf(x).logits[:, -1]
    err = (m(x) - (logits[:, 9] - logits[:, 5])).abs().max().item()
    assert err < 1e-5, f"label-word difference off by {err:.2e}"


def test_gpt2_checkpoint_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=8)).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="model_type='gpt2'"):
        load_gpt_neo(tmp_path)


def test_truncated_checkpoint_is_named(tiny_gpt_neo):
    folder, _ = tiny_gpt_neo
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_gpt_neo(folder)


def test_missing_and_unexpected_tensors_are_named(tiny_gpt_neo):
    from safetensors.torch import load_file, save_file

    folder, _ = tiny_gpt_neo
    state = load_file(folder / "model.safetensors")
    dropped = state.pop("transformer.h.1.mlp.c_fc.weight")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lacks 1 GPT-Neo tensors: transformer\.h\.1\.mlp\.c_fc\.weight"):
        load_gpt_neo(folder)
    state["transformer.h.1.mlp.c_fc.weight"] = dropped
    state["transformer.h.1.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"transformer\.h\.1\.extra\.weight"):
        load_gpt_neo(folder)
    with pytest.warns(UserWarning, match="extra"):
        load_gpt_neo(folder, strict=False)


def test_wrong_config_is_named(tiny_gpt_neo):
    folder, _ = tiny_gpt_neo
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"mlp\.c_fc\.weight has shape \(128, 32\), the config implies \(96, 32\)"
    ):
        load_gpt_neo(folder)


def test_hub_id_offline_says_how_to_pass_a_folder(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="pass a local folder"):
        load_gpt_neo("EleutherAI/gpt-neo-125m")


def test_bad_token_ids_and_length(tiny_gpt_neo):
    folder, _ = tiny_gpt_neo
    m = load_gpt_neo(folder)
    with pytest.raises(ModelInputError, match=r"token ids must lie in \[0, 61\), got min 0, max 61"):
        m(torch.tensor([[0, 61]]))
    with pytest.raises(ModelInputError, match="sequence length 17 exceeds the model's n_positions=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ModelInputError, match="integer tensor"):
        m(torch.zeros(1, 4))


def test_tokenizer_from_folder(tiny_gpt_neo):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder, _ = tiny_gpt_neo
    assert load_tokenizer(folder) is None
    vocab = {w: i for i, w in enumerate(["[UNK]", "good", "bad", "movie"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    loaded = load_tokenizer(folder)
    assert loaded("good movie")["input_ids"] == [1, 3]
