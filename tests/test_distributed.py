"""Distributed ingest on a local Ray cluster (CPU, tiny model) against a single-process ingest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install 'lloco-index[ray]')")

from lloco_index.backbone import Backbone  # noqa: E402
from lloco_index.compressor import CompressorConfig, ContextCompressor  # noqa: E402
from lloco_index.distributed import RayIngestConfig, ingest  # noqa: E402
from lloco_index.pipeline import LLoCO  # noqa: E402
from lloco_index.store import CompressedStore  # noqa: E402

SAMPLES = Path(__file__).parent.parent / "lloco_index" / "samples"
SMALL = RayIngestConfig(num_workers=1, batch_size=4, write_batch=5)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")  # logical CPUs: 2 actors + tasks
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def compressor_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A saved compressor, so the driver, every actor and the reference all load the same one."""
    out = tmp_path_factory.mktemp("compressor")
    bb = Backbone.from_pretrained(str(tiny_model_dir), device="cpu")
    ContextCompressor.untrained(bb, CompressorConfig(base_model=str(tiny_model_dir), segment_tokens=32,
                                                     summary_tokens=4, hidden_size=bb.hidden_size)).save_pretrained(out)
    return out


def single_process(model_dir, compressor_dir, store) -> LLoCO:
    return LLoCO.from_pretrained(str(model_dir), compressor=str(compressor_dir), adapter="base", store=str(store),
                                 device="cpu")


def assert_same_store(a: CompressedStore, b: CompressedStore) -> None:
    assert a.keys() == b.keys() and a.fingerprint == b.fingerprint  # same keys, same (document) order
    for x, y in zip(a.get_many(a.keys()), b.get_many(b.keys())):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3)
    assert a.documents() == b.documents() and all(a.doc_keys(d) == b.doc_keys(d) for d in a.documents())


def test_ray_ingest_resumes_after_a_failure_and_equals_single_process(ray_cluster, tiny_model_dir, compressor_dir,
                                                                      tmp_path, capsys):
    from lloco_index.cli import main

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a_lighthouse.txt").write_text((SAMPLES / "lighthouse_museum.txt").read_text()[:1200])
    (docs / "m_bad.txt").write_bytes(b"\x00\x01 not text")  # sorts between the good files
    (docs / "z_life.md").write_text((SAMPLES / "museum_life.txt").read_text()[:900])
    (docs / "sub" / "copy.txt").write_text((SAMPLES / "museum_life.txt").read_text()[:300])  # shares chunks
    store = tmp_path / "ray-store"
    with pytest.raises(ValueError, match=r"m_bad.txt: looks like a binary file .* fix it and rerun to resume"):
        ingest([docs], store, model=str(tiny_model_dir), compressor=str(compressor_dir), config=SMALL,
               show_progress_bar=False)
    kept = CompressedStore(store).keys()
    assert kept  # the job died after writing the chunks of the documents before the bad one
    (docs / "m_bad.txt").unlink()
    assert main(["ingest", str(docs), "--store", str(store), "--ray", "--num-workers", "1", "--batch-size", "4",
                 "--model", str(tiny_model_dir), "--compressor", str(compressor_dir), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    reference = single_process(tiny_model_dir, compressor_dir, tmp_path / "single")
    expected = reference.ingest([docs])
    assert resumed["new_chunks"] == expected.new_chunks - len(kept)  # finished chunks were not redone
    assert (resumed["documents"], resumed["chunks"], resumed["source_tokens"]) == \
           (expected.documents, expected.chunks, expected.source_tokens)
    assert_same_store(CompressedStore(store), reference.store)


def test_ray_ingest_tables_into_a_remote_store(ray_cluster, tiny_model_dir, compressor_dir, tmp_path):
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = {"doc-1": (SAMPLES / "lighthouse_museum.txt").read_text()[:700],
             "doc-2": (SAMPLES / "museum_life.txt").read_text()[:500], "doc-3": "A short note about Biscuit."}
    rows = [{"id": k, "text": v, "extra": 1} for k, v in texts.items()]
    pq.write_table(pa.Table.from_pylist(rows[:2]), tmp_path / "part.parquet")
    (tmp_path / "rest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    url = "memory://lloco-test/store"
    report = ingest([tmp_path / "part.parquet", tmp_path / "rest.jsonl"], url, model=str(tiny_model_dir),
                    compressor=str(compressor_dir), config=SMALL, show_progress_bar=False)
    fs = fsspec.filesystem("memory")
    local = tmp_path / "downloaded"
    fs.get("/lloco-test/store", str(local), recursive=True)
    reference = single_process(tiny_model_dir, compressor_dir, tmp_path / "single")
    for doc, text in texts.items():
        chunks = [c.text for c in reference.chunk(text)]
        reference.compress_texts(chunks, sources=[(doc, i) for i in range(len(chunks))])
    assert report.new_chunks == len(reference.store.keys()) and report.documents == 3
    assert_same_store(CompressedStore(local), reference.store)
    again = ingest([tmp_path / "part.parquet", tmp_path / "rest.jsonl"], url, model=str(tiny_model_dir),
                   compressor=str(compressor_dir), config=SMALL, show_progress_bar=False)
    assert again.new_chunks == 0 and again.chunks == report.chunks  # resumed from the uploaded index


def test_table_without_the_text_column_becomes_an_error_row():
    """Such rows reach the driver, which raises them as one line (see the binary-file case above)."""
    import pyarrow as pa

    from lloco_index.distributed import _table_rows

    rows = _table_rows(pa.table({"id": ["x"], "body": ["no text column"]}), id_col="id", text_col="text")
    assert list(rows["error"]) == ["table has no column 'text' (columns: id, body); set --id-column/--text-column"]
    ok = _table_rows(pa.table({"id": [7], "text": ["hello"]}), id_col="id", text_col="text")
    assert (list(ok["doc"]), list(ok["text"]), list(ok["error"])) == (["7"], ["hello"], [""])


def test_store_url_without_ray_is_refused(tmp_path, capsys):
    from lloco_index.cli import main

    assert main(["ingest", str(tmp_path), "--store", "s3://bucket/store"]) == 2
    assert "a store URL needs --ray" in capsys.readouterr().err
    assert not any(tmp_path.iterdir()) and not Path("s3:").exists()
