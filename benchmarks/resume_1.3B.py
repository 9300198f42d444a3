"""A crash and a resume on one GPU: `minintk ntk` for GPT-Neo-1.3B (random weights), T=128, n=2048, bf16.

Launch 1 of the CLI is killed (SIGKILL, as a crash would) once --kill-after tiles are finished, or at this
call's time limit, whichever comes first; then the same command is launched again and resumes. A second launch in
the same call starts only if the estimated time left (`minintk ntk --status`) fits the rest of the call;
otherwise the script stops, and running the same command again resumes from the tile folder (/tmp outlives
a call on a warm machine; a launch stopped at a call's time limit keeps its finished tiles too).
After every launch the table (time, tiles, recomputed tiles, per-tile seconds) is rewritten to --out.

    export PYTHONPATH=$PWD && ln -sfn ../kernels minintk/kernels
    python benchmarks/resume_1.3B.py --out $OUT/resume          # again, if it says so, to finish
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from minintk.tilefolder import TileRunError
from minintk.tileprogress import status

LABELS = "352,2089"  # two label-word ids, as in ntk_throughput.py (the cost does not depend on them)
STARTUP_S = 60.0  # a launch's own overhead (imports, 1.3B init and fingerprint), for the estimate


def cli(args: argparse.Namespace) -> list[str]:
    data = f"random:{args.n}:{args.T}:50257:0"
    return [sys.executable, "-m", "minintk.cli", "ntk", "gpt-neo-1.3B", data, "--labels", LABELS, "--diff",
            "--tile", str(args.tile), "--precision", "bf16", "--device", "cuda", "--seed", "0", "--out", str(args.work)]


def progress(work: Path) -> dict | None:
    try:
        return status(work)
    except TileRunError:  # no manifest yet
        return None


def launch(args, deadline: float, kill_after: int | None, log: Path) -> dict:
    """Run the CLI once; stop it after `kill_after` new tiles (SIGKILL) or at the deadline (SIGTERM)."""
    before = progress(args.work)
    done0 = before["tiles_done"] if before else 0
    started, t0 = datetime.now(timezone.utc).isoformat(timespec="seconds"), time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cli(args), stdout=f, stderr=subprocess.STDOUT)
        ended = None
        while p.poll() is None:
            time.sleep(2)
            st = progress(args.work)
            new = (st["tiles_done"] - done0) if st else 0
            if kill_after is not None and new >= kill_after:
                p.send_signal(signal.SIGKILL)
                ended = f"killed (SIGKILL) by the benchmark after {new} finished tiles"
            elif time.monotonic() > deadline:
                p.send_signal(signal.SIGTERM)
                ended = f"stopped at this call's time limit (SIGTERM) after {new} finished tiles"
            if ended:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                break
        p.wait()
    wall = time.monotonic() - t0
    st = progress(args.work)
    mine = st["launches"][-1] if st and st["launches"] and st["launches"][-1]["started"] >= started else None
    if ended is None:
        ended = "completed: Gram assembled" if p.returncode == 0 else f"failed (exit {p.returncode}), see {log.name}"
    return {
        "launch": mine["launch"] if mine else None, "started": started, "wall_s": wall, "ended": ended,
        "returncode": p.returncode, "tiles_computed": mine["tiles_computed"] if mine else 0,
        "recomputed": mine["recomputed"] if mine else 0, "tile_seconds": mine["tile_seconds"] if mine else 0.0,
        "tiles_done_after": st["tiles_done"] if st else 0, "tiles_total": st["tiles_total"] if st else None,
        "log": log.name,
    }


def gram_check(work: Path) -> dict:
    from safetensors.torch import load_file

    K = load_file(work / "gram.safetensors")["K"].double()
    return {"shape": list(K.shape), "finite": bool(torch.isfinite(K).all()), "symmetric": bool(torch.equal(K, K.T)),
            "min_diagonal": K.diagonal().min().item(), "trace": K.trace().item()}


def gram_line(g: dict) -> str:
    return (f"Gram assembled: {tuple(g['shape'])}, {'finite' if g['finite'] else 'NOT FINITE'}, "
            f"{'symmetric' if g['symmetric'] else 'NOT SYMMETRIC'}, min diagonal {g['min_diagonal']:.4g}, "
            f"trace {g['trace']:.6g}.")


def tile_rows(work: Path) -> list[dict]:
    rows = []
    for p in sorted((work / "tiles").glob("*.json")):
        s = json.loads(p.read_text())
        rows.append({k: s[k] for k in ("tile", "kind", "launch", "rank", "seconds", "recomputed")})
    return rows


def markdown(rec: dict) -> str:
    m, runs = rec["meta"], rec["launches"]
    lines = [
        f"# Resumable NTK Gram on {m.get('gpu', '?')}: GPT-Neo-1.3B (random weights), n={m['n']}, T={m['T']}, "
        f"bf16, tiles of {m['tile']}",
        "",
        f"torch {m['torch']}, CUDA {m['cuda']}, Python {m['python']}. Output f: label-word "
        f"logit difference at the last token. Each launch runs `{' '.join(m['command'])}`.",
        "",
        "| call | launch | how it ended | wall s | tiles computed | recomputed | tiles done after | tile-seconds "
        "| overhead s* |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        lines.append(
            f"| {r['call']} | {r['launch']} | {r['ended']} | {r['wall_s']:.1f} | {r['tiles_computed']} | "
            f"{r['recomputed']} | {r['tiles_done_after']} / {r['tiles_total']} | {r['tile_seconds']:.1f} | "
            f"{r['wall_s'] - r['tile_seconds']:.1f} |"
        )
    total = sum(r["wall_s"] for r in runs)
    recomputed = rec.get("recomputed_total", sum(r["recomputed"] for r in runs))
    lines += [
        "",
        f"Total: {total:.1f} s of wall time over {len(runs)} launch(es); {recomputed} tile(s) recomputed; "
        + (gram_line(rec["gram"]) if rec.get("gram") else "Gram not complete yet: run the same command again."),
        "",
        "\\* overhead: wall time outside finished tiles (start-up, assembly, the unfinished tile a kill loses).",
        "",
        "| tile | kind | launch | seconds | recomputed |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {t['tile']} | {t['kind']} | {t['launch']} | {t['seconds']:.1f} | {t['recomputed'] or 0} |"
              for t in rec.get("tiles", [])]
    return "\n".join(lines) + "\n"


def save(rec: dict, out: Path, work: Path) -> None:
    st = progress(work)
    if st:
        rec["tiles"], rec["recomputed_total"] = tile_rows(work), st["recomputed"]
        rec["meta"]["gpu"] = st["launches"][0]["device"] if st["launches"] else None
    text = json.dumps(rec, indent=2)
    (work / "benchmark.json").write_text(text)  # the record of every call, kept with the tiles
    (out / "resume_1.3B.json").write_text(text)
    (out / "resume_1.3B.md").write_text(markdown(rec))
    for log in work.glob("launch_*.log"):
        shutil.copy(log, out / log.name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/resume_1.3B", help="folder for the table (md + json)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/minintk-resume-1.3B"), help="the CLI's tile folder")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--tile", type=int, default=512)
    ap.add_argument("--kill-after", type=int, default=4, help="finished tiles after which launch 1 is killed")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="this call's time limit, seconds")
    ap.add_argument("--fresh", action="store_true", help="delete the tile folder and start over")
    args = ap.parse_args()
    t0 = time.monotonic()
    deadline = t0 + args.deadline_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    record_path = args.work / "benchmark.json"
    rec = json.loads(record_path.read_text()) if record_path.exists() else {"launches": [], "calls": 0}
    rec["calls"] += 1
    rec["meta"] = {**rec.get("meta", {}), "n": args.n, "T": args.T, "tile": args.tile, "torch": torch.__version__,
                   "cuda": torch.version.cuda, "python": platform.python_version(),
                   "host": platform.node(), "command": cli(args)}
    while True:
        st = progress(args.work)
        if st and st["gram"]:
            rec["gram"] = gram_check(args.work)
            save(rec, out, args.work)
            print(f"complete: {st['tiles_total']} tiles, {st['recomputed']} recomputed; table in {out}", flush=True)
            return
        first = not rec["launches"]
        if rec["launches"][-1:] and rec["launches"][-1]["call"] == rec["calls"]:  # this call launched already
            need = (st["eta_s"] or 0.0) + STARTUP_S if st else float("inf")
            left = deadline - time.monotonic()
            if need > left:
                save(rec, out, args.work)
                print(f"stopping: ~{need:.0f} s of work left, {left:.0f} s left in this call; run the same command "
                      f"again to resume from {args.work}", flush=True)
                return
        log = args.work / f"launch_{len(rec['launches']) + 1}.log"
        row = launch(args, deadline, args.kill_after if first else None, log)
        rec["launches"].append({"call": rec["calls"], **row})
        save(rec, out, args.work)
        print(json.dumps(row), flush=True)
        if row["returncode"] not in (0, -signal.SIGKILL, -signal.SIGTERM):
            sys.exit(f"launch failed; see {out / log.name}")


if __name__ == "__main__":
    main()
