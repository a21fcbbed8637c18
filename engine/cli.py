"""The `engine` command: a thin typer layer over the package's functions."""
from __future__ import annotations

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

from .errors import EXIT_BUG, EXIT_INPUT, EXIT_INTERRUPTED, EngineError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Asymmetric image retrieval: teacher galleries, student queries, fast top-k search.")
store_app = typer.Typer(no_args_is_help=True, help="Create, convert and inspect gallery stores.")
data_app = typer.Typer(no_args_is_help=True, help="Benchmarks and datasets.")
app.add_typer(store_app, name="store")
app.add_typer(data_app, name="data")

console = Console(stderr=True)
out = Console()


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise EngineError(f"--scales must be comma-separated numbers, got {text!r}") from None
    if not scales or any(s <= 0 for s in scales):
        raise EngineError(f"--scales must be positive, got {text!r}")
    return scales


def resolve_encoder(model: Optional[str], student: Optional[str], target: Optional[str], weights: Optional[str]):
    """The encoder named by --model (teacher name / checkpoint) or --student (checkpoint, or arch + --target)."""
    from .models import STUDENTS, build_student, load_encoder, registry_teacher_of

    if bool(model) == bool(student):
        raise EngineError("give exactly one of --model (teacher name or checkpoint) and --student")
    if model:
        return load_encoder(model, weights)
    if student in STUDENTS:
        if not target:
            raise EngineError(f"untrained student {student!r} needs --target: the teacher store (or teacher name) it maps into")
        if Path(target).is_dir():
            from .store import read_manifest

            m = read_manifest(Path(target))
            return build_student(student, m["dim"], m["space"], weights, teacher=m.get("info", {}).get("encoder", {}).get("name", ""),
                                 bridge_to=registry_teacher_of(m["space"]))
        teacher = load_encoder(target)
        return build_student(student, teacher.dim, teacher.space, weights, teacher=teacher.name, bridge_to=teacher)
    enc = load_encoder(student)
    if enc.config.get("role") != "student":
        console.print(f"[yellow]note[/]: {student} is a {enc.config.get('role')}, encoding with it as given")
    return enc


def resolve_items(images: Optional[Path], gnd: Optional[Path], train_set: Optional[Path], split: str):
    """(items, names) from --images DIR|LIST, a ground truth's gallery or query list (queries with their bbx),
    or a training set's images (named by image id)."""
    from .datasets import revisited
    from .images import list_images

    if gnd is not None and train_set is not None:
        raise EngineError("give --gnd or --train-set, not both")
    if train_set is not None:
        from .datasets.sfm import load_training_set

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
def models():
    """List the known teachers and students and where their weights come from."""
    from .models import describe_registry

    table = Table("name", "role", "weights / notes")
    for row in describe_registry():
        table.add_row(row["name"], row["role"], row["notes"])
    out.print(table)


