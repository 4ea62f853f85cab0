#!/usr/bin/env python3
"""Resource curves of a soak run: python3 tests/soak/plot.py <SOAK_OUT> [out.png]

Also prints, per daemon process that ran the whole run, a markdown table of
its resources every 5 minutes and the least-squares slope of RSS and fds
after warm-up (the first fifth of the run).

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
    table(rows)


def slope(pts):
    n = len(pts)
    if n < 2:
        return 0.0
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else 0.0


def table(rows):
    end = max(float(r["t_s"]) for r in rows)
    warm = max(end / 5, 60)
    for daemon in sorted({r["daemon"] for r in rows}):
        own = [r for r in rows if r["daemon"] == daemon and r["start"] == "1" and r["rss_kb"]]
        if not own or float(own[-1]["t_s"]) < end * 0.9:
            continue
        print(f"\ndaemon {daemon} (one process, the whole run):\n")
        print("| minute | RSS (MiB) | open fds | tokio tasks | conversations known | OpenCode sessions |")
        print("|---:|---:|---:|---:|---:|---:|")
        step = 300
        t = 0.0
        while t <= end:
            near = min(own, key=lambda r: abs(float(r["t_s"]) - t))
            print(f"| {float(near['t_s']) / 60:.0f} | {int(near['rss_kb']) / 1024:.1f} | {near['fds']} | {near['tasks']} | {near['conversations']} | {near['opencode_sessions']} |")
            t += step
        late = [r for r in own if float(r["t_s"]) >= warm]
        for key, unit, scale in [("rss_kb", "KiB/min", 1), ("fds", "fds/min", 1), ("tasks", "tasks/min", 1)]:
            pts = [(float(r["t_s"]) / 60, float(r[key]) * scale) for r in late if r[key]]
            print(f"\nslope of {key} after {warm / 60:.0f} min: {slope(pts):.2f} {unit}", end="")
        print()


if __name__ == "__main__":
    main()
