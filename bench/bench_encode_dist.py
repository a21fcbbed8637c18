"""Encoding throughput of one store job run by 1 or N processes (torchrun), and where each rank's time goes.

Run (the script is torchrun's target; it makes its own images on the first run):
    python bench/bench_encode_dist.py --nproc 1 2      # launches torchrun for each count, prints a table
Each rank builds the encoder, meets the others at a barrier (start-up is not timed), then runs encode_to_store
over the shared store; the job's images/s is the images over rank 0's wall time from that barrier to the
published store. Each rank then times, over its own share, decoding alone and the forward passes alone (the
same batches), which gives the shares of decoding and of the forward pass in its encode.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_IMAGES = 96
SIDE = 362


def make_images(folder: Path, n: int) -> None:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    for i in range(n):
        img = Image.fromarray(np.roll(photos[i % len(photos)], 37 * i, axis=1)).resize((1024, 768))
        img.save(folder / f"im{i:04d}.jpg", quality=90)


def rank_main(images: Path, out: Path, runner: str) -> None:
    """One rank of the job: time the job, then decoding and forward passes over this rank's share."""
    import torch

    from engine.backends import make_runner
    from engine.distributed import Group
    from engine.encode import EncodeOptions, describe, encode_to_store, to_batch
    from engine.images import list_images, read_image
    from engine.models import build

    group = Group()
    enc = build("effnet-lite2-gem")
    opts = EncodeOptions(max_side=SIDE, batch_size=8, workers=1, backend=runner, progress=False)
    run = make_runner(enc, runner, torch.device("cpu"))
    paths = list_images(images)
    items = [(p, None) for p in paths]
    group.barrier()
    t0 = time.perf_counter()
    encode_to_store(enc, items, [p.name for p in paths], out, opts, shard_rows=8, overwrite=True, runner=run, group=group)
    wall = time.perf_counter() - t0
    share = paths[group.rank::group.world]
    t = time.perf_counter()
    decoded = [read_image(p, SIDE) for p in share]
    t_decode = time.perf_counter() - t
    by_shape: dict = {}
    for img in decoded:
        by_shape.setdefault(img.shape, []).append(img)
    t = time.perf_counter()
    for imgs in by_shape.values():
        for a in range(0, len(imgs), 8):
            describe(enc, to_batch(imgs[a:a + 8], run.device), (1.0,), run)
    t_forward = time.perf_counter() - t
    rows = group.gather({"rank": group.rank, "images": len(share), "decode_s": t_decode, "forward_s": t_forward})
    if group.leader:
        print("RESULT " + json.dumps({"world": group.world, "images": len(paths), "wall_s": wall, "ranks": rows}))
    group.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="process counts to run")
    ap.add_argument("--images", type=Path, default=None, help="image folder (default: made in a temporary folder)")
    ap.add_argument("--runner", default="onnxruntime", help="engine.backends runner")
    ap.add_argument("--rank-of", type=Path, default=None, help=argparse.SUPPRESS)  # torchrun's target mode: the store
    a = ap.parse_args()
    if a.rank_of is not None:
        return rank_main(a.images, a.rank_of, a.runner)
    work = Path(tempfile.mkdtemp(prefix="aml-bench-dist-"))
    try:
        images = a.images or work / "imgs"
        if a.images is None:
            make_images(images, N_IMAGES)
        print(f"| processes | images/s | speed-up | decode share | forward share |  ({os.cpu_count()} cores, {a.runner}, {SIDE} px)")
        print("|---|---|---|---|---|")
        base = None
        for n in a.nproc:
            threads = max(1, (os.cpu_count() or 1) // n)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
                   "--images", str(images), "--runner", a.runner, "--rank-of", str(work / f"store-{n}")]
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(done.stderr[-3000:])
            r = json.loads(line[7:])
            rate = r["images"] / r["wall_s"]
            base = base or rate
            dec = sum(x["decode_s"] for x in r["ranks"])
            fwd = sum(x["forward_s"] for x in r["ranks"])
            print(f"| {n} | {rate:.1f} | {rate / base:.2f}x | {dec / (dec + fwd):.0%} | {fwd / (dec + fwd):.0%} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
