"""Tables read and written in chunks, so memory stays flat however many rows a table has.

Input: the formats of `data_prep.tables` (parquet, csv, tsv, jsonl, text ones optionally .gz, or a
folder of one format). Parquet is read one record batch at a time (memory is bounded by the
largest row group the file was written with); the text formats through pandas' `chunksize`.
Output: parquet, appended chunk by chunk with one `pyarrow.parquet.ParquetWriter`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.tables import InputTableError, format_of, input_files


def peek(file: Path) -> tuple[list[str], bool]:
    """(column names, whether it has any row) of one table file, read without reading all its rows."""
    fmt = format_of(file)
    if file.stat().st_size == 0:
        raise InputTableError(f"{file}: the file is empty; give a table with a header and at least one row")
    try:
        if fmt == "parquet":
            parquet = pq.ParquetFile(file)
            return list(parquet.schema_arrow.names), parquet.metadata.num_rows > 0
        first = next(_text_chunks(file, fmt, 1), None)
    except Exception as err:  # pyarrow/pandas raise many types; all mean "not this format"
        raise InputTableError(
            f"{file}: could not be read as {fmt} ({type(err).__name__}: {err}); "
            f"check that the file really is {fmt} or rename it to its real format"
        ) from err
    return ([], False) if first is None else (list(map(str, first.columns)), len(first) > 0)


def _text_chunks(path: Path, fmt: str, rows: int) -> Iterator[pd.DataFrame]:
    if fmt == "jsonl":
        with pd.read_json(path, lines=True, chunksize=rows) as reader:
            yield from reader
        return
    # keep_default_na=False: an empty caption stays "" (a caption, if a useless one), never NaN
    with pd.read_csv(
        path, sep="\t" if fmt == "tsv" else ",", chunksize=rows, dtype=str, keep_default_na=False
    ) as reader:
        yield from reader


def iter_chunks(path: str | Path, rows: int) -> Iterator[pd.DataFrame]:
    """The table's rows as DataFrames of at most `rows` rows, file after file, in order."""
    if rows < 1:
        raise ValueError(f"chunk size must be at least 1 row, got {rows}")
    for file in input_files(path):
        fmt = format_of(file)
        if fmt == "parquet":
            # pre_buffer=False + buffer_size: pages are read as needed, not the whole row group's bytes at once
            parquet = pq.ParquetFile(file, pre_buffer=False, buffer_size=1 << 20)
            for batch in parquet.iter_batches(batch_size=rows):
                yield batch.to_pandas()
        else:
            yield from _text_chunks(file, fmt, rows)


class ChunkWriter:
    """A parquet file written chunk by chunk; the first chunk fixes the schema, later ones are cast to it.

    Writes nothing until the first chunk; `close()` on a writer that saw no rows writes an empty
    table with `empty_columns`, so a consumer always finds the file.
    """

    def __init__(self, path: str | Path, empty_columns: dict[str, pa.DataType]):
        self.path = Path(path)
        self.empty_columns = empty_columns
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, frame: pd.DataFrame) -> None:
        if frame.empty:
            return
        if self._writer is None:
            table = pa.Table.from_pandas(frame, preserve_index=False)
            # A column that is all null in the first chunk would fix the type "null"; strings are the safe guess
            table = table.cast(
                pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema])
            )
            self._writer = pq.ParquetWriter(self.path, table.schema)
        else:
            table = pa.Table.from_pandas(frame, schema=self._writer.schema, preserve_index=False)
        self._writer.write_table(table)
        self.rows += len(frame)

    def close(self) -> None:
        if self._writer is None:
            pq.write_table(pa.table({name: pa.array([], type=t) for name, t in self.empty_columns.items()}), self.path)
        else:
            self._writer.close()

    def __enter__(self) -> ChunkWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
