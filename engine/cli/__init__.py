"""The `engine` command: a thin typer layer over the package's functions.

Every value is checked here, at the edge, before any work (engine/cli/options.py says how, and which flag
means what). Results go to stdout, progress and notes to stderr.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from ..errors import EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED, EngineError
from . import options as opt
from .options import parse_scales

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Asymmetric image retrieval: teacher galleries, student queries, fast top-k search.")
store_app = typer.Typer(no_args_is_help=True, help="Create, convert and inspect gallery stores.")
data_app = typer.Typer(no_args_is_help=True, help="Benchmarks and datasets.")
app.add_typer(store_app, name="store")
app.add_typer(data_app, name="data")

console = Console(stderr=True, soft_wrap=True)  # one note, one line, whatever the terminal width
out = Console()
_state = {"debug": False}

# Defaults shared by several commands: the library's own, written out so the command starts without torch
# (tests/test_cli.py holds every option's default equal to EncodeOptions', TrainConfig's and these constants').
MAX_SIDE = 362  # engine.images.DEFAULT_MAX_SIDE
MIN_SIDE = 32  # engine.images.MIN_SIDE: a smaller image leaves the trunk no feature map to pool
AUTO_WORKERS = -1  # the command's "half the cores" (engine.encode.default_workers)
SHARD_ROWS = 65536  # engine.store.DEFAULT_SHARD_ROWS
SHARD_GROUPS, GROUP_REPLICAS = 2, 2  # engine.cluster.ShardGroups' groups and replicas (Ray is imported only with --ray)
MAX_SIDE_HELP = "Longest image side in pixels (images are resized to it)"
WORKERS_HELP = "Image decoding threads (-1: half the cores, 0: decode between forward passes)"


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an internal error (also AML_DEBUG=1)")):
    """Asymmetric image retrieval: teacher galleries, student queries, fast top-k search."""
    _state["debug"] = debug


def _workers(workers: int) -> int:
    from ..encode import default_workers

    return default_workers() if workers == AUTO_WORKERS else workers


def resolve_encoder(model: Optional[str], student: Optional[str], target: Optional[str], weights: Optional[str]):
    """The encoder named by --model (teacher name or checkpoint) or by --student (an architecture) and --target.

    A checkpoint is `checkpoint:PATH`, `cirtorch:PATH` (`cirtorch-ms:PATH`: with its multi-scale Lw), or a plain
    PATH whose kind is read from its first bytes (engine.models.parse_source), never from its suffix.
    """
    from ..models import STUDENTS, build, load_encoder, registry_teacher_of

    if bool(model) == bool(student):
        raise EngineError("give exactly one of --model (teacher name or checkpoint) and --student")
    if model:
        return load_encoder(model, weights)
    if student in STUDENTS:
        if not target:
            raise EngineError(f"untrained student {student!r} needs --target: the teacher store (or teacher name) it maps into")
        if Path(target).is_dir():
            from ..store import read_manifest

            m = read_manifest(Path(target))
            return build(student, weights, dim=m["dim"], space=m["space"], teacher=m.get("info", {}).get("encoder", {}).get("name", ""),
                         bridge_to=registry_teacher_of(m["space"]))
        teacher = load_encoder(target)
        return build(student, weights, dim=teacher.dim, space=teacher.space, teacher=teacher.name, bridge_to=teacher)
    raise EngineError(f"unknown student architecture {student!r}: expected one of {', '.join(STUDENTS)} "
                      "(a trained student's checkpoint goes to --model)")


def resolve_items(images: Optional[Path], gnd: Optional[Path], train_set: Optional[Path], split: str):
    """(items, names) from --images DIR|LIST, a ground truth's gallery or query list (queries with their bbx),
    or a training set's images (named by image id)."""
    from ..datasets import revisited
    from ..images import list_images

    if gnd is not None and train_set is not None:
        raise EngineError("give --gnd or --train-set, not both")
    if train_set is not None:
        from ..datasets.sfm import load_training_set

        ts = load_training_set(train_set, "train" if split == "gallery" else split, images)
        return [(p, None) for p in ts.images], ts.cids
    if split not in ("gallery", "query"):
        raise EngineError(f"--split must be gallery or query with --gnd, got {split!r}")
    if gnd is not None:
        cfg = revisited.load_gnd(gnd)
        images_dir = images or revisited.images_dir_for(gnd)
        if split == "query":
            return revisited.query_items(cfg, images_dir), list(cfg["qimlist"])
        return revisited.gallery_items(cfg, images_dir), list(cfg["imlist"])
    if images is None:
        raise EngineError("give --images DIR|LIST or --gnd GND.pkl")
    paths = list_images(images)
    root = images if images.is_dir() else images.parent
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
    return [(p, None) for p in paths], names


@app.command()
def models(as_json: bool = typer.Option(False, "--json", help="Print the registry as a JSON list instead of a table")):
    """List the registry's teachers and students: architecture, D, and where their weights come from."""
    from ..models import describe_registry

    if as_json:
        print(json.dumps(describe_registry()))
        return
    from rich.table import Column

    table = Table(Column("name", no_wrap=True), "role", "D", "weights",
                  caption="a student: trunk -> GeM -> L2 -> linear map to its teacher's D -> L2")
    for row in describe_registry():
        table.add_row(row["name"], row["role"], str(row["dim"] or "teacher's"), row["source"])
    out.print(table)


