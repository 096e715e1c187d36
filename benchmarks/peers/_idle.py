#!/usr/bin/env python3
"""Print the fraction of all CPUs busy over the last second (from /proc/stat), after waiting up to
--wait seconds for it to drop below --threshold.  Used by run_all.sh; Linux only, stdlib only."""

import argparse
import time


def _sample():
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
    return sum(v), idle


def busy_fraction(dt=1.0):
    t0, i0 = _sample()
    time.sleep(dt)
    t1, i1 = _sample()
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--wait", type=float, default=120.0)
    p.add_argument("--threshold", type=float, default=0.15)
    a = p.parse_args()
    deadline = time.monotonic() + a.wait
    b = busy_fraction()
    while b >= a.threshold and time.monotonic() < deadline:
        b = busy_fraction()
    print(f"{b:.3f}")


if __name__ == "__main__":
    main()
