"""The benchmarks' `--plot PATH`: one PNG of what each benchmark's table shows.

Every figure is drawn from the benchmark's report alone (the payload that `--json`
writes), so what is plotted is exactly what was reported. matplotlib's object API on
the Agg canvas: no pyplot, hence no global figure state and no display needed.

- wire: ping latency distributions direct vs through modelgate; throughput ratio per task
- inline: images/s by client concurrency, against plain onnxruntime (the limit) and
  the same inserts with no model
- deferred: documents predicted over time while catching up, per number of modelgate
  processes, against plain onnxruntime's rate
- images: images/s with a cold cache, a warm cache and from local disk
- cache: LMDB lookups/s; fetch images/s cold, warm and from local disk
- connections: another client's ping p50/p99 without and with idle and slow connections
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["PLOTTERS", "write_plot"]

DPI = 120
PANEL_SIZE = (5.5, 4.2)  # inches, per panel
DIRECT_COLOR, PROXY_COLOR, BASELINE_COLOR = "tab:blue", "tab:orange", "tab:gray"


def write_plot(payload: dict[str, Any], path: str | Path) -> Path:
    """Draw `payload` (a benchmark's report) as a PNG at `path`, creating parent folders."""
    figure = PLOTTERS[payload["benchmark"]](payload)
    FigureCanvasAgg(figure)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
    return path


def _figure(title: str, payload: dict[str, Any], panels: int) -> tuple[Figure, list[Axes]]:
    """A figure of `panels` side by side, titled, with what it was measured on."""
    width, height = PANEL_SIZE
    figure = Figure(figsize=(width * panels, height + 1.2), layout="constrained")
    figure.suptitle(f"{title}\n{_machine_line(payload.get('machine') or {})}", fontsize=10)
    return figure, list(figure.subplots(1, panels, squeeze=False)[0])


def _machine_line(machine: dict[str, Any]) -> str:
    parts = [
        str(machine.get("date", ""))[:10],
        f"{machine.get('cpus_usable', machine.get('cpu_count', '?'))} CPUs",
        machine.get("cpu_model"),
        f"Python {machine['python']}" if "python" in machine else None,
    ]
    return ", ".join(part for part in parts if part)


def _legend_below(axes: Axes) -> None:
    """The legend under the plot, where it never hides a line."""
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14))


def _bars(
    axes: Axes, labels: Sequence[str], values: Sequence[float], colors: Sequence[str]
) -> None:
    """Vertical bars, each with its value written above it."""
    bars = axes.bar(labels, values, color=colors)
    axes.bar_label(bars, labels=[f"{value:,.0f}" for value in values], fontsize=8)
    axes.margins(y=0.15)
    axes.tick_params(axis="x", labelsize=8)


def _log_axis(axis: Axis) -> None:
    """A log-scale axis labelled in plain numbers at 1, 2 and 5 of each decade."""
    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
    axis.set_minor_formatter(NullFormatter())
    axis.set_tick_params(labelsize=8)


# --------------------------------------------------------------------------- wire


def wire_figure(payload: dict[str, Any]) -> Figure:
    latency = payload.get("ping_latency")
    figure, axes = _figure("modelgate wire benchmark", payload, 2 if latency else 1)
    if latency:
        _latency_panel(axes[0], latency)
    tasks = payload["tasks"]
    ratios = axes[-1]
    names = [task["name"] for task in tasks]
    values = [task["ratio"] for task in tasks]
    bars = ratios.barh(names, values, color=PROXY_COLOR)
    ratios.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=8)
    ratios.axvline(1.0, color=DIRECT_COLOR, linestyle="--", label="direct = 1")
    ratios.invert_yaxis()  # tasks top to bottom in the order they ran
    ratios.set_xlabel("MB/s through modelgate / MB/s direct")
    ratios.set_title("throughput per driver-spec task", fontsize=10)
    ratios.margins(x=0.15)
    ratios.legend(fontsize=8, loc="lower right")
    return figure


def _latency_panel(axes: Axes, latency: dict[str, Any]) -> None:
    # Up to p99.9: the slowest few stretch the axis and hide the body (max is in the table).
    shown = [i for i, q in enumerate(latency["percentiles"]) if q <= 99.9]
    for target, color in (("direct", DIRECT_COLOR), ("proxy", PROXY_COLOR)):
        stats = latency[target]
        axes.plot(
            [stats["distribution"][i] for i in shown],
            [latency["percentiles"][i] for i in shown],
            color=color,
            label=f"{target}: p50 {stats['p50']:.0f} µs, p99 {stats['p99']:.0f} µs",
        )
    axes.set_xscale("log")
    _log_axis(axes.xaxis)
    axes.set_xlabel("round trip (µs, log scale)")
    axes.set_ylabel("percentile")
    axes.set_title(
        f"ping latency, {latency['count']:,} sequential pings each (to p99.9)\n"
        f"added by modelgate: p50 {latency['added_p50_us']:+.0f} µs, "
        f"p99 {latency['added_p99_us']:+.0f} µs",
        fontsize=9,
    )
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")


# --------------------------------------------------------------------------- inline


