"""Read a LAION-style URL list and cut it into input parts, one per download shard.

The list is parquet, csv, tsv or jsonl(.gz): one file or a folder of them, local or any fsspec
URL (s3://, gs://). Schema problems (a missing url or caption column, an unreadable file) stop
here, before any work. Every row gets ``row`` (its position in the list), a 128-bit ``uid``
(given, or derived from url and caption) and ``reject``: "" or why it is never fetched
(``unsupported_url_scheme``, ``invalid_utf8``, ``invalid_uid``, ``duplicate_uid``; then
``not_in_subset`` for a uid missing from ``input.subset`` and ``metadata_<column>`` for the first of
``input.filters`` a row fails, so filtered rows cost no bandwidth). Missing values (null, NaN) are
empty strings, never the text "nan". ``fetch_url`` is the url as fetched: spaces and non-ASCII
characters percent-encoded as a browser would (``url`` keeps what the list said). A byte-order
mark is skipped; an empty file adds no rows (it is listed in the index), a list with no rows at
all is an error. Other columns are carried through.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import urllib.parse
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import subset as subsets
from pipeline.core.errors import UserError
from pipeline.core.io import arrow_file, atomic_write, exists, read_json, write_json
from pipeline.core.log import get_logger, progress

log = get_logger(__name__)
SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".json": "jsonl"}
INTERNAL = ("row", "uid", "url", "caption", "reject", "fetch_url")  # columns this stage owns
_UID = re.compile(r"[0-9a-f]{32}")  # always fullmatch: "$" would accept a trailing newline
_NEEDS_QUOTING = r"[^\x21-\x7e]"  # space, control or non-ASCII characters: not valid in a request line
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # reserved characters and "%" keep their meaning; everything else is encoded
_FILTER = re.compile(r"\s*(\w+)\s*(==|!=|<=|>=|<|>)\s*(.+?)\s*")
_COMPARE = {"==": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal}


class InputError(UserError, ValueError):
    """The URL list cannot be used (schema or read problem); raised before any work."""


@dataclasses.dataclass(kw_only=True)
class InputConfig:
    url_col: str = "url"
    caption_col: str = "caption"
    uid_col: str = ""  # a column of given 32-hex-char uids; "" derives uids from url and caption
    format: str = ""  # parquet | csv | tsv | jsonl; "" = from the file suffix
    part_size: int = 10000  # rows per input part = per download shard
    # Rows are interleaved by host within runs of this many parts, so that no part (no download
    # process) works through one host's rows at a time; 0 keeps the list order.
    interleave_parts: int = 16
    # Metadata thresholds on the list's own columns, before download: 'NSFW == "UNLIKELY"', "punsafe < 0.1",
    # "similarity >= 0.28", "WIDTH >= 256". A row failing one (or missing the value) is metadata_<column>.
    filters: list[str] = dataclasses.field(default_factory=list)
    subset: str = ""  # a DataComp subset file (.npy of sorted 128-bit uids) as a keep-list; others are not_in_subset

    def validate(self) -> None:
        for text in self.filters:
            parse_filter(text)
        if self.format and self.format not in set(SUFFIXES.values()):
            raise ValueError(f"format must be one of {sorted(set(SUFFIXES.values()))}, got {self.format!r}")
        if self.part_size < 1:
            raise ValueError("part_size must be >= 1")
        if self.interleave_parts < 0:
            raise ValueError("interleave_parts must be >= 0 (0: list order)")


def parse_filter(text: str) -> tuple[str, str, str | float]:
    """'COLUMN OP VALUE' -> (column, op, value): a quoted string or a number."""
    match = _FILTER.fullmatch(text)
    if not match:
        raise ValueError(f"filter {text!r}: write COLUMN OP VALUE with OP one of {' '.join(_COMPARE)}, e.g. 'punsafe < 0.1'")
    column, op, value = match.groups()
    if value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2:
        return column, op, value[1:-1]
    try:
        return column, op, float(value)
    except ValueError:
        raise ValueError(f"filter {text!r}: the value is a number or a quoted string") from None


def metadata_reasons(table: pa.Table, filters: list[str], reject: pa.Array, path: str = "") -> pa.Array:
    """``reject`` with ``metadata_<column>`` where a row not yet rejected fails a filter (vectorised)."""
    for text in filters:
        column, op, value = parse_filter(text)
        values = table[column]
        if isinstance(value, float) and not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            try:
                values = pc.cast(values, pa.float64())
            except pa.ArrowInvalid as err:
                raise InputError(f"{path}: column {column!r} is not numeric, as filter {text!r} needs: {err}") from None
        passed = pc.fill_null(_COMPARE[op](values, pa.scalar(value)), False)  # no value: the threshold is not met
        reject = pc.if_else(pc.and_(pc.equal(reject, ""), pc.invert(passed)), f"metadata_{column}", reject)
    return reject


def input_files(path: str, fmt: str) -> list[tuple[str, str]]:
    """(file, format) for a file or every list file in a folder, in name order."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise InputError(f"input {path!r} does not exist")
    names = sorted(fs.find(root)) if fs.isdir(root) else [root]
    files = [(fs.unstrip_protocol(n), fmt or _format_of(n)) for n in names if fmt or _format_of(n)]
    if not files:
        raise InputError(f"no URL list files ({', '.join(SUFFIXES)}) in {path!r}")
    return files