@app.command()
def encode(
    out_path: Path = typer.Option(..., "--out", help="A store directory, or Q.npy for query vectors"),
    model: Optional[str] = typer.Option(None, "--model", help="A registry name, checkpoint:PATH (a teacher or trained student), cirtorch:PATH, or a PATH whose kind is read from its first bytes"),
    student: Optional[str] = typer.Option(None, "--student", **opt.STUDENT,
                                          help="An untrained student architecture (needs --target; `engine models` lists them); a trained one is a --model checkpoint"),
    target: Optional[str] = typer.Option(None, "--target", help="For an untrained student: the teacher store (or name) whose space it maps into"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file for the backbone ('random' for random init)"),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images or a list file; with --gnd, the jpg/ folder"),
    gnd: Optional[Path] = typer.Option(None, "--gnd", help="Revisited-format ground truth: encode its gallery or queries"),
    train_set: Optional[Path] = typer.Option(None, "--train-set", help="SfM-120k-format db.pkl: encode its training images (rows named by image id)"),
    split: str = typer.Option("gallery", "--split", **opt.fixed("gallery", "query", "train", "val"),
                              help="With --gnd: gallery or query (queries are cropped to bbx); with --train-set: train or val"),
    max_side: int = typer.Option(MAX_SIDE, "--max-side", min=MIN_SIDE, help=MAX_SIDE_HELP),
    scales: str = typer.Option("1", "--scales", callback=parse_scales, help="Multi-scale factors, e.g. 1,0.707,0.5"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass"),
    workers: int = typer.Option(AUTO_WORKERS, "--workers", min=-1, help=WORKERS_HELP),
    device: str = typer.Option("cpu", "--device", callback=opt.device_name, help="cpu, cuda or cuda:N"),
    runner: str = typer.Option("auto", "--runner", **opt.RUNNER,
                               help="Inference runner, one of engine.backends.BACKENDS (auto: onnxruntime on CPU, torch on CUDA)"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the encoder (torch runner)"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Where exported ONNX/TensorRT files are cached (default ~/.cache/aml-engine)"),
    decode: str = typer.Option("auto", "--decode", **opt.DECODE,
                               help="Where JPEGs are decoded and resized: host (Pillow threads), device (nvJPEG with --device cuda), auto (device on CUDA)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record undecodable images in the manifest and go on"),
    shard_rows: int = typer.Option(SHARD_ROWS, "--shard-rows", min=1, help="Rows per shard (stores)"),
    dtype: str = typer.Option("float32", "--dtype", **opt.DTYPE, help="Store dtype"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild an existing complete store (or replace Q.npy)"),
    nproc: int = typer.Option(1, "--nproc", min=1, max=os.cpu_count() or 1,
                              help="Processes on this machine sharing the job, at most one per core (torchrun's launcher; one device each with --device cuda)"),
):
    """Encode images into a gallery store (resumable) or a query .npy (with a JSON sidecar).

    Under `torchrun --nproc-per-node N [--nnodes M ...] $(which engine) encode ...` (or `--nproc N` on this
    machine) the processes share a store's shards (one device each with --device cuda) and rank 0 publishes it,
    as one process would have; for Q.npy each encodes a share of the queries and rank 0 writes them all.
    """
    from ..distributed import Group, launch, rank_device

    if nproc > 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise EngineError("already under torchrun: give its --nproc-per-node, not --nproc")
    group = Group() if nproc == 1 else None
    if out_path.suffix == ".npy":
        opt.output_file(out_path)
        if out_path.exists() and not overwrite:
            raise EngineError("exists: pass --overwrite to replace it", out_path)
    else:
        opt.output_folder(out_path)
    opt.require_device(device)
    if group is None:
        # each process runs this same command line; the last --nproc is the one that counts
        code = launch(nproc, sys.executable, ["-c", "from engine.cli import main; main()", *_state["argv"], "--nproc", "1"])
        if code:
            sys.exit(code)
        return
    device = rank_device(device, group)
    from ..encode import EncodeOptions, encode_to_array, encode_to_store, save_vectors

    enc = resolve_encoder(model, student, target, weights)
    items, names = resolve_items(images, gnd, train_set, split)
    opts = EncodeOptions(max_side=max_side, batch_size=batch_size, workers=_workers(workers), scales=scales,
                         skip_bad=skip_bad, device=device, label=f"encoding {split} with {enc.name}", backend=runner,
                         compile=compile_, cache_dir=cache_dir, decode=decode)
    if out_path.suffix == ".npy":
        try:
            shares = encode_to_array(enc, items, opts, group=group)
        finally:
            group.close()
        if shares is None:
            return  # rank 0 writes the file
        vecs, kept, skipped = shares
        meta = {"space": enc.space, "dim": enc.dim, "encoder": enc.config, "encode": opts.describe(),
                "names": [names[i] for i in kept], "skipped": skipped}
        save_vectors(out_path, vecs, meta)
        console.print(f"wrote {len(vecs)} x {enc.dim} vectors to {out_path} (space {enc.space}); skipped {len(skipped)}")
    else:
        try:
            store = encode_to_store(enc, items, names, out_path, opts, shard_rows, dtype, overwrite, group=group)
        finally:
            group.close()
        if group.leader:
            console.print(f"store {out_path}: {store.count} x {store.dim} {dtype} in {len(store.manifest['shards'])} shard(s) "
                          f"(space {store.space}); skipped {len(store.skipped)}")


@app.command()
def search(
    store_path: Optional[Path] = typer.Argument(None, help="Gallery store directory (searched here); or none, with --url"),
    url: Optional[str] = typer.Option(None, "--url", help="Search on an `engine serve` server instead of a local STORE, e.g. http://127.0.0.1:8080"),
    queries: Path = typer.Option(..., "--queries", help="Query vectors: Q.npy (with its .json sidecar) or a store"),
    k: int = typer.Option(100, "-k", min=1, help="Results per query (at most the store's row count)"),
    out_path: Path = typer.Option(..., "--out", help="RESULT.npz with ids (Q x k int64) and scores (Q x k float32)"),
    scan: Optional[str] = typer.Option(None, "--scan", **opt.DTYPE,
                                       help="Copy to scan (default: the fastest exact setting the store allows)"),
    rescore: Optional[int] = typer.Option(None, "--rescore", min=0, help="Rescore k x R candidates of a compressed scan in float32 (0: none)"),
    backend: str = typer.Option("engine", "--backend", **opt.SEARCH_BACKEND,
                                help="Search backend: engine (the C++ kernel), faiss or torch"),
    threads: int = typer.Option(0, "--threads", min=0, help="Search threads (0: all cores)"),
    device: str = typer.Option("cpu", "--device", callback=opt.device_name,
                               help="cpu (the host search, by --backend), or cuda[:N]: the gallery uploaded to that GPU once and searched there by matmul, its candidates rescored in float32 (--scan: the copy held there, float16, bfloat16 or float32)"),
):
    """Top-k by inner product of each query against a store (exact by default).

    Two forms: `engine search STORE --queries Q.npy ...` searches here; `engine search --url URL --queries Q.npy ...`
    asks a running `engine serve` (the same results; --backend, --threads and --device are then the server's).
    """
    opt.output_file(out_path)
    if bool(store_path) == bool(url):
        raise EngineError("give exactly one of STORE (search here) and --url (search on a server)")
    from ..encode import load_vectors
    from ..results import save_results

    if url:
        if (backend, threads, device) != ("engine", 0, "cpu"):
            raise EngineError("--backend, --threads and --device choose how a local search runs: with --url the server decides")
        from ..serve.client import Client

        q, meta = load_vectors(queries)
        with Client(url) as client:
            scores, ids = client.search(q, k, scan=scan, rescore=rescore, space=meta.get("space"), names=False)
        save_results(out_path, ids, scores)
        console.print(f"wrote top-{ids.shape[1]} from {url} for {len(q)} queries to {out_path}")
        return
    opt.require_device(device)
    from ..search import search as run_search
    from ..store import open_store

    store = open_store(store_path)
    q, meta = load_vectors(queries)
    k, rescore, threads = opt.fit_search(store.count, k, rescore, threads, console.print)
    if device == "cpu":
        scores, ids = run_search(store, q, k, space=meta.get("space"), scan=scan, rescore=rescore, backend=backend,
                                 threads=threads, device=device)
    else:
        if (backend, threads) != ("engine", 0):
            raise EngineError(f"--backend and --threads choose how the host searches: --device {device} searches the gallery on the GPU")
        from ..index import Index

        index = Index([store], device=device, device_dtype=scan)
        scores, ids = index.search(q, k, meta.get("space"), rescore=rescore)
    save_results(out_path, ids, scores)
    console.print(f"wrote top-{ids.shape[1]} of {store.count} for {len(q)} queries to {out_path}")


@app.command()
def serve(
    store_paths: list[Path] = typer.Argument(..., help="Gallery store directories, taken as one gallery (same space and D)"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)"),
    port: int = typer.Option(8080, "--port", min=1, max=65535, help="Port to listen on"),
    model: Optional[str] = typer.Option(None, "--model", help="Query encoder for /search/image: a trained student's checkpoint (checkpoint:PATH or PATH) or a teacher"),
    student: Optional[str] = typer.Option(None, "--student", **opt.STUDENT,
                                          help="Query encoder for /search/image: an untrained student architecture, mapped into the first store's space"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file for the query encoder's backbone ('random' for random init)"),
    max_side: int = typer.Option(MAX_SIDE, "--max-side", min=MIN_SIDE, help=MAX_SIDE_HELP),
    runner: str = typer.Option("auto", "--runner", **opt.RUNNER,
                               help="Inference runner, one of engine.backends.BACKENDS (auto: onnxruntime on CPU, torch on CUDA)"),
    device: str = typer.Option("cpu", "--device", callback=opt.device_name,
                               help="Where the query encoder and the gallery live: cpu (the gallery searched by the host kernels), or cuda[:N] (the gallery uploaded to that GPU once and searched there; with --ray the shard groups stay on their hosts)"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="Most queries scanned as one block (concurrent requests batched)"),
    max_wait_ms: float = typer.Option(2.0, "--max-wait-ms", callback=opt.number(0, 1000), help="Longest a request waits for others to share its block (ms)"),
    blocks: int = typer.Option(2, "--blocks", min=1, max=64, help="Query blocks scanned at once (each scan already uses every core)"),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", callback=opt.number(0, 1024, open_min=True), help="Largest request body read (MiB); larger ones are refused with 413"),
    max_k: int = typer.Option(10_000, "--max-k", min=1, help="Largest k a request may ask for (a larger one is refused; k above the gallery size gets the gallery)"),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="Serve from shard groups on a Ray cluster: its address (HOST:6379, auto), or 'local' to start Ray on this machine"),
    groups: int = typer.Option(SHARD_GROUPS, "--groups", min=1, help="With --ray: shard groups the store's shards are split into (shard i -> group i % G)"),
    replicas: int = typer.Option(GROUP_REPLICAS, "--replicas", min=1, help="With --ray: actors holding each shard group, on different nodes where there are several"),
):
    """Serve searches over HTTP: POST /search, POST /search/image, GET /health, GET /stats, POST /reload (engine/serve/app.py)."""
    opt.require_device(device)
    from ..index import Index
    from ..serve.app import QueryEncoder, ServeConfig, serve as run_server

    if ray_address is not None:
        if len(store_paths) != 1:
            raise EngineError("--ray serves one store: give exactly one STORE")
        from ..cluster import ShardGroups

        index = ShardGroups(store_paths[0], address=ray_address, groups=groups, replicas=replicas)
    else:
        index = Index(store_paths, device=None if device == "cpu" else device)
    encoder = None
    if model or student:
        enc = resolve_encoder(model, student, str(store_paths[0]), weights)
        encoder = QueryEncoder(enc, max_side, runner, device)
    config = ServeConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, blocks=blocks, max_body_mb=max_body_mb, max_k=max_k)
    console.print(f"serving {index.count} x {index.dim} (space {index.space}) on http://{host}:{port}"
                  f"{f'; images encoded by {encoder.encoder.name}' if encoder else ''}")
    try:
        run_server(index, host, port, config, encoder)
    finally:
        if ray_address is not None:
            index.close()  # the actors and, when it started one, the local Ray


def load_ranks(path: Path, n_gallery: int) -> np.ndarray:
    """(n_ranked, n_queries) ranks of gallery ids 0..n_gallery-1, from a revisitop .npy or a search result .npz
    (its ids, transposed); checked whole by `evaluate.check_ranks` (EngineError naming `path`)."""
    from ..evaluate import check_ranks
    from ..results import load_results

    if path.suffix == ".npz":
        return check_ranks(load_results(path)[0].T, n_gallery, path)
    if not path.is_file():
        raise EngineError("no such ranks file" if not path.exists() else "is a folder, not a ranks .npy", path)
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise EngineError(f"not a readable .npy/.npz ({type(e).__name__})", path) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        data.close()
        return check_ranks(load_results(path)[0].T, n_gallery, path)
    return check_ranks(data, n_gallery, path)


def metrics_table(results: dict[str, dict], title: str = "") -> Table:
    """One row per setting and protocol: mAP and mP@1,5,10 in percent."""
    table = Table(title=title or None)
    for col in ("setting", "protocol", "mAP", "mP@1", "mP@5", "mP@10"):
        table.add_column(col, justify="left" if col in ("setting", "protocol") else "right")
    for name, res in results.items():
        for i, proto in enumerate(("easy", "medium", "hard")):
            r = res[proto]
            table.add_row(name if i == 0 else "", proto, f"{r['mAP']:.2f}", f"{r['mP@1']:.2f}", f"{r['mP@5']:.2f}",
                          f"{r['mP@10']:.2f}", end_section=i == 2)
    return table


@app.command("eval")
def eval_cmd(
    gnd: Path = typer.Option(..., "--gnd", help="Revisited-format ground truth .pkl"),
    ranks: Path = typer.Option(..., "--ranks", help="(n_gallery, n_queries) ranks .npy, or a search result .npz"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object, unrounded"),
):
    """mAP and mP@1,5,10 under the Easy, Medium and Hard protocols."""
    from ..datasets.revisited import load_gnd
    from ..evaluate import evaluate_revisited

    cfg = load_gnd(gnd)
    r = load_ranks(ranks, len(cfg["imlist"]))
    if r.shape[1] != len(cfg["gnd"]):
        raise EngineError(f"ranks cover {r.shape[1]} queries, the ground truth has {len(cfg['gnd'])}", ranks)
    res = evaluate_revisited(r, cfg["gnd"])
    if as_json:
        print(json.dumps(res))
    else:
        out.print(metrics_table({ranks.name: res}))


@store_app.command("import")
def store_import(
    vectors: Path = typer.Argument(..., help="N x D .npy array (its .json sidecar, if any, gives the space and names)"),
    out_path: Path = typer.Option(..., "--out", help="The store directory to create"),
    dtype: str = typer.Option("float32", "--dtype", **opt.DTYPE, help="Store dtype"),
    space: Optional[str] = typer.Option(None, "--space", help="Embedding-space id (default: from the sidecar, else 'imported:<sha>')"),
    shard_rows: int = typer.Option(SHARD_ROWS, "--shard-rows", min=1, help="Rows per shard"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing store"),
):
    """Make a store from vectors computed elsewhere."""
    opt.output_folder(out_path)
    from ..encode import load_vectors
    from ..files import sha256_file
    from ..store import write_store

    v, meta = load_vectors(vectors)
    space = space or meta.get("space") or f"imported:{sha256_file(vectors)[:16]}"
    store = write_store(out_path, v, space, meta.get("names"), dtype, shard_rows, {"imported_from": str(vectors)}, overwrite)
    console.print(f"store {out_path}: {store.count} x {store.dim} {dtype} (space {space})")


@store_app.command("convert")
def store_convert(
    store_path: Path = typer.Argument(..., help="Store directory (its float32 copy stays)"),
    dtype: str = typer.Option(..., "--dtype", **opt.COPY_DTYPE, help="The compressed copy to add beside the float32 one"),
):
    """Add a compressed copy of every shard; searches then scan it and rescore in float32 (still exact)."""
    from ..store import add_copy, open_store

    store = add_copy(open_store(store_path), dtype)
    console.print(f"store {store_path}: copies {', '.join(store.dtypes)}")


@store_app.command("add")
def store_add(
    store_path: Path = typer.Argument(..., help="Store directory made by engine encode"),
    images: Path = typer.Option(..., "--images", help="Folder of images or a list file: the images to add (named as encode names them)"),
    model: Optional[str] = typer.Option(None, "--model", help="The store's encoder when it is not a registry teacher: checkpoint:PATH, cirtorch:PATH or PATH (it must give the store's space)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Images per forward pass"),
    workers: int = typer.Option(AUTO_WORKERS, "--workers", min=-1, help=WORKERS_HELP),
    device: str = typer.Option("cpu", "--device", callback=opt.device_name, help="cpu, cuda or cuda:N"),
    runner: str = typer.Option("auto", "--runner", **opt.RUNNER,
                               help="Inference runner, one of engine.backends.BACKENDS (auto: onnxruntime on CPU, torch on CUDA)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record undecodable images in the manifest and go on"),
):
    """Encode new images with the store's own encoder and options and append them (a new generation)."""
    opt.require_device(device)
    from ..encode import EncodeOptions, add_images
    from ..models import load_encoder

    items, names = resolve_items(images, None, None, "gallery")
    opts = EncodeOptions(batch_size=batch_size, workers=_workers(workers), skip_bad=skip_bad, device=device, backend=runner,
                         label="adding")
    store = add_images(store_path, items, names, opts, load_encoder(model) if model else None)
    console.print(f"store {store_path}: {store.count} rows, generation {store.generation}; skipped {len(store.skipped)}")


@store_app.command("remove")
def store_remove(
    store_path: Path = typer.Argument(..., help="Store directory"),
    names_file: Path = typer.Option(..., "--names", help="Text file of the names of the rows to remove, one per line"),
    missing_ok: bool = typer.Option(False, "--missing-ok", help="Skip names the store does not hold instead of refusing"),
):
    """Mark rows deleted (searches no longer return them; the other rows keep their ids): a new generation."""
    from ..gallery import remove_names

    try:
        names = [line for line in names_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise EngineError(f"cannot read the names file ({getattr(e, 'strerror', None) or e})", names_file) from None
    store, removed = remove_names(store_path, names, missing_ok)
    console.print(f"store {store_path}: removed {removed} row(s), {len(store.deleted_rows())} removed in all; generation {store.generation}")


@store_app.command("compact")
def store_compact(store_path: Path = typer.Argument(..., help="Store directory")):
    """Rewrite the store without its removed rows (a new generation) and write how old ids map to new ones."""
    from ..gallery import compact

    store, id_map = compact(store_path)
    where = f"; old id -> new id (-1: removed) in {id_map}" if id_map else ": nothing was removed, nothing to do"
    console.print(f"store {store_path}: {store.count} rows, generation {store.generation}{where}")


@store_app.command("info")
def store_info(store_path: Path = typer.Argument(..., help="Store directory"),
               verify: bool = typer.Option(False, "--verify", help="Check every sha256")):
    """Describe a store as JSON on stdout (and verify its checksums with --verify)."""
    from ..store import open_store

    store = open_store(store_path, checksums=verify, allow_incomplete=True)
    m = store.manifest
    print(json.dumps({"path": str(store.path), "space": store.space, "dim": store.dim, "count": store.count,
                      "complete": store.complete, "copies": store.dtypes, "shards": len(m["shards"]),
                      "skipped": len(store.skipped), "generation": store.generation, "deleted": len(store.deleted_rows()),
                      "verified": verify}, indent=1))


@data_app.command("views")
def data_views(
    out_dir: Path = typer.Option(..., "--out", help="The benchmark folder to build (views/ layout: jpg/, test/, val/, train/, pairs/)"),
    photos: Optional[Path] = typer.Option(None, "--photos", help="A folder of photographs (default: those shipped in packages)"),
    difficulty: str = typer.Option("medium", "--difficulty", **opt.DIFFICULTY, help="How far views move from their photograph"),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed (the same seed builds the same benchmark)"),
    train_views: int = typer.Option(24, "--train-views", min=1, help="Views per training scene (the test split does not change)"),
    train_fraction: float = typer.Option(0.4, "--train-fraction", callback=opt.number(0, 1, open_min=True, open_max=True),
                                         help="Share of the photographs that become training scenes, in (0, 1)"),
):
    """Build the offline instance-retrieval benchmark from real photographs."""
    opt.output_folder(out_dir)
    from ..datasets.photos import photos_in
    from ..datasets.views import build_views

    info = build_views(out_dir, photos=photos_in(photos) if photos else None, difficulty=difficulty, seed=seed,
                       n_train=train_views, train_fraction=train_fraction)
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict))}))


