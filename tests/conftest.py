import os

# Triton kernels are tested in Triton's CPU interpreter; the mode is fixed when triton is first imported.
# The engine still takes the torch references on CPU (it asks for the Triton path only on CUDA).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

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