def _format_of(name: str) -> str:
    return next((f for s, f in SUFFIXES.items() if name.endswith(s)), "")


def read_list(path: str, fmt: str, cfg: InputConfig) -> pa.Table:
    """One list file as a table with string ``url`` and ``caption``; bad UTF-8 is marked, not fatal."""
    try:
        with arrow_file(path, compression="infer") as f:
            if fmt == "parquet":
                table = pq.ParquetFile(f).read()
            elif fmt == "jsonl":
                table = pajson.read_json(f)
            else:  # csv/tsv: text columns as bytes, so one bad caption is a counted skip
                binary = {cfg.url_col: pa.binary(), cfg.caption_col: pa.binary()}
                table = pacsv.read_csv(
                    f, parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                    convert_options=pacsv.ConvertOptions(column_types=binary),
                )
    except (OSError, pa.ArrowException) as err:
        raise InputError(f"cannot read {path!r} as {fmt}: {err}") from None
    check_schema(table.schema, cfg, path)
    return table


def check_schema(schema: pa.Schema, cfg: InputConfig, path: str) -> None:
    wanted = [cfg.url_col, cfg.caption_col, cfg.uid_col, *(parse_filter(f)[0] for f in cfg.filters)]
    missing = [c for c in dict.fromkeys(wanted) if c and c not in schema.names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing} (has {schema.names}); set input.url_col / input.caption_col "
                         "(or drop the input.filters that name them)")


def _decode(values: pa.ChunkedArray) -> tuple[list[str], list[bool]]:
    """Strings from a column of any type; missing values (null, NaN) and invalid UTF-8 become "", the latter flagged."""
    kind = values.type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
        missing = pc.is_null(values, nan_is_null=True)  # a float column's NaN is a missing value, not "nan"
        values = pc.if_else(missing, pa.scalar(None, pa.string()), pc.cast(values, pa.string()))
    texts, bad = [], []
    for value in values.to_pylist():
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                texts.append(""), bad.append(True)
                continue
        texts.append("" if value is None else str(value)), bad.append(False)
    return texts, bad


def fetchable(urls: list[str]) -> list[str]:
    """The urls percent-encoded where a request line needs it (spaces, non-ASCII); the rest unchanged."""
    out = list(urls)
    for i in pc.indices_nonzero(pc.match_substring_regex(pa.array(urls, pa.string()), _NEEDS_QUOTING)).to_pylist():
        scheme, host, *rest = urllib.parse.urlsplit(urls[i])  # a non-ASCII host is IDNA-encoded by http.client itself
        out[i] = urllib.parse.urlunsplit((scheme, host, *(urllib.parse.quote(x, safe=_URL_SAFE) for x in rest)))
    return out


