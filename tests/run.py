"""The whole suite as CI runs it: each test file in its own pytest process, two at a time.

    python tests/run.py                      # every test (what .ci/run runs)
    python tests/run.py -m "not slow"        # any pytest arguments pass through
    python tests/run.py tests/test_serve.py  # some files only

Why processes: a pytest process that has run servers, engines and CLIs for half an hour carries
their threads, compiled programs and several GB; two tiers' worth of that in one process hung
twice inside XLA (never in a file run alone). A file per process keeps each file's world its
own, and two at a time use both cores of a small machine while the other waits on a compile or
a subprocess. Longest files start first (the durations of the last run, kept in
.pytest_cache/jaxgpt-run.json, else those in tests/durations.json, else file size). Each file's output goes to a log; a failing
file's tail is printed at the end. A test that hangs is stopped by pytest-timeout after 900 s
(pyproject.toml) with every thread's stack in the log; a file that outlives --file-timeout is
killed and counts as failed. Exit status 0 only if every file passed.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HISTORY = REPO / ".pytest_cache" / "jaxgpt-run.json"
SHIPPED = REPO / "tests" / "durations.json"  # a full run's seconds per file, for a fresh clone


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-j", "--jobs", type=int, default=2, help="pytest processes at once (default 2)")
    p.add_argument("--file-timeout", type=float, default=1800,
                   help="seconds one file may run before it is killed and counted failed (default 1800)")
    p.add_argument("--logs", type=Path, default=None,
                   help="folder for each file's output (default: a new temporary folder, printed)")
    args, rest = p.parse_known_args(argv)
    files = [a for a in rest if a.endswith(".py") and Path(a).is_file()]
    args.pytest_args = [a for a in rest if a not in files]
    args.files = [Path(f).resolve() for f in files] or sorted((REPO / "tests").glob("test_*.py"))
    return args


def longest_first(files):
    """Longest files first (this checkout's last full run, else tests/durations.json, else size),
    so the longest does not start last and run alone at the end."""
    last = {}
    for path in (SHIPPED, HISTORY):
        try:
            last.update(json.loads(path.read_text()))
        except (OSError, ValueError):
            pass
    return sorted(files, key=lambda f: (-last.get(f.name, -1), -f.stat().st_size))


def start(file, args, logs):
    log = logs / f"{file.stem}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={logs / file.stem}.xml",
           str(file), *args.pytest_args]
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return {"file": file, "proc": proc, "log": log, "out": out, "t0": time.monotonic()}


def counts(xml_path):
    """(tests, failed, skipped) from the file's JUnit XML, or None if it wrote none."""
    try:
        suite = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return n["tests"], n["failures"] + n["errors"], n["skipped"]


def finish(job, logs, timed_out):
    job["out"].close()
    secs = time.monotonic() - job["t0"]
    got = counts(logs / f"{job['file'].stem}.xml")
    rc = job["proc"].returncode
    # exit 5 is "no tests collected" (a file whose tests all fall outside -m)
    ok = not timed_out and rc in (0, 5) and got is not None and got[1] == 0
    tests, failed, skipped = got or (0, 0, 0)
    what = "timed out" if timed_out else f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped"
    print(f"{'ok  ' if ok else 'FAIL'} {job['file'].name:34s} {what:42s} {secs:7.1f} s", flush=True)
    return {"file": job["file"].name, "ok": ok, "secs": secs, "tests": tests, "failed": failed,
            "skipped": skipped, "log": job["log"]}


def run_all(args, logs):
    todo, running, done = longest_first(args.files), [], []
    while todo or running:
        while todo and len(running) < args.jobs:
            running.append(start(todo.pop(0), args, logs))
        time.sleep(0.5)
        for job in list(running):
            timed_out = time.monotonic() - job["t0"] > args.file_timeout
            if timed_out and job["proc"].poll() is None:
                os.killpg(job["proc"].pid, signal.SIGKILL)
            if job["proc"].poll() is not None or timed_out:
                job["proc"].wait()
                running.remove(job)
                done.append(finish(job, logs, timed_out))
    return done


def report(done, wall):
    for r in (r for r in done if not r["ok"]):
        lines = r["log"].read_text(errors="replace").splitlines()
        print(f"\n===== {r['file']} (log {r['log']}), last 200 lines =====", *lines[-200:], sep="\n")
    failed = [r["file"] for r in done if not r["ok"]]
    total = {k: sum(r[k] for r in done) for k in ("tests", "failed", "skipped")}
    print(f"\n{len(done)} files, {total['tests']} tests: {total['tests'] - total['failed'] - total['skipped']} passed, "
          f"{total['failed']} failed, {total['skipped']} skipped in {wall / 60:.1f} min wall "
          f"({sum(r['secs'] for r in done) / 60:.1f} min of file time)")
    if failed:
        print("failed files: " + " ".join(failed))
    return not failed


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="jaxgpt-tests-"))
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{len(args.files)} test files, {args.jobs} at a time; logs in {logs}", flush=True)
    t0 = time.monotonic()
    done = run_all(args, logs)
    ok = report(done, time.monotonic() - t0)
    if not args.pytest_args and len(done) == len(list((REPO / "tests").glob("test_*.py"))):
        HISTORY.parent.mkdir(exist_ok=True)
        tmp = HISTORY.with_suffix(".tmp")
        tmp.write_text(json.dumps({r["file"]: round(r["secs"], 1) for r in done}, indent=1))
        os.replace(tmp, HISTORY)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
