"""What the coverage scripts (``coverage_mmdet.py``, ``coverage_basicsr.py``) share: recording a failed measurement
as a verdict, and writing the table. Light on imports so a script can use it before its framework loads."""
from __future__ import annotations

import csv
import traceback


def record_failure(row: dict, e: Exception) -> None:
    """``row['verdict']`` / ``row['detail']`` for an exception: ``refused (<type>)`` for this package's typed errors
    (a refusal the table counts), ``FAIL`` (with the traceback printed) for anything else."""
    from slim_plugins.errors import SlimError

    row["verdict"] = f"refused ({type(e).__name__})" if isinstance(e, SlimError) else "FAIL"
    row["detail"] = f"{type(e).__name__}: {str(e)[:300]}"
    if not isinstance(e, SlimError):
        traceback.print_exc()


def write_table(path: str, rows: list[dict]) -> None:
    """The rows as a CSV (header from the first row), written atomically; prints the exact count."""
    from slim_plugins.checkpoint import atomic_write

    def write(f):
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)

    atomic_write(path, write, "w")
    print(f"wrote {path}: {sum(r['verdict'] == 'exact' for r in rows)} of {len(rows)} exact")
