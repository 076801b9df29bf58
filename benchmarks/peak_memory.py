"""Peak resident memory of the current process, for benchmarks that measure one method per child
process (Linux: /proc/self/status and clear_refs)."""

from __future__ import annotations


def status_mib(field: str) -> float:
    """A /proc/self/status memory field (VmRSS, VmHWM = peak RSS), MiB."""
    with open("/proc/self/status") as fh:
        return next(int(ln.split()[1]) for ln in fh if ln.startswith(field + ":")) / 1024


def reset_peak() -> float:
    """Restart the peak-RSS count (Linux: clear_refs 5) at the current RSS, which is returned, MiB;
    so building the data does not hide a smaller peak of the method measured after it."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return status_mib("VmRSS")
