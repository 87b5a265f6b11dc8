"""pgolf.model.device.visible_gpus: the GPU count every Snakemake plan reads (the GPU rules' process count).

Without a GPU driver's device node it is 0 and torch stays unimported (a CPU plan paid ~2 s for the import); with
one, it is torch's own count (checked on the GPU machine).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from pgolf.model import device


def test_no_driver_node_means_no_gpu_and_no_torch_import(tmp_path):
    missing = str(tmp_path / "no-such-node")
    probe = ("import sys; from pgolf.model import device; "
             f"device.GPU_DRIVER_NODES = ({missing!r},); device.GPU_DRIVER_LIBRARIES = ('no-such-library',); "
             "print(device.visible_gpus(), 'torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["0", "False"], proc.stderr


def test_a_driver_node_or_library_defers_to_torch(tmp_path, monkeypatch):
    import ctypes.util

    import torch

    node = tmp_path / "nvidiactl"
    node.write_text("")
    monkeypatch.setattr(device, "GPU_DRIVER_NODES", (str(node),))
    monkeypatch.setattr(device, "GPU_DRIVER_LIBRARIES", ())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert device.visible_gpus() == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.visible_gpus() == 0
    # no node yet (a headless machine after a boot: the first CUDA call creates them), but the driver's library
    node.unlink()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "GPU_DRIVER_LIBRARIES", ("cuda",))
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "libcuda.so.1" if name == "cuda" else None)
    assert device.visible_gpus() == 3


@pytest.mark.gpu
def test_on_a_gpu_machine_the_count_is_torchs():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    assert device.visible_gpus() == torch.cuda.device_count() > 0
