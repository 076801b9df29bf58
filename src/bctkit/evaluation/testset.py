"""Evaluate models, or their feature files, on a test set read from disk (``bctkit evaluate
--protocol``): IJB-B / IJB-C, an insightface pair set (.bin), query/gallery lists or folders,
Market-1501 / DukeMTMC-reID, leave-one-out over one labelled set, revisited Oxford / Paris (+ R1M)
and GLDv2's retrieval test.

Each model is given as a model (anything ``bctkit extract`` reads: a run's model, an imported old
model, an export) or as a feature file of the test set's images. A model's features are extracted
into ``OUT/features/<name>.safetensors`` (resumable, split over torchrun's processes) and reused by a
later evaluation into the same folder when the model, the images, the flip test and the precision
are the same. A feature file is matched to the test set's images by its row keys when it has them
(``bctkit extract`` writes them; a .npz may give ``keys``), else taken in the images' order.
Then every comparable (query model, gallery model) pair is evaluated, and the report, plots and
compatibility certificates are written as ``bctkit run`` writes them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bctkit.data.sources.base import DataSource
from bctkit.engine.distributed import is_main
from bctkit.errors import ConfigError, DataError, FileFormatError
from bctkit.evaluation.protocols.base import Protocol, check_comparable
from bctkit.evaluation.transformed import method_of, transformed_set
from bctkit.features import FeatureSet, load_features
from bctkit.models.transformation import LoadedTransformation
from bctkit.oldside.given import features_fingerprint, given_features
from bctkit.storage import read_header

PROTOCOLS = {
    "ijbb": "IJB-B in insightface's layout: --data ROOT (meta/, loose_crop/)",
    "ijbc": "IJB-C in insightface's layout: --data ROOT (meta/, loose_crop/)",
    "pairs": "a verification pair set as insightface distributes it: --data FILE.bin",
    "retrieval": "query and gallery images: --data QUERY GALLERY (each a 'path label' list, a folder "
                 "root/<identity>/<image> or a RecordIO set)",
    "market": "Market-1501 / DukeMTMC-reID: --data ROOT (query/, bounding_box_test/)",
    "loo": "leave-one-out over one labelled set (each image queries all the others; BCT, BT^2): --data "
           "PATH (a 'path label' list, a folder root/<class>/<image> or a RecordIO set)",
    "roxford": "revisited Oxford: --data ROOT [DISTRACTORS] (ROOT: gnd_roxford5k.pkl, jpg/; DISTRACTORS: "
               "a folder of images or a list file, e.g. R1M)",
    "rparis": "revisited Paris: --data ROOT [DISTRACTORS] (ROOT: gnd_rparis6k.pkl, jpg/)",
    "gldv2": "GLDv2 retrieval: --data ROOT (test/, index/, retrieval_solution_v2.1.csv, index.csv)",
}
DATA_PATHS = {"retrieval": (2, 2), "roxford": (1, 2), "rparis": (1, 2)}
"""(fewest, most) --data paths of the protocols that do not take exactly one."""


@dataclass(frozen=True)
class TestSetOptions:
    """What the protocols take from the command line (each uses the ones that apply to it). Rates
    and ranks left None are the protocol's own defaults (pairs: FARs 1e-3, 1e-2; IJB: 1e-6 ... 1e-1)."""

    fars: tuple[float, ...] | None = None
    fpirs: tuple[float, ...] | None = None
    topk: tuple[int, ...] | None = None
    score_weighting: bool = False
    folds: int = 10
    block: int = 1024
    index: str | None = None
    nprobe: int | None = None
    query_folder: str = "query"
    tar_mode: str = "exact"
    ap: str = "mean"

    def rates(self, *names: str) -> dict[str, Any]:
        """The options among ``names`` (fars, fpirs, topk) that were given, as keyword arguments."""
        return {n: v for n in names if (v := getattr(self, n)) is not None}


