"""What goes in: the samples (a tensor or a dict of tensors, samples first), their checks, and the parameters
that are differentiated, selected on the caller's model and carried to the precision's copy by name."""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
from collections.abc import Mapping

import torch
from torch import nn

from .errors import NTKError
from .precision import model_dtype

Inputs = torch.Tensor | Mapping[str, torch.Tensor]


def n_samples(X: Inputs) -> int:
    """The leading (sample) dimension shared by every tensor of X; NTKError otherwise."""
    if isinstance(X, torch.Tensor):
        if X.dim() == 0:
            raise NTKError("X must have a leading sample dimension, got a 0-d tensor")
        return X.shape[0]
    if isinstance(X, Mapping) and X:
        sizes = {k: v.shape[0] for k, v in X.items() if isinstance(v, torch.Tensor)}
        if len(set(sizes.values())) != 1 or len(sizes) != len(X):
            raise NTKError(f"every input must be a tensor with the same leading sample dimension, got {sizes}")
        return next(iter(sizes.values()))
    raise NTKError(f"X must be a tensor (n, ...) or a dict of such tensors, got {type(X).__name__}")


def rows(X: Inputs, lo: int, hi: int, device: torch.device) -> Inputs:
    """Samples lo:hi of X on `device`."""
    if isinstance(X, torch.Tensor):
        return X[lo:hi].to(device)
    return {k: v[lo:hi].to(device) for k, v in X.items()}


def take(X: Inputs, which: list[int], device: torch.device) -> Inputs:
    """Samples `which` (repeats allowed) of X on `device`."""
    idx = torch.tensor(which)
    if isinstance(X, torch.Tensor):
        return X[idx.to(X.device)].to(device)
    return {k: v[idx.to(v.device)].to(device) for k, v in X.items()}


def tokens(x: Inputs) -> int:
    """Tokens per sample: dimension 1 of the ids (0 for inputs without a second dimension)."""
    if isinstance(x, torch.Tensor):
        return x.shape[1] if x.dim() >= 2 else 0
    ids = x.get("input_ids", x.get("idx"))
    ids = ids if isinstance(ids, torch.Tensor) else next((v for v in x.values() if v.dim() >= 2), None)
    return ids.shape[1] if ids is not None and ids.dim() >= 2 else 0


def input_embedding(model: nn.Module) -> nn.Embedding | None:
    """The embedding that reads the token ids: the model's get_input_embeddings() (transformers, our Decoder),
    else its largest Embedding."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(emb, nn.Embedding):
        return emb
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(embs, key=lambda m: m.num_embeddings) if embs else None


def check_inputs(model: nn.Module, X: Inputs, name: str) -> int:
    """n, after checking token ids (integer (n, T), inside the input embedding's rows) and attention masks (no
    fully masked row); NTKError naming the bad value otherwise."""
    n = n_samples(X)
    if n == 0:
        raise NTKError(f"{name} has no samples")
    ids = X if isinstance(X, torch.Tensor) else X.get("input_ids", X.get("idx"))
    emb = input_embedding(model)
    if emb is not None and isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise NTKError(
                f"{name} holds token ids for an embedding model: it must be an integer tensor, got {ids.dtype}"
            )
        if ids.dim() != 2:
            raise NTKError(f"{name} token ids must have shape (n, T), got {tuple(ids.shape)}")
        lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
        if lo < 0 or hi >= emb.num_embeddings:
            raise NTKError(f"{name} token ids must lie in [0, {emb.num_embeddings}), got min {lo}, max {hi}")
    mask = X.get("attention_mask") if isinstance(X, Mapping) else None
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        empty = (~mask.bool().flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:
            raise NTKError(f"{name}['attention_mask'] rows {empty[:8]} mask every token: such a sample has no "
                           f"output to differentiate; drop it")
    return n


def check_model(model: nn.Module) -> None:
    """NTKError for models whose NTK is undefined here: meta tensors, batch statistics or dropout in training
    mode, NaN or inf parameters."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise NTKError(
            f"parameters {meta[:3]} are on the meta device (no values: a model built under init_empty_weights or "
            f"device_map offloading); load its weights first, e.g. model.to_empty(device=...) then load_state_dict"
        )
    for name, m in model.named_modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise NTKError(f"{name or 'model'} is batch norm in training mode: samples interact; call model.eval()")
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise NTKError(f"{name} is dropout (p={m.p}) in training mode: f is random; call model.eval()")
    named = list(model.named_parameters())
    with torch.no_grad():  # the 2-norm of all parameters (multi-tensor kernels, one sync): NaN/inf propagate; an
        # overflow of huge finite entries falls to the per-parameter check (the inf-norm is one kernel per tensor)
        if not named or math.isfinite(nn.utils.get_total_norm([p for _, p in named], 2.0).item()):
            return
        for name, p in named:
            if not torch.isfinite(p).all():
                raise NTKError(f"parameter {name} holds NaN or inf values; the NTK of such a model is undefined")