def inline_figure(payload: dict[str, Any]) -> Figure:
    results = payload["models"]
    figure, axes = _figure("modelgate inline benchmark", payload, len(results))
    for panel, result in zip(axes, results, strict=True):
        clients = [cell["concurrency"] for cell in result["inline"]]
        panel.plot(
            clients,
            [cell["images_per_s"] for cell in result["inline"]],
            marker="o",
            color=PROXY_COLOR,
            label="inline model through modelgate",
        )
        best = result["baseline"]["best_e2e"]
        panel.axhline(
            best["images_per_s"],
            color=BASELINE_COLOR,
            linestyle="--",
            label=f"limit: onnxruntime alone, batch {best['batch']} (decode included)",
        )
        plain = result["no_model"]  # empty with --no-plain
        for target, color in (("proxy", PROXY_COLOR), ("direct", DIRECT_COLOR)) if plain else ():
            panel.plot(
                [row["concurrency"] for row in plain],
                [row[target]["images_per_s"] for row in plain],
                marker="s",
                linestyle=":",
                color=color,
                label=f"same documents, no model, {target}",
            )
        panel.set_xscale("log", base=2)
        panel.set_xticks(clients, [str(c) for c in clients])
        panel.set_yscale("log")
        _log_axis(panel.yaxis)
        panel.set_xlabel("concurrent clients")
        panel.set_ylabel("documents/s (log scale)")
        panel.set_title(_model_title(result["model"]), fontsize=10)
        panel.grid(True, which="both", alpha=0.3)
        _legend_below(panel)
    return figure


def _model_title(model: dict[str, Any]) -> str:
    """ "digits, 28x28 grayscale": the name and the input images."""
    size = "x".join(map(str, model["image_size"]))
    colours = {"L": "grayscale", "RGB": "RGB"}.get(model["image_mode"], model["image_mode"])
    return f"{model['name']}, {size} {colours}"


# --------------------------------------------------------------------------- deferred


def deferred_figure(payload: dict[str, Any]) -> Figure:
    results = payload["models"]
    figure, axes = _figure("modelgate deferred benchmark: catching up", payload, len(results))
    for panel, result in zip(axes, results, strict=True):
        total = 0
        for cell in result["cells"]:
            fast = cell["catch_up"]
            total = max(total, fast["documents"])
            seconds, done = zip(*fast["progress"], strict=True)
            panel.plot(
                seconds,
                done,
                marker=".",
                label=f"{cell['processes']} modelgate process(es): "
                f"{fast['documents_per_s']:.1f} documents/s",
            )
        rate = result["baseline"]["best_e2e"]["images_per_s"]
        panel.plot(
            [0.0, total / rate],
            [0, total],
            color=BASELINE_COLOR,
            linestyle="--",
            label=f"onnxruntime alone in a loop: {rate:,.0f} images/s",
        )
        panel.set_xlabel("seconds since the first insert")
        panel.set_ylabel("documents with a prediction")
        panel.set_title(f"{_model_title(result['model'])}, {total:,} documents", fontsize=10)
        panel.grid(True, alpha=0.3)
        _legend_below(panel)
    return figure


# --------------------------------------------------------------------------- images


def images_figure(payload: dict[str, Any]) -> Figure:
    results = payload["models"]
    figure, axes = _figure(
        f"modelgate images benchmark\nimage URLs through an inline model, "
        f"{payload['concurrency']} clients",
        payload,
        len(results),
    )
    for panel, result in zip(axes, results, strict=True):
        local = result["local_disk"]
        _bars(
            panel,
            ["cold cache\n(HTTP)", "warm cache\n(LMDB)", f"local disk\n(batch {local['batch']})"],
            [
                result["cold_cache"]["images_per_s"],
                result["warm_cache"]["images_per_s"],
                local["images_per_s"],
            ],
            [PROXY_COLOR, PROXY_COLOR, BASELINE_COLOR],
        )
        panel.set_ylabel("images/s")
        panel.set_title(_model_title(result["model"]), fontsize=10)
    return figure


# --------------------------------------------------------------------------- cache


def cache_figure(payload: dict[str, Any]) -> Figure:
    results = payload["results"]
    figure, (lookups, fetches) = _figure(
        f"modelgate image cache: {results['images']} images of "
        f"{results['mean_image_bytes'] / 1000:.1f} kB",
        payload,
        2,
    )
    _bars(
        lookups,
        list(results["lookups_per_s"]),
        list(results["lookups_per_s"].values()),
        [PROXY_COLOR] * len(results["lookups_per_s"]),
    )
    lookups.set_ylabel("lookups/s")
    lookups.set_title("LMDB cache hits", fontsize=10)
    paths = results["fetch"]
    _bars(
        fetches,
        [name.replace(" (", "\n(") for name in paths],
        [row["images_per_s"] for row in paths.values()],
        [BASELINE_COLOR if name.startswith("local") else PROXY_COLOR for name in paths],
    )
    fetches.set_ylabel("images/s")
    fetches.set_title(f"fetching, {results['concurrency']} at a time", fontsize=10)
    return figure


# --------------------------------------------------------------------------- connections


def connections_figure(payload: dict[str, Any]) -> Figure:
    pings = payload["ping_ms"]
    figure, (latency,) = _figure("modelgate connections benchmark", payload, 1)
    labels = [f"{load}\n{q}" for load in ("unloaded", "loaded") for q in ("p50", "p99")]
    values = [pings[load][q] for load in ("unloaded", "loaded") for q in ("p50", "p99")]
    bars = latency.bar(labels, values, color=[DIRECT_COLOR] * 2 + [PROXY_COLOR] * 2)
    latency.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=8)
    latency.margins(y=0.15)
    latency.set_ylabel("ping round trip (ms)")
    latency.set_title(
        f"another client's pings, alone, then beside {payload['idle_connections']} idle\n"
        f"and {payload['slow_clients']} slow-byte connections; proxy RSS "
        f"{payload['rss_bytes_per_idle_connection'] / 1024:.1f} KiB per idle connection",
        fontsize=9,
    )
    return figure


#: benchmark name (the report's "benchmark") -> its figure.
PLOTTERS: dict[str, Callable[[dict[str, Any]], Figure]] = {
    "wire": wire_figure,
    "inline": inline_figure,
    "deferred": deferred_figure,
    "images": images_figure,
    "cache": cache_figure,
    "connections": connections_figure,
}
