"""Device discovery and memory figures on this CPU box, plus the CUDA branch driven through a
stand-in for torch.cuda (a simulation: there is no GPU here)."""

from __future__ import annotations

import types

import psutil
import pytest

from gpu_worker import devices


def test_this_box_reports_cpu_with_real_memory():
    found = devices.discover_devices()
    assert [d.name for d in found] == ["cpu"]
    cpu = found[0]
    assert cpu.device_type == "cpu" and cpu.display_name
    assert cpu.memory_total_mb == pytest.approx(psutil.virtual_memory().total / devices.MB, rel=1e-6)
    stats = devices.memory_stats("cpu")
    assert set(stats) == {"total_mb", "used_mb", "free_mb"}
    assert 0 < stats["free_mb"] <= stats["total_mb"]
    assert stats["used_mb"] == pytest.approx(stats["total_mb"] - stats["free_mb"], abs=0.2)


@pytest.mark.parametrize("raw, expected", [
    ("cpu", ("cpu", None)), ("CPU", ("cpu", None)), ("mps", ("mps", None)),
    ("cuda", ("cuda", 0)), ("cuda:1", ("cuda", 1)), ("directml:0", ("directml", 0)),
])
def test_device_names_parse(raw, expected):
    assert devices.parse_device_name(raw) == expected


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "", "tpu:0", "cpu:0"])
def test_unknown_device_names_are_refused(bad):
    with pytest.raises(ValueError, match="unknown device"):
        devices.parse_device_name(bad)


def test_device_lists():
    assert [d.name for d in devices.parse_devices("auto")] == ["cpu"]
    assert [d.name for d in devices.parse_devices("cpu")] == ["cpu"]
    assert [d.name for d in devices.parse_devices("cpu,cpu")] == ["cpu"]
    with pytest.raises(ValueError, match="cuda:0 is not present"):
        devices.parse_devices("cpu,cuda:0")
    with pytest.raises(ValueError, match="empty device list"):
        devices.parse_devices(" , ")


def test_torch_device_and_cache_are_safe_on_cpu():
    import torch

    assert devices.torch_device("cpu") == torch.device("cpu")
    assert devices.torch_device("cuda:1") == torch.device("cuda", 1)  # building the object needs no GPU
    devices.empty_device_cache("cpu")
    devices.empty_device_cache("cuda:0")  # torch.cuda.empty_cache is a no-op without CUDA


def test_cuda_discovery_with_a_simulated_torch_cuda(monkeypatch):
    """Simulation: torch.cuda answers as a two-GPU host would, to drive the CUDA branch."""
    import torch

    names = ["Sim GPU A", "Sim GPU B"]
    totals = [8 * 1024 * devices.MB, 24 * 1024 * devices.MB]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: types.SimpleNamespace(name=names[i], total_memory=totals[i]))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (totals[i] // 4, totals[i]))
    found = devices.discover_devices()
    assert [(d.name, d.display_name, d.memory_total_mb) for d in found] == [
        ("cuda:0", "Sim GPU A", 8192.0), ("cuda:1", "Sim GPU B", 24576.0)]
    assert devices.memory_stats("cuda:1") == {"total_mb": 24576.0, "used_mb": 18432.0, "free_mb": 6144.0}
    assert [d.name for d in devices.parse_devices("cuda:1,cuda:0")] == ["cuda:1", "cuda:0"]


def test_a_failing_probe_falls_back_to_cpu(monkeypatch, caplog):
    import torch

    def broken():
        raise RuntimeError("driver exploded")
    monkeypatch.setattr(torch.cuda, "is_available", broken)
    assert [d.name for d in devices.discover_devices()] == ["cpu"]
    assert "driver exploded" in caplog.text
