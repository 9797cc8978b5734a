"""Entry point of ``make bench``: runs every ``bench/*_bench.py`` module's ``main(argv)``.

Arguments are passed on to each module (``python bench/run.py --size 64M``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    status = 0
    for path in sorted(Path(__file__).resolve().parent.glob("*_bench.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        print(f"== {path.stem}", flush=True)
        status |= int(module.main(argv))
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
