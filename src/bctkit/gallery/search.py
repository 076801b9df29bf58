"""Mixed-version search, the part every backend shares: which versions may be compared (a stored
passed certificate per ordered pair of versions), the blocks each query version searches (a
version's own items on all coordinates, another version's only on a certificate's dims), and the
result type. Each backend searches its blocks under the ranking rule (:mod:`bctkit.gallery.ranking`)
and merges them with :func:`~bctkit.gallery.ranking.merge`."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from bctkit.gallery.checks import GalleryError, Version

Block = tuple[int, int, int]
"""(version id, first coordinate, end coordinate) of the gallery side of one search block."""


class SearchResult(NamedTuple):
    """Per query: the ids found, best first, their cosine scores [Q, k] float32 and their versions.

    Every row has min(k, items searched) places; a place an approximate index left empty has id "",
    version "" and score -inf.
    """

    ids: list[list[str]]
    scores: np.ndarray
    versions: list[list[str]]


def check_k(k: Any) -> int:
    """``k`` as a positive int; anything else is refused."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise GalleryError(f"search: k must be a positive integer, got {k!r}")
    return int(k)


def plan_blocks(v: Version, versions: Sequence[Version], certs: Mapping[int, dict]
                ) -> list[tuple[Block, tuple[int, int]]]:
    """(gallery block, query coordinates) for every version with items that ``v`` queries search;
    ``certs``: the stored certificates of ``v`` queries by gallery version id. Refused when a
    version holding items has no certificate."""
    blocked = _uncertified(v.fingerprint, versions, {u.fingerprint for u in versions if u.vid in certs})
    if blocked is not None:
        raise _refused(v.label, blocked)
    plan = []
    for u in versions:
        if u.count == 0:
            continue
        if u.vid == v.vid:
            plan.append(((u.vid, 0, u.dim), (0, v.dim)))
            continue
        (qa, qb), (ga, gb) = certs[u.vid]["query_dims"], certs[u.vid]["gallery_dims"]
        plan.append(((u.vid, int(ga), int(gb)), (int(qa), int(qb))))
    return plan


def search_blocker(store: Any, fingerprint: str) -> Version | None:
    """The first version holding items of ``store`` that queries of version ``fingerprint`` (declared
    or not) may not search, or None; from the declared versions and stored certificates alone."""
    versions = [Version(i, fp, info["name"], info["dim"], info["layout"], info["count"])
                for i, (fp, info) in enumerate(store.versions().items())]
    certified = {c["gallery"]["fingerprint"] for c in store.certificates()
                 if c["query"]["fingerprint"] == fingerprint}
    return _uncertified(fingerprint, versions, certified)


def check_search_allowed(store: Any, fingerprint: str, name: str | None = None) -> None:
    """Refuse queries of version ``fingerprint`` (declared in ``store`` or not; ``name`` for the
    message) that may not search every version holding items, decided from the declared versions
    and stored certificates alone: a caller checks before it declares the version or embeds a query."""
    blocked = search_blocker(store, fingerprint)
    if blocked is not None:
        raise _refused(f"{name} ({fingerprint})" if name else fingerprint, blocked)


def _uncertified(fingerprint: str, versions: Sequence[Version], certified: Collection[str]
                 ) -> Version | None:
    """The first version holding items that ``fingerprint`` queries may not search: neither their
    own version nor one a stored passed certificate (query -> it) allows."""
    return next((u for u in versions
                 if u.count and u.fingerprint != fingerprint and u.fingerprint not in certified), None)


def _refused(label: str, u: Version) -> GalleryError:
    return GalleryError(f"search: {label} queries cannot search the {u.count} items of {u.label}: "
                        "a passed compatibility certificate for this pair is needed "
                        "(bctkit gallery certify) or those items must be backfilled")
