"""The regression tasks of a width scan: token sequences labelled by a random teacher decoder, or read from a
task file; a target task to fine-tune on and a source task (another teacher) to pretrain on."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .config import DecoderConfig
from .model import Decoder
from .width_config import ScanConfig, WidthScanError


class Task(NamedTuple):
    """Regression on token sequences: X (n, T) int64, y (n,) float32; X_test (m, T), y_test (m,)."""

    X: torch.Tensor
    y: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor


def check_task(task: Task, name: str = "task") -> Task:
    """Validate shapes and dtypes of a Task; returns it with y as float32."""
    X, y, Xt, yt = task
    for a, b, part in ((X, y, "train"), (Xt, yt, "test")):
        if not isinstance(a, torch.Tensor) or a.is_floating_point() or a.dim() != 2 or a.shape[0] < 1:
            raise WidthScanError(f"{name} {part} inputs must be integer token ids (n, T), got "
                                 f"{getattr(a, 'dtype', type(a).__name__)} {tuple(getattr(a, 'shape', ()))}")
        if not isinstance(b, torch.Tensor) or b.shape != (a.shape[0],) or not torch.isfinite(b.float()).all():
            raise WidthScanError(f"{name} {part} targets must be finite scalars (n,) = ({a.shape[0]},), got "
                                 f"{tuple(getattr(b, 'shape', ()))}; one target per sequence")
        if int(a.min()) < 0:
            raise WidthScanError(f"{name} {part} token ids must be >= 0, got {int(a.min())}")
    if X.shape[1] != Xt.shape[1]:
        raise WidthScanError(f"{name} train and test sequences differ in length: {X.shape[1]} vs {Xt.shape[1]}")
    return Task(X.long(), y.float(), Xt.long(), yt.float())


def teacher(vocab: int, seq_len: int, width: int, n_head: int, seed: int) -> Decoder:
    """A random scalar decoder (one block, 1/sqrt(d) attention, standard parameterization): the synthetic task."""
    cfg = DecoderConfig(vocab_size=vocab, n_positions=seq_len, d_model=width, n_layer=1, n_head=n_head,
                        attn_scale="1/sqrt(d)", head="scalar")
    model = Decoder(cfg)
    model.reset_parameters(torch.Generator().manual_seed(seed))
    return model.eval()


def teacher_task(cfg: ScanConfig, seed: int, vocab: int | None = None, seq_len: int | None = None) -> Task:
    """n_train + n_test uniform token sequences labelled by teacher(seed), standardized over a pool of 1024
    sequences, plus N(0, noise^2). Same seed, same task."""
    vocab, seq_len = vocab or cfg.vocab_size, seq_len or cfg.seq_len
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(0, vocab, (1024 + cfg.n_train + cfg.n_test, seq_len), generator=g)
    with torch.no_grad():
        out = teacher(vocab, seq_len, cfg.teacher_width, cfg.n_head, seed)(X).double()
    z = (out - out[:1024].mean()) / out[:1024].std()
    y = (z + cfg.noise * torch.randn(z.shape, generator=g, dtype=torch.float64)).float()
    n = 1024 + cfg.n_train
    return Task(X[1024:n], y[1024:n], X[n:], y[n:])


def load_task(path: str | Path) -> Task:
    """A task file: .npz or .safetensors with X (n, T) int, y (n,), and optionally X_test, y_test (else the
    second half of the rows is held out)."""
    p = Path(path)
    if not p.is_file():
        raise WidthScanError(f"{path}: no such task file")
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(z[k]) for k in z.files}
    elif p.suffix == ".safetensors":
        from safetensors.torch import load_file

        arrays = load_file(p)
    else:
        raise WidthScanError(f"{path}: unknown task format {p.suffix!r}; give .npz or .safetensors (X, y[, X_test, "
                             f"y_test])")
    if "X" not in arrays or "y" not in arrays:
        raise WidthScanError(f"{path}: needs arrays 'X' (n, T) token ids and 'y' (n,) targets; it holds "
                             f"{sorted(arrays)}")
    X, y = arrays["X"], arrays["y"]
    if "X_test" in arrays and "y_test" in arrays:
        return check_task(Task(X, y, arrays["X_test"], arrays["y_test"]), str(path))
    if X.shape[0] < 2:
        raise WidthScanError(f"{path}: needs >= 2 rows to hold half out, or X_test and y_test")
    h = X.shape[0] // 2
    return check_task(Task(X[:h], y[:h], X[h:], y[h:]), str(path))


def tasks(cfg: ScanConfig) -> tuple[Task, Task, int]:
    """(target, source, vocab): the fine-tuning task, the pretraining task (a different teacher), the vocabulary."""
    if cfg.data:
        target = load_task(cfg.data)
        vocab = max(cfg.vocab_size, int(max(target.X.max(), target.X_test.max())) + 1)
        seq_len = target.X.shape[1]
    else:
        target = teacher_task(cfg, 2 * cfg.data_seed + 1)
        vocab, seq_len = cfg.vocab_size, cfg.seq_len
    return target, teacher_task(cfg, 2 * cfg.data_seed + 2, vocab, seq_len), vocab