def select_params(model: nn.Module, params=None) -> list[tuple[str, nn.Parameter]]:
    """The parameters whose Jacobian enters K, as (name, parameter) in the model's order.

    params: None (every parameter that requires grad), glob pattern(s) on names, module(s) or parameter(s) of
    the model, or a predicate (name, parameter) -> bool. Parameters chosen by name, object or predicate are
    differentiated whether or not they require grad (a frozen backbone's kernel is a kernel too).
    Examples: "blocks.*.attn.*" (attention only), ["blocks.10.*", "blocks.11.*"], model.lm_head.
    Raises NTKError when nothing is selected.
    """
    named = list(model.named_parameters())
    many = isinstance(params, (list, tuple)) and len(params) > 0
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen and named:
            raise NTKError("no parameter of the model requires grad; name the ones to differentiate with params=")
    elif isinstance(params, str) or (many and all(isinstance(q, str) for q in params)):
        pats = [params] if isinstance(params, str) else list(params)
        chosen = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, q) for q in pats)]
    elif isinstance(params, nn.Module) or (many and all(isinstance(q, nn.Module) for q in params)):
        mods = [params] if isinstance(params, nn.Module) else list(params)
        ids = {id(p) for m in mods for p in m.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif isinstance(params, nn.Parameter) or (many and all(isinstance(q, nn.Parameter) for q in params)):
        ids = {id(p) for p in ([params] if isinstance(params, nn.Parameter) else params)}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        raise NTKError(
            f"params must be None, a glob pattern, a list of patterns, module(s), parameter(s) or a predicate; "
            f"got {params!r}"
        )
    if not chosen:
        raise NTKError(f"params={params!r} selects no parameter of this model; names look like "
                       f"{[n for n, _ in named[:4]]}")
    return chosen


def last_blocks(model: nn.Module, k: int) -> list[str]:
    """Glob patterns selecting the parameters of the last k transformer blocks (ours or transformers')."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise NTKError("the model has no nn.ModuleList of blocks")
    name, blocks = max(lists, key=lambda t: len(t[1]))
    return [f"{name}.{i}.*" for i in range(max(0, len(blocks) - k), len(blocks))]


def prepare(model: nn.Module, X: Inputs, X2: Inputs | None, params, precision: str):
    """Checks, then (model in the precision's dtype, its selected (name, parameter)s, X, X2 in the model's dtype).

    Parameters are selected on the caller's model and carried to a converted copy by name; floating inputs
    follow the model's conversion (fp32 inputs of an fp32 model become fp64 with it) and are widened to it."""
    check_model(model)
    check_inputs(model, X, "X")
    if X2 is not None:
        check_inputs(model, X2, "X2")
    names = [name for name, _ in select_params(model, params)]
    before = next(model.parameters()).dtype
    model = in_precision(model, precision)
    after = next(model.parameters()).dtype
    by_name = dict(model.named_parameters())
    return model, [(name, by_name[name]) for name in names], as_dtype(X, before, after), as_dtype(X2, before, after)


def in_precision(model: nn.Module, precision: str) -> nn.Module:
    """The model with parameters in the precision's dtype (fp64; fp32 for the others, bf16 models stay bf16):
    itself, or a converted copy."""
    want = model_dtype(precision)
    pdt = next(model.parameters()).dtype
    if pdt != want and not (precision == "bf16" and pdt == torch.bfloat16):
        return copy.deepcopy(model).to(want)  # deepcopy keeps tied parameters tied
    return model


def as_dtype(X: Inputs | None, before: torch.dtype, after: torch.dtype) -> Inputs | None:
    """Floating tensors of dtype `before` converted to `after` (the model's conversion), and floating tensors
    narrower than `after` widened to it (exact); others as they are."""

    def one(v):
        change = isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != after
        if change and (v.dtype == before or v.dtype.itemsize < after.itemsize):
            return v.to(after)
        return v

    if X is None:
        return X
    return one(X) if isinstance(X, torch.Tensor) else {k: one(v) for k, v in X.items()}


@contextlib.contextmanager
def differentiable(params: list[nn.Parameter]):
    """Selected parameters require grad for the call (a frozen backbone's too: the NTK is a property of f and of
    the chosen parameters, not of which ones a training loop updates); restored afterwards."""
    frozen = [p for p in params if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def width(model: nn.Module) -> int:
    """The model's width (d_model / hidden_size / n_embd of its config), for normalize=True."""
    cfg = getattr(model, "cfg", None) or getattr(model, "config", None)
    for attr in ("d_model", "hidden_size", "n_embd"):
        if cfg is not None and getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise NTKError("normalize=True needs the model's width (config d_model/hidden_size); pass normalize=<width>")
