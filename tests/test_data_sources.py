"""Record sources: JSONL (+gz), Parquet, ArrayRecord, TFDS error, globs, pickling, grain."""

import gzip
import json
import os
import pickle
import sys
import types

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jaxpo.data.sources import RecordSource, file_kind

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "data")
RECORDS = [{"prompt": f"p{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(7)]


def write_jsonl(path, records, blank_after=()):
    with open(path, "w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps(r) + "\n")
            if i in blank_after:
                f.write("\n  \n" if i % 2 else "\r\n")
    return str(path)


def test_jsonl_line_numbers_skip_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", RECORDS[:3], blank_after=(0,))
    src = RecordSource(path)
    assert len(src) == 3
    assert [src[i].where.index for i in range(3)] == [1, 3, 4]
    assert str(src[2].where) == f"{path}:4"
    assert [src[i].data for i in range(3)] == RECORDS[:3]


def test_jsonl_without_final_newline_and_whitespace_line(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n   \n" + json.dumps(RECORDS[1]))
    src = RecordSource(str(path))
    # A whitespace-only line is a record line that fails to parse: reported, not silently lost.
    assert len(src) == 3 and src[1].error is not None and src[1].where.index == 2
    assert src[2].data == RECORDS[1]


def test_gzip_matches_plain(tmp_path):
    plain = write_jsonl(tmp_path / "c.jsonl", RECORDS)
    gz = tmp_path / "c.jsonl.gz"
    with open(plain, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    a, b = RecordSource(plain), RecordSource(str(gz))
    assert len(a) == len(b) == 7
    assert [a[i].data for i in range(7)] == [b[i].data for i in range(7)]
    assert b[4].where.index == 5 and b[4].where.file.endswith(".jsonl.gz")


def test_parquet_row_groups(tmp_path):
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS), path, row_group_size=3)
    src = RecordSource(path)
    assert len(src) == 7
    order = [6, 0, 4, 3, 5, 1, 2]  # jumps across row groups
    assert [src[i].data for i in order] == [RECORDS[i] for i in order]
    assert str(src[5].where) == f"{path}:row 5"


def test_array_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "e.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for r in RECORDS:
        writer.write(json.dumps(r).encode())
    writer.write(b"\xff not json")
    writer.close()
    src = RecordSource(path)
    assert len(src) == 8
    assert [src[i].data for i in (3, 0, 6)] == [RECORDS[3], RECORDS[0], RECORDS[6]]
    bad = src[7]
    assert bad.data is None and bad.error.reason == "bad_json"
    assert str(bad.error).startswith(f"{path}:row 7: field '<record>'")


def test_globs_and_several_files_index_globally(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", RECORDS[:3])
    write_jsonl(tmp_path / "part-1.jsonl", RECORDS[3:])
    pq.write_table(pa.Table.from_pylist(RECORDS[:2]), str(tmp_path / "x.parquet"))
    src = RecordSource([str(tmp_path / "part-*.jsonl"), str(tmp_path / "x.parquet")])
    assert len(src) == 9
    assert [src[i].id for i in range(9)] == list(range(9))
    assert src[4].data == RECORDS[4] and src[4].where.index == 2
    assert src[4].where.file.endswith("part-1.jsonl")
    assert src[8].data == RECORDS[1] and src[-1].data == RECORDS[1]
    with pytest.raises(IndexError):
        src[9]


def test_bad_json_line_is_reported_with_its_line(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    src = RecordSource(str(path))
    assert src[0].error is None
    assert str(src[1].error).startswith(f"{path}:2: field '<record>': invalid JSON")


def test_missing_files_and_unknown_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data file matches"):
        RecordSource(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(FileNotFoundError):
        RecordSource(str(tmp_path / "absent.jsonl"))
    (tmp_path / "g.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unknown data file type"):
        RecordSource(str(tmp_path / "g.csv"))
    assert file_kind("shard.array_record-00000-of-00004") == "array_record"


def test_tfds_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails as if absent
    with pytest.raises(ImportError, match=r"tfds:my_prefs:train.*jaxpo\[tfds\]"):
        RecordSource("tfds:my_prefs:train")


def test_tfds_source_reads_through_data_source(monkeypatch):
    calls = []
    rows = [{"prompt": b"p", "chosen": b"a", "rejected": b"b", "ref_chosen_logps": np.float32(-1)}]

    def data_source(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.setitem(sys.modules, "tensorflow_datasets",
                        types.SimpleNamespace(data_source=data_source))
    src = RecordSource("tfds:my_prefs/v2:test")
    assert calls == [("my_prefs/v2", "test")] and len(src) == 1
    assert src[0].data == {"prompt": "p", "chosen": "a", "rejected": "b", "ref_chosen_logps": -1.0}
    assert str(src[0].where) == "tfds:my_prefs/v2:test:row 0"


def test_pickled_source_reads_the_same(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", RECORDS)
    pq.write_table(pa.Table.from_pylist(RECORDS), str(tmp_path / "h.parquet"), row_group_size=2)
    src = RecordSource([path, str(tmp_path / "h.parquet")])
    src[0], src[9]  # open handles and caches before pickling
    again = pickle.loads(pickle.dumps(src))
    assert [again[i].data for i in range(14)] == RECORDS + RECORDS


def test_fixture_jsonl_and_parquet_hold_the_same_records():
    for name in ("pairs_explicit", "pairs_implicit", "pairs_conversational", "lists", "trees",
                 "trees_flat", "unpaired"):
        a = RecordSource(os.path.join(FIXTURES, f"{name}.jsonl"))
        b = RecordSource(os.path.join(FIXTURES, f"{name}.parquet"))
        assert len(a) == len(b) >= 2
        assert a[0].data.get("prompt") == b[0].data.get("prompt")
        assert a[0].data.get("chosen") == b[0].data.get("chosen")


def test_grain_map_dataset_over_a_source(tmp_path):
    import grain

    path = write_jsonl(tmp_path / "i.jsonl", RECORDS)
    ds = grain.MapDataset.source(RecordSource(path)).seed(3).shuffle().map(
        lambda r: r.data["prompt"])
    got = [ds[i] for i in range(len(ds))]
    assert sorted(got) == sorted(r["prompt"] for r in RECORDS)
    assert got == [ds[i] for i in range(len(ds))]  # deterministic


@pytest.mark.parametrize("name, text, why", [
    ("empty.jsonl", "", "the file is empty"),
    ("blank.jsonl", "\n\r\n\n", "only blank lines"),
    ("empty.jsonl.gz", "", "the file is empty"),
])
def test_a_file_without_records_is_a_one_line_error(tmp_path, name, text, why):
    path = str(tmp_path / name)
    with (gzip.open if name.endswith(".gz") else open)(path, "wt") as f:
        f.write(text)
    with pytest.raises(ValueError) as e:
        RecordSource([write_jsonl(tmp_path / "ok.jsonl", RECORDS), path])
    assert str(e.value) == f"{path}: no records ({why})"


def test_a_parquet_file_without_rows_is_an_error(tmp_path):
    path = str(tmp_path / "none.parquet")
    pq.write_table(pa.Table.from_pylist(RECORDS).slice(0, 0), path)
    with pytest.raises(ValueError, match=r"none.parquet: no records \(0 rows\)"):
        RecordSource(path)


def test_a_record_over_max_record_bytes_is_a_bad_record_not_decoded(tmp_path):
    huge = json.dumps({"prompt": "x" * 3000, "chosen": "a", "rejected": "b"})
    path = tmp_path / "j.jsonl"
    path.write_text(f"{json.dumps(RECORDS[0])}\n{huge[:-1]}\n{json.dumps(RECORDS[1])}\n")
    with open(path, "rb") as f, gzip.open(tmp_path / "j.jsonl.gz", "wb") as g:
        g.write(f.read())
    for p in (str(path), str(tmp_path / "j.jsonl.gz")):
        src = RecordSource(p, max_record_bytes=1000)
        assert len(src) == 3 and src[0].data == RECORDS[0] and src[2].data == RECORDS[1]
        # Not decoded: the line is cut short (invalid JSON), yet the error is its size.
        assert src[1].data is None and src[1].error.reason == "too_large"
        assert str(src[1].error) == (f"{p}:2: field '<record>': record is {len(huge) - 1} "
                                     "bytes, over data.max_record_bytes=1000")
        assert RecordSource(p)[1].error.reason == "bad_json"  # within the default limit


def test_array_record_over_max_record_bytes(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "k.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(json.dumps(RECORDS[0]).encode())
    writer.write(json.dumps({"prompt": "x" * 2000}).encode())
    writer.close()
    src = RecordSource(path, max_record_bytes=1000)
    assert src[0].data == RECORDS[0]
    assert src[1].error.reason == "too_large" and str(src[1].error).startswith(f"{path}:row 1:")


def test_indexing_memory_does_not_grow_with_a_long_line(tmp_path, monkeypatch):
    import tracemalloc

    from jaxpo.data import sources

    monkeypatch.setattr(sources, "_CHUNK", 1 << 20, raising=False)
    path = tmp_path / "long.jsonl"
    with open(path, "w") as f:
        f.write(json.dumps(RECORDS[0]) + "\n")
        f.write(json.dumps({"prompt": "x" * (8 << 20)}) + "\n")
        f.write(json.dumps(RECORDS[1]) + "\n")
    tracemalloc.start()
    try:
        src = RecordSource(str(path), max_record_bytes=1 << 16)
        assert src[1].error.reason == "too_large" and src[2].data == RECORDS[1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"indexing and reading peaked at {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_chunked_indexing_finds_the_same_lines_at_every_chunk_size(tmp_path, monkeypatch, chunk):
    from jaxpo.data import sources

    monkeypatch.setattr(sources, "_CHUNK", chunk, raising=False)
    text = ("\r\n" + json.dumps(RECORDS[0]) + "\r\n\n\r\n" + json.dumps(RECORDS[1]) + "\n\r\n"
            + json.dumps(RECORDS[2]) + "\r")
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(text.encode())
    src = RecordSource(str(path))
    assert [src[i].where.index for i in range(len(src))] == [2, 5, 7]
    assert [src[i].data for i in range(len(src))] == RECORDS[:3]
    (tmp_path / "cr.jsonl").write_bytes(b"\n\r")  # a lone CR at the end is blank too
    with pytest.raises(ValueError, match="only blank lines"):
        RecordSource(str(tmp_path / "cr.jsonl"))
