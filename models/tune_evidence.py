"""Tunes the policy's sequential test (CUSUM over the LSTM's per-window log-odds) offline.

    python3 models/tune_evidence.py WINDOWS_CSV [--reference K] [--clamp C] [--threshold H]

WINDOWS_CSV comes from `cargo run --release --example evaluate -- --split validation
--windows-csv FILE`: one row per window (group, user, timing score, LSTM log-odds over the
operating threshold's), humans and generated macro users in window order. Run it on the
validation split only: the test split stays blind.

For each (reference, clamp) on a grid it reports the largest statistic any human reached, the
threshold that leaves a margin over it, each family's share of users whose statistic reaches
that threshold, and theta, the root of E[exp(theta X)] = 1 over the human increments X, which
bounds the expected windows to a false alarm below by exp(theta H) (for independent windows;
see crates/core/src/detect/policy.rs).
"""

import argparse
import csv
import math
from collections import defaultdict


def load(path):
    users = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["lstm_log_odds"] == "":
                continue
            x = float(row["lstm_log_odds"])
            users[(row["group"], row["user"])].append(x)
    return users


def path_max(xs, k, c, cap=math.inf):
    s, best = 0.0, 0.0
    for x in xs:
        s = min(cap, max(0.0, s + max(-c, min(c, x - k))))
        best = max(best, s)
    return best


def first_reach(xs, k, c, h):
    s = 0.0
    for i, x in enumerate(xs):
        s = min(2 * h, max(0.0, s + max(-c, min(c, x - k))))
        if s >= h:
            return i
    return None


def theta(increments):
    """Root theta > 0 of mean(exp(theta x)) = 1, by bisection; None if the mean is not negative."""
    if sum(increments) >= 0:
        return None
    f = lambda t: sum(math.exp(t * x) for x in increments) / len(increments) - 1.0
    lo, hi = 1e-6, 1.0
    while f(hi) < 0 and hi < 1e3:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--margin", type=float, default=1.5, help="threshold over the largest human statistic")
    ap.add_argument("--reference", type=float, nargs="*", default=[-6, -5, -4, -3, -2])
    ap.add_argument("--clamp", type=float, nargs="*", default=[1.0, 2.0, 3.0])
    ap.add_argument("--threshold", type=float, default=None, help="evaluate this threshold instead")
    args = ap.parse_args()
    users = load(args.csv)
    humans = {u: xs for u, xs in users.items() if u[0] == "human"}
    families = sorted({g for g, _ in users if g != "human"})
    human_windows = sum(len(xs) for xs in humans.values())
    print(f"{len(humans)} humans, {human_windows} windows; families: {', '.join(families)}")
    header = ["reference", "clamp", "max human S", "threshold", "theta", "log10 ARL bound"] + families
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for k in args.reference:
        for c in args.clamp:
            human_max = max(path_max(xs, k, c) for xs in humans.values())
            h = args.threshold if args.threshold is not None else max(c * 3, human_max * args.margin)
            incs = [max(-c, min(c, x - k)) for xs in humans.values() for x in xs]
            th = theta(incs)
            arl = f"{th * h / math.log(10):.1f}" if th else "-"
            cells = [f"{k:g}", f"{c:g}", f"{human_max:.2f}", f"{h:.2f}", f"{th:.3f}" if th else "-", arl]
            flagged = sum(1 for xs in humans.values() if first_reach(xs, k, c, h) is not None)
            for fam in families:
                fam_users = [xs for u, xs in users.items() if u[0] == fam]
                hit = sum(1 for xs in fam_users if first_reach(xs, k, c, h) is not None)
                cells.append(f"{100 * hit / max(1, len(fam_users)):.1f} %")
            print("| " + " | ".join(cells) + f" |  humans reaching it: {flagged}")


if __name__ == "__main__":
    main()
