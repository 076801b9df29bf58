"""Compatibility certificates: hash, tampering, compared dims, the evaluate_suite hook and the CLI."""

import errno
import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import torch

from bctkit.cli import main
from bctkit.errors import FileFormatError
from bctkit.evaluation.certificate import (
    CertificateError,
    certificates_for_report,
    compared_dims,
    make_certificate,
    verify_certificate,
    write_certificate,
    write_certificates,
)
from bctkit.evaluation.protocols import EvalProtocol
from bctkit.evaluation.suite import evaluate_suite, models_info_from_features
from bctkit.features import FeatureSet
from bctkit.storage import json_safe

IDS, PER_ID = 8, 4


def _features() -> dict[str, FeatureSet]:
    """old (16-d), new (24-d, leading 16 compatible), v3 (32-d: 24 with new, 16 with old), bad (16-d
    noise: fails the criterion) and paragon (16-d independent)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(IDS).repeat_interleave(PER_ID)
    centers = torch.randn(IDS, 16, generator=g)
    n = len(labels)

    def noisy(scale: float) -> torch.Tensor:
        return centers[labels] + scale * torch.randn(n, 16, generator=g)

    new = torch.cat([noisy(0.6), torch.randn(n, 8, generator=g)], 1)
    v3 = torch.cat([new + 0.05 * torch.randn(n, 24, generator=g), torch.randn(n, 8, generator=g)], 1)
    return {
        "old": FeatureSet(noisy(1.6), labels, {"model_fingerprint": "fp-old"}),
        "paragon": FeatureSet(noisy(0.4), labels, {"model_fingerprint": "fp-par"}),
        "new": FeatureSet(new, labels, {"model_fingerprint": "fp-new", "compat_dims": 16}),
        "v3": FeatureSet(v3, labels, {"model_fingerprint": "fp-v3", "compat_dims": 24,
                                      "compat_prefixes": [24, 16]}),
        "bad": FeatureSet(torch.randn(n, 16, generator=g), labels, {"model_fingerprint": "fp-bad"}),
    }


PROTOCOL = EvalProtocol("syn", torch.arange(IDS).repeat_interleave(PER_ID), 1, (1e-3, 0.1), (1, 2))


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    feats = _features()
    report = evaluate_suite(feats, PROTOCOL, out, models_info_from_features(feats), {"dataset": "syn"},
                            backfill=False, chain=["old", "new", "v3"])
    return out, feats, report


def _top1(query: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> float:
    """Closed-set top-1 with the first image of each identity as the gallery (cosine)."""
    first = torch.tensor([i % PER_ID == 0 for i in range(len(labels))])
    q = torch.nn.functional.normalize(query[~first], dim=1)
    g = torch.nn.functional.normalize(gallery[first], dim=1)
    return float((labels[first][(q @ g.T).argmax(1)] == labels[~first]).float().mean())


def _top1_hits(query: torch.Tensor, gallery: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each probe's closed-set top-1 hit, as :func:`_top1` counts them."""
    first = torch.tensor([i % PER_ID == 0 for i in range(len(labels))])
    q = torch.nn.functional.normalize(query[~first], dim=1)
    g = torch.nn.functional.normalize(gallery[first], dim=1)
    return labels[first][(q @ g.T).argmax(1)] == labels[~first]


def test_certificate_states_its_pairs_flips_counted_by_hand(suite):
    out, feats, report = suite
    labels = feats["old"].labels
    ref = _top1_hits(feats["old"].feats, feats["old"].feats, labels)
    hits = _top1_hits(feats["new"].feats[:, :16], feats["old"].feats, labels)  # compared dims [0, 16)
    negative, positive = int((ref & ~hits).sum()), int((~ref & hits).sum())
    assert negative + positive > 0  # the case is not trivial
    cert = verify_certificate(out / "certificates" / "new__old.json")
    n = len(ref)
    assert cert["flips"] == {"negative_flip_rate": negative / n, "positive_flip_rate": positive / n,
                             "negative_flips": negative, "positive_flips": positive, "n": n}
    entry = next(f for f in report["flips"] if (f["query_model"], f["gallery_model"]) == ("new", "old"))
    assert {k: entry[k] for k in cert["flips"]} == cert["flips"]
    listed = next(c for c in report["certificate_results"] if c["file"] == "certificates/new__old.json")
    assert listed["negative_flip_rate"] == negative / n
    table = (out / "report.md").read_text().split("## Negative flips", 1)[1]
    assert f"| new / old | {100 * negative / n:.2f} ({negative}) |" in table


