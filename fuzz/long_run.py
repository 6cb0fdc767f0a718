#!/usr/bin/env python3
"""Long runs of the fuzz targets (issue 21): each for --seconds, one after the other, a summary line each.

    python fuzz/long_run.py --seconds 600                 # every target, 10 minutes each
    python fuzz/long_run.py --seconds 1800 state session  # some targets

New inputs go to a temporary corpus next to the committed seeds (fuzz/corpus/<target>/, only read); a
finding (crash-*, oom-*, timeout-*, leak-*) is copied to --findings and makes the exit status 1. Run the
committed seeds of a finding again with `python fuzz/fuzz_<target>.py FILE`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
TARGETS = ("state", "session", "params", "gguf")


def run(target: str, seconds: int, findings: Path) -> bool:
    with tempfile.TemporaryDirectory(prefix=f"l2kv-fuzz-{target}-") as tmp:
        work = Path(tmp)
        corpus = work / "corpus"
        corpus.mkdir()
        cmd = [sys.executable, str(FUZZ / f"fuzz_{target}.py"), str(corpus), str(FUZZ / "corpus" / target)]
        cmd += [f"-max_total_time={seconds}", f"-artifact_prefix={work}/", "-rss_limit_mb=2048", "-timeout=30"]
        t0 = time.monotonic()
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "L2KV_FUZZ_DIR": tmp})
        wall = time.monotonic() - t0
        found = [p for p in work.iterdir() if p.name.split("-")[0] in ("crash", "oom", "timeout", "leak")]
        for p in found:
            findings.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, findings / f"{target}-{p.name}")
        done = re.search(r"Done (\d+) runs in (\d+) second", res.stderr)
        cov = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", res.stderr)
        runs = int(done.group(1)) if done else None
        print(
            f"{target:8s} {wall:7.0f} s  {runs if runs is not None else '?':>9} executions"
            f"  {runs / wall if runs else 0:8.0f}/s  coverage {cov[-1][0] if cov else '?':>5}"
            f"  corpus {int(cov[-1][2]) if cov else '?':>5}  findings {len(found)}  exit {res.returncode}",
            flush=True,
        )
        if found or res.returncode != 0:
            print("\n".join(res.stderr.splitlines()[-40:]), file=sys.stderr)
        return not found and res.returncode == 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=list(TARGETS), choices=TARGETS)
    ap.add_argument("--seconds", type=int, default=600, help="per target")
    ap.add_argument("--findings", type=Path, default=Path("fuzz-findings"), help="where findings are copied")
    args = ap.parse_args()
    ok = [run(t, args.seconds, args.findings) for t in args.targets]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
