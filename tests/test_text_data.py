"""Text datasets (pure, no Ray): byte tokens, blocks, the sources, the manifest, bad input."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lepton_ray import cli
from lepton_ray.data import open_dataset, prepare, read_arrays, text
from lepton_ray.errors import DataError

DOCS = ["Hello, world!\n", "Grüße aus Köln — ünïcode.\n" * 3, "", "the end"]


def _stream(docs):
    """What the blocks must cover: each non-empty document's bytes, EOT after each."""
    return b"".join(d.encode() + bytes([text.EOT]) for d in docs if d)


def _rebuilt(infos) -> tuple[bytes, np.ndarray]:
    """Every block of every split placed back at its offset: (the covered stream, ids sorted)."""
    rows, ids = [], []
    for info in infos.values():
        x, labels, i = read_arrays(info)
        assert labels.tolist() == [0] * len(i)
        rows.append(x.reshape(len(x), -1))
        ids.append(i)
    rows, ids = np.concatenate(rows), np.concatenate(ids)
    order = np.argsort(ids)
    rows, ids = rows[order], ids[order]
    t = rows.shape[1] - 1
    for a, b in zip(rows[:-1], rows[1:], strict=True):
        assert a[-1] == b[0]  # consecutive blocks share one token
    return bytes(rows[0]) + b"".join(bytes(r[1:]) for r in rows[1:]), ids * t


# --- tokens and blocks -------------------------------------------------------------------------
def test_bytes_round_trip():
    s = "naïve café ☕ 日本語"
    tokens = text.encode(s)
    assert tokens.dtype == np.uint8 and len(tokens) == len(s.encode("utf-8"))
    assert text.decode(tokens) == s
    assert text.decode(tokens[:-1]).endswith("\ufffd")  # a cut character, not an error


def test_blocks_overlap_by_one_token_and_drop_the_tail():
    tokens = np.arange(10, dtype=np.uint8)
    b = text.cut_blocks(tokens, 3)
    assert b.tolist() == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    assert text.cut_blocks(np.arange(12, dtype=np.uint8), 3).shape == (3, 4)  # 10, 11 dropped
    assert text.cut_blocks(np.arange(3, dtype=np.uint8), 3).shape == (0, 4)
    assert not b.flags.writeable  # a view of the stream, not a copy


def test_split_holds_out_a_seeded_tenth_of_the_blocks():
    s = text.split_blocks(25)
    assert len(s["test"]) == 2 and len(s["train"]) == 23  # round(2.5) = 2
    assert sorted([*s["train"], *s["test"]]) == list(range(25))
    assert text.split_blocks(25)["test"].tolist() == s["test"].tolist()
    assert len(text.split_blocks(2)["test"]) == 1


# --- sources -----------------------------------------------------------------------------------
def test_text_file_round_trip(tmp_path):
    src = tmp_path / "a.txt"
    body = "".join(DOCS)
    src.write_text(body, encoding="utf-8")
    infos = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    stream = body.encode() + bytes([text.EOT])
    covered, offsets = _rebuilt(infos)
    n = (len(stream) - 1) // 8
    assert offsets.tolist() == [8 * i for i in range(n)]
    assert covered == stream[: 8 * n + 1]
    train = infos["train"]
    assert train.kind == "text" and train.shape == (1, 9, 1) and train.classes == ()
    assert train.block_size == 8 and train.vocab_size == 256
    assert train.model_kwargs() == {"vocab_size": 256, "block_size": 8}
    m = json.loads((tmp_path / "ds" / "train" / "manifest.json").read_text())
    assert (m["kind"], m["tokenizer"], m["block_size"], m["classes"]) == ("text", "bytes", 8, [])
    assert infos["test"].num_rows == max(1, round(n * text.VAL_FRACTION))


def test_folder_of_text_files_in_path_order(tmp_path):
    d = tmp_path / "corpus"
    (d / "b").mkdir(parents=True)
    (d / "b" / "2.txt").write_text(DOCS[1])
    (d / "1.txt").write_text(DOCS[0])
    (d / "3.txt").write_text(DOCS[3])
    (d / "notes.md").write_text("not text for us")
    infos = prepare(f"text:{d}", str(tmp_path / "ds"), block_size=4)
    covered, _ = _rebuilt(infos)
    stream = _stream([DOCS[0], DOCS[3], DOCS[1]])  # 1.txt, 3.txt, b/2.txt: by path
    assert covered == stream[: len(covered)] and len(stream) - len(covered) < 4


