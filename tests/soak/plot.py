#!/usr/bin/env python3
"""Resource curves of a soak run: python3 tests/soak/plot.py <SOAK_OUT> [out.png]

Reads <SOAK_OUT>/samples.csv (written by `cargo test --release --test soak`)
and draws, per daemon, RSS, open file descriptors, tokio tasks and the
conversation map over the run; restarts of a daemon show as gaps. Needs
matplotlib (Debian: python3-matplotlib).
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else f"{src}/resources.png"
    rows = list(csv.DictReader(open(f"{src}/samples.csv")))
    series = [
        ("rss_kb", "RSS (MiB)", 1 / 1024),
        ("fds", "open fds", 1),
        ("tasks", "tokio tasks", 1),
        ("conversations", "conversations known", 1),
    ]
    fig, axes = plt.subplots(len(series), 1, figsize=(10, 10), sharex=True)
    for ax, (key, label, scale) in zip(axes, series):
        for daemon in sorted({r["daemon"] for r in rows}):
            # One line per process (a restart starts a new one).
            for start in sorted({r["start"] for r in rows if r["daemon"] == daemon}, key=int):
                pts = [
                    (float(r["t_s"]) / 60, float(r[key]) * scale)
                    for r in rows
                    if r["daemon"] == daemon and r["start"] == start and r[key]
                ]
                if not pts:
                    continue
                xs, ys = zip(*pts)
                first = start == "1"
                ax.plot(
                    xs,
                    ys,
                    color="C0" if daemon == "0" else "C1",
                    linewidth=1,
                    label=f"daemon {daemon}" if first else None,
                )
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="upper left")
    axes[-1].set_xlabel("minutes")
    fig.suptitle("soak: resources per daemon (daemon 1 is killed and restarted)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(out)


if __name__ == "__main__":
    main()
