"""Verilator builds ahead of the tests that need them.

``python -m flowtile.testing.prebuild DESIGNS`` builds, one after another, each design of ``DESIGNS`` (a JSON list of
``{"arch": {Arch fields}, "waves": false}``) through :func:`flowtile.rtl.simulate.build_verilator` into the default
build cache, exactly as a test's first run on that design would. tests/conftest.py starts it in the background, at
the lowest priority, when a test run selects the Verilator tests of many files: on a machine without a build cache
each build is 15-60 s of C++ compile, which then overlaps the tests that need no Verilator instead of adding to them.

Nothing depends on it: a test that needs a design first builds or reuses it itself (the cache's lock makes it wait
for a build under way instead of building twice), and a design this process cannot build is built, and its error
reported, by the test.
"""
from __future__ import annotations

import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    from flowtile.arch import Arch
    from flowtile.rtl.simulate import build_verilator
    designs = json.loads((sys.argv[1:] if argv is None else argv)[0])
    started = time.perf_counter()
    for index, design in enumerate(designs, 1):
        try:
            build = build_verilator(Arch.from_dict(design["arch"]), waves=design.get("waves", False))
        except Exception as error:  # noqa: BLE001 - the test that needs the design builds it and reports
            print(f"prebuild: {design}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            continue
        print(f"prebuild: {index}/{len(designs)} {build.directory.name} {'cached' if build.cached else 'built'} "
              f"({time.perf_counter() - started:.0f} s since the start)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