def build_protocol(name: str, data: Sequence[str], opts: TestSetOptions) -> Protocol:
    """The protocol ``name`` over the files ``data`` (what each expects: :data:`PROTOCOLS`)."""
    from bctkit.evaluation.protocols.retrieval import RankingOptions

    if name not in PROTOCOLS:
        raise ConfigError(f"--protocol {name!r}: expected one of {sorted(PROTOCOLS)} (or split)")
    low, high = DATA_PATHS.get(name, (1, 1))
    if not low <= len(data) <= high:
        want = str(low) if low == high else f"{low} or {high}"
        raise ConfigError(f"--protocol {name} needs --data with {want} path(s) ({PROTOCOLS[name]}), "
                          f"got {len(data)}")
    for p in data:
        if not Path(p).exists():
            raise DataError(f"--data {p}: not found ({PROTOCOLS[name]})")
    ranking = RankingOptions(**({} if opts.topk is None else {"ks": opts.topk}), block=opts.block,
                             index=opts.index, nprobe=opts.nprobe)
    if name in ("ijbb", "ijbc"):
        from bctkit.evaluation.protocols.ijb import IJBProtocol

        return IJBProtocol.from_root(data[0], name=name, **opts.rates("fars", "fpirs", "topk"),
                                     score_weighting=opts.score_weighting, tar_mode=opts.tar_mode)
    if name == "pairs":
        from bctkit.evaluation.protocols.pairs import PairsProtocol

        return PairsProtocol.from_file(data[0], **opts.rates("fars"), folds=opts.folds,
                                       tar_mode=opts.tar_mode)
    if name == "market":
        from bctkit.evaluation.protocols.reid import ReIDProtocol

        return ReIDProtocol.from_root(data[0], query=opts.query_folder, options=ranking, ap=opts.ap)
    if name == "loo":
        from bctkit.evaluation.protocols.loo import LeaveOneOutProtocol

        return LeaveOneOutProtocol.from_path(data[0], ks=opts.topk or (1, 5), block=opts.block)
    if name in ("roxford", "rparis"):
        from bctkit.evaluation.protocols.revisited import RevisitedProtocol

        return RevisitedProtocol.from_root(data[0], "roxford5k" if name == "roxford" else "rparis6k",
                                           distractors=data[1] if len(data) > 1 else None, block=opts.block)
    if name == "gldv2":
        from bctkit.evaluation.protocols.gldv2 import GLDv2Protocol

        return GLDv2Protocol.from_root(data[0], block=opts.block)
    from bctkit.data.datasets import open_dataset
    from bctkit.evaluation.protocols.retrieval import QueryGalleryProtocol

    query, gallery = (Path(p) for p in data)
    if query.is_dir() != gallery.is_dir():
        raise ConfigError(f"--data {query} {gallery}: give two list files or two folders")
    return QueryGalleryProtocol.from_sources(open_dataset(query), open_dataset(gallery), options=ranking)


@dataclass(frozen=True)
class ExtractOptions:
    """How models are run over the test set's images (as for ``bctkit extract``)."""

    flip: bool = False
    batch_size: int = 256
    workers: int = 0
    device: str = "auto"
    precision: str = "fp32"


def feature_file_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of ``path`` when it holds features rather than a model (a .npy / .npz, or a
    safetensors file with a ``feats`` or ``features`` tensor, told from its header alone), else
    None."""
    if path.suffix in (".npy", ".npz"):
        return {}
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    names, meta = read_header(path)
    return meta if {"feats", "features"} & set(names) else None


def _file_features(path: Path, meta: dict[str, Any], source: DataSource) -> FeatureSet:
    """A feature file's rows for ``source``'s images (matched by key when the file has keys)."""
    feats = given_features(path, source, None, "test-set")
    labels = torch.from_numpy(source.labels.astype("int64"))
    meta = {**meta, "dataset": source.name, "images_fingerprint": source.fingerprint()}
    meta.setdefault("model_fingerprint", features_fingerprint(feats))
    return FeatureSet(feats, labels, meta)


def _reusable(out: Path, model: Path, source: DataSource, ex: ExtractOptions) -> bool:
    """Whether ``out`` already holds ``model``'s features of ``source`` made the same way."""
    if not out.is_file():
        return False
    from bctkit.extract import open_model

    try:
        have = load_features(out).meta
    except (FileFormatError, DataError):
        return False
    now = open_model(model, torch.device("cpu")).meta
    same = {"model_fingerprint": now.get("model_fingerprint"), "model_format": now.get("model_format"),
            "images_fingerprint": source.fingerprint(), "flip": ex.flip, "precision": ex.precision}
    return all(have.get(k) == v for k, v in same.items())


