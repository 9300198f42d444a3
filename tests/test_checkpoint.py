"""Every checkpoint layout a user has on disk loads with the logits transformers gives it, with its tokenizer.

Each layout is written by transformers (or, for sharded .bin, by the hub library's shard splitter and torch.save,
the way older uploads are stored); weights never run pickled code."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_gpt_neo_checkpoint
from transformers import AutoTokenizer, GPTNeoForCausalLM

from minintk.gptneo import CheckpointError, load_gpt_neo, load_tokenizer, save_gpt_neo

TEXTS = ["the movie was good", "a bad film, the worst", "good good bad"]


def gpt2_style_tokenizer(folder: Path) -> None:
    """vocab.json + merges.txt (no tokenizer.json), as GPT-Neo's own hub folders hold them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 10, trainer=trainer)
    tok.model.save(str(folder))


def logits_close(ours: torch.nn.Module, hf: GPTNeoForCausalLM, tol: float = 1e-5) -> None:
    x = torch.randint(0, hf.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(1))
    a, b = ours(x).double(), hf(x).logits.double()
    err = ((a - b).abs().max() / b.abs().max()).item()
    assert err <= tol, f"logits differ from transformers' by {err:.2e} (relative to the largest)"


def sharded_bin(hf: GPTNeoForCausalLM, folder: Path) -> Path:
    from huggingface_hub import split_torch_state_dict_into_shards

    folder.mkdir()
    shutil.copy(hf.name_or_path + "/config.json", folder / "config.json")
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    split = split_torch_state_dict_into_shards(state, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size="40KB")
    assert split.is_sharded and len(split.filename_to_tensors) > 2, "the test needs several shards"
    for name, keys in split.filename_to_tensors.items():
        torch.save({k: state[k] for k in keys}, folder / name)
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture
def neo(tmp_path):
    folder, hf = make_gpt_neo_checkpoint(tmp_path / "neo")
    hf.name_or_path = str(folder)
    return folder, hf


def test_sharded_safetensors(neo, tmp_path):
    _, hf = neo
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    logits_close(load_gpt_neo(tmp_path / "sharded"), hf)
    logits_close(load_gpt_neo(tmp_path / "sharded" / "model.safetensors.index.json"), hf)


def test_single_and_sharded_bin_folders_and_files(neo, tmp_path):
    folder, hf = neo
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(folder / "config.json", single / "config.json")
    torch.save(hf.state_dict(), single / "pytorch_model.bin")
    sharded = sharded_bin(hf, tmp_path / "sharded")
    for source in (single, single / "pytorch_model.bin", sharded, sharded / "pytorch_model.bin.index.json"):
        logits_close(load_gpt_neo(source), hf)
    reference = GPTNeoForCausalLM.from_pretrained(sharded).eval()  # transformers reads the same folder
    logits_close(load_gpt_neo(sharded), reference)


def test_a_shard_index_naming_a_missing_shard_is_named(neo, tmp_path):
    _, hf = neo
    sharded = sharded_bin(hf, tmp_path / "sharded")
    gone = sorted(sharded.glob("pytorch_model-*.bin"))[0]
    gone.unlink()
    with pytest.raises(CheckpointError, match=f"names shards that are not there: .*{gone.name}"):
        load_gpt_neo(sharded)