def test_parquet_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": DOCS, "n": list(range(len(DOCS)))}), path)
    infos = prepare(f"text-parquet:{path}:body", str(tmp_path / "ds"), block_size=4)
    covered, _ = _rebuilt(infos)
    assert covered == _stream(DOCS)[: len(covered)]
    with pytest.raises(DataError, match=r"column 'n' holds int64, not text"):
        prepare(f"text-parquet:{path}:n", str(tmp_path / "ds2"), block_size=4)
    with pytest.raises(DataError, match=r"no column 'text' \(has body, n\)"):
        prepare(f"text-parquet:{path}", str(tmp_path / "ds3"), block_size=4)


def test_pydoc_topics_ship_with_python(tmp_path):
    docs = text.pydoc_topics()
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000
    infos = prepare("pydoc-topics", str(tmp_path / "ds"), block_size=256)
    n = sum(i.num_rows for i in infos.values())
    assert n == (len(text.join_documents(docs)) - 1) // 256
    assert infos["train"].manifest["source"] == "builtin:pydoc-topics/train"


def test_prepare_is_idempotent_per_block_size(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 10)
    first = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    again = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    assert again["train"].manifest["created_at"] == first["train"].manifest["created_at"]
    assert again["train"].shards == first["train"].shards  # nothing rewritten
    other = prepare(f"text:{src}", str(tmp_path / "ds"), block_size=16)
    assert other["train"].block_size == 16 and other["train"].shape == (1, 17, 1)


# --- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "block_size", "match"),
    [
        ("", 8, "the text is empty"),
        ("abc", 8, r"4 tokens make 0 block\(s\) of 9; at least 2 are needed"),
        ("abcdefghij", 1, "block_size must be a whole number >= 2"),
    ],
)
def test_bad_text_is_one_clear_error(tmp_path, content, block_size, match):
    src = tmp_path / "a.txt"
    src.write_text(content)
    with pytest.raises(DataError, match=match):
        prepare(f"text:{src}", str(tmp_path / "ds"), block_size=block_size)