@app.command()
def train(
    ctx: typer.Context,
    out_dir: Path = typer.Option(..., "--out", help="Run folder: checkpoints (last, best), config.json, log.jsonl"),
    teacher_store: Optional[Path] = typer.Option(None, "--teacher-store", help="Teacher vectors of the training images (engine encode --train-set)"),
    train_set: Optional[Path] = typer.Option(None, "--train-set", help="SfM-120k-format db.pkl"),
    adapt_gallery: Optional[Path] = typer.Option(None, "--adapt-gallery",
                                                 help="Instead of a training set: fit the student to this gallery store's own images (under --images) "
                                                      "and teacher vectors, label-free; transductive, so report its results apart"),
    images: Optional[Path] = typer.Option(None, "--images", help="The training images' ims/ or jpg/ folder (default: found beside db.pkl); "
                                                                 "with --adapt-gallery, the folder the gallery was encoded from"),
    recipe: Optional[str] = typer.Option(None, "--recipe", **opt.fixed("demo", "aml"),
                                         help="A preset of the options below (training.recipes; README's table): demo (fast, trunk frozen) "
                                              "or aml (the paper's main experiment); options given explicitly override it"),
    student: str = typer.Option("mobilenetv2", "--student", **opt.STUDENT_OR_TEACHER,
                                help="Student architecture, or a teacher name to fine-tune it (--mode sym); `engine models` lists them"),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint instead of an untrained student"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights file ('random' for random init)"),
    loss: str = typer.Option("regression", "--loss", **opt.LOSS, help="Training loss, one of training.losses.LOSSES (a wrong name lists them)"),
    mode: str = typer.Option("asym", "--mode", **opt.fixed("asym", "sym"), help="asym (refs from the teacher) or sym (all from the student)"),
    margin: Optional[float] = typer.Option(None, "--margin", callback=opt.number(0), help="Tuple-loss margin, >= 0 (default: the loss's own)"),
    reduction: Optional[str] = typer.Option(None, "--reduction", **opt.fixed("sum", "mean"),
                                            help="The loss over a batch: sum or mean (default: the loss's own; regression averages)"),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs"),
    lr: float = typer.Option(1e-4, "--lr", callback=opt.number(0, open_min=True), help="Learning rate, > 0"),
    lr_decay: float = typer.Option(0.01, "--lr-decay", callback=opt.number(0), help="lr *= exp(-decay) per epoch; >= 0"),
    weight_decay: float = typer.Option(1e-6, "--weight-decay", callback=opt.number(0), help="Adam weight decay, >= 0"),
    batch_size: int = typer.Option(5, "--batch-size", min=1, help="Tuples per batch (x4 images for knowledge-transfer losses)"),
    images_per_batch: Optional[int] = typer.Option(None, "--images-per-batch", min=1,
                                                   help="Images per batch of a knowledge-transfer loss (default: 4 x --batch-size)"),
    images_per_epoch: int = typer.Option(20000, "--images-per-epoch", min=1, help="Training images drawn per epoch"),
    query_size: int = typer.Option(2000, "--query-size", min=1, help="Queries mined for hard negatives per epoch"),
    pool_size: int = typer.Option(20000, "--pool-size", min=1, help="Negative pool per epoch"),
    neg_num: int = typer.Option(5, "--neg-num", min=1, help="Negatives per tuple"),
    negatives: str = typer.Option("hard", "--negatives", **opt.fixed("hard", "random"), help="hard (mined) or random"),
    max_side: int = typer.Option(MAX_SIDE, "--max-side", min=MIN_SIDE, help=MAX_SIDE_HELP),
    workers: int = typer.Option(AUTO_WORKERS, "--workers", min=-1, help=WORKERS_HELP),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed"),
    freeze: str = typer.Option("bn", "--freeze", **opt.fixed("bn", "stats", "trunk"),
                               help="bn (BatchNorm statistics and weights frozen), stats (statistics frozen, weights learned: "
                                    "cirtorch's) or trunk (only the head learns)"),
    center: bool = typer.Option(True, "--center/--no-center", help="Targets: teacher vectors minus their training mean"),
    val_every: int = typer.Option(1, "--val-every", min=1, help="Validate every N epochs (and after the last)"),
    select: str = typer.Option("auto", "--select", **opt.fixed("auto", "asym", "sym"),
                               help="The validation mAP that chooses the best model: asym, sym or auto (the --mode's)"),
    val_scales: str = typer.Option("1", "--val-scales", callback=parse_scales,
                                   help="Validation's multi-scale factors for the student, e.g. 1,0.7071,0.5"),
    patience: Optional[int] = typer.Option(None, "--patience", min=1,
                                           help="Stop after this many validations without a better score (default: never)"),
    val_gnd: Optional[Path] = typer.Option(None, "--val-gnd", help="Validation ground truth (revisited format; needs --val-store): "
                                                                  "held-out scenes, never views of the training scenes"),
    val_store: Optional[Path] = typer.Option(None, "--val-store", help="Teacher store of the validation gallery (needs --val-gnd)"),
):
    """Train a student into the teacher's space (asym) or its own (sym); resumes an interrupted run in --out.

    With --recipe, the recipe's values replace the defaults of the options not given on the command line.
    With --adapt-gallery STORE, the data are the gallery's own images and teacher vectors (no labels, no
    validation): transductive, so its results are never paper-protocol numbers.
    """
    if (val_gnd is None) != (val_store is None):
        raise typer.BadParameter("--val-gnd and --val-store go together: give both or neither")
    if adapt_gallery is not None and (train_set or teacher_store or val_gnd):
        raise typer.BadParameter("--adapt-gallery is the data: it takes no --train-set, --teacher-store or --val-gnd")
    if adapt_gallery is None and (train_set is None or teacher_store is None):
        raise typer.BadParameter("give --train-set and --teacher-store (or --adapt-gallery STORE)")
    opt.output_folder(out_dir)
    from training.trainer import TrainConfig

    # typer carries its own copy of click's ParameterSource: compare by name
    given = {name: value for name, value in ctx.params.items()
             if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    fields = {"student", "weights", "loss", "mode", "margin", "reduction", "epochs", "lr", "lr_decay", "weight_decay",
              "batch_size", "images_per_batch", "images_per_epoch", "query_size", "pool_size", "neg_num", "negatives",
              "max_side", "seed", "freeze", "val_every", "select", "val_scales", "patience", "center"}
    cfg = TrainConfig.from_recipe(recipe, workers=_workers(workers), **{k: v for k, v in given.items() if k in fields})
    if adapt_gallery is not None:
        from training.adapt import adapt_to_gallery

        metrics = adapt_to_gallery(cfg, adapt_gallery, out_dir, images_root=images, init=init)
    else:
        from training.run import run_training

        metrics = run_training(cfg, out_dir, teacher_store, train_set, images, val_gnd, val_store, init)
    print(json.dumps(metrics))


@app.command()
def export(
    model: str = typer.Option(..., "--model", help="A registry name, checkpoint:PATH, cirtorch:PATH, or a PATH whose kind is read from its first bytes"),
    out_path: Path = typer.Option(..., "--out", help="OUT.onnx, or OUT.engine / OUT.plan for TensorRT"),
    fmt: Optional[str] = typer.Option(None, "--format", **opt.fixed("onnx", "tensorrt"), help="Default: from --out's suffix"),
    opset: int = typer.Option(17, "--opset", min=9, help="ONNX opset"),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="TensorRT precision (the head stays fp32)"),
    min_batch: int = typer.Option(1, "--profile-min-batch", min=1, help="TensorRT profile: smallest batch"),
    min_side: int = typer.Option(32, "--profile-min-side", min=MIN_SIDE, help="TensorRT profile: smallest image side"),
    opt_batch: int = typer.Option(8, "--profile-opt-batch", min=1, help="TensorRT profile: the batch it is tuned for"),
    opt_side: int = typer.Option(362, "--profile-opt-side", min=MIN_SIDE, help="TensorRT profile: the image side it is tuned for"),
    max_batch: int = typer.Option(32, "--profile-max-batch", min=1, help="TensorRT profile: largest batch"),
    max_side: int = typer.Option(1024, "--profile-max-side", min=MIN_SIDE, help="TensorRT profile: largest image side"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file for the backbone ('random' for random init)"),
):
    """Export an encoder (head included) to ONNX (dynamic batch and size) or a TensorRT engine (optional extra)."""
    if not (min_batch <= opt_batch <= max_batch and min_side <= opt_side <= max_side):
        raise typer.BadParameter("the TensorRT profile needs min <= opt <= max for both --profile-*-batch and --profile-*-side")
    opt.output_file(out_path)
    from ..export import export_command

    console.print(export_command(model, out_path, fmt, opset, fp16, (min_batch, min_side), (opt_batch, opt_side),
                                 (max_batch, max_side), weights))


@app.command()
def whiten(
    model: str = typer.Option(..., "--model", help="The encoder to whiten: a registry name, checkpoint:PATH, cirtorch:PATH or PATH (as for encode)"),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="Learn Lw from these pairs: a whitening pickle {cids, qidxs, pidxs} or an SfM-format db.pkl"),
    lw_from: Optional[str] = typer.Option(None, "--lw-from", help="Instead, install this teacher's Lw (a source, as --model) in a student trained on raw:TEACHER vectors: the paper's test-time whitening"),
    out_path: Path = typer.Option(..., "--out", help="Checkpoint (.safetensors) of the encoder with its learned whitening"),
    dim: Optional[int] = typer.Option(None, "--dim", min=1, help="Keep the first DIM whitened components"),
    images: Optional[Path] = typer.Option(None, "--images", help="The pairs' ims/ or jpg/ folder"),
    max_side: int = typer.Option(MAX_SIDE, "--max-side", min=MIN_SIDE, help=MAX_SIDE_HELP),
    workers: int = typer.Option(AUTO_WORKERS, "--workers", min=-1, help=WORKERS_HELP),
):
    """Give a teacher or student a learned whitening (Lw): learned from matching pairs, or a teacher's (--lw-from);
    save the encoder with it as the head's last layer."""
    if (pairs is None) == (lw_from is None):
        raise typer.BadParameter("give exactly one of --pairs (learn Lw) and --lw-from (adopt a teacher's)")
    opt.output_file(out_path)
    from training.learn_whitening import adopt_whitening, whiten_encoder

    from ..encode import EncodeOptions
    from ..models import load_encoder

    enc = load_encoder(model)
    if lw_from is not None:
        adopt_whitening(enc, load_encoder(lw_from), out_path)
        path = out_path
    else:
        opts = EncodeOptions(max_side=max_side, workers=_workers(workers), label="whitening pairs")
        path = whiten_encoder(enc, pairs, out_path, opts, dim, images)
    console.print(f"wrote {path}: {enc.name} + Lw (D = {enc.dim}, space {enc.space})")


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., **opt.DATASET, help="A dataset or teacher checkpoint"),
    root: Path = typer.Option(Path("data"), "--root", help="Where datasets are kept"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="A mirror that keeps the original paths"),
    sha256: Optional[list[str]] = typer.Option(None, "--sha256", help="FILE=SHA256 you vouch for: the download must match it (repeatable)"),
):
    """Download (resumable, checksummed) and unpack a dataset or teacher checkpoint into a standard layout."""
    opt.output_folder(root, "--root")
    from ..datasets.download import download, parse_pins

    console.print(f"{name}: ready in {download(name, root, base_url, pins=parse_pins(sha256 or []))}")


