"""``bctkit gallery create | add | remove | certify | search | transform | backfill | status``: the
command-line face of the gallery store (argument parsing and printing only; the work is in the
library)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from bctkit.data.sources.base import DataSource
from bctkit.errors import ConfigError
from bctkit.gallery.checks import GalleryError
from bctkit.storage import read_json, write_json

NAMES = ("gallery",)
STORE_HELP = ("a folder (the SQLite store), milvus-lite:PATH.db[#COLLECTION] (Milvus Lite) or "
              "milvus://HOST:PORT/COLLECTION | http(s)://HOST:PORT/COLLECTION (a Milvus server)")


def _positive_int(text: str) -> int:
    """argparse type of a count (--batch-size, -k): an integer >= 1, refused when the arguments are
    read, before any store, model or image is opened."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_parser(sub: Any) -> None:
    """Register ``gallery`` and its subcommands on the CLI's subparsers."""
    g = sub.add_parser("gallery", help="a versioned gallery: add, search across model versions, backfill")
    gs = g.add_subparsers(dest="gallery_command", required=True)
    c = gs.add_parser("create", help="create an empty gallery store (a new folder)")
    c.add_argument("store", help=STORE_HELP)
    c.add_argument("--index", default="Flat",
                   help="FAISS index factory string per version (default Flat: exact); on Milvus Flat, "
                        "IVF_FLAT or HNSW")
    c.add_argument("--dim", type=_positive_int,
                   help="Milvus only: the largest embedding size any model version will have (default: "
                        "the largest declared before the first add)")
    a = gs.add_parser("add", help="embed images with a model and add them (id: the image path in the source)")
    a.add_argument("store", help=STORE_HELP)
    _model_and_images(a)
    r = gs.add_parser("remove", help="delete items by id, in one atomic commit")
    r.add_argument("store", help=STORE_HELP)
    r.add_argument("ids", nargs="*", metavar="ID", help="item ids (the images' paths in their source)")
    r.add_argument("--ids", dest="ids_file", metavar="FILE", help="a UTF-8 file of item ids, one per line")
    ce = gs.add_parser("certify", help="allow mixing two versions: add verified compatibility certificates")
    ce.add_argument("store", help=STORE_HELP)
    ce.add_argument("certificates", nargs="+", help="certificate files (RUN/certificates/*.json)")
    s = gs.add_parser("search", help="embed query images with a model and search every version's items")
    s.add_argument("store", help=STORE_HELP)
    _model_and_images(s)
    s.add_argument("-k", type=_positive_int, default=5, help="results per query (default 5)")
    s.add_argument("--out", help="write the results as JSON here")
    t = gs.add_parser("transform", help="rewrite the old version's items through a learned transformation "
                                        "h(old) -> new (FCT / FastFill; no image read; resumable)")
    t.add_argument("store", help=STORE_HELP)
    t.add_argument("--transform", required=True,
                   help="a run's transformation (RUN/models/<name>/ or its transform.safetensors)")
    t.add_argument("--batch-size", type=_positive_int, default=8192)
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    b = gs.add_parser("backfill", help="re-embed the items with a new model, batch by batch (resumable)")
    b.add_argument("store", help=STORE_HELP)
    _model_and_images(b)
    b.add_argument("--order", choices=["random", "benefit", "uncertainty"], default="random",
                   help="random (seeded), benefit: smallest old-embedding norm first, or uncertainty: after "
                        "gallery transform, the items the transformation was least sure of first "
                        "(FastFill; default random)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--limit", type=int, help="stop after this many items (a partial backfill: refused "
                                             "unless the store holds a passed certificate new -> old)")
    b.add_argument("--unsearchable-while-partial", action="store_true",
                   help="allow a partial backfill without a passed certificate: the new model cannot "
                        "search the store until the backfill ends")
    b.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N: where the model embeds (under torchrun: each rank's own "
                        "GPU with auto)")
    st = gs.add_parser("status", help="items per model version, and the expected accuracy now")
    st.add_argument("store", help=STORE_HELP)
    st.add_argument("--report", help="a run's report.json: the expected top-1 from its backfill curve of "
                                                   "the order the backfill used")


