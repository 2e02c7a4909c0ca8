"""The soak test's picture: resident memory and request rate over the run, as one SVG."""
from pathlib import Path

W, H, PAD = 760, 200, 48


def polyline(points, x_max, y_max, top, colour):
    if not points or x_max <= 0 or y_max <= 0:
        return ""
    coords = " ".join(
        f"{PAD + (W - 2 * PAD) * x / x_max:.1f},{top + H - PAD - (H - 2 * PAD) * y / y_max:.1f}"
        for x, y in points
    )
    return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'


def panel(top, title, points, x_max, y_max, unit, colour, hline=None):
    out = [
        f'<text x="{PAD}" y="{top + 18}" font-size="13" font-weight="bold">{title}</text>',
        f'<line x1="{PAD}" y1="{top + H - PAD}" x2="{W - PAD}" y2="{top + H - PAD}" stroke="#999"/>',
        f'<line x1="{PAD}" y1="{top + PAD}" x2="{PAD}" y2="{top + H - PAD}" stroke="#999"/>',
        f'<text x="{PAD - 4}" y="{top + PAD + 4}" font-size="10" text-anchor="end">{y_max:.0f}</text>',
        f'<text x="{PAD - 4}" y="{top + H - PAD}" font-size="10" text-anchor="end">0</text>',
        f'<text x="{W - PAD}" y="{top + H - PAD + 14}" font-size="10" text-anchor="end">{x_max:.0f} s</text>',
        f'<text x="{PAD + 4}" y="{top + PAD - 6}" font-size="10">{unit}</text>',
        polyline(points, x_max, y_max, top, colour),
    ]
    if hline is not None and y_max > 0:
        y = top + H - PAD - (H - 2 * PAD) * hline[0] / y_max
        out.append(f'<line x1="{PAD}" y1="{y:.1f}" x2="{W - PAD}" y2="{y:.1f}" stroke="#c33" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{W - PAD}" y="{y - 4:.1f}" font-size="10" text-anchor="end" fill="#c33">{hline[1]}</text>')
    return "\n".join(out)


def write_svg(path: Path, samples, figures):
    """`samples`: (seconds, RSS bytes, requests sent so far); `figures`: idle/peak/final RSS."""
    if not samples:
        path.write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
        return
    t_max = samples[-1][0] or 1.0
    rss = [(t, r / 2**20) for t, r, _ in samples]
    rate = []
    for (t0, _, n0), (t1, _, n1) in zip(samples, samples[10:]):  # 5 s windows at 0.5 s sampling
        rate.append((t1, (n1 - n0) / max(t1 - t0, 1e-9)))
    idle = figures.get("idle_rss", 0) / 2**20
    rss_max = max(max(r for _, r in rss), idle * 1.6) * 1.1
    rate_max = max((r for _, r in rate), default=1.0) * 1.1 or 1.0
    body = [
        panel(0, "resident memory (MiB)", rss, t_max, rss_max, "MiB", "#1f77b4", (idle * 1.5, "1.5 x idle")),
        panel(H, "requests finished per second (5 s window)", rate, t_max, rate_max, "req/s", "#2ca02c"),
    ]
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{2 * H}" font-family="sans-serif">\n'
        f'<rect width="100%" height="100%" fill="white"/>\n' + "\n".join(body) + "\n</svg>\n"
    )
