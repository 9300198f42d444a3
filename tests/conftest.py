import os

import pytest
import torch
from hypothesis import settings

# No test may reach a hub: loading code is exercised on checkpoints the tests write.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

settings.register_profile("ci", max_examples=10, deadline=None, derandomize=True)
settings.load_profile("ci")


@pytest.fixture
def one_thread():
    """One intra-op torch thread: on a small shared CPU, threads that spin-wait for each other run ~10x slower on
    the tiny matrices of these tests. Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_gpt_neo(tmp_path):
    """A random-init transformers GPTNeoForCausalLM saved with save_pretrained: a faithful GPT-Neo checkpoint."""
    return make_gpt_neo_checkpoint(tmp_path / "neo")


def make_gpt_neo_checkpoint(folder, vocab=61, positions=16, d=32, layers=2, heads=4, window=4, std=0.3, seed=0):
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    torch.manual_seed(seed)
    if layers == 1:
        types = [[["local"], 1]]
    elif layers % 2:
        types = [[["global", "local"], layers // 2], [["global"], 1]]
    else:
        types = [[["global", "local"], layers // 2]]
    cfg = GPTNeoConfig(
        vocab_size=vocab,
        max_position_embeddings=positions,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        attention_types=types,
        window_size=window,
        bos_token_id=0,
        eos_token_id=0,
    )
    hf = GPTNeoForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than GPT-Neo's 0.02 init so that every path of the logits is exercised
        for p in hf.parameters():
            p.normal_(0.0, std)
    hf.save_pretrained(folder)
    return folder, hf


def gpt_neo_scores_in_model_dtype(monkeypatch):
    """transformers' GPT-Neo with attention scores in the model's dtype: its own code casts q and k to fp32 even
    in an fp64 model, which our decoder does not (fp64 stays fp64), so fp64 comparisons need the cast removed."""
    import torch.nn.functional as F
    from transformers.models.gpt_neo import modeling_gpt_neo as neo

    def attn(self, query, key, value, attention_mask=None):
        w = query @ key.transpose(-1, -2)
        q_len, k_len = query.size(-2), key.size(-2)
        w = torch.where(self.bias[:, :, k_len - q_len : k_len, :k_len], w, torch.finfo(w.dtype).min)
        if attention_mask is not None:
            w = w + attention_mask
        w = F.softmax(w, dim=-1).to(value.dtype)
        return w @ value, w

    monkeypatch.setattr(neo.GPTNeoSelfAttention, "_attn", attn)


REVIEWS = ["a wonderful, moving film", "the plot made no sense", "fine, if a little long", "I laughed and cried",
           "two hours I will not get back", "the cast is superb", "dull from the first scene"]


def make_gpt_neo_with_tokenizer(folder, d=16, layers=2, positions=32, seed=0):
    """A random GPT-Neo checkpoint with a tokenizer beside it (a byte-level BPE trained on a few reviews, with
    " negative" and " positive" as single tokens), as `hf download` leaves a model folder."""
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    from minintk.tokenization import train_tokenizer

    tok = train_tokenizer(REVIEWS * 4, vocab_size=320, extra_words=(" negative", " positive"))
    torch.manual_seed(seed)
    cfg = GPTNeoConfig(vocab_size=len(tok), max_position_embeddings=positions, hidden_size=d, num_layers=layers,
                       num_heads=2, attention_types=[[["global", "local"], layers // 2]], window_size=4,
                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    hf = GPTNeoForCausalLM(cfg).eval()
    hf.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# A tiled Gram as `minintk ntk` computes it: the tiny decoder's fp64 label-word difference on 24 random sequences,
# in 6 blocks of 4 samples: 21 upper-triangle tiles.
TILE_DATA, TILE, TILES = "random:24:8:512:0", 4, 21


@pytest.fixture(scope="session")
def tiled_reference(tmp_path_factory):
    """(model, X, K, folder) of an uninterrupted one-process tiled_ntk run (one thread, as torchrun gives each
    rank), built as the CLI builds them. Tests copy the folder before changing it."""
    from minintk.distributed import tiled_ntk
    from minintk.sources import load_model, load_tokens

    model = load_model("tiny", (3, 7), diff=True, seed=0, device="cpu", dtype=torch.float64)
    X = load_tokens(TILE_DATA, model.cfg.vocab_size)
    out = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        K = tiled_ntk(model, X, out, tile=TILE, precision="fp64", progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, X, K, out


def sidecars(out) -> dict:
    """{tile name: sidecar} of a tile folder, skipping a sidecar being written right now."""
    import json

    found = {}
    for p in (out / "tiles").glob("*.json"):
        try:
            found[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            pass
    return found


# A width scan small enough for a test: 2 widths x 2 seeds of a 1-block decoder on 4 + 4 sequences of 3 tokens.
TINY_SCAN = dict(n_layer=1, n_head=2, vocab_size=8, seq_len=3, n_train=4, n_test=4, teacher_width=4, times=(0.5,),
                 pretrain_time=0.5, seeds=2, widths=(8, 16))
