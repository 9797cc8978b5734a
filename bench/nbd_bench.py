"""NBD export speed, side by side: blockgraph's storage daemon and qemu-storage-daemon serve the
same image, the same fio (nbd engine) and nbdcopy workloads run against each, and the
blockgraph/QEMU ratios are printed (above 1.0: blockgraph is faster), with each daemon's peak
RSS.

``python bench/nbd_bench.py --size 256M --runtime 5`` is a quick run. On a small machine one
run moves by tens of per cent; ``--repeat 3`` runs every measurement three times, QEMU and
blockgraph alternating, and prints medians.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from common import precompile

BLOCKGRAPH = Path(sys.executable).parent / "blockgraph"

# name, fio arguments, writethrough export
JOBS: list[tuple[str, list[str], bool]] = [
    ("seq read 1M qd8", ["--rw=read", "--bs=1M", "--iodepth=8"], False),
    ("seq write 1M qd8 (allocating)", ["--rw=write", "--bs=1M", "--iodepth=8"], False),
    ("rand read 4k qd16", ["--rw=randread", "--bs=4k", "--iodepth=16"], False),
    ("rand write 4k qd16", ["--rw=randwrite", "--bs=4k", "--iodepth=16"], False),
    ("rand write 4k qd1 (writethrough)", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], True),
]


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes]) -> None:
    # Poll-connect with a bound: the daemons create the socket once they listen.
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode}")
        if path.exists():
            with socket.socket(socket.AF_UNIX) as sock:
                try:
                    sock.connect(str(path))
                    return
                except OSError:
                    pass
        time.sleep(0.01)
    raise RuntimeError("daemon did not start listening")


@contextmanager
def daemon(program: list[str], image: Path, fmt: str, sock: Path,
           writethrough: bool) -> Iterator[subprocess.Popen[bytes]]:
    args = program + [
        "--blockdev", f"driver=file,filename={image},node-name=file0",
        "--blockdev", f"driver={fmt},file=file0,node-name=disk0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=nbd,id=exp0,node-name=disk0,name=disk,writable=on,"
                    f"writethrough={'on' if writethrough else 'off'}",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_socket(sock, proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        sock.unlink(missing_ok=True)


def peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def fio(uri: str, args: list[str], size: str, runtime: int) -> float:
    """Bytes per second of one fio job against ``uri``."""
    out = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--size={size}",
         f"--runtime={runtime}", "--time_based=0", "--output-format=json", *args],
        check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    return float(job["read"]["bw_bytes"] + job["write"]["bw_bytes"])


def nbdcopy(src: str, dst: str) -> float:
    start = time.monotonic()
    subprocess.run(["nbdcopy", src, dst], check=True)
    return time.monotonic() - start


def make_image(path: Path, fmt: str, size: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="nbd_bench")
    parser.add_argument("--size", default="1G", help="image size (default 1G)")
    parser.add_argument("--runtime", type=int, default=10, help="seconds per fio job at most")
    parser.add_argument("--workdir", help="where images go (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per measurement, daemons alternating; medians are printed")
    parser.add_argument("--only", metavar="REGEX",
                        help="only the rows whose name matches (e.g. 'writethrough|nbdcopy')")
    args, _unknown = parser.parse_known_args(argv)  # run.py passes one argv to all
    precompile()
    missing = [t for t in ("fio", "nbdcopy", "qemu-storage-daemon", "qemu-img") if not shutil.which(t)]
    if missing:
        print(f"nbd_bench: missing {', '.join(missing)}; skipped")
        return 0
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="nbd-bench."))
    daemons = {
        "qemu": ["qemu-storage-daemon"],
        "blockgraph": [str(BLOCKGRAPH), "storage-daemon"],
    }
    repeat = max(1, args.repeat)
    print(f"image {args.size}, fio runtime <= {args.runtime}s per job, median of {repeat}; "
          "ratio = blockgraph/QEMU")
    print(f"{'workload':36} {'qemu MB/s':>10} {'blockgraph MB/s':>16} {'ratio':>6}")
    rss: dict[str, int] = {"qemu": 0, "blockgraph": 0}
    only = re.compile(args.only) if args.only else None
    for fmt in ("raw", "qcow2"):
        for name, fio_args, writethrough in JOBS:
            if only is not None and not only.search(f"{fmt} {name}"):
                continue
            runs: dict[str, list[float]] = {"qemu": [], "blockgraph": []}
            for _ in range(repeat):
                for who, program in daemons.items():
                    image = workdir / f"{who}.{fmt}"
                    make_image(image, fmt, args.size)
                    if "read" in name:  # reads need data: fill the image first
                        subprocess.run(["qemu-io", "-f", fmt, "-c",
                                        f"write -P 0x5a 0 {args.size}", str(image)],
                                       check=True, capture_output=True)
                    sock = workdir / f"{who}.sock"
                    # Dirty pages left by the last run (or the fill) would be written back
                    # during this one, whichever daemon it measures.
                    os.sync()
                    with daemon(program, image, fmt, sock, writethrough) as proc:
                        runs[who].append(fio(f"nbd+unix:///disk?socket={sock}", fio_args,
                                             args.size, args.runtime))
                        rss[who] = max(rss[who], peak_rss_kib(proc.pid))
                    image.unlink()
            speed = {who: statistics.median(values) for who, values in runs.items()}
            ratio = speed["blockgraph"] / speed["qemu"] if speed["qemu"] else 0.0
            print(f"{fmt + ' ' + name:36} {speed['qemu'] / 1e6:10.1f} "
                  f"{speed['blockgraph'] / 1e6:16.1f} {ratio:6.2f}", flush=True)
    # nbdcopy of a whole image out of and into each daemon's export.
    for direction in ("out", "in"):
        if only is not None and not only.search(f"nbdcopy {direction}"):
            continue
        times: dict[str, list[float]] = {"qemu": [], "blockgraph": []}
        for _ in range(repeat):
            for who, program in daemons.items():
                image = workdir / f"{who}.raw"
                make_image(image, "raw", args.size)
                local = workdir / f"{who}.local"
                if direction == "out":
                    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a 0 {args.size}",
                                    str(image)], check=True, capture_output=True)
                else:
                    make_image(local, "raw", args.size)
                    subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0xa5 0 {args.size}",
                                    str(local)], check=True, capture_output=True)
                sock = workdir / f"{who}.sock"
                uri = f"nbd+unix:///disk?socket={sock}"
                os.sync()  # as above
                with daemon(program, image, "raw", sock, False) as proc:
                    if direction == "out":
                        times[who].append(nbdcopy(uri, "null:"))
                    else:
                        times[who].append(nbdcopy(str(local), uri))
                    rss[who] = max(rss[who], peak_rss_kib(proc.pid))
                image.unlink()
                local.unlink(missing_ok=True)
        seconds = {who: statistics.median(values) for who, values in times.items()}
        ratio = seconds["qemu"] / seconds["blockgraph"] if seconds["blockgraph"] else 0.0
        print(f"{'nbdcopy ' + direction:36} {seconds['qemu']:9.2f}s {seconds['blockgraph']:15.2f}s "
              f"{ratio:6.2f}", flush=True)
    print(f"peak RSS: qemu-storage-daemon {rss['qemu'] // 1024} MiB, "
          f"blockgraph {rss['blockgraph'] // 1024} MiB")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    os.sync()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