class WritesAFile:
    """A pickle payload: unpickled without weights_only, it creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_code_is_never_run_on_any_bin_path(neo, tmp_path):
    folder, hf = neo
    marker = tmp_path / "pwned"
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(folder / "config.json", single / "config.json")
    torch.save({"transformer.wte.weight": WritesAFile(marker)}, single / "pytorch_model.bin")
    sharded = sharded_bin(hf, tmp_path / "sharded")
    shard = sorted(sharded.glob("pytorch_model-*.bin"))[-1]
    torch.save({"x": WritesAFile(marker)}, shard)
    for source in (single, single / "pytorch_model.bin", sharded, sharded / "pytorch_model.bin.index.json", shard):
        with pytest.raises(CheckpointError, match="pickled code is never run"):
            load_gpt_neo(source)
        assert not marker.exists(), f"loading {source} ran the pickle's code"


def test_saved_dtype_kept_with_auto(tmp_path):
    for dtype in (torch.float16, torch.bfloat16):
        folder, hf = make_gpt_neo_checkpoint(tmp_path / str(dtype), std=0.05)
        hf.to(dtype).save_pretrained(folder)
        auto = load_gpt_neo(folder, dtype="auto")
        assert {p.dtype for p in auto.parameters()} == {dtype}
        saved = dict(hf.named_parameters())
        assert torch.equal(auto.wte.weight, saved["transformer.wte.weight"]), "dtype='auto' changed the weights"
        logits_close(load_gpt_neo(folder), hf.float())  # the default upcasts to fp32 exactly
    with pytest.raises(CheckpointError, match=r"dtype='half'; expected a floating torch dtype"):
        load_gpt_neo(folder, dtype="half")


def test_untied_head_loads_and_round_trips_exactly(tmp_path):
    from transformers import GPTNeoConfig

    torch.manual_seed(0)
    cfg = GPTNeoConfig(vocab_size=41, max_position_embeddings=16, hidden_size=16, num_layers=2, num_heads=2,
                       attention_types=[[["global", "local"], 1]], window_size=4, tie_word_embeddings=False)
    hf = GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path / "untied")
    ours = load_gpt_neo(tmp_path / "untied")
    assert ours.lm_head.weight is not ours.wte.weight
    logits_close(ours, hf)
    words = load_gpt_neo(tmp_path / "untied", head="label_words", label_ids=(3, 7))
    x = torch.randint(0, 41, (2, 9))
    assert torch.allclose(words(x), hf(x).logits[:, -1, [3, 7]], atol=1e-5), "label words must read the own head"
    back = GPTNeoForCausalLM.from_pretrained(save_gpt_neo(ours, tmp_path / "saved")).eval()
    assert not back.config.tie_word_embeddings
    assert torch.equal(back(x).logits, hf(x).logits), "save_gpt_neo -> from_pretrained changed the logits"


def test_tokenizer_beside_weights_matches_transformers(neo):
    folder, _ = neo
    gpt2_style_tokenizer(folder)
    reference = AutoTokenizer.from_pretrained(str(folder))
    for source in (folder, folder / "model.safetensors"):
        tok = load_tokenizer(source)
        assert tok is not None, f"no tokenizer found for {source}"
        assert [tok(t)["input_ids"] for t in TEXTS] == [reference(t)["input_ids"] for t in TEXTS]
        assert tok.pad_token == tok.eos_token == "<|endoftext|>", "GPT-Neo pads with its end-of-text token"


def hub_cache(neo_folder: Path, cache: Path, repo: str) -> Path:
    """The Hugging Face cache layout of `repo`: blobs, a snapshot of symlinks into them, refs/main."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in neo_folder.iterdir():
        blob = root / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return snap


def test_cache_snapshot_and_repo_id_offline(neo, tmp_path):
    folder, hf = neo
    gpt2_style_tokenizer(folder)
    snap = hub_cache(folder, tmp_path / "hub", "someone/tiny-neo")
    assert (snap / "model.safetensors").is_symlink()
    logits_close(load_gpt_neo(snap), hf)
    x = torch.randint(0, 61, (2, 7))
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import torch
from minintk.gptneo import CheckpointError, load_gpt_neo, load_tokenizer
m = load_gpt_neo("someone/tiny-neo")
torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})
print(load_tokenizer("someone/tiny-neo")({TEXTS[0]!r})["input_ids"])
try:
    load_gpt_neo("someone/not-cached")
except CheckpointError as e:
    print(e)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert torch.allclose(torch.load(tmp_path / "y.pt"), hf(x).logits, atol=1e-5, rtol=0)
    assert lines[0] == str(AutoTokenizer.from_pretrained(str(folder))(TEXTS[0])["input_ids"])
    assert "someone/not-cached" in lines[1] and "pass a local folder" in lines[1]
