"""Which compute devices this host has, and how much memory each has free.

Names are the wire names: "cuda:0", "directml:0", "mps", "cpu". torch is imported only when a
question needs it (CPU memory comes from psutil), so a simulated worker or `serve --help`
never pays for `import torch`. Everything here is safe on a CPU-only build: only calls that
do not raise without CUDA are made (no cuda.synchronize, get_device_name, Generator("cuda")).
"""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass

import psutil

log = logging.getLogger(__name__)

MB = 1024 * 1024
DEVICE_TYPES = ("cuda", "directml", "mps", "cpu")
_DEVICE_NAME = re.compile(r"^(cuda|directml)(?::(\d+))?$|^(mps|cpu)$")


@dataclass(frozen=True)
class DeviceInfo:
    name: str              # "cuda:0", "directml:0", "mps", "cpu"
    device_type: str       # "cuda" | "directml" | "mps" | "cpu"
    display_name: str      # what the hardware calls itself
    memory_total_mb: float  # 0.0 when the backend cannot tell (DirectML)

    def to_dict(self) -> dict:
        return {"name": self.name, "device_type": self.device_type,
                "display_name": self.display_name, "memory_total_mb": round(self.memory_total_mb, 1)}


def parse_device_name(device: str) -> tuple[str, int | None]:
    """"cuda:1" -> ("cuda", 1); "cuda" -> ("cuda", 0); "mps" -> ("mps", None). ValueError if unknown."""
    match = _DEVICE_NAME.match(device.strip().lower())
    if not match:
        raise ValueError(f"unknown device {device!r}: expected cpu, mps, cuda:N or directml:N")
    if match.group(3):
        return match.group(3), None
    return match.group(1), int(match.group(2) or 0)


def normalize_device_name(device: str) -> str:
    """The canonical spelling: "CUDA" -> "cuda:0", " cpu " -> "cpu"."""
    device_type, index = parse_device_name(device)
    return device_type if index is None else f"{device_type}:{index}"


def _cpu_display_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine() or 'CPU'} ({os.cpu_count()} cores)"


def cpu_device() -> DeviceInfo:
    return DeviceInfo("cpu", "cpu", _cpu_display_name(), psutil.virtual_memory().total / MB)


def _cuda_devices() -> list[DeviceInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        devices.append(DeviceInfo(f"cuda:{index}", "cuda", props.name, props.total_memory / MB))
    return devices


def _directml_devices() -> list[DeviceInfo]:
    try:
        import torch_directml  # optional extra, Windows only
    except Exception:  # ImportError, or a broken install that fails while importing
        return []
    devices = []
    for index in range(torch_directml.device_count()):
        devices.append(DeviceInfo(f"directml:{index}", "directml", torch_directml.device_name(index), 0.0))
    return devices


def _mps_total_mb() -> float:
    import torch

    # Apple silicon shares system memory; torch tells how much Metal recommends using.
    try:
        return torch.mps.recommended_max_memory() / MB
    except (AttributeError, RuntimeError):
        return psutil.virtual_memory().total / MB


def _mps_device() -> list[DeviceInfo]:
    import torch

    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return []
    return [DeviceInfo("mps", "mps", f"Apple {platform.machine()} GPU (MPS)", _mps_total_mb())]


def discover_devices() -> list[DeviceInfo]:
    """Accelerators found (every CUDA index, DirectML adapters, MPS); [cpu] when there are none."""
    found: list[DeviceInfo] = []
    for probe in (_cuda_devices, _directml_devices, _mps_device):
        try:
            found.extend(probe())
        except Exception as exc:  # a broken driver must not stop the worker from serving on CPU
            log.warning("device probe %s failed: %s", probe.__name__, exc)
    if not found:
        found.append(cpu_device())
    log.info("devices: %s", ", ".join(f"{d.name} ({d.display_name})" for d in found))
    return found


def device_info(device: str) -> DeviceInfo:
    """Facts about one named device; ValueError when it is not present on this host."""
    name = normalize_device_name(device)
    if name == "cpu":
        return cpu_device()
    for info in discover_devices():
        if info.name == name:
            return info
    raise ValueError(f"device {name} is not present on this host")


def parse_devices(spec: str) -> list[DeviceInfo]:
    """`--devices` value: "auto" (every accelerator, else cpu), "cpu", or a comma list such as
    "cuda:0,cuda:1". Each named device must exist (ValueError names the missing one)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return discover_devices()
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ValueError("empty device list")
    seen: list[DeviceInfo] = []
    for name in names:
        info = device_info(name)
        if info not in seen:
            seen.append(info)
    return seen


def memory_stats(device: str) -> dict:
    """{total_mb, used_mb, free_mb} for a device right now (device-wide, not this process)."""
    device_type, index = parse_device_name(device)
    total = used = free = 0.0
    if device_type == "cpu":
        vm = psutil.virtual_memory()
        total, free = vm.total / MB, vm.available / MB
        used = total - free
    elif device_type == "cuda":
        import torch

        free_b, total_b = torch.cuda.mem_get_info(index)
        total, free = total_b / MB, free_b / MB
        used = total - free
    elif device_type == "mps":
        import torch

        total = _mps_total_mb()
        used = torch.mps.driver_allocated_memory() / MB
        free = max(total - used, 0.0)
    elif device_type == "directml":
        # torch-directml reports no totals; what it reports is per-tile usage, when it can
        try:
            import torch_directml

            used = float(sum(torch_directml.gpu_memory(index, 1)))
        except Exception:
            used = 0.0
    return {"total_mb": round(total, 1), "used_mb": round(used, 1), "free_mb": round(free, 1)}


def torch_device(device: str):
    """The object to pass to `.to()`: torch.device, or torch_directml's device object."""
    device_type, index = parse_device_name(device)
    if device_type == "directml":
        import torch_directml

        return torch_directml.device(index)
    import torch

    if device_type == "cuda":
        return torch.device("cuda", index)
    return torch.device(device_type)


def empty_device_cache(device: str) -> None:
    """Give cached allocator memory back to the device (no-op on CPU)."""
    device_type, _ = parse_device_name(device)
    if device_type == "cuda":
        import torch

        torch.cuda.empty_cache()
    elif device_type == "mps":
        import torch

        torch.mps.empty_cache()


def main() -> int:
    """`python -m gpu_worker.devices`: the devices found, as a JSON list on stdout. `serve
    --devices auto` runs this in a child process so the broker process never imports torch."""
    import json
    import sys

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps([d.to_dict() for d in discover_devices()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