@data_app.command("convert-train")
def data_convert_train(
    images_file: Path = typer.Argument(..., help="CSV/JSONL of (image, instance[, split]); see engine/datasets/FORMATS.md"),
    out_path: Path = typer.Option(..., "--out", help="SfM-120k-format db.pkl"),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="CSV/JSONL of explicit (query, positive) pairs"),
    images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder the image paths are relative to"),
    seed: int = typer.Option(0, "--seed", min=0, help="Random seed of the query/positive pairs drawn"),
):
    """Convert your own training data (image, instance id) into the SfM-120k format training reads."""
    opt.output_file(out_path)
    from ..datasets.convert import convert_training

    print(json.dumps(convert_training(images_file, out_path, pairs, images_root, seed), default=str))


@data_app.command("convert-test")
def data_convert_test(
    gallery: Path = typer.Argument(..., help="CSV/JSONL of gallery images"),
    queries: Path = typer.Argument(..., help="CSV/JSONL of queries (image, optional bbx)"),
    labels: Path = typer.Argument(..., help="CSV/JSONL of (query, gallery image, positive|hard|junk)"),
    out_path: Path = typer.Option(..., "--out", help="Revisited-format gnd.pkl"),
    images_root: Optional[Path] = typer.Option(None, "--images-root", help="Folder the image paths are relative to"),
):
    """Convert your own test data into the revisited Oxford/Paris ground-truth format."""
    opt.output_file(out_path)
    from ..datasets.convert import convert_test

    print(json.dumps(convert_test(gallery, queries, labels, out_path, images_root), default=str))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("engine-demo"), "--out", help="Where the benchmark, stores and results go"),
    photos: Optional[Path] = typer.Option(None, "--photos", help="Build the benchmark from this folder of photographs"),
    student: str = typer.Option("effnet-lite0", "--student", **opt.STUDENT, help="Student architecture (`engine models` lists them)"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by setting"),
    train: Optional[str] = typer.Option(None, "--train", **opt.LOSS, help="Also train the student with this loss (one of training.losses.LOSSES) and score it"),
    epochs: int = typer.Option(10, "--epochs", min=1, help="Training epochs with --train"),
    single_scale: bool = typer.Option(False, "--single-scale", help="Encode the test images at one scale (default: METHOD.md's multi-scale protocol, scales 1, 1/sqrt(2), 1/2)"),
    adapt: bool = typer.Option(False, "--adapt", help="Also fit the student to the test gallery's own images, label-free "
                                                     "(transductive: rows student_adapted_*, apart from the protocol's)"),
):
    """The whole pipeline on real photographs: benchmark, teacher gallery, student queries, search, evaluation."""
    opt.output_folder(out_dir)
    from .demo import SCALES, run_demo

    results = run_demo(out_dir, photos=photos, student=student, log=console, train_loss=train, epochs=epochs,
                       scales=(1.0,) if single_scale else SCALES, adapt=adapt)
    if as_json:
        print(json.dumps(results["metrics"]))
    else:
        out.print(metrics_table(results["metrics"], title=f"asymmetric retrieval on {results['benchmark']}"))
        for line in results["notes"]:
            out.print(line)


