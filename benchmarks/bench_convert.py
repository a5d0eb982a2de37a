"""Peak RSS of checkpoint conversion vs checkpoint size (random weights), streaming converter vs a naive one.

    python benchmarks/bench_convert.py --model mamba_790m [--dir /tmp/bench_convert] [--keep]

The checkpoints go to a new temp dir (removed at the end), or to --dir, which must be new or
empty: at the end (also after a failure) only the files the benchmark wrote there are removed,
and the directory itself only if the benchmark created it. --keep keeps everything.

Each conversion runs in a fresh Python process; peak RSS is that process's ``ru_maxrss`` (it includes
the interpreter + torch baseline, reported separately, and file pages touched through mmap, which the
kernel can drop under pressure); peak anonymous RSS (sampled every 5 ms from /proc/self/status) is the
memory the conversion itself holds.
"naive" = ``torch.load`` everything + ``safetensors.torch.save_file`` (and ``load_file`` + ``torch.save``).

Time: every case alike, the conversion plus an fsync of every file it wrote (and of their directories),
so a case ends only once its output is on disk; before each case, untimed, ``os.sync()`` flushes what
earlier cases left in the page cache, so no case pays for another's writeback.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench_args import HelpFormatter

CHILD = r"""
import json, os, resource, sys, threading, time
import torch
from openlm_mamba.convert import convert

%(durable)s

def anon_kb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0

peak_anon = [anon_kb()]
done = threading.Event()
def sample():
    while not done.is_set():
        peak_anon[0] = max(peak_anon[0], anon_kb())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
base_anon = anon_kb()
kind, src, dst, to, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
t = time.perf_counter()
if kind == "ours":
    convert(src, dst, to=to, progress=False, **extra)
elif kind == "naive_to_hf":
    import os
    from safetensors.torch import save_file
    sd = torch.load(src, map_location="cpu", weights_only=True)["state_dict"]
    sd = {k[len("model."):].replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items() if k != "model.lm_head.weight"}
    os.makedirs(dst)
    save_file(sd, os.path.join(dst, "model.safetensors"))
elif kind == "naive_to_openlm":
    from safetensors.torch import load_file
    sd = load_file(src + "/model.safetensors")
    sd = {"model." + k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in sd.items()}
    sd["model.lm_head.weight"] = sd["model.backbone.embedding.weight"]
    torch.save({"epoch": 0, "step": 0, "state_dict": sd}, dst)
t_sync = time.perf_counter()
durable(dst)  # inside the timed region, for every converter: the output is on disk when the clock stops
end = time.perf_counter()
elapsed, fsync_s = end - t, end - t_sync
done.set()
peak_anon[0] = max(peak_anon[0], anon_kb())
print(json.dumps({"base_kb": base, "peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "base_anon_kb": base_anon,
                  "peak_anon_kb": peak_anon[0], "s": elapsed, "fsync_s": fsync_s}))
"""


def durable(path: str) -> None:
    """fsync every file under ``path`` (or ``path`` itself, a file), then the directories holding them."""
    import os

    files, dirs = [], {os.path.dirname(os.path.abspath(path))}
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            dirs.add(root)
            files += [os.path.join(root, n) for n in names]
    else:
        files.append(path)
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for name in sorted(dirs):  # the renames / new entries; a platform that cannot fsync a directory skips it
        try:
            fd = os.open(name, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def flush_page_cache() -> None:
    """``os.sync()`` where the platform has it (Linux, macOS): earlier writes reach the disk before a case starts."""
    if hasattr(os, "sync"):
        os.sync()


def make_checkpoint(model: str, path: Path) -> int:
    """Write an OpenLM epoch checkpoint of random fp32 weights (built tensor by tensor); returns its size."""
    code = f"""
import torch
from openlm_mamba import MambaConfig
from openlm_mamba.convert.common import expected_shapes
from openlm_mamba.convert import openlm_checkpoint
cfg = MambaConfig.load({model!r})
g = torch.Generator().manual_seed(0)
sd = {{k: torch.randn(s, generator=g) * 0.02 for k, s in expected_shapes(cfg).items()}}
sd["lm_head.weight"] = sd["backbone.embedding.weight"]
torch.save(openlm_checkpoint(sd, cfg), {str(path)!r})
"""
    child([code], f"writing the {model} checkpoint")
    return path.stat().st_size


def child(argv: list[str], what: str) -> str:
    """Run ``python -c argv...`` and return its stdout; if it fails, print the last lines of its
    stderr and exit 1 (the caller's ``finally`` still cleans up)."""
    proc = subprocess.run([sys.executable, "-c", *argv], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-8:] or ["(no output on stderr)"]
        print(f"bench_convert: {what} failed (exit code {proc.returncode}):", file=sys.stderr)
        for line in tail:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1)
    return proc.stdout


