"""Time to a ready model: `load_afine` on a full-size merged afine.pth (random ViT-B/32 CLIP, text tower included),
against a plain `torch.load` of the same file in the same process.

    python bench/load.py                       # float32 and float16 CLIP, 5 runs each, page cache warm and cold
    python bench/load.py --runs 9 --dtypes float32

Writes the files to a temporary folder (about 610 MB for float32, the released file's size, and 310 MB for float16),
then, for each, runs fresh processes that each time, in this order: `load_afine` on the file (what `afine score`
does: the image tower read into memory of its own and checked finite, the text tower never read) and one forward
on a 224x224 pair; then a plain `torch.load(file, weights_only=True)` (every tensor read, nothing checked). "cold"
runs drop the file from the page cache (posix_fadvise DONTNEED, this file only) before each of the two; "warm" runs
find it there. Prints, per file and cache state, the median and the best of the runs for both loads, and the
process's resident memory after the forward pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from afine.checkpoint import save_afine  # noqa: E402
from afine.model import load_afine  # noqa: E402


def write_files(folder: Path, dtypes: list[str]) -> dict[str, Path]:
    from bench.train import random_b32  # here, not at the top: the timed processes import only what scoring does

    parts = random_b32().parts()
    files = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        files[name] = folder / f"afine_{name}.pth"
        clip = {k: v.to(dtype) for k, v in parts["finetuned_clip"].state_dict().items()}
        save_afine(files[name], {**parts, "finetuned_clip": clip})
    return files


def drop_from_page_cache(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def child(file: str, cold: bool) -> dict:
    """One fresh process: seconds of load_afine, of the first forward, resident MiB after it, then seconds of a
    plain torch.load of the same file."""
    if cold:
        drop_from_page_cache(Path(file))
    start = time.perf_counter()
    model = load_afine(file)
    loaded = time.perf_counter()
    with torch.inference_mode():
        model(torch.rand(1, 3, 224, 224), torch.rand(1, 3, 224, 224))
    out = {"load_afine_s": loaded - start, "first_forward_s": time.perf_counter() - loaded, "rss_mib": resident_mib()}
    del model
    if cold:
        drop_from_page_cache(Path(file))
    start = time.perf_counter()
    state = torch.load(file, map_location="cpu", weights_only=True)
    out["torch_load_s"] = time.perf_counter() - start
    del state
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per file and cache state (default 5)")
    parser.add_argument("--dtypes", default="float32,float16", help="CLIP dtypes of the files (default both)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.cold)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"torch {torch.__version__}, {os.cpu_count()} cpus, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}; "
          f"median / best of {args.runs} fresh processes")
    print(f"{'file':<16} {'MB':>5} {'cache':>5} {'load_afine s':>13} {'torch.load s':>13} {'first forward s':>16} "
          f"{'RSS MiB':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, file in write_files(Path(tmp), args.dtypes.split(",")).items():
            for cache in ("cold", "warm"):
                runs = []
                for _ in range(args.runs):
                    proc = subprocess.run([sys.executable, __file__, "--child", str(file)]
                                          + (["--cold"] if cache == "cold" else []), env=env, capture_output=True,
                                          text=True)
                    if proc.returncode != 0:
                        sys.exit(f"error: loading {file} failed:\n{proc.stderr}")
                    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                best = {k: min(r[k] for r in runs) for k in runs[0]}
                print(f"{name:<16} {file.stat().st_size / 1e6:>5.0f} {cache:>5} "
                      f"{med['load_afine_s']:>6.3f}/{best['load_afine_s']:<6.3f} "
                      f"{med['torch_load_s']:>6.3f}/{best['torch_load_s']:<6.3f} "
                      f"{med['first_forward_s']:>16.3f} {med['rss_mib']:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