def _model_and_images(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="a bctkit model (RUN/models/<name>/ or its model.safetensors) or a bctkit export "
                        "(its folder, model.pt or model.onnx)")
    p.add_argument("--images", required=True,
                   help="an image folder (root/<identity>/<image>), a list file (path label per line) or "
                        "a RecordIO set (a folder with train.rec + train.idx, or the .rec file)")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _images(path: str) -> DataSource:
    from bctkit.data.datasets import open_dataset

    if not Path(path).expanduser().exists():
        raise ConfigError(f"--images {path}: no such image folder, list file or RecordIO set")
    return open_dataset(path)


def _model(path: str) -> Any:
    from bctkit.gallery.embed import open_embedder

    return open_embedder(path)


def run(args: argparse.Namespace) -> int:
    """Carry out one ``bctkit gallery`` subcommand; returns the exit code."""
    from bctkit.gallery.interface import create_gallery, open_gallery

    cmd = args.gallery_command
    if cmd == "create":
        create_gallery(args.store, index=args.index, dim=args.dim).close()
        print(f"gallery: created {args.store} (index {args.index})")
        return 0
    if cmd == "backfill":  # before opening: under torchrun not every rank opens the store
        return _backfill(args)
    with open_gallery(args.store) as store:
        if cmd == "add":
            return _add(store, args)
        if cmd == "remove":
            return _remove(store, args)
        if cmd == "certify":
            return _certify(store, args.certificates)
        if cmd == "search":
            return _search(store, args)
        if cmd == "transform":
            return _transform(store, args)
        return _status(store, args.report)


def _transform(store: Any, args: argparse.Namespace) -> int:
    from bctkit.gallery.transform import transform
    from bctkit.models.transformation import load_transformation

    h = load_transformation(args.transform)
    res = transform(store, h, batch_size=args.batch_size, progress=not args.quiet)
    print(f"gallery: transformed {res.transformed} items in {res.batches} batches ({res.already} done "
          f"before) into {res.version}; {_shares(store)}")
    return 0


def _backfill(args: argparse.Namespace) -> int:
    """``gallery backfill``, in one process or every torchrun process (see
    :func:`bctkit.gallery.backfill.distributed_backfill`); rank 0 prints."""
    from bctkit.engine.compute import Engine
    from bctkit.engine.distributed import is_main
    from bctkit.extract.model import open_model
    from bctkit.gallery.backfill import distributed_backfill
    from bctkit.gallery.interface import open_gallery, parse_store

    parse_store(args.store)  # a bad store string is refused before a model is read
    engine = Engine.create(args.device, field="--device")
    images = _images(args.images)
    model = open_model(args.model, engine.device)
    res = distributed_backfill(args.store, model, images, order=args.order, seed=args.seed,
                               batch_size=args.batch_size, progress=not args.quiet, limit=args.limit,
                               unsearchable_while_partial=args.unsearchable_while_partial)
    if is_main():
        with open_gallery(args.store) as store:
            print(f"gallery: backfilled {res.embedded} items in {res.batches} batches ({res.already} done "
                  f"before); {_shares(store)}")
    return 0


def _add(store: Any, args: argparse.Namespace) -> int:
    from bctkit.gallery.ingest import add_images

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    res = add_images(store, _model(args.model), _images(args.images), batch_size=args.batch_size,
                     progress=not args.quiet)
    print(f"gallery: added {res.added} items of {res.version} in {res.batches} batches ({res.already} "
          f"already stored by this version, skipped); {_shares(store)}")
    return 0


def _remove(store: Any, args: argparse.Namespace) -> int:
    ids = list(args.ids)
    if args.ids_file:
        try:
            text = Path(args.ids_file).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"--ids {args.ids_file}: no such file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--ids {args.ids_file}: not UTF-8 text (byte {exc.start})") from None
        ids += [line for line in text.split("\n") if line.strip()]
        ids = [i.removesuffix("\r") for i in ids]
    if not ids:
        raise ConfigError("gallery remove: no ids given (IDs or --ids FILE)")
    store.delete(ids)
    print(f"gallery: removed {len(ids)} items; {_shares(store)}")
    return 0


