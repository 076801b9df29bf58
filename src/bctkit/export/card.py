"""The parts of an export card that read the model's run: its compatible blocks, whether its
compatibility criterion passed (from the run's certificate, else its report) and its report's results.

A model whose criterion failed must not be served against its predecessor's gallery: its card says
so (``compatible_with`` null, ``trained_against`` the predecessor, no ancestors to search) instead of
telling a server how to search that gallery.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bctkit.errors import FileFormatError
from bctkit.models.config import BackboneConfig
from bctkit.storage import read_json

UNKNOWN = {"passed": None, "note": "no report or certificate of this model in its run: whether its "
                                   "compatibility criterion holds is not known here"}


def split_reports(run: Path) -> list[Path]:
    """The run's test-split report files that exist."""
    return [p for p in (run / "report.json", run / "reports" / "report.json") if p.is_file()]


def criterion(run: Path | None, name: str, parent: str | None, fp: str) -> dict[str, Any]:
    """Whether ``name`` (fingerprint ``fp``) passed the criterion against ``parent``: ``passed``
    (true, false or null when not known), the metric, its cross and old-self values and the file
    read. The run's certificate of the pair comes first (its own choice of metric); without one, the
    report's first headline metric (else top1, else the first). Files of another version of the
    model (another fingerprint) are not read as this model's."""
    if run is None or not parent:
        return dict(UNKNOWN)
    for path in split_reports(run):
        try:
            rep = read_json(path, allow_nan=True)
        except FileFormatError:
            continue
        if not isinstance(rep, dict) or ((rep.get("models") or {}).get(name) or {}).get("fingerprint") != fp:
            continue
        found = _from_certificates(path.parent, rep.get("certificates") or [], name, parent, fp)
        if found is None:
            found = _from_report(path, rep, name)
        if found is not None:
            return found
    return dict(UNKNOWN)


def _from_certificates(folder: Path, rels: list[Any], name: str, parent: str,
                       fp: str) -> dict[str, Any] | None:
    for rel in rels:
        path = folder / str(rel)
        try:
            cert = read_json(path)
        except FileFormatError:
            continue
        if not isinstance(cert, dict) or not isinstance(cert.get("criterion"), dict):
            continue
        query, gallery = cert.get("query") or {}, cert.get("gallery") or {}
        if (query.get("name"), query.get("fingerprint"), gallery.get("name")) == (name, fp, parent) \
                and isinstance(cert.get("passed"), bool):
            c = cert["criterion"]
            return {"passed": cert["passed"], "metric": c.get("metric"), "cross": c.get("cross"),
                    "old_self": c.get("old_self"), "source": str(path)}
    return None


def _from_report(path: Path, rep: dict[str, Any], name: str) -> dict[str, Any] | None:
    entries = (rep.get("compatibility") or {}).get(name)
    if not isinstance(entries, dict) or not entries:
        return None
    order = [m for m in (*(rep.get("headline") or []), "top1") if m in entries] or list(entries)
    entry = entries[order[0]]
    if not isinstance(entry, dict) or not isinstance(entry.get("criterion"), bool):
        return None
    return {"passed": entry["criterion"], "metric": order[0], "cross": entry.get("cross"),
            "old_self": entry.get("old_self"), "source": str(path)}


def compat_card(meta: dict[str, Any], dim: int, run: Path | None, name: str, fp: str) -> dict[str, Any]:
    """The model's compatible blocks: the first ``compat_dims`` coordinates (all when null) search
    ``compatible_with``'s gallery; each entry of ``compat_prefixes`` is an older ancestor's size.
    When the run records a failed criterion, none: the card says the criterion failed instead."""
    parent, prefixes = meta.get("compatible_with"), sorted(meta.get("compat_prefixes") or [], reverse=True)
    crit = criterion(run, name, parent, fp)
    if crit["passed"] is False:
        return {
            "compatible_with": None, "trained_against": parent, "criterion": crit,
            "compat_dims": meta.get("compat_dims"), "compat_prefixes": prefixes, "ancestors": [],
            "how": (f"the compatibility criterion failed ({crit['metric']} cross {crit['cross']} is not "
                    f"above {parent}'s own {crit['old_self']}, {crit['source']}): this model's queries "
                    f"must not search a gallery embedded by {parent}; serve it only on a gallery it "
                    "embedded itself (a full backfill)"),
        }
    ancestors, seen = [], set()
    ancestor = parent
    while ancestor and run is not None and ancestor not in seen:
        seen.add(ancestor)
        try:
            info = read_json(run / "models" / ancestor / "model.json")
            size = BackboneConfig(**info["backbone"]).output_dim
        except (FileFormatError, KeyError, TypeError, ValueError):
            break  # no readable metadata of that ancestor here: its size is not known
        ancestors.append({"name": ancestor, "dim": size,
                          "query_dims": [0, size] if size == dim or size in prefixes else None})
        ancestor = info.get("compatible_with")
    if parent and not ancestors:
        ancestors.append({"name": parent, "dim": meta.get("compat_dims") or dim,
                          "query_dims": [0, meta.get("compat_dims") or dim]})
    return {
        "compatible_with": parent, "criterion": crit, "compat_dims": meta.get("compat_dims"),
        "compat_prefixes": prefixes, "ancestors": ancestors,
        "how": ("to search a gallery embedded by an ancestor, take the query's coordinates 'query_dims' "
                "(the leading block of the ancestor's size), L2-normalise, compare by cosine"),
    }


def evaluation_card(run: Path | None, name: str, fp: str) -> dict[str, Any]:
    """This model's rows of the run's reports (test and validation split), when there are any."""
    if run is None:
        return {"reports": [], "note": "no report found: the model is not in a run directory "
                                       "(RUN/models/<name>/model.safetensors)"}
    candidates = [*(("test", p) for p in split_reports(run)),
                  ("validation", run / "validation" / "report.json")]
    reports = [_report_entry(p, split, name, fp) for split, p in candidates if p.is_file()]
    if not reports:
        return {"reports": [], "note": f"no report found in {run} (the run's evaluation has not finished)"}
    return {"reports": reports}


def _report_entry(path: Path, split: str, name: str, fp: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"split": split, "path": str(path)}
    try:
        rep = read_json(path, allow_nan=True)  # reports of older versions hold NaN for n/m values
    except FileFormatError as exc:
        return {**entry, "note": str(exc)}
    info = (rep.get("models") or {}).get(name)
    entry["dataset"] = rep.get("dataset")
    if info is None:
        return {**entry, "note": f"the report evaluates no model named {name!r}"}
    if info.get("fingerprint") != fp:
        return {**entry, "note": f"the report evaluated another version of {name!r} (fingerprint "
                                 f"{info.get('fingerprint')}), not this model: its results are left out"}
    entry["flip_test"] = ((rep.get("config") or {}).get("evaluation") or {}).get("flip")
    entry["criterion"] = (rep.get("compatibility") or {}).get(name)
    entry["results"] = [r for r in rep.get("results", []) if name in (r["query_model"], r["gallery_model"])]
    chain = rep.get("chain")
    if chain and name in chain.get("models", []):
        i = chain["models"].index(name)
        entry["chain"] = {"models": chain["models"], **{
            m: {"row": v["matrix"][i], "criterion": v["criterion"][i]}
            for m, v in chain.items() if m != "models"}}
    return entry
