"""The token table stored as int8 rows (`build --embeddings int8`): written in chunks, read by the
runtime row by row, refused when it does not match the config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from citrus_edge.bundle import BundleError
from citrus_edge.config import TINY
from citrus_edge.host_inputs import embed, int8_rows_dtype, quantize_rows, table_dtype


def _table(vocab: int, hidden: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    table = rng.normal(scale=0.02, size=(vocab, hidden)).astype(np.float32)
    table[3] = 0.0  # a padding row: scale 1, all zeros back
    table[4, 7] = 0.5  # one outlier: its row's step is 0.5 / 127
    return table


def test_rows_round_to_half_a_step():
    table = _table(50, 64)
    rows = quantize_rows(table)
    assert rows.dtype == int8_rows_dtype(64) and table_dtype(rows) == "int8"
    back = embed(np.arange(50)[None], rows)[0]
    assert back.dtype == np.float32 and back.shape == (50, 64)
    err = np.abs(back - table).max(axis=1)
    assert np.all(err <= rows["scale"] * 0.5 * (1 + 1e-6))
    assert rows["scale"][3] == 1.0 and not back[3].any()
    assert back[4, 7] == pytest.approx(0.5, abs=1e-7)  # the absmax itself is exact
    assert rows["q"].min() >= -127 and rows["q"].max() <= 127
    # float tables: the lookup casts, as before
    assert table_dtype(table.astype(np.float16)) == "float16"
    assert embed(np.array([[1, 2]]), table.astype(np.float16)).dtype == np.float32


def test_chunked_store_equals_one_pass(tmp_path, monkeypatch):
    from citrus_edge.compress import quantized_output

    table = _table(50, 64)
    np.save(tmp_path / "src.npy", table)
    monkeypatch.setattr(quantized_output, "TABLE_CHUNK_ROWS", 7)  # 50 rows: 8 chunks, last short
    for dtype in ("int8", "float16"):
        dst = tmp_path / f"{dtype}.npy"
        quantized_output.store_embeddings(tmp_path / "src.npy", dst, dtype)
        got = np.load(dst)
        want = quantize_rows(table) if dtype == "int8" else table.astype(np.float16)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float16.npy", "int8.npy", "src.npy"]


def test_runtime_reads_int8_rows_and_refuses_a_mismatch(tmp_path):
    from citrus_edge.runtime.artifacts import _load_embeddings

    vocab, hidden = TINY.text.vocab_size, TINY.text.hidden_size
    table = quantize_rows(_table(vocab, hidden))
    np.save(tmp_path / "ok.npy", table)
    loaded = _load_embeddings(tmp_path / "ok.npy", TINY)
    assert isinstance(loaded, np.memmap) and loaded.dtype == table.dtype
    other = dataclasses.replace(TINY, text=dataclasses.replace(TINY.text, vocab_size=vocab + 1))
    want = rf"int8 \({vocab},\), config says .* int8 rows \({vocab + 1},\) of {hidden}"
    with pytest.raises(BundleError, match=want):
        _load_embeddings(tmp_path / "ok.npy", other)
    np.save(tmp_path / "narrow.npy", quantize_rows(_table(vocab, hidden // 2)))
    with pytest.raises(BundleError, match="narrow.npy: embedding table is int8"):
        _load_embeddings(tmp_path / "narrow.npy", TINY)
    np.save(tmp_path / "short.npy", table[:-1])
    with pytest.raises(BundleError, match="short.npy: embedding table is int8"):
        _load_embeddings(tmp_path / "short.npy", TINY)


def test_a_table_that_cannot_be_stored_leaves_no_file(tmp_path, monkeypatch):
    """A non-finite row is named (counted over the whole table, not the chunk), and an error
    or an interruption in the middle of the chunks leaves no temp file behind."""
    from citrus_edge.compress import quantized_output

    table = _table(50, 64)
    table[23, 5] = np.inf
    np.save(tmp_path / "src.npy", table)
    monkeypatch.setattr(quantized_output, "TABLE_CHUNK_ROWS", 7)
    with pytest.raises(ValueError, match=r"src.npy: embedding row 23 is not finite"):
        quantized_output.store_embeddings(tmp_path / "src.npy", tmp_path / "int8.npy", "int8")
    np.save(tmp_path / "src.npy", _table(50, 64))
    calls = []

    def interrupted(rows, first=0):
        calls.append(first)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return quantize_rows(rows, first)

    monkeypatch.setattr(quantized_output, "quantize_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantized_output.store_embeddings(tmp_path / "src.npy", tmp_path / "int8.npy", "int8")
    assert calls == [0, 7, 14]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.npy"]


def test_tiny_rows_keep_a_normal_scale_and_an_unreadable_table_is_a_bundle_error(tmp_path):
    from citrus_edge.runtime.artifacts import _load_embeddings

    rows = quantize_rows(np.array([[1e-40, 0.0], [0.0, 0.0]], dtype=np.float32))
    assert rows["scale"][0] == np.finfo(np.float32).tiny and np.isfinite(embed([[0]], rows)).all()
    assert table_dtype(np.zeros(2, dtype=[("scale", "<f4"), ("q", "i1")])) != "int8"
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(BundleError, match="empty.npy: not a readable .npy embedding table"):
        _load_embeddings(tmp_path / "empty.npy", TINY)