def derive_uid(url: str, caption: str) -> str:
    """128 bits of sha256(url, caption): the same pair always gets the same uid."""
    return hashlib.sha256(f"{url}\x00{caption}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def normalize(table: pa.Table, cfg: InputConfig, first_row: int, seen_uids: set[str] | None = None,
              subset: np.ndarray | None = None, path: str = "") -> pa.Table:
    """The list's rows with this stage's columns (see the module docstring) plus the extra columns.

    A given uid already in ``seen_uids`` (earlier rows; updated) is a ``duplicate_uid``: two samples
    with one uid would be one tar key. Derived uids repeat only for a repeated (url, caption) row,
    which dedupe's ``rows`` level counts as ``duplicate_row``. ``subset`` is a sorted keep-list
    (pipeline.subset), ``path`` names the file in errors.
    """
    seen_uids = set() if seen_uids is None else seen_uids
    urls, bad_url = _decode(table[cfg.url_col])
    captions, bad_caption = _decode(table[cfg.caption_col])
    given = table[cfg.uid_col].to_pylist() if cfg.uid_col else [None] * len(urls)
    uids, reject = [], []
    for url, caption, uid, bu, bc in zip(urls, captions, given, bad_url, bad_caption):
        uid = str(uid).lower() if uid is not None else derive_uid(url, caption)
        uids.append(uid)
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        reject.append(
            "invalid_utf8" if bu or bc else "invalid_uid" if not _UID.fullmatch(uid)
            else "duplicate_uid" if cfg.uid_col and uid in seen_uids
            else "" if scheme in ("http", "https") else "unsupported_url_scheme"
        )
        if cfg.uid_col:
            seen_uids.add(uid)
    reject = pa.array(reject, pa.string())
    if subset is not None:
        valid = pc.equal(reject, "")  # these uids are well-formed
        listed = np.zeros(len(uids), bool)
        listed[np.flatnonzero(np.asarray(valid))] = subsets.contains(subset, pa.array(uids).filter(valid).to_pylist())
        reject = pc.if_else(pc.and_(valid, pc.invert(pa.array(listed))), "not_in_subset", reject)
    reject = metadata_reasons(table, cfg.filters, reject, path)
    columns = {
        "row": pa.array(range(first_row, first_row + len(urls)), pa.int64()),
        "uid": uids, "url": urls, "caption": captions, "reject": reject,
        "fetch_url": pc.if_else(pc.equal(reject, ""), pa.array(fetchable(urls), pa.string()), ""),  # what img2dataset may fetch
    }
    extras = [c for c in table.column_names if c not in (cfg.url_col, cfg.caption_col, cfg.uid_col, *INTERNAL)]
    columns.update({c: table[c] for c in extras})
    return pa.table(columns)


def interleave_hosts(table: pa.Table) -> pa.Table:
    """The rows round-robin over their url's host: each host's first row, then each one's second, ...
    (hosts in order of first appearance, rows of one host in list order). Vectorised."""
    if table.num_rows == 0:
        return table
    hosts = pc.struct_field(pc.extract_regex(table["url"], r"^[^:/?#]*://(?:[^/?#@]*@)?(?P<host>[^/?#:]*)"), "host")
    codes = np.asarray(pc.dictionary_encode(pc.utf8_lower(pc.fill_null(hosts, ""))).combine_chunks().indices)
    counts = np.bincount(codes)
    rank = np.empty(len(codes), np.int64)  # position of each row among its host's rows
    rank[np.argsort(codes, kind="stable")] = np.arange(len(codes)) - np.repeat(np.cumsum(counts) - counts, counts)
    return table.take(np.lexsort((codes, rank)))


def _concat(tables: list[pa.Table]) -> pa.Table:
    """The tables as one; an extra column read as different types from different files (csv infers
    int64 where jsonl gives a string) is kept as text."""
    try:
        return pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    except pa.ArrowTypeError:
        types: dict[str, set] = {}
        for table in tables:
            for field in table.schema:
                types.setdefault(field.name, set()).add(field.type)
        mixed = [name for name, kinds in types.items() if len(kinds - {pa.null()}) > 1]
        tables = [t.cast(pa.schema([pa.field(f.name, pa.string()) if f.name in mixed else f for f in t.schema])) for t in tables]
        return pa.concat_tables(tables, promote_options="permissive").combine_chunks()


