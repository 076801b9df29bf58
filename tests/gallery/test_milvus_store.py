"""Refusals of the Milvus backend, each one line from the library (GalleryError or FileFormatError)
and exit 2 from ``bctkit gallery``, writing nothing: store strings of neither form, an unreachable
server, collections bctkit did not create or whose dimension disagrees with its record, creating
over a collection, a version wider than the collection, over-long ids, metadata and fingerprints,
and a Lite file another process holds."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pymilvus import DataType, MilvusClient

from bctkit.cli import main
from bctkit.errors import BctkitError, FileFormatError
from bctkit.evaluation.certificate import make_certificate, write_certificate
from bctkit.features import FeatureSet
from bctkit.gallery import GalleryError, create_gallery, open_gallery, parse_store
from bctkit.gallery.backends.milvus.client import FP_MAX, ID_MAX, VALUE_MAX, disconnect
from tests.gallery.conftest import state

ROOT = Path(__file__).resolve().parents[2]


def one_line(info: pytest.ExceptionInfo, error: type[BaseException] = GalleryError) -> str:
    """The message of a refusal: a bctkit error of type ``error``, one line."""
    assert isinstance(info.value, error) and isinstance(info.value, BctkitError)
    assert "\n" not in str(info.value)
    return str(info.value)


def cli_error(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    """``bctkit gallery ...`` exits 2 printing one error line; that line."""
    capsys.readouterr()
    assert main(["gallery", *argv]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def files(root: Path) -> list[Path]:
    return sorted(root.rglob("*"))


@pytest.fixture
def lite(tmp_path: Path) -> str:
    """A Milvus Lite gallery: version old (8-d) with 3 items, so the collection is 8-d."""
    where = f"milvus-lite:{tmp_path}/g.db"
    with create_gallery(where) as g:
        g.add_version("old", 8, name="old")
        g.add(["a", "b", "c"], np.eye(3, 8, dtype=np.float32), "old", [{"n": 1}, {}, {}])
    return where


@pytest.mark.parametrize(("store", "match"), [
    ("ftp://x/y", "not a store string bctkit reads"),
    ("milvus-lite:{tmp}/foo.txt", r"a Milvus Lite store is milvus-lite:PATH\.db"),
    ("milvus-lite:{tmp}/g.db#1bad", "collection '1bad' is not a Milvus collection name"),
    ("milvus-lite:{tmp}/g.db#bad-name", "collection 'bad-name' is not a Milvus collection name"),
    ("milvus://127.0.0.1:19530/has.dot", "collection 'has.dot' is not a Milvus collection name"),
    ("http://127.0.0.1:19530/", "not a store string bctkit reads"),
])
def test_a_store_string_of_neither_form_is_refused(tmp_path: Path, capsys, store: str, match: str) -> None:
    store = store.format(tmp=tmp_path)
    for call in (parse_store, create_gallery, open_gallery):
        with pytest.raises(GalleryError, match=match) as info:
            call(store)
        assert store in one_line(info)
    for cmd in ("create", "status"):
        assert match.replace("\\", "") in cli_error(capsys, [cmd, store]).replace("\\", "")
    assert files(tmp_path) == []


@pytest.mark.parametrize("store", [None, 3, b"g.db", ""])
def test_a_store_that_is_not_a_string_is_refused(store) -> None:
    for call in (parse_store, create_gallery, open_gallery):
        with pytest.raises(GalleryError, match="expected a folder path, milvus-lite:PATH.db") as info:
            call(store)
        one_line(info)


def test_a_lite_path_that_is_no_lite_store_is_refused_and_left_alone(tmp_path: Path, capsys) -> None:
    for store in (f"milvus-lite:{tmp_path}/new.db", f"milvus-lite:{tmp_path}/sub/new.db#g"):
        with pytest.raises(FileFormatError, match="no Milvus Lite file .*new.db") as info:
            open_gallery(store)
        one_line(info, FileFormatError)
        assert "no Milvus Lite file" in cli_error(capsys, ["status", store])
    assert "sub not exists" in cli_error(capsys, ["create", f"milvus-lite:{tmp_path}/sub/new.db"])
    assert files(tmp_path) == []
    (tmp_path / "file.db").write_text("not a store\n")
    for call in (create_gallery, open_gallery):
        with pytest.raises(FileFormatError, match=r"file\.db: not a Milvus Lite store \(a file") as info:
            call(f"milvus-lite:{tmp_path}/file.db")
        one_line(info, FileFormatError)
    for cmd in ("create", "status"):
        assert "not a Milvus Lite store" in cli_error(capsys, [cmd, f"milvus-lite:{tmp_path}/file.db"])
    assert files(tmp_path) == [tmp_path / "file.db"] and (tmp_path / "file.db").read_text() == "not a store\n"


def test_an_unreachable_server_fails_within_the_timeout(capsys) -> None:
    store = "milvus://127.0.0.1:1/g"
    for call in (lambda: open_gallery(store, timeout_s=5), lambda: create_gallery(store, timeout_s=5)):
        start = time.monotonic()
        refused = r"127\.0\.0\.1:1: could not connect to Milvus \(waiting at most 5 s\)"
        with pytest.raises(GalleryError, match=refused) as info:
            call()
        one_line(info)
        assert time.monotonic() - start < 15
    start = time.monotonic()
    assert "could not connect to Milvus (waiting at most" in cli_error(capsys, ["status", store])
    assert time.monotonic() - start < 15


def test_a_collection_bctkit_did_not_create_is_refused(tmp_path: Path, capsys) -> None:
    path = str(tmp_path / "plain.db")
    client = MilvusClient(path)
    client.create_collection("photos", dimension=8)
    client.insert("photos", [{"id": i, "vector": [float(i)] * 8} for i in range(4)])
    disconnect(client, "milvus-lite", path)
    store = f"milvus-lite:{path}#photos"
    with pytest.raises(FileFormatError, match="collection 'photos' was not created by bctkit") as info:
        open_gallery(store)
    one_line(info, FileFormatError)
    assert "was not created by bctkit" in cli_error(capsys, ["status", store])
    with pytest.raises(GalleryError, match="collection 'photos' exists; a new gallery needs a new"):
        create_gallery(store)
    assert "collection 'photos' exists" in cli_error(capsys, ["create", store])
    with pytest.raises(FileFormatError, match="no bctkit gallery 'other'"):
        open_gallery(f"milvus-lite:{path}#other")
    client = MilvusClient(path)
    try:  # nothing written: the foreign collection alone, its 4 entities
        assert client.list_collections() == ["photos"]
        client.load_collection("photos")
        assert client.query("photos", filter="", output_fields=["count(*)"])[0]["count(*)"] == 4
    finally:
        disconnect(client, "milvus-lite", path)


def test_an_items_collection_of_another_dim_than_the_record_is_refused(tmp_path: Path, capsys) -> None:
    """The items collection replaced by one of the same fields and 12-d vectors: refused on open."""
    store = f"milvus-lite:{tmp_path}/g.db#gal"
    create_gallery(store, dim=8).close()
    path = str(tmp_path / "g.db")
    client = MilvusClient(path)
    try:
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=ID_MAX)
        for name, kind in (("seq", DataType.INT64), ("prior", DataType.FLOAT)):
            schema.add_field(name, kind)
        for name in ("version", "meta"):
            schema.add_field(name, DataType.VARCHAR, max_length=256)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=12)
        client.drop_collection("gal")
        client.create_collection("gal", schema=schema)
    finally:
        disconnect(client, "milvus-lite", path)
    with pytest.raises(FileFormatError, match="collection 'gal' holds 12-d vectors but its bctkit record "
                                              "says 8") as info:
        open_gallery(store)
    one_line(info, FileFormatError)
    assert "holds 12-d vectors" in cli_error(capsys, ["status", store])


def test_creating_over_an_existing_gallery_is_refused(lite: str, capsys) -> None:
    before = state(lite)
    for index in ("Flat", "HNSW"):
        with pytest.raises(GalleryError, match="collection 'bctkit_gallery' exists; a new gallery needs a "
                                               "new collection name") as info:
            create_gallery(lite, index=index)
        one_line(info)
    assert "exists" in cli_error(capsys, ["create", lite])
    assert "exists" in cli_error(capsys, ["create", lite.replace("g.db", "g.db#bctkit_gallery")])
    assert state(lite) == before


def test_a_version_wider_than_the_collection_is_refused(lite: str, tmp_path: Path, capsys) -> None:
    """After the first add fixed the collection at 8 dims, a 12-d version (declared directly or by
    ``gallery certify``) is refused, pointing at --dim; a gallery created with --dim 12 takes it."""
    before = state(lite)
    with open_gallery(lite) as g, pytest.raises(GalleryError, match=r"add_version new: dim 12, but .* holds "
                                                                   r"vectors of at most 8 dims") as info:
        g.add_version("new", 12)
    assert "create the gallery with --dim 12 or more" in one_line(info)
    labels = torch.arange(4)
    q = FeatureSet(torch.randn(4, 12), labels, {"model_fingerprint": "new", "compat_dims": 8})
    gal = FeatureSet(torch.randn(4, 8), labels, {"model_fingerprint": "old"})
    metrics = {"top1": {"cross": 0.6, "old_self": 0.5, "self": 0.7, "criterion": True, "update_gain": 0.5}}
    write_certificate(tmp_path / "c.json", make_certificate("new", q, "old", gal, metrics, {"dataset": "t"}))
    assert "--dim 12" in cli_error(capsys, ["certify", lite, str(tmp_path / "c.json")])
    assert state(lite) == before
    wide = f"milvus-lite:{tmp_path}/wide.db"
    assert main(["gallery", "create", wide, "--dim", "12"]) == 0
    assert main(["gallery", "certify", wide, str(tmp_path / "c.json")]) == 0
    with open_gallery(wide) as g:
        g.add(["x"], np.ones((1, 8), np.float32), "old")
        g.add(["y"], np.ones((1, 12), np.float32), "new")
        assert g.find(["x", "y"]) == ["old", "new"] and g.dim == 12


def test_ids_metadata_and_fingerprints_too_long_for_the_collection_are_refused(lite: str, capsys) -> None:
    before = state(lite)
    long = "x" * (ID_MAX + 1)
    with open_gallery(lite) as g:
        for call in (lambda: g.add(["d", long], np.ones((2, 8), np.float32), "old"),
                     lambda: g.replace([long], np.ones((1, 8), np.float32), "old"),
                     lambda: g.delete(["a", long]), lambda: g.find([long])):
            with pytest.raises(GalleryError, match=f"ids longer than {ID_MAX} characters") as info:
                call()
            one_line(info)
        for call, match in (
                (lambda: g.add(["d"], np.ones((1, 8), np.float32), "old", [{"x": "y" * VALUE_MAX}]),
                 f"metadata longer than {VALUE_MAX} characters of JSON for 'd'"),
                (lambda: g.add_version('say "hi"', 8), "without quotes or backslashes"),
                (lambda: g.add_version("f" * (FP_MAX + 1), 8), f"of at most {FP_MAX} characters")):
            with pytest.raises(GalleryError, match=match) as info:
                call()
            one_line(info)
        g.add(["y" * ID_MAX], np.ones((1, 8), np.float32), "old")  # the longest id taken
        assert g.find(["y" * ID_MAX]) == ["old"]
        g.delete(["y" * ID_MAX])
    assert f"ids longer than {ID_MAX} characters" in cli_error(capsys, ["remove", lite, "a", long])
    assert state(lite) == before


HOLDER = textwrap.dedent("""
    import sys
    from bctkit.gallery import open_gallery
    with open_gallery(sys.argv[1]) as g:
        print(g.count(), flush=True)
        sys.stdin.readline()
""")


def test_a_lite_file_another_process_holds_is_refused(lite: str, capsys) -> None:
    before = state(lite)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, lite], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "3"  # it opened the file
        with pytest.raises(GalleryError, match="another process has it open: Milvus Lite admits one "
                                               "process at a time") as info:
            open_gallery(lite)
        one_line(info)
        assert "admits one process at a time" in cli_error(capsys, ["status", lite])
        assert "admits one process at a time" in cli_error(capsys, ["remove", lite, "a"])
        with pytest.raises(GalleryError, match="admits one process at a time"):
            create_gallery(lite.replace("g.db", "g.db#another"))
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    assert state(lite) == before  # the holder gone, the file opens again, unchanged
