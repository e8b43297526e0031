"""Classify the bad-input catalogue of the ``slim`` command (tests/test_cli_catalogue.py, issue 22).

Runs the catalogue with pytest (one process, in-process calls of ``slim_plugins.cli.main``), collects one JSON
record per case and prints how many cases are clean and, for the others, why: wrote files, wrong exit status
(0 / other / an exception), traceback or more than one line, argparse usage block, the option not named.

    python benchmarks/cli_catalogue.py                                  # the code installed in .venv (this tree)
    python benchmarks/cli_catalogue.py --pythonpath /tmp/beforepkg      # another copy of slim_plugins
    python benchmarks/cli_catalogue.py --report r.jsonl --no-run        # classify an earlier report again
    python benchmarks/cli_catalogue.py -k "timm and widths" --ids       # a subset, listing failing ids by cause

pytest runs from a scratch folder (not the repository root) so that ``--pythonpath`` wins over the working tree.
Set OMP_NUM_THREADS=1 on a shared machine (done here unless already set).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEST = REPO / "tests" / "test_cli_catalogue.py"


def run(report: str, pythonpath: str | None, k: str | None, timeout: float | None, extra: list) -> int:
    env = dict(os.environ, SLIM_CATALOGUE_REPORT=report)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("SLIM_DATA", str(REPO.parent / "shared" / "data"))
    env.pop("SLIM_DEBUG", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if timeout:
        env["SLIM_CATALOGUE_TIMEOUT"] = str(timeout)
    cmd = [sys.executable, "-m", "pytest", str(TEST), "-q", "-p", "no:cacheprovider", "--tb=no", "-rN", *extra]
    if k:
        cmd += ["-k", k]
    with tempfile.TemporaryDirectory(prefix="slim-catalogue-") as cwd:
        t0 = time.time()
        r = subprocess.run(cmd, cwd=cwd, env=env)
        print(f"pytest exit {r.returncode} after {time.time() - t0:.0f}s", file=sys.stderr)
    return r.returncode


def summarise(records: list, show_ids: bool) -> None:
    n = len(records)
    mods = sorted({r.get("slim_plugins", "?") for r in records})
    print(f"{n} cases; slim_plugins from {', '.join(mods)}")
    clean = sum(1 for r in records if not r["problems"])
    wrote = sum(1 for r in records if "wrote" in r["problems"])
    status = collections.Counter(r["problems"]["status"] for r in records if "status" in r["problems"])
    out = [r["problems"].get("output", "") for r in records]
    tb = sum(1 for o in out if "traceback" in o)
    multi = sum(1 for o in out if " lines" in o)
    silent = sum(1 for o in out if "no line" in o)
    not_error = sum(1 for o in out if "not error:" in o)
    usage = sum(1 for o in out if "usage block" in o)
    unnamed = sum(1 for o in out if "does not name" in o)
    print("\nper check (a case may fail several):")
    print(f"  clean (exit 2, one error: line, nothing written) {clean:4d}")
    print(f"  wrote / changed / removed files                  {wrote:4d}")
    print(f"  wrong exit status                                {sum(status.values()):4d}  "
          + ", ".join(f"{k}: {v}" for k, v in sorted(status.items())))
    print(f"  traceback printed or exception raised            {tb:4d}")
    print(f"  more than one line on stderr                     {multi:4d}")
    print(f"    of which an argparse usage block               {usage:4d}")
    print(f"  nothing on stderr                                {silent:4d}")
    print(f"  first stderr line not 'error:'                   {not_error:4d}")
    print(f"  option not named in the error line               {unnamed:4d}")
    causes = collections.Counter(r["cause"] for r in records)
    print("\nprimary cause (one per case):")
    for cause, cnt in causes.most_common():
        print(f"  {cause:40s} {cnt:4d}")
    groups = collections.defaultdict(lambda: collections.Counter())
    for r in records:
        groups[r["group"]][r["cause"] == "clean"] += 1
    print("\nclean / total per group:")
    for g, c in sorted(groups.items()):
        print(f"  {g:16s} {c[True]:4d} / {c[True] + c[False]:4d}")
    slow = sorted(records, key=lambda r: -r["seconds"])[:5]
    print(f"\ntime in main(): {sum(r['seconds'] for r in records):.0f}s; slowest: "
          + ", ".join(f"{r['id']} {r['seconds']:.0f}s" for r in slow))
    if show_ids:
        by = collections.defaultdict(list)
        for r in records:
            if r["cause"] != "clean":
                by[r["cause"]].append(r["id"])
        for cause, ids in sorted(by.items()):
            print(f"\n## {cause} ({len(ids)})")
            for i in ids:
                print(f"  {i}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pythonpath", help="prepend to PYTHONPATH (e.g. /tmp/beforepkg: a copy of slim_plugins)")
    p.add_argument("--report", help="JSON-lines report (default: a temporary file)")
    p.add_argument("--no-run", action="store_true", help="only classify an existing --report")
    p.add_argument("-k", help="pytest -k expression (a subset of the cases)")
    p.add_argument("--timeout", type=float, help="seconds per case (SLIM_CATALOGUE_TIMEOUT, default 120)")
    p.add_argument("--ids", action="store_true", help="list the failing case ids by cause")
    args, extra = p.parse_known_args(argv)
    report = args.report or tempfile.mktemp(prefix="slim-catalogue-", suffix=".jsonl")
    if not args.no_run:
        if os.path.exists(report):
            os.remove(report)
        run(report, args.pythonpath, args.k, args.timeout, extra)
    with open(report) as f:
        records = [json.loads(line) for line in f if line.strip()]
    summarise(records, args.ids)
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