def model_features(name: str, spec: str, protocol: Protocol, out: Path, ex: ExtractOptions,
                   progress: bool = True) -> FeatureSet:
    """Features of the test set's images by the model or feature file ``spec``, keyed to the
    protocol's rows. A model's are extracted to ``out``/features/``name``.safetensors (or reused)."""
    path = Path(spec).expanduser()
    source: DataSource = protocol.source  # type: ignore[attr-defined]
    if not path.exists():
        raise DataError(f"{name}={spec}: not found (a model, or a feature file of the test set's images)")
    meta = feature_file_meta(path)
    if meta is not None:
        fs = _file_features(path, meta, source)
    else:
        from bctkit.extract import extract_to_file

        file = out / "features" / f"{name}.safetensors"
        if not _reusable(file, path, source, ex):
            extract_to_file(path, source, file, batch_size=ex.batch_size, workers=ex.workers, flip=ex.flip,
                            device=ex.device, precision=ex.precision,  # type: ignore[arg-type]
                            progress=progress)
        fs = load_features(file)
    if len(fs.feats) != len(source):
        raise DataError(f"{name}={spec}: {len(fs.feats)} feature rows for {len(source)} test images")
    fs.meta.setdefault("model", name)
    return fs


def evaluate_testset(protocol: Protocol, models: dict[str, str], out: Path, ex: ExtractOptions,
                     chain: list[str] | None = None, log: Callable[[str], None] | None = None,
                     progress: bool = True, data: Sequence[str] = (),
                     transforms: dict[str, LoadedTransformation] | None = None) -> dict[str, Any] | None:
    """Features of every model in ``models`` (name -> model or feature file; "old" required, then
    "paragon" and the new models), then the report in ``out`` (rank 0; None on other ranks).
    ``data``: the test set's paths as given, named in the report. ``transforms``: transformed
    galleries h(old) to add by name (each h's target, ``h.meta["target"]``, among ``models``; no
    side information), evaluated with their target as in a run."""
    from bctkit.evaluation.suite import evaluate_suite, models_info_from_features

    if "old" not in models:
        raise ConfigError("evaluation needs the old model (--old)")
    say = log or (lambda _msg: None)
    if ex.flip:  # validated before any model is run
        for name, spec in models.items():
            if feature_file_meta(Path(spec).expanduser()) is not None:
                raise ConfigError(f"--flip: {name}={spec} is a feature file, already extracted; the flip "
                                  "test is chosen when features are extracted (bctkit extract --flip): drop "
                                  "--flip or give the model")
    features: dict[str, FeatureSet] = {}
    for name, spec in models.items():
        say(f"[features] {name}: {spec}")
        features[name] = model_features(name, spec, protocol, out, ex, progress)
    check_comparable(features, chain, models)
    if not is_main():
        return None
    how = {}
    for name, h in (transforms or {}).items():
        fs, _ = transformed_set(name, h, features["old"], features[str(h.meta["target"])],
                                {"method": method_of(h)})
        fs.save(out / "features" / f"{name}.safetensors")
        features[name], how[name] = fs, {"target": str(h.meta["target"])}
    extra = {"dataset": f"{protocol.dataset}: {len(protocol.source)} images",  # type: ignore[attr-defined]
             "test_set": protocol.describe(), "data": [str(p) for p in data], "inputs": dict(models),
             "extraction": {"flip": ex.flip, "precision": ex.precision}, "warnings": protocol.caveats()}
    return evaluate_suite(features, protocol, out, models_info_from_features(features), extra,
                          backfill=False, chain=chain, log=say, progress=progress, transforms=how)
