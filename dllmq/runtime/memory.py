"""Peak resident memory of the current process."""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory, in bytes.

    On Linux this is VmHWM from /proc/self/status. getrusage's ru_maxrss is not used there: Linux
    carries it across fork+exec, so a subprocess started by a big parent would report the
    parent's peak instead of its own. Elsewhere ru_maxrss (bytes on macOS, KiB on other systems).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