def _rehash(cert: dict) -> dict:
    body = {k: v for k, v in cert.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {**body, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


def test_hash_round_trip(suite, tmp_path):
    out, _, report = suite
    cert = json.loads((out / report["certificates"][0]).read_text())
    assert _rehash(cert)["sha256"] == cert["sha256"]
    assert set(cert) == {"format", "version", "query", "gallery", "query_dims", "gallery_dims", "protocol",
                         "metrics", "criterion", "passed", "update_gain", "flips", "issued_by", "sha256"}
    assert set(cert["flips"]) == {"negative_flip_rate", "positive_flip_rate", "negative_flips",
                                  "positive_flips", "n"}
    # a certificate issued before flips were measured has none, and still verifies
    old_style = _rehash({k: v for k, v in cert.items() if k != "flips"})
    assert verify_certificate(old_style) == old_style
    write_certificate(tmp_path / "copy.json", cert)
    assert verify_certificate(tmp_path / "copy.json") == cert
    assert verify_certificate(cert) == cert
    assert cert["format"] == "bctkit-compatibility-certificate" and cert["version"] == 1
    assert cert["issued_by"].startswith("bctkit ")
    feats = _features()
    named = make_certificate("новая", feats["new"], "old", feats["old"], cert["metrics"], {"dataset": "é"})
    assert named["sha256"] == _rehash(named)["sha256"]  # canonical JSON keeps non-ASCII as UTF-8
    write_certificate(tmp_path / "named.json", named)
    assert verify_certificate(tmp_path / "named.json")["query"]["name"] == "новая"


def _edit_metric(c: dict) -> None:
    c["metrics"]["top1"]["cross"] = 0.99


def _edit_fingerprint(c: dict) -> None:
    c["query"]["fingerprint"] = "fp-other"


def _edit_hash(c: dict) -> None:
    c["sha256"] = "0" * 64


@pytest.mark.parametrize("edit", [_edit_metric, _edit_fingerprint, _edit_hash])
def test_edited_certificate_fails_on_its_hash(suite, tmp_path, edit):
    out, _, report = suite
    cert = json.loads((out / report["certificates"][0]).read_text())
    edit(cert)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(cert))
    with pytest.raises(CertificateError) as err:
        verify_certificate(path)
    assert str(err.value) == f"{path}: hash does not match its contents (edited after it was issued?)"


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("metrics"), "missing field 'metrics'"),
    (lambda c: c.update(version=2), "version 2 is newer than this bctkit reads (1); upgrade bctkit"),
    (lambda c: c.update(format="something-else"), "unknown format 'something-else'"),
    (lambda c: c.update(query_dims=[0, 40]), "'query_dims' [0, 40] lies outside the 24-d embedding"),
    (lambda c: c.update(query_dims=[0, 8]), "query_dims [0, 8] and gallery_dims [0, 16] differ in length"),
    (lambda c: c.update(passed=not c["passed"]), "'passed' does not follow"),
    (lambda c: c["query"].update(embedding_dim="24"), "'query.embedding_dim' must be a positive integer"),
])
def test_malformed_certificate_fails_even_when_rehashed(suite, tmp_path, edit, message):
    """Checks beyond the hash: an edit whose hash was recomputed (anyone can) is still caught."""
    out, _, report = suite
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    edit(cert)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_rehash(cert)))
    with pytest.raises(CertificateError) as err:
        verify_certificate(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_not_json_and_missing_file(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(CertificateError, match="x.json: not valid JSON"):
        verify_certificate(tmp_path / "x.json")
    with pytest.raises(CertificateError, match="nope.json: file not found"):
        verify_certificate(tmp_path / "nope.json")


@pytest.mark.parametrize("where", ["metrics.top1.self", "protocol.dataset"])
def test_nan_in_a_certificate_is_refused_naming_the_field(suite, tmp_path, capsys, where):
    """Python's json reads NaN; a certificate holding one (anywhere, even where any value goes) is
    refused on one line naming the field, from a file, from the CLI and as a dict."""
    out, _, _ = suite
    cert = json.loads((out / "certificates" / "new__old.json").read_text())
    *parents, key = where.split(".")
    node = cert
    for part in parents:
        node = node[part]
    node[key] = math.nan
    path = tmp_path / "nan.json"
    path.write_text(json.dumps(cert))
    expected = f"{path}: field '{where}' is NaN; expected a finite number or null"
    with pytest.raises(CertificateError) as err:
        verify_certificate(path)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    with pytest.raises(CertificateError, match=f"certificate: field '{where}' is NaN"):
        verify_certificate(cert)
    assert main(["certificate", "verify", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith(f"FAILED {expected}") and len(captured.out.splitlines()) == 1
    assert captured.err == ""


def test_deeply_nested_json_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["certificate", "verify", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"FAILED {path}: JSON nested deeper than 100 levels\n" and captured.err == ""


def test_certificate_write_on_a_full_disk_is_one_line_and_leaves_nothing(suite, tmp_path, monkeypatch):
    out, _, _ = suite
    cert = verify_certificate(out / "certificates" / "new__old.json")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(FileFormatError) as err:
        write_certificates(tmp_path / "certs", [cert])
    target = tmp_path / "certs" / "new__old.json"
    assert str(err.value) == f"{target}: could not write (No space left on device)"
    assert list((tmp_path / "certs").iterdir()) == []


def test_compared_dims_plain_wide_and_bt2():
    labels = torch.arange(4)
    old = FeatureSet(torch.randn(4, 128), labels, {})
    plain = FeatureSet(torch.randn(4, 128), labels, {})
    wide = FeatureSet(torch.randn(4, 256), labels, {"compat_dims": 128})
    layout = {"bct": [0, 128], "added": [128, 160]}
    bt2 = FeatureSet(torch.randn(4, 160), labels, {"compat_dims": 128, "layout": layout})
    unrelated = FeatureSet(torch.randn(4, 256), labels, {})
    assert compared_dims(plain, old) == ([0, 128], [0, 128])
    assert compared_dims(wide, old) == ([0, 128], [0, 128])
    assert compared_dims(bt2, old) == (layout["bct"], [0, old.dim])
    assert compared_dims(old, bt2) == ([0, 128], [0, 128])  # old queries on a bt2 gallery: its bct block
    assert compared_dims(unrelated, old) is None
    with pytest.raises(CertificateError, match="no coordinates in common"):
        make_certificate("u", unrelated, "old", old, {"top1": {}}, {})


def test_certificate_dims_reproduce_the_cross_test(suite):
    """Slicing the features at the certified dims gives the certified cross top-1 (own computation)."""
    out, feats, _ = suite
    for name in ("new__old", "v3__old", "v3__new"):
        cert = json.loads((out / "certificates" / f"{name}.json").read_text())
        q, g = feats[cert["query"]["name"]], feats[cert["gallery"]["name"]]
        (qa, qb), (ga, gb) = cert["query_dims"], cert["gallery_dims"]
        assert (qa, qb, ga, gb) == (0, g.dim, 0, g.dim)  # leading block of the gallery model's size
        assert cert["query"]["embedding_dim"] == q.dim and cert["gallery"]["embedding_dim"] == g.dim
        assert cert["metrics"]["top1"]["cross"] == pytest.approx(
            _top1(q.feats[:, qa:qb], g.feats[:, ga:gb], q.labels))
        assert cert["metrics"]["top1"]["old_self"] == pytest.approx(_top1(g.feats, g.feats, g.labels))


def test_evaluate_suite_writes_certificates(suite):
    out, feats, report = suite
    expected = {"new__old", "v3__old", "bad__old", "v3__new"}
    assert sorted(report["certificates"]) == sorted(f"certificates/{n}.json" for n in expected)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["certificates"] == report["certificates"]
    assert {p.stem for p in (out / "certificates").iterdir()} == expected  # no paragon certificate
    compat = json_safe(report["compatibility"])
    for rel in report["certificates"]:
        cert = verify_certificate(out / rel)
        q, g = cert["query"]["name"], cert["gallery"]["name"]
        assert cert["query"]["fingerprint"] == feats[q].meta["model_fingerprint"]
        assert cert["gallery"]["fingerprint"] == feats[g].meta["model_fingerprint"]
        assert cert["criterion"]["metric"] == "top1"
        if g == "old":
            assert cert["metrics"] == compat[q]
        top1 = cert["metrics"]["top1"]
        assert cert["criterion"] == {"metric": "top1", "cross": top1["cross"], "old_self": top1["old_self"],
                                     "passed": top1["cross"] > top1["old_self"]}
        assert cert["passed"] is cert["criterion"]["passed"]
        assert cert["update_gain"] == top1["update_gain"]
        assert cert["protocol"]["probes"] == IDS * (PER_ID - 1) and cert["protocol"]["gallery_images"] == IDS
        assert cert["protocol"]["topk"] == [1, 2] and cert["protocol"]["fars"] == [1e-3, 0.1]
    assert report["compatibility"]["new"]["top1"]["criterion"] is True
    assert report["compatibility"]["new"]["top1"]["update_gain"] is not None
    assert math.isnan(report["compatibility"]["new"]["tar@far=1e-3"]["cross"])  # too few impostors
    bad = verify_certificate(out / "certificates" / "bad__old.json")  # a failed criterion is recorded
    assert bad["passed"] is False and bad["criterion"]["cross"] < bad["criterion"]["old_self"]
    chain = verify_certificate(out / "certificates" / "v3__new.json")
    pick = {(r["query_model"], r["gallery_model"]): r["value"]
            for r in report["results"] if r["metric"] == "top1"}
    assert chain["metrics"]["top1"]["cross"] == pick[("v3", "new")]
    assert chain["metrics"]["top1"]["old_self"] == pick[("new", "new")]
    assert chain["metrics"]["top1"]["self"] == pick[("v3", "v3")]


def test_certificates_without_protocol_read_rates_from_the_report(suite):
    _, feats, report = suite
    with_protocol = certificates_for_report(report, feats, PROTOCOL)
    without = certificates_for_report(report, feats)
    assert [c["metrics"] for c in without] == [c["metrics"] for c in with_protocol]
    assert without[0]["protocol"]["topk"] == [1, 2] and without[0]["protocol"]["fars"] == [1e-3, 0.1]
    with pytest.raises(CertificateError, match="no features of model 'v3'"):
        certificates_for_report(report, {k: v for k, v in feats.items() if k != "v3"})


def test_first_identification_metric_when_no_top1(tmp_path):
    labels = torch.arange(IDS).repeat_interleave(PER_ID)
    feats = {k: v for k, v in _features().items() if k in ("old", "new")}
    protocol = EvalProtocol("syn", labels, 1, (0.1,), (2,), (0.5,))
    report = evaluate_suite(feats, protocol, tmp_path, models_info_from_features(feats), backfill=False)
    cert = verify_certificate(tmp_path / report["certificates"][0])
    assert cert["criterion"]["metric"] == "top2"
    protocol = EvalProtocol("syn", labels, 1, (0.1,), (2, 1))
    report = evaluate_suite(feats, protocol, tmp_path / "t", models_info_from_features(feats), backfill=False)
    assert list(report["compatibility"]["new"])[0] == "top2"
    cert = verify_certificate(tmp_path / "t" / report["certificates"][0])
    assert cert["criterion"]["metric"] == "top1"
    protocol = EvalProtocol("syn", labels, 1, (0.1,), (1,), identification=False)
    report = evaluate_suite(feats, protocol, tmp_path / "v", models_info_from_features(feats), backfill=False)
    cert = verify_certificate(tmp_path / "v" / report["certificates"][0])
    assert cert["criterion"]["metric"] == "tar@far=1e-1"


def test_cli_verify_exit_codes(suite, tmp_path, capsys):
    out, _, _ = suite
    good, bad = out / "certificates" / "new__old.json", out / "certificates" / "bad__old.json"
    assert main(["certificate", "verify", str(good)]) == 0
    line = capsys.readouterr().out
    assert line.startswith(f"OK {good}: new (fp-new) queries on old (fp-old)") and line.endswith("passed\n")
    assert ", negative flips " in line and " of 24 queries, passed" in line
    # a valid certificate whose claim failed: its own code (3), so a CI gate stops on it
    assert main(["certificate", "verify", str(good), str(bad)]) == 3
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"OK {good}: new (fp-new) queries on old (fp-old)")
    assert lines[0].endswith("passed")
    assert lines[1].startswith(f"CLAIM FAILED {bad}: bad") and lines[1].endswith("failed")
    edited = json.loads(good.read_text())
    edited["metrics"]["top1"]["self"] = 0.5
    (tmp_path / "edited.json").write_text(json.dumps(edited))
    hash_error = "hash does not match its contents (edited after it was issued?)"
    # the worst code wins whatever the order: 2 (invalid) over 3 (failed claim) over 0
    for files in ([good, tmp_path / "edited.json", bad], [bad, tmp_path / "edited.json"]):
        assert main(["certificate", "verify", *map(str, files)]) == 2
        lines = capsys.readouterr().out.splitlines()
        assert len(lines) == len(files)
        assert f"FAILED {tmp_path / 'edited.json'}: {hash_error}" in lines
        assert sum(ln.startswith("CLAIM FAILED ") for ln in lines) == 1
    assert main(["certificate", "verify", str(tmp_path / "missing.json")]) == 2
    assert capsys.readouterr().out.strip() == f"FAILED {tmp_path / 'missing.json'}: file not found"


def test_report_md_lists_every_certificate_with_its_result(suite):
    out, _, report = suite
    md = (out / "report.md").read_text()
    section = md.split("## Compatibility certificates", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| [certificates/")]
    assert len(rows) == len(report["certificates"]) == 4
    for rel in report["certificates"]:
        cert = verify_certificate(out / rel)
        row = next(r for r in rows if r.startswith(f"| [{rel}]"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{cert['query']['name']} → {cert['gallery']['name']}"
        assert cells[3] == f"{100 * cert['criterion']['cross']:.2f}"
        assert cells[5] == ("passed" if cert["passed"] else "failed")
        assert cells[6] == f"`{cert['sha256'][:16]}`"