def _certify(store: Any, paths: list[str]) -> int:
    """Verify every certificate file, and that each passed and agrees with the store's (and the
    other files') embedding sizes, before storing any: a refused call changes nothing. A version
    the store does not know yet is declared without a name (the model that embeds with it names it;
    a certificate's name is the run's label, which may differ)."""
    from bctkit.evaluation.certificate import verify_certificate

    dims = {fp: info["dim"] for fp, info in store.versions().items()}
    certs = []
    for path in paths:
        cert = verify_certificate(path)
        if cert["passed"] is not True:
            raise GalleryError(f"{path}: the compatibility criterion failed (passed: {cert['passed']!r}); "
                               "only a passed certificate allows mixed-version search")
        for side in ("query", "gallery"):
            m = cert[side]
            known = dims.setdefault(m["fingerprint"], m["embedding_dim"])
            if known != m["embedding_dim"]:
                raise GalleryError(f"{path}: {side} model {m['name']} ({m['fingerprint']}) has embedding_dim "
                                   f"{m['embedding_dim']}, but the store or another certificate says {known}")
        certs.append((path, cert))
    for path, cert in certs:
        for side in ("query", "gallery"):  # the new model may have no items yet
            _declare(store, cert[side]["fingerprint"], cert[side]["embedding_dim"], None, None)
        store.add_certificate(cert)
        print(f"gallery: {cert['query']['name']} queries may search {cert['gallery']['name']} items ({path})")
    return 0


def _search(store: Any, args: argparse.Namespace) -> int:
    from bctkit.gallery.embed import check_images, embed_all, version_of
    from bctkit.gallery.search import check_search_allowed

    model, images = _model(args.model), _images(args.images)
    fp, dim, name, layout = version_of(model)
    check_images(model, images)
    check_search_allowed(store, fp, name)  # refused before the version is declared or a query embedded
    _declare(store, fp, dim, name, layout)
    feats = embed_all(model, images, args.batch_size, progress=not args.quiet, desc="queries")
    res = store.search(feats, fp, args.k)
    rows = [{"query": images.key(i), "results": [
        {"id": item, "score": float(score), "version": ver}
        for item, score, ver in zip(res.ids[i], res.scores[i], res.versions[i], strict=True)]}
        for i in range(len(images))]
    if args.out:
        write_json(args.out, {"model": fp, "k": args.k, "queries": rows})
    for row in rows[:5]:
        best = row["results"][0] if row["results"] else None
        print(f"{row['query']}: " + (f"{best['id']} ({best['score']:.3f})" if best else "no result"))
    print(f"gallery: {len(rows)} queries searched" + (f"; results in {args.out}" if args.out else ""))
    return 0


def _declare(store: Any, fingerprint: str, dim: int, name: str | None, layout: dict | None) -> None:
    """Declare a model version the store does not know yet (a known one keeps its name)."""
    if fingerprint not in store.versions():
        store.add_version(fingerprint, dim, name=name, layout=layout)


def _shares(store: Any) -> str:
    total = max(store.count(), 1)
    return ", ".join(f"{info.get('name') or fp} {info['count']} ({100 * info['count'] / total:.1f} %)"
                     for fp, info in store.versions().items())


def _kinds(store: Any) -> str:
    """The three kinds of item: embedded when added, transformed by h(old), re-embedded by a backfill."""
    from bctkit.gallery.backfill_plan import TRANSFORM_ORDERS

    orders = store.backfill_orders()
    kinds = {"added": 0, "transformed": 0, "re-embedded": 0}
    for fp, info in store.versions().items():
        used = orders.get(fp, [])
        kind = "transformed" if set(TRANSFORM_ORDERS) & set(used) else "re-embedded" if used else "added"
        kinds[kind] += info["count"]
    return ", ".join(f"{n} {k}" for k, n in kinds.items())


def _status(store: Any, report: str | None) -> int:
    store.verify()  # reads every vector: a damaged item is named (exit 2), not reported as OK
    print(f"gallery: {store.count()} items; {_shares(store)}")
    print(f"gallery: {_kinds(store)} (as added, through a transformation, by a backfill)")
    if report:  # older reports hold NaN for values not measurable
        from bctkit.gallery.forecast import expected_accuracy

        for line in expected_accuracy(store, read_json(report, allow_nan=True), f"--report {report}"):
            print(line)
    return 0