def run(kind: str, src: Path, dst: Path, to: str, extra: dict | None = None) -> dict:
    """One timed conversion in a fresh process (see the module docstring); its measurements."""
    code = CHILD % {"durable": inspect.getsource(durable)}
    out = child([code, kind, str(src), str(dst), to, json.dumps(extra or {})], f"{kind} {src.name} -> {dst.name}")
    return json.loads(out.strip().splitlines()[-1])


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def remove_outputs(work: Path, names: list[str], created: bool) -> None:
    """Remove the entries ``names`` of ``work`` (what the benchmark wrote), then ``work`` if it is
    empty and the benchmark created it; anything else in it stays. A conversion killed midway leaves
    ``.<name>.partial-*`` (and ``.<name>.old-*``) beside its output: those are removed too."""
    paths = [work / name for name in names]
    for name in names:
        paths += [*work.glob(f".{name}.partial-*"), *work.glob(f".{name}.old-*")]
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    if created and work.is_dir() and not any(work.iterdir()):
        work.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default="mamba_790m", help="model config name or JSON path (random weights)")
    parser.add_argument(
        "--dir",
        default=None,
        help="work directory, new or empty (refused otherwise); without --keep only the files written there "
        "are removed at the end, and the directory if it was created (default: a new temp dir, removed)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the checkpoint and every converted output (the work dir's path is printed)",
    )
    args = parser.parse_args(argv)

    from openlm_mamba import ConfigError, MambaConfig

    try:
        MambaConfig.load(args.model)
    except ConfigError as exc:
        parser.error(f"argument --model: {exc}")
    if args.dir is None:
        work, own, created = Path(tempfile.mkdtemp(prefix="bench_convert_")), True, True
    else:
        work, own = Path(args.dir), False
        if work.exists() and not work.is_dir():
            parser.error(f"argument --dir: {work} exists and is not a directory")
        if work.is_dir() and any(work.iterdir()):
            parser.error(f"argument --dir: {work} is not empty; give a new or empty directory")
        created = not work.exists()
        work.mkdir(parents=True, exist_ok=True)
    src = work / "epoch_0.pt"
    cases = [
        ("ours", "openlm -> hf (1 file)", src, work / "hf", "hf", {}),
        ("ours", "openlm -> hf (1GB shards)", src, work / "hf_sharded", "hf", {"shard_size": "1GB"}),
        ("naive_to_hf", "openlm -> hf (1 file)", src, work / "hf_naive", "hf", None),
        ("ours", "hf -> openlm", work / "hf", work / "back.pt", "openlm", {}),
        ("ours", "hf (shards) -> openlm", work / "hf_sharded", work / "back2.pt", "openlm", {}),
        ("naive_to_openlm", "hf -> openlm", work / "hf", work / "back_naive.pt", "openlm", None),
        ("ours", "openlm -> mamba_ssm", src, work / "ssm", "mamba_ssm", {}),
        ("ours", "mamba_ssm -> openlm", work / "ssm", work / "back3.pt", "openlm", {}),
    ]
    outputs = [src.name] + [case[3].name for case in cases]  # everything the benchmark writes into work
    try:
        t = time.perf_counter()
        size = make_checkpoint(args.model, src)
        print(
            f"# {args.model}: random fp32 checkpoint {size / 2**30:.2f} GiB written in {time.perf_counter() - t:.0f} s",
            flush=True,
        )
        print("# time s: the conversion + fsync of its output (os.sync() before each case, untimed)")
        print(
            "| converter | direction | checkpoint GiB | baseline RSS GiB | peak RSS GiB | peak / checkpoint "
            "| peak anon RSS above baseline GiB | time s |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for kind, label, s, d, to, extra in cases:
            flush_page_cache()  # untimed: no case pays for the writeback of earlier ones
            r = run(kind, s, d, to, extra)
            ck = size_of(s)
            peak, base = r["peak_kb"] / 2**20, r["base_kb"] / 2**20
            name = "openlm-mamba" if kind == "ours" else "naive"
            anon = (r["peak_anon_kb"] - r["base_anon_kb"]) / 2**20
            print(
                f"| {name} | {label} | {ck / 2**30:.2f} | {base:.2f} | {peak:.2f} | {peak * 2**30 / ck:.2f} | {anon:.2f} "
                f"| {r['s']:.1f} |",
                flush=True,
            )
    finally:
        if args.keep:
            print(f"# kept: {work}", file=sys.stderr)
        elif own:
            shutil.rmtree(work, ignore_errors=True)
        else:
            remove_outputs(work, outputs, created)
    return 0


if __name__ == "__main__":
    sys.exit(main())
