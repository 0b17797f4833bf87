"""Boot a small image: lazyfs cold, cold with trace, warm and hot against pull + unpack and a local rootfs.

The workload is one command, ``python3 -c "import json, sqlite3, decimal,
email.parser, xml.dom.minidom, http.client; print('ok')"``, in a runc
container from the debootstrap bookworm + python3 test image that
``tests.support.images`` builds. ``benchmarks.bootlib`` describes the states,
the set-up and the report. Run it from the repository root with the
project's virtual environment, as root::

    .venv/bin/python -m benchmarks.boot_small --runs 5 --write-results
"""

from __future__ import annotations

import sys

from tests.support import images

from .bootlib import BootBenchmark, main
# Re-exported: the other benchmarks import these helpers from here.
from .bootlib import (console_script, drop_page_cache, exit_on_sigterm,  # noqa: F401
                      isolate_aws_environment, positive_int)

BENCHMARK = BootBenchmark(
    name="boot_small",
    section_heading="Small image boot (`benchmarks/boot_small.py`)",
    image=images.debootstrap_image,
    image_description="debootstrap bookworm + python3 from `tests.support.images`",
    repository="lazyfs/bookworm-python3",
    bucket="boot-small",
    program="import json, sqlite3, decimal, email.parser, xml.dom.minidom, http.client; print('ok')",
    expected_output="ok\n",
    default_runs=5,
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
