"""``blockgraph img`` side by side with qemu-img: convert and bench, as speed ratios.

Ratio = blockgraph speed / qemu-img speed (= qemu-img time / blockgraph time); 1.0 is parity.
The source image is generated deterministically: 1 MiB segments cycling through random data,
compressible text, zero-filled data and holes.
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import precompile

BLOCKGRAPH = [str(Path(sys.executable).with_name("blockgraph")), "img"]
QEMU_IMG = ["qemu-img"]
SEGMENT = 1 << 20
_WORDS = (b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor "
          b"incididunt ut labore et dolore magna aliqua block layer qcow2 cluster refcount ")


def parse_size(text: str) -> int:
    units = {"k": 10, "m": 20, "g": 30, "t": 40}
    if text[-1:].lower() in units:
        return int(float(text[:-1]) * (1 << units[text[-1].lower()]))
    return int(text)


def make_source(path: Path, size: int, seed: int = 42) -> None:
    rnd = random.Random(seed)
    text = bytearray()
    while len(text) < SEGMENT:
        text += _WORDS[rnd.randrange(40):] + str(rnd.randrange(10 ** 6)).encode()
    text_seg = bytes(text[:SEGMENT])
    with open(path, "wb") as f:
        f.truncate(size)
        for i, off in enumerate(range(0, size, SEGMENT)):
            n = min(SEGMENT, size - off)
            kind = (i * 7 + rnd.randrange(4)) % 5  # random, text, text, zero data, hole
            if kind == 4:
                continue
            f.seek(off)
            if kind == 0:
                f.write(rnd.randbytes(n))
            elif kind == 3:
                f.write(bytes(n))
            else:
                f.write(text_seg[:n])


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
    return elapsed


def bench_convert(work: Path, name: str, args: list[str], out: str, check_against: str,
                  check_fmt: list[str]) -> tuple[str, float, float]:
    times = {}
    for label, tool in (("qemu", QEMU_IMG), ("ours", BLOCKGRAPH)):
        target = work / f"{label}-{out}"
        target.unlink(missing_ok=True)
        times[label] = timed([*tool, "convert", *args, str(target)], work)
        cmp = subprocess.run(["qemu-img", "compare", *check_fmt, check_against, str(target)],
                             capture_output=True, text=True)
        if cmp.returncode != 0:
            raise RuntimeError(f"{label} {name}: {cmp.stdout}{cmp.stderr}")
    return name, times["qemu"], times["ours"]


def bench_io(work: Path, name: str, image: Path, args: list[str]) -> tuple[str, float, float]:
    times = {}
    for label, tool in (("qemu", QEMU_IMG), ("ours", BLOCKGRAPH)):
        copy = work / f"bench-{label}.qcow2"
        shutil.copyfile(image, copy)
        times[label] = timed([*tool, "bench", *args, str(copy)], work)
        copy.unlink()
    return name, times["qemu"], times["ours"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="img_bench")
    parser.add_argument("--size", default="1G", help="source image size (default 1G)")
    parser.add_argument("--count", type=int, default=20000, help="requests per bench run")
    parser.add_argument("--workdir", default=None)
    opts, _unknown = parser.parse_known_args(argv)  # run.py passes one argv to all
    precompile()
    if shutil.which("qemu-img") is None:
        print("qemu-img is not installed: nothing to compare against")
        return 1
    size = parse_size(opts.size)
    work = Path(opts.workdir or tempfile.mkdtemp(prefix="img-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        src = work / "src.raw"
        make_source(src, size)
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(src),
                        str(work / "src.qcow2")], check=True)
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(work / "fresh.qcow2"),
                        str(size)], check=True, capture_output=True)
        results = [
            bench_convert(work, "convert raw->qcow2", ["-f", "raw", "-O", "qcow2", str(src)],
                          "out.qcow2", str(src), ["-f", "raw", "-F", "qcow2"]),
            bench_convert(work, "convert qcow2->raw", ["-f", "qcow2", "-O", "raw",
                                                       str(work / "src.qcow2")],
                          "out.raw", str(src), ["-f", "raw", "-F", "raw"]),
            bench_convert(work, "convert qcow2->qcow2 -c", ["-f", "qcow2", "-O", "qcow2", "-c",
                                                            str(work / "src.qcow2")],
                          "outc.qcow2", str(src), ["-f", "raw", "-F", "qcow2"]),
        ]
        count = str(opts.count)
        # A large odd step (in 4 KiB units) scatters the requests over the image.
        scatter = str(4096 * 7919)
        for image_name, image in (("allocated", work / "src.qcow2"),
                                  ("fresh", work / "fresh.qcow2")):
            for mode, extra in (("seq read", []), ("rand read", ["-S", scatter]),
                                ("seq write", ["-w"]), ("rand write", ["-w", "-S", scatter])):
                results.append(bench_io(work, f"bench {mode} 4k ({image_name})", image,
                                        ["-f", "qcow2", "-c", count, "-s", "4k", *extra]))
        print(f"source: {opts.size} ({size} bytes), bench: {count} requests of 4 KiB, depth 64")
        print(f"{'benchmark':<36}{'qemu-img s':>12}{'blockgraph s':>14}{'ratio':>8}")
        for name, q, o in results:
            print(f"{name:<36}{q:>12.3f}{o:>14.3f}{q / o:>8.2f}")
    finally:
        if opts.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
