#!/usr/bin/env python3
"""How often this machine stops a CPU: one busy loop pinned to each CPU reads the clock as fast
as it can for SECONDS and records every gap longer than THRESHOLD_MS between two reads. On an
idle machine a gap is time the CPU was taken away (another process, or the hypervisor pausing
the virtual CPU). It explains latency tails that no server can avoid.

Usage: scripts/vm_stalls.py [SECONDS=20] [THRESHOLD_MS=5]
"""
import os
import sys
import time
from multiprocessing import Pool


def spin(args):
    cpu, seconds, threshold_ns = args
    os.sched_setaffinity(0, {cpu})
    gaps = []
    now = time.perf_counter_ns
    end = now() + seconds * 1_000_000_000
    last = now()
    while last < end:
        t = now()
        if t - last > threshold_ns:
            gaps.append(t - last)
        last = t
    return cpu, gaps


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    threshold_ms = float(sys.argv[2]) if len(sys.argv) > 2 else 5.0
    if not 0 < seconds <= 600:
        sys.exit("SECONDS must be in (0, 600]")
    cpus = sorted(os.sched_getaffinity(0))
    jobs = [(cpu, seconds, int(threshold_ms * 1e6)) for cpu in cpus]
    with Pool(len(cpus)) as pool:
        for cpu, gaps in pool.map(spin, jobs):
            ms = ", ".join(f"{g / 1e6:.1f}" for g in gaps)
            print(f"CPU {cpu}: {len(gaps)} gaps over {threshold_ms:g} ms in {seconds:g} s: [{ms}]")


if __name__ == "__main__":
    main()
