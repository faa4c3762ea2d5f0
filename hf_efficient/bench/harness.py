"""The benchmark harness: timing with warm-up and repeats, peak memory, machine info, and reports.

Every benchmark in `hf_efficient/bench/` measures a Hugging Face baseline and our candidate in the same
process and reports ratios. A report is one table (a list of row dicts) plus notes and a plot, written as
JSON, Markdown and PNG:

```python
from hf_efficient.bench.harness import BenchReport, measure

report = BenchReport("demo", "Greedy decoding", device="cpu", setup="reference target, 4 prompts")
base = measure(lambda: model.generate(**inputs, max_new_tokens=64), device="cpu")
report.add_row({"method": "HF greedy", "tokens_per_s": 64 / base.median_s, "speedup": 1.0})
report.bar_plot("tokens_per_s")
report.save("bench-results")
```
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "BenchReport",
    "ForwardCounter",
    "Interleaved",
    "Measurement",
    "interleaved",
    "machine_info",
    "measure",
    "ratio",
    "synchronize",
]


def synchronize(device: str) -> None:
    """Wait for queued kernels on `device` so wall-clock timings are honest."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class _PeakRSS:
    """Samples the process's resident set size in a thread; CPU memory has no allocator counter to read."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> _PeakRSS:
        self.start = self.rss_bytes()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss_bytes())


@dataclass
class Measurement:
    """Timing of one callable.

    Attributes:
        median_s (`float`): median wall-clock seconds over the repeats.
        times_s (`list[float]`): every repeat's seconds.
        peak_memory_bytes (`int | None`): on CUDA, peak allocated bytes above the allocation before the call;
            on CPU, peak resident-set growth during the repeats (`None` where `/proc` is unavailable).
        result (`Any`): the return value of the last repeat.
    """

    median_s: float
    times_s: list[float]
    peak_memory_bytes: int | None
    result: Any = field(repr=False, default=None)


def measure(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 3, device: str = "cpu") -> Measurement:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; return the median and peak memory.

    Args:
        fn (`Callable[[], Any]`): the work to time; it must do the same work on every call.
        warmup (`int`, *optional*, defaults to 1): untimed calls first (allocator, caches, lazy init).
        repeats (`int`, *optional*, defaults to 3): timed calls; the median is reported.
        device (`str`, *optional*, defaults to `"cpu"`): synchronised before and after each call.
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, result = [], None
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    tracker = _PeakRSS() if not on_cuda and os.path.exists("/proc/self/statm") else None
    if tracker is not None:
        tracker.__enter__()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    finally:
        if tracker is not None:
            tracker.__exit__()
    if on_cuda:
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = tracker.peak - tracker.start if tracker is not None else None
    return Measurement(statistics.median(times), times, peak, result)


@dataclass
class Interleaved:
    """Timings of several callables run in interleaved rounds (see `interleaved`).

    Attributes:
        times_s (`dict[str, list[float]]`): per name, the seconds of each round, in round order.
        results (`dict[str, list[Any]]`): per name, the return value of each round, in round order.
    """

    times_s: dict[str, list[float]]
    results: dict[str, list[Any]] = field(repr=False, default_factory=dict)

    def median_s(self, name: str) -> float:
        """Median seconds of `name` over the rounds."""
        return statistics.median(self.times_s[name])

    def per_round(self, name: str, baseline: str, amount: Callable[[Any], float] | None = None) -> list[float]:
        """Per round, `name`'s throughput over `baseline`'s: `baseline time / name time`, or with `amount` (work
        done, read from a round's result, e.g. new tokens) `(amount / time)` over `(amount / time)`."""
        rates = []
        for t_base, t_name, r_base, r_name in zip(
            self.times_s[baseline], self.times_s[name], self.results[baseline], self.results[name], strict=True
        ):
            work_base, work_name = (amount(r_base), amount(r_name)) if amount else (1.0, 1.0)
            rates.append((work_name / t_name) / (work_base / t_base))
        return rates

    def speedup(self, name: str, baseline: str, amount: Callable[[Any], float] | None = None) -> float:
        """Median over rounds of `per_round`: each round's ratio compares runs made moments apart, so drift of
        the machine's speed over the benchmark cancels."""
        return statistics.median(self.per_round(name, baseline, amount))


def interleaved(
    works: dict[str, Callable[[], Any]], *, rounds: int = 3, warmup: int = 1, device: str = "cpu"
) -> Interleaved:
    """Time every callable once per round, rounds after one another: A B C, B C A, C A B, ...

    The order rotates each round, so no method always runs first (after a pause) or last. `warmup` untimed
    rounds come first. Report ratios with `Interleaved.speedup` (median of per-round ratios), never a ratio of
    two medians taken minutes apart.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    names = list(works)
    for _ in range(warmup):
        for name in names:
            works[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[Any]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            synchronize(device)
            start = time.perf_counter()
            result = works[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            results[name].append(result)
    return Interleaved(times, results)


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """Machine, device and library versions, recorded with every report."""
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


class BenchReport:
    """One benchmark's results: a table of rows, notes, a plot, and the machine they were measured on.

    Args:
        name (`str`): benchmark name, also the output file stem.
        title (`str`): heading of the Markdown section.
        device (`str`, *optional*, defaults to `"cpu"`): where it ran; CUDA reports get a `-cuda` file suffix.
        setup (`str`, *optional*): what was measured on (model tier, texts, prompt counts).
    """

    def __init__(self, name: str, title: str, device: str = "cpu", setup: str = "") -> None:
        self.name, self.title, self.device, self.setup = name, title, device, setup
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.plot: Callable[[Any], None] | None = None
        self.saved_png: Path | None = None  # a plot already drawn, for reports loaded from JSON
        self.machine = machine_info(device)
        self.command = f"hf-efficient bench {name} --device {device}"

    @property
    def stem(self) -> str:
        return self.name if self.device == "cpu" else f"{self.name}-{self.device.split(':')[0]}"

    def add_row(self, row: dict[str, Any]) -> None:
        """Append one table row (keys become columns, in first-seen order)."""
        self.rows.append(dict(row))

    def note(self, text: str) -> None:
        """Add a line under the table (targets met or missed, caveats)."""
        self.notes.append(text)

    def columns(self) -> list[str]:
        columns: list[str] = []
        for row in self.rows:
            columns.extend(key for key in row if key not in columns)
        return columns

    def to_markdown(self) -> str:
        columns = self.columns()
        lines = [f"### {self.title}", ""]
        info = self.machine
        lines.append(
            f"`{self.command}` — {info['date']}, {info.get('gpu', info['processor'])}, "
            f"{info['cpu_count']} cores, torch {info['torch']}, transformers {info['transformers']}."
        )
        if self.setup:
            lines += ["", self.setup]
        lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in self.rows:
            lines.append("| " + " | ".join(_format(row.get(column, "")) for column in columns) + " |")
        if self.notes:
            lines += ["", *[f"- {note}" for note in self.notes]]
        return "\n".join(lines) + "\n"

    def bar_plot(
        self,
        metric: str,
        *,
        group: str | None = None,
        label: str = "method",
        log: bool = False,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Set the plot to a grouped bar chart of `metric`, one bar per `label`, grouped by `group`, over the rows
        `where` accepts (default: all)."""

        def draw(fig: Any) -> None:
            ax = fig.add_subplot(1, 1, 1)
            rows = [row for row in self.rows if where is None or where(row)]
            groups = [None] if group is None else list(dict.fromkeys(row[group] for row in rows))
            labels = list(dict.fromkeys(row[label] for row in rows))
            width = 0.8 / max(len(labels), 1)
            for i, name in enumerate(labels):
                values = [
                    next((r[metric] for r in rows if r[label] == name and (g is None or r[group] == g)), 0.0)
                    for g in groups
                ]
                ax.bar([x + i * width for x in range(len(groups))], values, width, label=str(name))
            ax.set_xticks([x + 0.4 - width / 2 for x in range(len(groups))], [str(g or "") for g in groups])
            ax.set_ylabel(metric)
            if log:
                ax.set_yscale("log")
            ax.set_title(self.title)
            ax.legend(fontsize="small")

        self.plot = draw

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "command": self.command,
            "setup": self.setup,
            "machine": self.machine,
            "rows": self.rows,
            "notes": self.notes,
        }

    @classmethod
    def load(cls, json_path: str | os.PathLike) -> BenchReport:
        """A report saved by `save` (its PNG beside it is reused), e.g. to record it without re-running."""
        data = json.loads(Path(json_path).read_text())
        report = cls(data["name"], data["title"], device=data["machine"]["device"], setup=data["setup"])
        report.rows, report.notes = data["rows"], data["notes"]
        report.machine, report.command = data["machine"], data["command"]
        png = Path(json_path).with_suffix(".png")
        report.saved_png = png if png.is_file() else None
        return report

    def save_plot(self, path: Path) -> Path:
        """Draw `self.plot` on a fresh figure (or copy a loaded report's PNG) and write it to `path`."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.plot is None and self.saved_png is not None:
            if self.saved_png.resolve() != path.resolve():
                shutil.copyfile(self.saved_png, path)
            return path
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(8, 4.5))
        self.plot(fig)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def save(self, out_dir: str | os.PathLike = "bench-results") -> list[Path]:
        """Write `NAME.json`, `NAME.md` and (if a plot is set) `NAME.png` into `out_dir`; return the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{self.stem}.json", out / f"{self.stem}.md"]
        paths[0].write_text(json.dumps(self.to_dict(), indent=2, default=str))
        paths[1].write_text(self.to_markdown())
        if self.plot is not None or self.saved_png is not None:
            paths.append(self.save_plot(out / f"{self.stem}.png"))
        return paths

    def record(self, benchmarks_md: str | os.PathLike = "BENCHMARKS.md", assets_dir: str = "docs/benchmarks") -> None:
        """Replace (or append) this report's section in BENCHMARKS.md, between `<!-- bench:STEM -->` markers.

        The plot is saved to `assets_dir` (next to BENCHMARKS.md, committed) and linked from the section.
        """
        path = Path(benchmarks_md)
        text = path.read_text() if path.exists() else "# Benchmarks\n"
        begin, end = f"<!-- bench:{self.stem} -->", f"<!-- /bench:{self.stem} -->"
        body = self.to_markdown()
        if self.plot is not None or self.saved_png is not None:
            png = self.save_plot(path.parent / assets_dir / f"{self.stem}.png")
            body += f"\n![{self.title}]({assets_dir}/{png.name})\n"
        section = f"{begin}\n{body}{end}"
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            text = head + section + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
        path.write_text(text)


def ratio(candidate: float, baseline: float) -> float:
    """`candidate / baseline`, or NaN when the baseline is zero."""
    return candidate / baseline if baseline else float("nan")


class ForwardCounter:
    """Counts a model's forward calls, e.g. target forwards per generated token in speculative decoding.

    ```python
    with ForwardCounter(model) as counter:
        model.generate(...)
    print(counter.calls)
    ```
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.calls = 0

    def _hook(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        self.calls += 1

    def __enter__(self) -> ForwardCounter:
        self.calls = 0
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
