"""The public calls: ntk (the Gram), ntk_fn (neural-tangents style), plan (the tiling, without the Gram).
One call: inputs.prepare -> probe.discover -> plan.plan_gram -> tiles.gram (capture -> contract) -> K."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from .contract import STRATEGIES
from .errors import NTKError, torch_errors
from .graphs import MODES, eligible, graphed_gram
from .graphs import release as release_graphs
from .inputs import Inputs, differentiable, n_samples, prepare, width
from .plan import DEFAULT_COST, CostModel, Plan, Sizes, plan_gram
from .precision import PRECISIONS, matmul_flags, result_dtype
from .probe import clear_cache as forget_structures
from .probe import discover
from .reference import reference_gram
from .spec import Spec
from .stats import Stats
from .structure import Structure
from .tiles import gram
from .variants import Variant, as_variant, weights


def ntk(
    model: nn.Module,
    X: Inputs,
    X2: Inputs | None = None,
    *,
    output: Callable | None = None,
    params=None,
    precision: str = "fp32",
    strategy: str = "auto",
    trace: bool = False,
    diagonal: bool = False,
    normalize: bool | float = False,
    max_memory: int | None = None,
    block_size: int | None = None,
    progress: bool = True,
    stats: Stats | None = None,
    cost: CostModel = DEFAULT_COST,
    cuda_graph: bool | str = "auto",
    kernel: str | Variant = "sgd",
) -> torch.Tensor:
    """Empirical NTK Gram K[i, j] = J(x_i) J(x2_j)^T of `model` at its current parameters (docs/theory.md s. 2).

    X: (n, T) token ids, or (n, ...) inputs, or a dict of them passed as keywords (a tokenizer's output works);
    X2 the same for a cross kernel (default X). output: f of the model's batched output -> (n,) or (n, C)
    (label_words for LMs); None uses the output as it is. Returns, fp64 for precision="fp64" else fp32:
    (n, n2) for one output per sample; for C outputs (n, n2, C, C) with every pair of outputs, or with
    trace=True (n, n2) the MEAN over outputs (1/C) sum_c Theta_cc (neural-tangents' convention, and the kernel
    with which each output moves under the loss (1/2n) sum ||f - y||^2: docs/theory.md section 2.2), or with
    diagonal=True (n, n2, C) the per-output kernels Theta_cc. Trace and diagonal are contracted inside each
    layer: their memory and Gram flops are about C times below the full kernel's.
    params: see select_params (frozen parameters named there are differentiated too). normalize: True divides
    by the model's width (docs/theory.md section 1.3), a number divides by it. strategy: "auto" picks the
    ghost or materialized form per layer by cost; "ghost"/"materialized" force one; "loop" and "func" are the
    per-sample references. max_memory: bytes for the engine's working set (default: default_budget).
    block_size: largest sample block. stats: a Stats to fill (plan, seconds per phase, forms, peak memory).
    cost: the planner's CostModel. cuda_graph: small Grams on CUDA (one layer group, one sample tile) are replayed
    from a CUDA graph of their kernels (engine/graphs.py: exact, for a call repeated with inputs of one shape on
    an unchanged model); "auto" records it on the second such call when its working set is under 1/8 of the
    device's memory (which the graph then keeps), True on the first whatever its size, False never.
    kernel: "sgd" (the eNTK), "signgd" (<g(x_i), sign(g(x2_j))>, asymmetric) or adam(second_moment, eps)
    (<g(x_i), g(x2_j) / (sqrt(v) + eps)>): the kernels of other optimizers (engine/variants.py, docs/theory.md
    s. 2.7), formed per parameter in the materialized form; parameters the probe routes to the reference path
    need strategy="func" or "loop" with them.
    Raises NTKError for bad inputs or settings, naming what to change.
    """
    outputs = _check_options(precision, strategy, cuda_graph, trace, diagonal)
    variant = as_variant(kernel)
    model, selected, X, X2 = prepare(model, X, X2, params, precision)
    if variant is not None and not variant.symmetric and X2 is None:
        X2 = X  # an asymmetric kernel: every tile, as a cross kernel of X with itself
    n = n_samples(X)
    n2 = n if X2 is None else n_samples(X2)
    device = next(model.parameters()).device
    whole = strategy in ("loop", "func") or variant is not None  # the full kernel, reduced below
    spec = Spec(model, output, tuple(selected), precision, device, "full" if whole else outputs, variant=variant,
                weights=None if variant is None else weights(variant, selected, device, torch.float64))
    with _engine_mode(spec):
        if strategy in ("loop", "func"):
            K, C, scalar = reference_gram(spec, X, X2, n, n2, strategy, progress)
        else:
            K, C, scalar = _layerwise(spec, X, X2, n, n2, strategy, max_memory, block_size, stats, progress, cost,
                                      cuda_graph)
    if whole:
        K = _outputs_of_full(K, n, n2, C, outputs)
    if outputs == "full":
        K = K.reshape(n, C, n2, C).permute(0, 2, 1, 3)
        K = K[:, :, 0, 0] if scalar else K
    elif outputs == "trace":
        K = K / C
    if normalize:
        K = K / (width(model) if normalize is True else float(normalize))
    return K.to(result_dtype(precision)).contiguous()


def _check_options(precision: str, strategy: str, cuda_graph, trace: bool, diagonal: bool) -> str:
    """The output layout ("full", "trace" or "diagonal"); NTKError naming a bad option and what is accepted."""
    if precision not in PRECISIONS:
        raise NTKError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if strategy not in STRATEGIES:
        raise NTKError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if cuda_graph not in MODES:
        raise NTKError(f"unknown cuda_graph {cuda_graph!r}; expected 'auto', True or False")
    if trace and diagonal:
        raise NTKError("trace=True and diagonal=True exclude each other: trace -> (n, n2), diagonal -> (n, n2, C)")
    return "trace" if trace else "diagonal" if diagonal else "full"


def _layerwise(spec: Spec, X: Inputs, X2: Inputs | None, n: int, n2: int, strategy: str, max_memory: int | None,
               block_size: int | None, stats: Stats | None, progress: bool, cost: CostModel, cuda_graph):
    """(K as tiles.gram returns it, C, scalar output) by the layerwise engine, replayed from a CUDA graph where
    graphs.eligible allows it."""
    budget = int(max_memory) if max_memory is not None else default_budget(spec.device)
    st = discover(spec, X, budget, margin=cost.graph_margin, progress=progress)
    p = plan_gram(st, _sizes(spec, n, n2, X2 is None, budget, block_size, cost, own=X2 is X), cost)
    if stats is not None:
        stats.plan = p
    if spec.variant is not None and st.fallback:
        raise NTKError(f"kernel {spec.variant.name!r}: parameters {[n for n, _ in st.fallback][:6]} go to the "
                       "reference path (per-sample gradients of the whole model); pass strategy='func' (or 'loop'), "
                       "or leave them out of params=")
    K = None
    if eligible(spec, st, p, cuda_graph):
        t0 = time.perf_counter()
        with torch.cuda.device(spec.device):  # graphs are captured and replayed on the current device's streams
            K, phase = graphed_gram(spec, st, p, X, X2, cuda_graph, (strategy, cost, block_size, max_memory),
                                    lambda g, a, b: gram(g, st, p, a, b, strategy=strategy, cost=cost))
        if K is not None and stats is not None:
            stats.tick(phase, t0, spec.device)
    if K is None:
        K = gram(spec, st, p, X, X2, strategy=strategy, cost=cost, stats=stats, progress=progress)
    return K, st.C, st.scalar_output


def plan(
    model: nn.Module,
    X: Inputs,
    X2: Inputs | None = None,
    *,
    output: Callable | None = None,
    params=None,
    precision: str = "fp32",
    max_memory: int | None = None,
    block_size: int | None = None,
    trace: bool = False,
    diagonal: bool = False,
    cost: CostModel = DEFAULT_COST,
) -> Plan:
    """The Plan ntk would use (layer groups, sample blocks, memory, flops), without computing the Gram."""
    model, selected, X, X2 = prepare(model, X, X2, params, precision)
    outputs = "trace" if trace else "diagonal" if diagonal else "full"
    spec = Spec(model, output, tuple(selected), precision, next(model.parameters()).device, outputs)
    budget = int(max_memory) if max_memory is not None else default_budget(spec.device)
    with _engine_mode(spec):
        st = discover(spec, X, budget, margin=cost.graph_margin)
    n = n_samples(X)
    return plan_gram(st, _sizes(spec, n, n if X2 is None else n_samples(X2), X2 is None, budget, block_size, cost),
                     cost)


def layer_structure(
    model: nn.Module,
    X: Inputs,
    *,
    output: Callable | None = None,
    params=None,
    precision: str = "fp32",
    max_memory: int | None = None,
) -> Structure:
    """What the probe finds in `model` on inputs like X (cached, as ntk caches it): the layer calls it contracts
    (Structure.uses, with their shapes and segments), the parameters it routes to the reference path and why,
    the block chain, and memory and flops per segment."""
    model, selected, X, _ = prepare(model, X, None, params, precision)
    spec = Spec(model, output, tuple(selected), precision, next(model.parameters()).device)
    budget = int(max_memory) if max_memory is not None else default_budget(spec.device)
    with _engine_mode(spec):
        return discover(spec, X, budget)


def _outputs_of_full(K: torch.Tensor, n: int, n2: int, C: int, outputs: str) -> torch.Tensor:
    """A full (n C, n2 C) Gram in the layout of `outputs` (the sum over outputs for "trace", as the engine's)."""
    if outputs == "full":
        return K
    diag = K.reshape(n, C, n2, C).diagonal(dim1=1, dim2=3)  # (n, n2, C)
    return diag.sum(-1) if outputs == "trace" else diag


def clear_cache() -> None:
    """Forget every model's probed structure (after replacing modules or re-tying weights) and drop every
    recorded CUDA graph with the device memory it holds (engine/graphs.py)."""
    forget_structures()
    release_graphs()


def ntk_fn(model: nn.Module, **options) -> Callable[..., torch.Tensor]:
    """neural-tangents style: kernel_fn(X, X2=None) -> ntk(model, X, X2, **options), the options fixed."""

    def kernel_fn(X: Inputs, X2: Inputs | None = None) -> torch.Tensor:
        return ntk(model, X, X2, **options)

    return kernel_fn


def default_budget(device: torch.device, fraction: float = 0.9) -> int:
    """Bytes for the engine's working set: `fraction` of the memory free to torch on a CUDA device (counting
    blocks its allocator holds but does not use); on CPU, 8 GiB or half the available memory if less."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(fraction * free)
    return int(min(8 << 30, 0.5 * host_memory_available()))


def host_memory_available(default: int = 8 << 30) -> int:
    """Bytes of host memory available (Linux /proc/meminfo; `default` elsewhere)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", default)
    return default


@contextlib.contextmanager
def _engine_mode(spec: Spec):
    """The precision's matmul flags (forward, backward and contractions), the selected parameters requiring
    grad, and torch's errors said as NTKError, for the whole call."""
    with matmul_flags(spec.precision), differentiable([p for _, p in spec.selected]), torch_errors():
        yield


def _sizes(spec: Spec, n: int, n2: int, symmetric: bool, budget: int, block_size: int | None,
           cost: CostModel, own: bool = False) -> Sizes:
    host_ok = spec.device.type == "cuda" if cost.host_cache is None else cost.host_cache
    return Sizes(n, n2, symmetric, budget, block_size, spec.cap_dtype.itemsize, spec.precision, host_ok,
                 host_memory_available(0) if host_ok else 0.0, spec.outputs, own and not symmetric)