@app.command()
def encode(
    out_path: Path = typer.Option(..., "--out", help="A store directory, or Q.npy for query vectors"),
    model: Optional[str] = typer.Option(None, "--model", help="Teacher name, .safetensors checkpoint or cirtorch .pth"),
    student: Optional[str] = typer.Option(None, "--student", help="Student checkpoint, or an untrained student architecture"),
    target: Optional[str] = typer.Option(None, "--target", help="For an untrained student: the teacher store (or name) whose space it maps into"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Weights file for the backbone ('random' for random init)"),
    images: Optional[Path] = typer.Option(None, "--images", help="Folder of images or a list file; with --gnd, the jpg/ folder"),
    gnd: Optional[Path] = typer.Option(None, "--gnd", help="Revisited-format ground truth: encode its gallery or queries"),
    train_set: Optional[Path] = typer.Option(None, "--train-set", help="SfM-120k-format db.pkl: encode its training images (rows named by image id)"),
    split: str = typer.Option("gallery", "--split", help="With --gnd: gallery or query (queries are cropped to bbx); with --train-set: train or val"),
    max_side: int = typer.Option(362, "--max-side", help="Longest image side in pixels"),
    scales: str = typer.Option("1", "--scales", help="Multi-scale factors, e.g. 1,0.707,0.5"),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: int = typer.Option(-1, "--workers", help="Decoding workers (-1: half the cores)"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    backend: str = typer.Option("auto", "--backend", help="auto, torch, onnxruntime or tensorrt (auto: onnxruntime on CPU, torch on CUDA)"),
    compile_: bool = typer.Option(False, "--compile", help="torch.compile the encoder (torch backend)"),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="Where exported ONNX/TensorRT files are cached (default ~/.cache/aml-engine)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Record undecodable images in the manifest and go on"),
    shard_rows: int = typer.Option(65536, "--shard-rows", help="Rows per shard (stores)"),
    dtype: str = typer.Option("float32", "--dtype", help="Store dtype: float32, float16, bfloat16 or int8"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Rebuild an existing complete store"),
):
    """Encode images into a gallery store (resumable) or a query .npy (with a JSON sidecar)."""
    from .encode import EncodeOptions, default_workers, encode_to_array, encode_to_store, save_vectors

    enc = resolve_encoder(model, student, target, weights)
    items, names = resolve_items(images, gnd, train_set, split)
    opts = EncodeOptions(max_side=max_side, batch_size=batch_size, workers=default_workers() if workers < 0 else workers,
                         scales=parse_scales(scales), skip_bad=skip_bad, device=device, label=f"encoding {split} with {enc.name}",
                         backend=backend, compile=compile_, cache_dir=cache_dir)
    if out_path.suffix == ".npy":
        if out_path.exists() and not overwrite:
            raise EngineError("exists: pass --overwrite to replace it", out_path)
        vecs, kept, skipped = encode_to_array(enc, items, opts)
        meta = {"space": enc.space, "dim": enc.dim, "encoder": enc.config, "encode": opts.describe(),
                "names": [names[i] for i in kept], "skipped": skipped}
        save_vectors(out_path, vecs, meta)
        console.print(f"wrote {len(vecs)} x {enc.dim} vectors to {out_path} (space {enc.space}); skipped {len(skipped)}")
    else:
        store = encode_to_store(enc, items, names, out_path, opts, shard_rows, dtype, overwrite)
        console.print(f"store {out_path}: {store.count} x {store.dim} {dtype} in {len(store.manifest['shards'])} shard(s) "
                      f"(space {store.space}); skipped {len(store.skipped)}")


@app.command()
def search(
    store_path: Path = typer.Argument(..., help="Gallery store directory"),
    queries: Path = typer.Option(..., "--queries", help="Query vectors: Q.npy (with its .json sidecar) or a store"),
    k: int = typer.Option(100, "-k", help="Results per query"),
    out_path: Path = typer.Option(..., "--out", help="RESULT.npz with ids (Q x k int64) and scores (Q x k float32)"),
    scan: Optional[str] = typer.Option(None, "--scan", help="Copy to scan: float32, float16, bfloat16 or int8 (default: the fastest exact setting)"),
    rescore: Optional[int] = typer.Option(None, "--rescore", help="Rescore k x R candidates of a compressed scan in float32 (0: none)"),
    backend: str = typer.Option("engine", "--backend", help="engine (C++ kernel), faiss or torch"),
    threads: int = typer.Option(0, "--threads", help="Search threads (0: all cores)"),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda[:N] with --backend torch (the GPU search path)"),
):
    """Top-k by inner product of each query against a store (exact by default)."""
    from .encode import load_vectors
    from .search import save_results
    from .search import search as run_search
    from .store import open_store

    store = open_store(store_path)
    q, meta = load_vectors(queries)
    scores, ids = run_search(store, q, k, space=meta.get("space"), scan=scan, rescore=rescore, backend=backend, threads=threads,
                              device=device)
    save_results(out_path, ids, scores)
    console.print(f"wrote top-{ids.shape[1]} of {store.count} for {len(q)} queries to {out_path}")


def load_ranks(path: Path) -> np.ndarray:
    """(n_gallery, n_queries) ranks from a .npy, or from a search result .npz (its ids, transposed)."""
    from .evaluate import ranks_from_ids

    if not path.exists():
        raise EngineError("no such ranks file", path)
    try:
        data = np.load(path, allow_pickle=False)
    except Exception as e:
        raise EngineError(f"not a readable .npy/.npz ({type(e).__name__})", path) from None
    if isinstance(data, np.lib.npyio.NpzFile):
        if "ids" not in data:
            raise EngineError("result .npz has no 'ids' array", path)
        return ranks_from_ids(data["ids"])
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise EngineError(f"ranks must be a 2-d integer array (n_gallery, n_queries), got {data.dtype} {data.shape}", path)
    return data


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
    from .datasets.revisited import load_gnd
    from .evaluate import evaluate_revisited

    cfg = load_gnd(gnd)
    r = load_ranks(ranks)
    if r.shape[1] != len(cfg["gnd"]):
        raise EngineError(f"ranks cover {r.shape[1]} queries, the ground truth has {len(cfg['gnd'])}", ranks)
    if r.size and (r.min() < 0 or r.max() >= len(cfg["imlist"])):
        raise EngineError(f"ranks hold gallery indices outside 0..{len(cfg['imlist']) - 1}", ranks)
    res = evaluate_revisited(r, cfg["gnd"])
    if as_json:
        print(json.dumps(res))
    else:
        out.print(metrics_table({ranks.name: res}))


@store_app.command("import")
def store_import(
    vectors: Path = typer.Argument(..., help="N x D .npy array"),
    out_path: Path = typer.Option(..., "--out"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16, bfloat16 or int8"),
    space: Optional[str] = typer.Option(None, "--space", help="Embedding-space id (default: from the sidecar, else 'imported:<sha>')"),
    shard_rows: int = typer.Option(65536, "--shard-rows"),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Make a store from vectors computed elsewhere."""
    from .encode import load_vectors
    from .files import sha256_file
    from .store import write_store

    v, meta = load_vectors(vectors)
    space = space or meta.get("space") or f"imported:{sha256_file(vectors)[:16]}"
    store = write_store(out_path, v, space, meta.get("names"), dtype, shard_rows, {"imported_from": str(vectors)}, overwrite)
    console.print(f"store {out_path}: {store.count} x {store.dim} {dtype} (space {space})")


@store_app.command("convert")
def store_convert(
    store_path: Path = typer.Argument(...),
    dtype: str = typer.Option(..., "--dtype", help="float16, bfloat16 or int8: a compressed copy kept beside the float32 one"),
):
    """Add a compressed copy of every shard; searches then scan it and rescore in float32 (still exact)."""
    from .store import add_copy, open_store

    store = add_copy(open_store(store_path), dtype)
    console.print(f"store {store_path}: copies {', '.join(store.dtypes)}")


@store_app.command("info")
def store_info(store_path: Path = typer.Argument(...), verify: bool = typer.Option(False, "--verify", help="Check every sha256")):
    """Describe a store (and verify its checksums with --verify)."""
    from .store import open_store

    store = open_store(store_path, checksums=verify, allow_incomplete=True)
    m = store.manifest
    print(json.dumps({"path": str(store.path), "space": store.space, "dim": store.dim, "count": store.count,
                      "complete": store.complete, "copies": store.dtypes, "shards": len(m["shards"]),
                      "skipped": len(store.skipped), "verified": verify}, indent=1))


@data_app.command("views")
def data_views(
    out_dir: Path = typer.Option(..., "--out"),
    photos: Optional[Path] = typer.Option(None, "--photos", help="A folder of photographs (default: those shipped in packages)"),
    difficulty: str = typer.Option("medium", "--difficulty"),
    seed: int = typer.Option(0, "--seed"),
    train_views: int = typer.Option(24, "--train-views", help="Views per training scene (the test split does not change)"),
    train_fraction: float = typer.Option(0.4, "--train-fraction", help="Share of the photographs that become training scenes"),
):
    """Build the offline instance-retrieval benchmark from real photographs."""
    from .datasets.photos import photos_in
    from .datasets.views import build_views

    info = build_views(out_dir, photos=photos_in(photos) if photos else None, difficulty=difficulty, seed=seed,
                       n_train=train_views, train_fraction=train_fraction)
    console.print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict))}))


@app.command()
def train(
    out_dir: Path = typer.Option(..., "--out", help="Run folder: checkpoints (last, best), config.json, log.jsonl"),
    teacher_store: Path = typer.Option(..., "--teacher-store", help="Teacher vectors of the training images (engine encode --train-set)"),
    train_set: Path = typer.Option(..., "--train-set", help="SfM-120k-format db.pkl"),
    images: Optional[Path] = typer.Option(None, "--images", help="The training images' ims/ or jpg/ folder (default: found beside db.pkl)"),
    student: str = typer.Option("mobilenetv2", "--student", help="Student architecture, or a teacher name to fine-tune it (--mode sym)"),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint instead of an untrained student"),
    weights: Optional[str] = typer.Option(None, "--weights", help="Backbone weights file ('random' for random init)"),
    loss: str = typer.Option("regression", "--loss", help="regression, contrastive, contrastive+, triplet, multi-similarity, rkd, darkrank, csd"),
    mode: str = typer.Option("asym", "--mode", help="asym (refs from the teacher) or sym (all from the student)"),
    margin: Optional[float] = typer.Option(None, "--margin"),
    epochs: int = typer.Option(10, "--epochs"),
    lr: float = typer.Option(1e-4, "--lr"),
    lr_decay: float = typer.Option(0.01, "--lr-decay", help="lr *= exp(-decay) per epoch"),
    weight_decay: float = typer.Option(1e-6, "--weight-decay"),
    batch_size: int = typer.Option(5, "--batch-size", help="Tuples per batch (x4 images for knowledge-transfer losses)"),
    images_per_epoch: int = typer.Option(20000, "--images-per-epoch"),
    query_size: int = typer.Option(2000, "--query-size"),
    pool_size: int = typer.Option(20000, "--pool-size"),
    neg_num: int = typer.Option(5, "--neg-num"),
    negatives: str = typer.Option("hard", "--negatives", help="hard (mined) or random"),
    max_side: int = typer.Option(362, "--max-side"),
    workers: int = typer.Option(-1, "--workers"),
    seed: int = typer.Option(0, "--seed"),
    freeze: str = typer.Option("bn", "--freeze", help="bn (BatchNorm statistics frozen) or trunk (only the head learns)"),
    center: bool = typer.Option(True, "--center/--no-center", help="Targets: teacher vectors minus their training mean"),
    val_every: int = typer.Option(1, "--val-every", help="Validate every N epochs (and after the last)"),
    val_gnd: Optional[Path] = typer.Option(None, "--val-gnd", help="Validation ground truth (revisited format)"),
    val_store: Optional[Path] = typer.Option(None, "--val-store", help="Teacher store of the validation gallery"),
):
    """Train a student into the teacher's space (asym) or its own (sym); resumes an interrupted run in --out."""
    from training.run import run_training
    from training.trainer import TrainConfig

    from .encode import default_workers

    cfg = TrainConfig(student=student, weights=weights, loss=loss, mode=mode, margin=margin, epochs=epochs, lr=lr,
                      lr_decay=lr_decay, weight_decay=weight_decay, batch_size=batch_size, images_per_epoch=images_per_epoch,
                      query_size=query_size, pool_size=pool_size, neg_num=neg_num, negatives=negatives, max_side=max_side,
                      workers=default_workers() if workers < 0 else workers, seed=seed, freeze=freeze, val_every=val_every,
                      center=center)
    metrics = run_training(cfg, out_dir, teacher_store, train_set, images, val_gnd, val_store, init)
    console.print(json.dumps(metrics))


@app.command()
def export(
    model: str = typer.Option(..., "--model", help="Teacher name or checkpoint (.safetensors / cirtorch .pth)"),
    out_path: Path = typer.Option(..., "--out", help="OUT.onnx, or OUT.engine / OUT.plan for TensorRT"),
    fmt: Optional[str] = typer.Option(None, "--format", help="onnx or tensorrt (default: from --out's suffix)"),
    opset: int = typer.Option(17, "--opset"),
    fp16: bool = typer.Option(True, "--fp16/--fp32", help="TensorRT precision (the head stays fp32)"),
    min_batch: int = typer.Option(1, "--min-batch"),
    min_side: int = typer.Option(32, "--min-side"),
    opt_batch: int = typer.Option(8, "--opt-batch"),
    opt_side: int = typer.Option(362, "--opt-side"),
    max_batch: int = typer.Option(32, "--max-batch"),
    max_side: int = typer.Option(1024, "--max-side"),
    weights: Optional[str] = typer.Option(None, "--weights"),
):
    """Export an encoder (head included) to ONNX (dynamic batch and size) or a TensorRT engine (optional extra)."""
    from .export import export_command

    console.print(export_command(model, out_path, fmt, opset, fp16, (min_batch, min_side), (opt_batch, opt_side),
                                 (max_batch, max_side), weights))


@app.command()
def whiten(
    model: str = typer.Option(..., "--model", help="Teacher name or checkpoint to whiten"),
    pairs: Path = typer.Option(..., "--pairs", help="Whitening pickle {cids, qidxs, pidxs} or an SfM-format db.pkl"),
    out_path: Path = typer.Option(..., "--out", help="Checkpoint (.safetensors) of the encoder with its learned whitening"),
    dim: Optional[int] = typer.Option(None, "--dim", help="Keep the first DIM whitened components"),
    images: Optional[Path] = typer.Option(None, "--images", help="The pairs' ims/ or jpg/ folder"),
    max_side: int = typer.Option(362, "--max-side"),
    workers: int = typer.Option(-1, "--workers"),
):
    """Learn whitening (Lw) from matching pairs and save the encoder with it as the head's last layer."""
    from training.learn_whitening import whiten_encoder

    from .encode import EncodeOptions, default_workers
    from .models import load_encoder

    enc = load_encoder(model)
    opts = EncodeOptions(max_side=max_side, workers=default_workers() if workers < 0 else workers, label="whitening pairs")
    path = whiten_encoder(enc, pairs, out_path, opts, dim, images)
    console.print(f"wrote {path}: {enc.name} + Lw (D = {enc.dim}, space {enc.space})")


@data_app.command("download")
def data_download(
    name: str = typer.Argument(..., help="roxford5k, rparis6k, sfm120k, r1m, resnet101-gem or vgg16-gem"),
    root: Path = typer.Option(Path("data"), "--root", help="Where datasets are kept"),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="A mirror that keeps the original paths"),
):
    """Download (resumable, checksummed) and unpack a dataset or teacher checkpoint into a standard layout."""
    from .datasets.download import download

    console.print(f"{name}: ready in {download(name, root, base_url)}")


@data_app.command("convert-train")
def data_convert_train(
    images_file: Path = typer.Argument(..., help="CSV/JSONL of (image, instance[, split]); see engine/datasets/FORMATS.md"),
    out_path: Path = typer.Option(..., "--out", help="SfM-120k-format db.pkl"),
    pairs: Optional[Path] = typer.Option(None, "--pairs", help="CSV/JSONL of explicit (query, positive) pairs"),
    images_root: Optional[Path] = typer.Option(None, "--images-root"),
    seed: int = typer.Option(0, "--seed"),
):
    """Convert your own training data (image, instance id) into the SfM-120k format training reads."""
    from .datasets.convert import convert_training

    print(json.dumps(convert_training(images_file, out_path, pairs, images_root, seed), default=str))


@data_app.command("convert-test")
def data_convert_test(
    gallery: Path = typer.Argument(..., help="CSV/JSONL of gallery images"),
    queries: Path = typer.Argument(..., help="CSV/JSONL of queries (image, optional bbx)"),
    labels: Path = typer.Argument(..., help="CSV/JSONL of (query, gallery image, positive|hard|junk)"),
    out_path: Path = typer.Option(..., "--out", help="Revisited-format gnd.pkl"),
    images_root: Optional[Path] = typer.Option(None, "--images-root"),
):
    """Convert your own test data into the revisited Oxford/Paris ground-truth format."""
    from .datasets.convert import convert_test

    print(json.dumps(convert_test(gallery, queries, labels, out_path, images_root), default=str))


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("engine-demo"), "--out", help="Where the benchmark, stores and results go"),
    photos: Optional[Path] = typer.Option(None, "--photos", help="Build the benchmark from this folder of photographs"),
    student: str = typer.Option("mobilenetv2", "--student", help="Student architecture"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object keyed by setting"),
    train: Optional[str] = typer.Option(None, "--train", help="Also train the student with this loss (e.g. regression) and score it"),
    epochs: int = typer.Option(10, "--epochs", help="Training epochs with --train"),
    scales: str = typer.Option("1", "--scales", help="Test-time multi-scale factors, e.g. 1,0.707,0.5 (METHOD.md's protocol)"),
):
    """The whole pipeline on real photographs: benchmark, teacher gallery, student queries, search, evaluation."""
    from .demo import run_demo

    results = run_demo(out_dir, photos=photos, student=student, log=console, train_loss=train, epochs=epochs,
                       scales=parse_scales(scales))
    if as_json:
        print(json.dumps(results["metrics"]))
    else:
        out.print(metrics_table(results["metrics"], title=f"asymmetric retrieval on {results['benchmark']}"))
        for line in results["notes"]:
            out.print(line)


from .report.cli import report as _report  # noqa: E402  (the command carries its own typer options)

app.command("report", help="A static HTML retrieval report: metrics, plots, per-query rankings, two result sets side by side.")(_report)


def main() -> None:
    """The `engine` command. Exit codes: 0 done, 1 bad input (one line on stderr), 2 usage (click's),
    70 the engine's own bug (a traceback only with AML_DEBUG=1 or --debug), 130 interrupted."""
    debug = "--debug" in sys.argv[1:] or os.environ.get("AML_DEBUG") == "1"
    if "--debug" in sys.argv[1:]:
        sys.argv.remove("--debug")
    try:
        app()
    except EngineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # not the user's input: a bug of the engine's
        if debug:
            raise
        where = traceback.extract_tb(e.__traceback__)[-1]
        print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(at {Path(where.filename).name}:{where.lineno}; rerun with --debug for the traceback, and report it)",
              file=sys.stderr)
        sys.exit(EXIT_BUG)
