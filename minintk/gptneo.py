"""Load and save real GPT-Neo checkpoints as our Decoder, mapping every tensor by name.

Sources (checkpoint.resolve): a Hugging Face model folder (single or sharded safetensors, single or sharded
pytorch_model.bin), a weights file with config.json beside it, a cache snapshot, or a hub id (downloaded online,
found in the cache offline). Loading never runs pickled code. The folder's tokenizer comes with load_tokenizer.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError, resolve
from .config import DecoderConfig
from .model import Decoder

__all__ = ["CheckpointError", "decoder_config_from_hf", "load_gpt_neo", "load_tokenizer", "save_gpt_neo"]

# Buffers that old GPT-Neo checkpoints carry; they hold no weights (the causal mask), so we skip them.
_IGNORED_SUFFIXES = (".attn.attention.bias", ".attn.attention.masked_bias")
_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "tanh": "tanh", "gelu_pytorch_tanh": "gelu_new"}


def decoder_config_from_hf(hf: dict, attn_scale: str = "native", **overrides) -> DecoderConfig:
    """Our DecoderConfig for a GPT-Neo config.json dict. attn_scale "native" keeps GPT-Neo's (none)."""
    kind = hf.get("model_type")
    if kind != "gpt_neo":
        raise CheckpointError(
            f"config.json says model_type={kind!r}; load_gpt_neo reads GPT-Neo checkpoints (model_type 'gpt_neo')"
        )
    layers = hf.get("attention_layers")
    if not layers:
        layers = [t for pattern, reps in hf["attention_types"] for _ in range(reps) for t in pattern]
    if len(layers) != hf["num_layers"]:
        raise CheckpointError(f"attention_layers has {len(layers)} entries for num_layers={hf['num_layers']}")
    act = hf.get("activation_function", "gelu_new")
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"activation_function {act!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    d = hf["hidden_size"]
    inter = hf.get("intermediate_size") or 4 * d
    windows = tuple(None if t == "global" else int(hf.get("window_size", 256)) for t in layers)
    kw = dict(
        vocab_size=hf["vocab_size"],
        n_positions=hf["max_position_embeddings"],
        d_model=d,
        n_layer=hf["num_layers"],
        n_head=hf["num_heads"],
        mlp_ratio=inter / d,
        activation=_ACTIVATIONS[act],
        ln_eps=hf.get("layer_norm_epsilon", 1e-5),
        attn_scale="none" if attn_scale == "native" else attn_scale,
        attention_windows=windows,
        qkv_bias=False,
        head="lm",
        tie_lm_head=bool(hf.get("tie_word_embeddings", True)),
    )
    kw.update(overrides)
    return DecoderConfig(**kw)


def _weight_map(cfg: DecoderConfig, prefix: str) -> dict[str, str]:
    """Our parameter name -> GPT-Neo checkpoint name, every tensor spelled out."""
    m = {"wte.weight": f"{prefix}wte.weight", "wpe.weight": f"{prefix}wpe.weight"}
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.", f"{prefix}h.{i}."
        for ln in ("ln_1", "ln_2"):
            for p in ("weight", "bias"):
                m[f"{ours}{ln}.{p}"] = f"{theirs}{ln}.{p}"
        for proj in ("q_proj", "k_proj", "v_proj"):
            m[f"{ours}attn.{proj}.weight"] = f"{theirs}attn.attention.{proj}.weight"
        for p in ("weight", "bias"):
            m[f"{ours}attn.out_proj.{p}"] = f"{theirs}attn.attention.out_proj.{p}"
            m[f"{ours}mlp.c_fc.{p}"] = f"{theirs}mlp.c_fc.{p}"
            m[f"{ours}mlp.c_proj.{p}"] = f"{theirs}mlp.c_proj.{p}"
    m["ln_f.weight"], m["ln_f.bias"] = f"{prefix}ln_f.weight", f"{prefix}ln_f.bias"
    if not cfg.tie_lm_head and cfg.head in ("lm", "label_words"):
        m["lm_head.weight"] = "lm_head.weight"
    return m