def _parts(tables: Iterator[pa.Table], size: int, window: int) -> Iterator[pa.Table]:
    """Parts of ``size`` rows, interleaved by host within runs of ``window`` parts (0: in list order)."""
    pending: list[pa.Table] = []
    rows, run = 0, size * max(window, 1)

    def cut(table: pa.Table) -> Iterator[pa.Table]:
        table = interleave_hosts(table) if window else table
        yield from (table.slice(start, size) for start in range(0, table.num_rows, size))

    for table in tables:
        pending.append(table)
        rows += table.num_rows
        while rows >= run:
            merged = _concat(pending)
            yield from cut(merged.slice(0, run))
            pending, rows = [merged.slice(run)], rows - run
    if rows:
        yield from cut(_concat(pending))


def prepare(path: str, cfg: InputConfig, layout) -> dict:
    """Write ``input/{part}.parquet`` and ``input/index.json``; skipped when the index exists."""
    if exists(layout.input_index):
        return read_json(layout.input_index)
    files = input_files(path, cfg.format)
    # every schema first: a bad file stops the run before any work; an empty one adds no rows
    empty = [name for name, fmt in files if not _check_file_schema(name, fmt, cfg)]
    files = [(name, fmt) for name, fmt in files if name not in empty]
    for name in empty:
        log.warning("input: %s is empty, skipped", name)

    def tables() -> Iterator[pa.Table]:
        first, seen_uids = 0, set()
        subset = subsets.read_subset(cfg.subset) if cfg.subset else None
        for name, fmt in progress(files, desc="read list"):
            table = normalize(read_list(name, fmt, cfg), cfg, first, seen_uids, subset, name)
            first += table.num_rows
            yield table

    rows = parts = 0
    rejected: dict[str, int] = {}
    for part, table in enumerate(_parts(tables(), cfg.part_size, cfg.interleave_parts)):
        with atomic_write(layout.input_part(part)) as f:
            pq.write_table(table, f)
        rows, parts = rows + table.num_rows, part + 1
        for reason in table["reject"].to_pylist():
            if reason:
                rejected[reason] = rejected.get(reason, 0) + 1
    if rows == 0:
        raise InputError(f"{path}: the URL list has no rows{' (empty file)' if empty else ''}; "
                         "give a list with a header line and at least one row")
    index = {"rows": rows, "parts": parts, "part_size": cfg.part_size, "rejected": rejected, "source": str(path),
             "empty_files": empty}
    write_json(layout.input_index, index)
    log.info("input: %d rows in %d parts of %d (%s rejected before download)", rows, parts, cfg.part_size, sum(rejected.values()))
    return index


def _check_file_schema(name: str, fmt: str, cfg: InputConfig) -> bool:
    """Check that the file has the configured columns; False when it is empty (no header, no rows)."""
    try:
        with fsspec.open(name, "rb", compression="infer") as f:
            if fmt == "parquet":
                if not f.read(1):
                    return False
                f.seek(0)
                names = pq.read_schema(f).names
            else:
                first = f.readline()
                if first.strip() in (b"", b"\xef\xbb\xbf") and not f.read(1):
                    return False
                if first.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise InputError(f"{name} is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
                first = first.decode("utf-8-sig", "replace")  # a UTF-8 byte-order mark is not part of the first column's name
                names = list(json.loads(first)) if fmt == "jsonl" else next(csv.reader([first.rstrip("\r\n")], delimiter="\t" if fmt == "tsv" else ","))
    except InputError:
        raise
    except (OSError, ValueError, pa.ArrowException) as err:
        raise InputError(f"cannot read {name!r} as {fmt}: {err}") from None
    check_schema(pa.schema([(n, pa.string()) for n in names]), cfg, name)
    return True