def test_not_utf8_and_missing_paths(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe nope")
    with pytest.raises(DataError, match=r"bad.txt: not UTF-8 text \(byte 3\)"):
        prepare(f"text:{bad}", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no text file or folder at"):
        prepare(f"text:{tmp_path / 'missing.txt'}", str(tmp_path / "ds"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt files under"):
        prepare(f"text:{tmp_path / 'empty'}", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="block_size applies to text sources only"):
        prepare("mnist5k", str(tmp_path / "ds"), block_size=8)


def test_skip_bad_leaves_unreadable_files_out(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "a.txt").write_text("good text " * 10)
    (d / "b.txt").write_bytes(b"\xff" * 50)
    infos = prepare(f"text:{d}", str(tmp_path / "ds"), block_size=8, skip_bad=True)
    assert infos["train"].manifest["skipped_rows"] == 1
    assert "b.txt: not UTF-8 text" in infos["train"].manifest["skipped_examples"][0]


def test_cli_prepares_text_and_refuses_bad_input_in_one_line(tmp_path, capsys):
    src = tmp_path / "a.txt"
    src.write_text("some words to learn from. " * 20)
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", f"text:{src}", str(out), "--block-size", "16"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["kind"] == "text" and shown["train"]["block_size"] == 16
    assert cli.main(["data", "inspect", str(out / "test")]) == 0
    assert json.loads(capsys.readouterr().out)["block_size"] == 16
    assert cli.main(["data", "prepare", f"text:{src}", str(out), "--block-size", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lepton-ray: error: block_size must be a whole number >= 2, got 1"]


def test_a_tampered_text_manifest_is_refused(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("abcdefghij" * 10)
    prepare(f"text:{src}", str(tmp_path / "ds"), block_size=8)
    path = tmp_path / "ds" / "train" / "manifest.json"
    m = json.loads(path.read_text())
    for key, value, match in [
        ("shape", [1, 8, 1], r"'shape' must be \[1, 9, 1\]"),
        ("block_size", 1, "'block_size' must be a whole number >= 2"),
        ("vocab_size", 50304, "'tokenizer' must be 'bytes' with vocab_size 256"),
        ("kind", "audio", "'kind' must be one of image, text, text-label, ctr"),
        ("classes", ["a"], r"'classes' must be \[\] for text"),
    ]:
        path.write_text(json.dumps({**m, key: value}))
        with pytest.raises(DataError, match=match):
            open_dataset(str(tmp_path / "ds" / "train"))


# --- labelled text (kind "text-label") -----------------------------------------------------------
LABELLED = [
    ("a short one", "neg"),
    ("Grüße aus Köln, a text longer than the block of twelve bytes", "pos"),
    ("x, with a comma", "neg"),
    ('"quoted"\nover two lines', "10"),
    ("nine", "9"),
]


def _labelled_rows(infos) -> dict[int, tuple[bytes, str]]:
    """Every row of every split by id: (its tokens without the padding, its class name)."""
    out = {}
    for info in infos.values():
        x, labels, ids = read_arrays(info)
        assert x.shape[1:] == (1, info.block_size, 1) and info.kind == "text-label"
        for row, label, i in zip(x.reshape(len(x), -1), labels, ids, strict=True):
            out[int(i)] = (bytes(row).rstrip(b"\0"), info.classes[label])
    return out


def _check_labelled(infos, block: int = 12) -> None:
    assert set(infos) == {"train", "test"} and infos["test"].num_rows == 1  # a tenth, at least 1
    train = infos["train"]
    assert train.classes == ("9", "10", "neg", "pos")  # numbers in numeric order first
    assert train.manifest["kind"] == "text-label" and train.manifest["tokenizer"] == "bytes"
    assert train.model_kwargs() == {"vocab_size": 256, "block_size": block, "num_classes": 4}
    assert train.kind_fields() == {"block_size": block, "vocab_size": 256}
    rows = _labelled_rows(infos)
    assert sorted(rows) == list(range(len(LABELLED)))  # ids: row numbers in the source
    for i, (body, label) in enumerate(LABELLED):
        assert rows[i] == (body.encode()[:block], label)  # cut after 12 bytes, or padded


def test_csv_rows_as_byte_tokens_with_classes(tmp_path):
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "body", "sentiment"])
        w.writerows([k, body, label] for k, (body, label) in enumerate(LABELLED))
    infos = prepare(f"text-csv:{path}:body:sentiment", str(tmp_path / "ds"), block_size=12)
    _check_labelled(infos)
    assert infos["train"].manifest["source"] == f"text-csv:{path}:body:sentiment/train"
    again = prepare(f"text-csv:{path}:body:sentiment", str(tmp_path / "ds"), block_size=12)
    assert again["train"].shards == infos["train"].shards  # idempotent


def test_parquet_rows_with_integer_labels(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [b for b, _ in LABELLED], "label": [3, 1, 3, 1, 2]}), path)
    infos = prepare(f"text-label-parquet:{path}", str(tmp_path / "ds"))  # text, label; 128
    assert infos["train"].classes == ("1", "2", "3") and infos["train"].block_size == 128
    rows = _labelled_rows(infos)
    assert [rows[i][1] for i in range(5)] == ["3", "1", "3", "1", "2"]
    assert rows[1][0] == LABELLED[1][0].encode()  # shorter than 128: whole


def test_labelled_csv_on_s3(s3_server, s3_bucket, tmp_path):
    from lepton_ray import storage

    body = io.StringIO(newline="")
    csv.writer(body).writerows([("text", "label"), *LABELLED])
    src = f"s3://{s3_bucket}/raw/reviews.csv"
    storage.resolve(src, s3_server).write_bytes(body.getvalue().encode())
    infos = prepare(
        f"text-csv:{src}", f"s3://{s3_bucket}/ds", block_size=12, endpoint_url=s3_server
    )
    _check_labelled(infos)
    assert infos["train"].uri == f"s3://{s3_bucket}/ds/train"


@pytest.mark.parametrize(
    ("body", "arg", "match"),
    [
        ("body,label\nhi,a\nho,b\n", "", r"no column 'text' \(has body, label\); name the columns"),
        ("text,label\nhi,a\nho,a\nhu,a\n", "", "every row has label 'a': a classifier needs at least 2"),
        ("text,label\nhi,a\n", "", r"1 labelled row\(s\); at least 2"),
        ("text,label\nhi,a\n,b\n", "", "line 3: text is empty"),
        ("text,label\nhi,a\nho,\n", "", "line 3: label is empty"),
        ("text,label\nhi,a\nho,b,c\n", "", "line 3: has 3 fields, the header 2"),
        ("text,label\nhi\x00there,a\nho,b\n", "", r"line 2: text holds U\+0000"),
        ("", "", "no header row"),
        ("text,label\nhi,a\n", ":label", "name both columns"),
    ],
)  # fmt: skip
def test_bad_labelled_csv_is_one_clear_error(tmp_path, body, arg, match):
    path = tmp_path / "a.csv"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=match):
        prepare(f"text-csv:{path}{arg}", str(tmp_path / "ds"), block_size=8)


def test_bad_labelled_files_and_skip_bad(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"text,label\nok,a\n\xff\xfe,b\n")
    with pytest.raises(DataError, match=r"bad.csv: not UTF-8 text \(byte 16\)"):
        prepare(f"text-csv:{bad}", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="no CSV file at"):
        prepare(f"text-csv:{tmp_path / 'missing.csv'}", str(tmp_path / "ds"))
    with pytest.raises(DataError, match="is a folder: text-csv reads one CSV file"):
        prepare(f"text-csv:{tmp_path}", str(tmp_path / "ds"))
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", None, "c", ""], "label": [1.0, 2.0, 1.0, 2.0]}), p)
    with pytest.raises(DataError, match=r"column 'label' holds double, not labels"):
        prepare(f"text-label-parquet:{p}", str(tmp_path / "ds"))
    pq.write_table(
        pa.table({"text": ["a", None, "c", "", "e"], "label": ["x", "y", "y", "x", None]}), p
    )
    with pytest.raises(DataError, match=r"t.parquet row 1: text is null"):
        prepare(f"text-label-parquet:{p}", str(tmp_path / "ds"))
    infos = prepare(f"text-label-parquet:{p}", str(tmp_path / "ds"), skip_bad=True)
    m = infos["train"].manifest
    assert m["skipped_rows"] == 3 and sum(i.num_rows for i in infos.values()) == 2
    assert m["skipped_examples"] == [
        "t.parquet row 1: text is null",
        "t.parquet row 3: text is empty",
        "t.parquet row 4: label is null",
    ]


def test_python_snippets_is_balanced_learnable_and_not_a_length_rule():
    """The built-in corpus: three classes of equal size (majority = 1/3), deterministic, and a
    rule on lengths (each length bin's most common class, fitted on the rows themselves) stays far
    from perfect: the classes overlap in length."""
    from lepton_ray.data import labelled_text as lt

    texts, labels = lt.python_snippets()
    assert (texts, labels) == lt.python_snippets()
    counts = {c: labels.count(c) for c in set(labels)}
    assert set(counts) == {"code", "docstring", "reference"} and len(set(counts.values())) == 1
    assert len(texts) > 3000 and len(set(texts)) == len(texts)
    assert all(lt.text_problem(t) is None for t in texts)
    lengths = np.minimum([len(t.encode()) for t in texts], 128) // 8  # bins as a 128-byte block
    y = np.asarray([sorted(counts).index(label) for label in labels])
    best = sum(np.bincount(y[lengths == b]).max() for b in np.unique(lengths))
    assert best / len(y) < 0.55, best / len(y)


def test_cli_prepares_labelled_text(tmp_path, capsys):
    src = tmp_path / "a.csv"
    src.write_text("text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate("abcdefghij")))
    out = tmp_path / "ds"
    assert cli.main(["data", "prepare", f"text-csv:{src}", str(out), "--block-size", "4"]) == 0
    shown = json.loads(capsys.readouterr().out)["train"]
    assert (shown["kind"], shown["block_size"], shown["classes"], shown["rows"]) == (
        "text-label", 4, 2, 9,
    )  # fmt: skip
    assert cli.main(["data", "inspect", str(out / "test")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["kind"] == "text-label" and shown["classes"] == ["0", "1"]
    assert cli.main(["data", "prepare", f"text-csv:{src}:x:label", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column 'x' (has text, label)" in err[0]


def test_a_tampered_labelled_manifest_is_refused(tmp_path):
    src = tmp_path / "a.csv"
    src.write_text("text,label\nhi,a\nho,b\nhu,a\n")
    prepare(f"text-csv:{src}", str(tmp_path / "ds"), block_size=8)
    path = tmp_path / "ds" / "train" / "manifest.json"
    m = json.loads(path.read_text())
    for key, value, match in [
        ("shape", [1, 9, 1], r"'shape' must be \[1, 8, 1\]"),
        ("block_size", 0, "'block_size' must be a whole number >= 1"),
        ("tokenizer", "gpt2", "'tokenizer' must be 'bytes' with vocab_size 256"),
        ("classes", ["a"], "'classes' must name at least 2 classes"),
        ("encoding", "png", "'encoding' must be 'raw' for labelled text"),
    ]:
        path.write_text(json.dumps({**m, key: value}))
        with pytest.raises(DataError, match=match):
            open_dataset(str(tmp_path / "ds" / "train"))
