"""Device and software-version facts recorded in every result and latency table."""

from __future__ import annotations

import contextlib
import datetime as _dt
import platform
import sys
from importlib import metadata


def device_name(device: str = "cpu") -> str:
    """A filesystem-safe device name: GPU name on CUDA, CPU model + thread count on CPU."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        raw = torch.cuda.get_device_name(torch.device(device))
    else:
        raw = _cpu_model() + f"-{torch.get_num_threads()}t"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw).strip("-").lower()


@contextlib.contextmanager
def torch_threads(n: int):
    """``n`` torch intra-op threads inside the block (``n <= 0``: leave the count), the previous count restored
    afterwards. On CPU the device name, hence the latency table a lookup finds, carries the thread count."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "triton", "llama_cpp_python", "gguf", "archquant"):
        try:
            out[pkg] = metadata.version(pkg.replace("_", "-"))
        except metadata.PackageNotFoundError:
            pass
    return out


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def run_header(device: str = "cpu", **extra) -> dict:
    """The header every results JSON carries: device, versions, date, argv."""
    import torch

    return {
        "device": device_name(device),
        "cpu": _cpu_model(),
        "threads": torch.get_num_threads(),
        "versions": versions(),
        "date": now(),
        "argv": sys.argv,
        **extra,
    }
