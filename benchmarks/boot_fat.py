"""Boot a fat image: numpy, pandas, scipy, matplotlib and ipykernel imports, lazyfs against pull + unpack.

The image is Debian bookworm with python3-ipykernel, numpy, scipy, pandas and
matplotlib (``tests.support.images.fat_image``, 2 layers, about 1.4 GB). The
workload is ``python3 -c "import numpy, pandas, scipy.linalg, matplotlib;
import ipykernel.kernelapp; print('ok')"`` in a runc container; the states
are those of ``benchmarks.bootlib``. The image must be built and cached
first (``tests.support.images.fat_image``, several minutes, Debian mirror
access); this benchmark never builds it. Run it from the repository root
with the project's virtual environment, as root::

    .venv/bin/python -m benchmarks.boot_fat --runs 3 --write-results
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.support import images

from .bootlib import BenchmarkError, BootBenchmark, main


def cached_fat_image() -> tuple[Path, str]:
    """Return (layout, tag) of the cached fat image; raise BenchmarkError when it is not built yet."""
    layout = images.cache_dir() / "images" / images.FAT_IMAGE_NAME
    if not (layout / "index.json").is_file():
        raise BenchmarkError(f"the fat image is not built yet at {layout}: build it with "
                             "tests.support.images.fat_image() first")
    return images.fat_image()


BENCHMARK = BootBenchmark(
    name="boot_fat",
    section_heading="Fat image boot (`benchmarks/boot_fat.py`)",
    image=cached_fat_image,
    image_description="Debian bookworm + python3-ipykernel, numpy, scipy, pandas and matplotlib "
                      "from `tests.support.images.fat_image`",
    repository="lazyfs/bookworm-fat",
    bucket="boot-fat",
    program="import numpy, pandas, scipy.linalg, matplotlib; import ipykernel.kernelapp; print('ok')",
    expected_output="ok\n",
    default_runs=3,
)


if __name__ == "__main__":
    sys.exit(main(BENCHMARK))
