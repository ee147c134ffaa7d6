"""glibc malloc tuning for batch processes (napari_milview._malloc)."""

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

PROBE = """
import torch
from napari_milview._malloc import tune_for_batches
from napari_milview.features.encoders import build_encoder
if {tune}:
    assert tune_for_batches() and tune_for_batches()  # applied once, then remembered
torch.set_num_threads(1)
enc = build_encoder("demo").to(memory_format=torch.channels_last)
x = torch.rand(64, 3, 64, 64).contiguous(memory_format=torch.channels_last)
def minor_faults():
    with open('/proc/self/stat') as f:
        return int(f.read().rsplit(')', 1)[1].split()[7])
with torch.inference_mode():
    for _ in range(3):  # settle the allocator
        enc(x)
    before = minor_faults()
    for _ in range(20):  # batch after batch, as the extraction runs
        enc(x)
print(minor_faults() - before)
"""


def faults(tune: bool) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE.format(tune=tune)], capture_output=True,
                         text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def test_tuning_stops_page_faulting_each_batch():
    """Untuned, glibc gives the activations' large blocks back to the OS after every batch
    and page-faults them in again; tuned, they are reused from the heap."""
    plain, tuned = faults(False), faults(True)
    print(f"minor page faults over 20 batches: {plain} untuned, {tuned} tuned")
    assert tuned * 10 < plain