from .report import report as _report  # noqa: E402  (the command carries its own typer options)

app.command("report", help="A static HTML retrieval report: metrics, plots, per-query rankings, two result sets side by side.")(_report)

# An OSError with a file name and one of these causes is the user's to fix (a path, a permission, a full disk).
USER_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG,
                         errno.ELOOP, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def main() -> None:
    """The `engine` command. Exit codes: 0 done, 1 bad input (one line on stderr), 2 usage (typer's),
    70 the engine's own bug (a traceback only with --debug or AML_DEBUG=1), 130 interrupted."""
    _state["debug"] = False
    _state["argv"] = sys.argv[1:]  # what `encode --nproc N` has each process run
    try:
        code = app(standalone_mode=False)
    except EngineError as e:
        _fail(EXIT_INPUT, f"error: {e}")
    except typer.TyperException as e:  # click's usage errors (exit 2), raised here as the app runs unattended
        e.show()
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        _fail(EXIT_INTERRUPTED, "interrupted: rerun the same command to resume")
    except OSError as e:
        if e.filename is None or e.errno not in USER_ERRNOS:
            _internal(e)
        _fail(EXIT_INPUT, f"error: {e.filename}: {(e.strerror or str(e)).lower()}")
    except Exception as e:  # not the user's input: a bug of the engine's
        _internal(e)
    if code == EXIT_INTERRUPTED:  # typer turns ^C into this exit code
        _fail(EXIT_INTERRUPTED, "interrupted: rerun the same command to resume")
    sys.exit(code if isinstance(code, int) else 0)


def _fail(code: int, line: str) -> None:
    print(line.splitlines()[0] if line else line, file=sys.stderr)
    sys.exit(code)


def _internal(e: BaseException) -> None:
    if _state["debug"] or os.environ.get("AML_DEBUG") == "1":
        traceback.print_exception(e)
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f"at {Path(where.filename).name}:{where.lineno}; " if where else ""
    _fail(EXIT_BUG, f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                    f"({at}rerun with --debug for the traceback, and report it)")
