"""Check that the wheels bench/gpu_wheels.sh downloads (``--no-deps``) can import on the GPU machine: every
runtime requirement of every wheel (its METADATA ``Requires-Dist`` lines without an ``extra ==`` marker) must be
another carried wheel or something the image has. A requirement nobody carries fails silently there: the
package installs, then its import fails on the machine and the sections that need it skip or fall back
(fla-core without einops: no DeltaNet kernels, every Qwen3.5 GPU test skipped).

    python3 bench/wheel_deps.py WHEEL_DIR IMAGE_PACKAGE...     # exit 1 listing what is missing
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-``, ``_``, ``.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> str:
    return canonical(path.name.split("-")[0])


def runtime_requirements(path: Path) -> list[str]:
    """The canonical names a wheel needs at run time (requirements behind an ``extra`` are left out)."""
    with zipfile.ZipFile(path) as z:
        meta = next((n for n in z.namelist() if n.endswith(".dist-info/METADATA")), None)
        if meta is None:
            raise ValueError(f"{path}: no *.dist-info/METADATA inside; not a wheel")
        text = z.read(meta).decode("utf-8", errors="replace")
    out = []
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        spec, _, marker = line[len("Requires-Dist:"):].partition(";")
        if re.search(r"\bextra\s*==", marker):
            continue
        m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
        if m:
            out.append(canonical(m.group(1)))
    return out


def unmet(wheel_dir: Path, image: list[str]) -> dict[str, list[str]]:
    """{wheel file: [requirements neither carried in ``wheel_dir`` nor in ``image``]} (only wheels with gaps)."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    have = {wheel_name(w) for w in wheels} | {canonical(n) for n in image}
    out = {}
    for w in wheels:
        missing = sorted({r for r in runtime_requirements(w) if r not in have})
        if missing:
            out[w.name] = missing
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    gaps = unmet(Path(argv[0]), argv[1:])
    for wheel, missing in gaps.items():
        print(f"{wheel} needs {', '.join(missing)}: neither carried nor in the image; pin it in "
              "bench/gpu_wheels.sh", file=sys.stderr)
    return 1 if gaps else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