def load_gpt_neo(
    source: str | os.PathLike,
    attn_scale: str = "native",
    head: str = "lm",
    dtype: torch.dtype | str = torch.float32,
    strict: bool = True,
    **head_options,
) -> Decoder:
    """A GPT-Neo checkpoint as our Decoder (standard parameterization).

    source: see checkpoint.resolve. attn_scale: "native" (GPT-Neo's, no scaling), "1/sqrt(d)" or "1/d" to
    study the same weights under another scaling. head: "lm" (tied to the embedding, or untied as the
    checkpoint says), "label_words" (label_ids=..., label_diff=...), or a fresh "scalar"/"classes" head
    (randomly initialised; warned). dtype: a torch dtype, or "auto" for the dtype the checkpoint was saved in.
    Missing, unexpected or misshapen tensors raise CheckpointError naming them (strict=False turns unexpected
    ones into a warning).
    """
    if dtype != "auto" and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(f"dtype={dtype!r}; expected a floating torch dtype (torch.float32, torch.bfloat16, "
                              f"...) or 'auto' (the dtype the checkpoint was saved in)")
    ck = resolve(source)
    cfg = decoder_config_from_hf(ck.read_config(), attn_scale=attn_scale, head=head, **head_options)
    state = ck.read_state()
    prefix = "transformer." if any(k.startswith("transformer.") for k in state) else ""
    wmap = _weight_map(cfg, prefix)
    model = Decoder(cfg)
    _check_names(source, state, wmap, strict)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, theirs in wmap.items():
            t = state[theirs]
            if t.shape != ours[name].shape:
                raise CheckpointError(
                    f"{theirs} has shape {tuple(t.shape)}, the config implies {tuple(ours[name].shape)} for {name}"
                )
            ours[name].copy_(t)
    if cfg.tie_lm_head and "lm_head.weight" in state and not torch.equal(state["lm_head.weight"],
                                                                        state[wmap["wte.weight"]]):
        raise CheckpointError("lm_head.weight differs from the token embedding, but config.json ties them "
                              "(tie_word_embeddings is true or absent)")
    if head in ("scalar", "classes"):
        warnings.warn(f"the {head!r} head is not in the checkpoint: it is freshly initialised", stacklevel=2)
    return model.to(_saved_dtype([state[k] for k in wmap.values()]) if dtype == "auto" else dtype)


def _check_names(source, state: dict, wmap: dict, strict: bool) -> None:
    missing = [theirs for theirs in wmap.values() if theirs not in state]
    used = set(wmap.values()) | {"lm_head.weight"}
    unexpected = [k for k in state if k not in used and not k.endswith(_IGNORED_SUFFIXES)]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} lacks {len(missing)} GPT-Neo tensors: {', '.join(missing[:12])}"
            + (" ..." if len(missing) > 12 else "")
        )
    if unexpected:
        msg = f"checkpoint {source} has {len(unexpected)} tensors GPT-Neo does not use: {', '.join(unexpected[:12])}"
        if strict:
            raise CheckpointError(msg + " (pass strict=False to ignore them)")
        warnings.warn(msg, stacklevel=3)


def _saved_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    """The dtype the model's tensors were saved in (dtype="auto"; old checkpoints' fp32 mask buffers aside)."""
    kinds = {t.dtype for t in tensors}
    if len(kinds) != 1:
        raise CheckpointError(f"dtype='auto': the checkpoint mixes {sorted(map(str, kinds))}; pass a dtype")
    return kinds.pop()


def save_gpt_neo(model: Decoder, folder: str | os.PathLike) -> Path:
    """Write `folder` (config.json + model.safetensors) that transformers.GPTNeoForCausalLM.from_pretrained loads.

    The model must be a GPT-Neo: standard parameterization, GPT-Neo's attention scaling ("none"), learned
    positions, no q/k/v biases, one local window size. A non-LM head is not part of GPT-Neo and is dropped.
    """
    from safetensors.torch import save_file

    cfg = model.cfg
    problems = []
    if cfg.parameterization != "standard":
        problems.append("parameterization must be 'standard'")
    if cfg.attn_scale != "none":
        problems.append(f"attn_scale must be 'none' (GPT-Neo's own), got {cfg.attn_scale!r}")
    if cfg.n_positions is None:
        problems.append("GPT-Neo needs learned positions (n_positions)")
    if cfg.qkv_bias:
        problems.append("GPT-Neo has no q/k/v biases")
    sizes = {w for w in (cfg.window(i) for i in range(cfg.n_layer)) if w is not None}
    if len(sizes) > 1:
        problems.append(f"GPT-Neo has one local window size, this model has {sorted(sizes)}")
    if problems:
        raise CheckpointError("cannot save as GPT-Neo: " + "; ".join(problems))
    if cfg.head in ("scalar", "classes"):
        warnings.warn(f"the {cfg.head!r} head is not part of GPT-Neo and is not saved", stacklevel=2)

    layers = ["global" if cfg.window(i) is None else "local" for i in range(cfg.n_layer)]
    hf = {
        "model_type": "gpt_neo",
        "architectures": ["GPTNeoForCausalLM"],
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.n_positions,
        "hidden_size": cfg.d_model,
        "num_layers": cfg.n_layer,
        "num_heads": cfg.n_head,
        "attention_types": [[[t], 1] for t in layers],
        "attention_layers": layers,
        "window_size": next(iter(sizes), 256),
        "intermediate_size": cfg.d_mlp,
        "activation_function": cfg.activation,
        "layer_norm_epsilon": cfg.ln_eps,
        "resid_dropout": 0.0,
        "embed_dropout": 0.0,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_lm_head,
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = dict(model.named_parameters())
    wmap = _weight_map(cfg, "transformer.")
    state = {theirs: params[ours].detach().cpu().contiguous() for ours, theirs in wmap.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return folder


def load_tokenizer(source: str | os.PathLike):
    """The tokenizer that comes with a model (transformers.AutoTokenizer), resolved as load_gpt_neo resolves the
    weights (a folder, a file beside it, a cache snapshot, a hub id), or None when the source has none.

    GPT-Neo's tokenizer has no padding token; this one pads with its end-of-text token (and an attention mask,
    which minintk's models and label_words read), so `tok(texts, padding=True)` works."""
    folder = resolve(source, weights=False).tokenizer_folder()
    if folder is None:
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
