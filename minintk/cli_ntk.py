"""`minintk ntk`: a model and token ids (or texts) to the NTK Gram in a folder of tiles, resumable, on one device
or on every rank under torchrun; `--status` reports a folder's progress."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def add_parsers(add: Callable[..., argparse.ArgumentParser]) -> None:
    """`minintk ntk`; add(name, help=...) makes a subcommand's parser."""
    tiles = add("ntk", help="NTK Gram into a folder of tiles: resumable, one GPU, CPU or under torchrun")
    tiles.add_argument("model", nargs="?", help="GPT-Neo folder / .safetensors / hub id, or a built-in with random "
                       "weights: tiny, gpt-neo-125M, gpt-neo-1.3B, gpt-neo-2.7B")
    tiles.add_argument("data", nargs="?", help="token ids (n, T): .npy, .pt or .safetensors ('input_ids' [+ "
                       "'attention_mask']), or random:N:T[:vocab][:seed]; or give --text")
    tiles.add_argument("--text", help="text examples instead of DATA: one per line, or .jsonl with a 'text' field, "
                       "tokenized by the model folder's tokenizer and padded with an attention mask")
    tiles.add_argument("--tokenizer", help="tokenizer folder for --text and word labels (default: the model "
                       "folder's); 'fallback' trains a byte-level BPE on the texts (random-weight models)")
    tiles.add_argument("--out", help="result folder: manifest.json, tiles/, gram.safetensors when complete")
    tiles.add_argument("--labels", help="output f: logits of these label words or token ids at each sample's last "
                       "token, e.g. ' negative, positive' (one token each) or 352,2089")
    tiles.add_argument("--diff", action="store_true", help="f = logit[labels[1]] - logit[labels[0]] (n,)")
    tiles.add_argument("--tile", type=int, default=256, help="samples per tile side")
    tiles.add_argument("--precision", default="fp32", help="fp64 | fp32 | tf32 | bf16")
    tiles.add_argument("--device", default=None, help="cuda (one GPU per rank under torchrun) or cpu; default cuda "
                       "if available")
    tiles.add_argument("--max-memory", default=None, help="bytes for one tile's working set, e.g. 40GiB")
    tiles.add_argument("--params", default=None, help="comma-separated glob patterns of the parameters (default all)")
    tiles.add_argument("--kernel", default="sgd", help="sgd (the eNTK) | signgd (<g(x), sign(g(x'))>, every tile "
                       "computed); Adam kernels need their second moments: use minintk.ntk(kernel=adam(v))")
    tiles.add_argument("--seed", type=int, default=0, help="seed of a built-in model's random weights")
    tiles.add_argument("--overwrite", action="store_true", help="delete the folder's tiles of another run first")
    tiles.add_argument("--status", metavar="OUT", help="report the progress of the folder OUT and exit")
    tiles.set_defaults(func=_cmd_ntk)


def _cmd_ntk(args: argparse.Namespace) -> int:
    import torch

    from . import sources
    from .distributed import is_rank0, process_group, tiled_ntk
    from .tilefolder import TileRunError
    from .tileprogress import status

    if args.status:
        print(f"minintk ntk --status\n{format_status(status(args.status))}")
        return 0
    if not (args.model and (args.data or args.text) and args.out) or (args.data and args.text):
        raise TileRunError("give MODEL DATA --out FOLDER or MODEL --text FILE --out FOLDER to compute a Gram, or "
                           "--status FOLDER to report one")
    texts = sources.read_texts(args.text) if args.text else None
    words = [w for w in (args.labels or "").split(",") if w.strip()]
    tok = None
    if texts is not None or (args.tokenizer and words):
        vocab = sources.model_vocab(args.model)
        tok = sources.tokenizer_for(args.model, args.tokenizer, texts or [], words, vocab)
    labels = sources.resolve_labels(args.labels, tok)
    with process_group(args.device) as dev:
        dtype = torch.float64 if args.precision == "fp64" else torch.float32
        model = sources.load_model(args.model, labels, args.diff, args.seed, dev, dtype)
        if texts is not None:
            X = sources.encode_texts(texts, tok, model.cfg.n_positions)
        else:
            X = sources.load_tokens(args.data, model.cfg.vocab_size)
        pats = [p for p in args.params.split(",") if p] if args.params else None
        tiled_ntk(model, X, args.out, tile=args.tile, precision=args.precision, params=pats,
                  max_memory=sources.parse_bytes(args.max_memory), overwrite=args.overwrite, kernel=args.kernel)
        if is_rank0():
            print(f"minintk ntk: {args.model} on {args.text or args.data}\n{format_status(status(args.out))}")
    return 0


def format_status(st: dict) -> str:
    """The status dict as the lines `minintk ntk --status` prints."""
    s, cfg = st["settings"], st["model"]["config"]
    arch = ", ".join(f"{k}={cfg[k]}" for k in ("d_model", "n_layer", "head") if k in cfg)
    eta = st["eta_s"]
    rows = [
        ("folder", st["out"]),
        ("model", f"{st['model']['class'].rsplit('.', 1)[-1]} {arch} ({st['model']['parameters']:,} parameters)"),
        ("data", ", ".join(f"{k} {tuple(v)}" for k, v in st["data"]["shapes"].items())),
        ("settings", f"kernel {s.get('kernel', 'sgd')}, precision {s['precision']}, tile {s['tile']}, params "
                     f"{s['params'] or 'all'}, {s['output']}"),
        ("tiles", f"{st['tiles_done']} / {st['tiles_total']} done, {st['tiles_left']} left"),
        ("recomputed tiles", str(st["recomputed"])),
        ("est. time left", "unknown (no tile finished yet)" if eta is None else f"{eta:.0f} s on "
         f"{st['launches'][-1]['world_size'] if st['launches'] else 1} rank(s)"),
        ("gram", st["gram"] or "not assembled yet"),
    ]
    for e in st["launches"]:
        end = f"finished {e['finished']}" if e.get("finished") else "interrupted or running"
        tiles = f"{e['tiles_computed']} tiles ({e['recomputed']} recomputed), {e['tile_seconds']:.1f} tile-s"
        where = f"{e['world_size']} rank(s) on {e['device']}"
        rows.append((f"launch {e['launch']}", f"{e['started']}, {where}: {tiles}; {end}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)
