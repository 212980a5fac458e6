"""What every benchmark shares: the clock, the hardware record, the result JSON and its section of
``docs/benchmarks.md``.

A benchmark is a short module over this one: ``run(args) -> dict`` measures (its numbers, rounded,
in a flat JSON-able dict headed by :func:`record`), and ``render(result, key) -> str`` turns such a
dict into its markdown section; :func:`main_for` is the rest of its ``main``. The doc is only ever
written from a result, so a figure in it always has a JSON behind it, and every goal sentence is
computed from that JSON: a goal is data (:class:`Goal`), and "met"/"not met" is its comparison
with the value the renderer computes from the run's numbers, never typed. ``--render FILE``
rewrites a section from a result measured before, so old results are shown the same way.

Fairness, which the clock helps with: ratios are taken within one run (the machines are shared and
noisy), and a clock that stops while the GPU still has queued work measures the launch, not the
work, so :class:`Timer` synchronises CUDA before it reads the time.

The doc holds one section per result file, between ``<!-- bench:KEY -->`` and
``<!-- /bench:KEY -->`` (KEY is the result's file stem); a run replaces its own section only.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import operator
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
DOC_HEADER = "# Benchmarks\n"

# --- the clock ---------------------------------------------------------------------------------


def sync(device: Any = None) -> None:
    """Wait for the GPU's queued work when ``device`` is (or defaults to) a CUDA device in use."""
    torch = sys.modules.get("torch")  # a benchmark that never imported torch never used a GPU
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    if device is None or torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``; CUDA is synchronised at both ends.

    Synchronising at the start keeps work queued before the block out of it; at the end it keeps
    the block's own queued work in.
    """

    def __init__(self, device: Any = None):
        self.device, self.seconds = device, float("nan")

    def __enter__(self) -> Timer:
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def timed(
    fn: Callable[..., Any], *args: Any, device: Any = None, **kwargs: Any
) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and the seconds it took (GPU work included)."""
    with Timer(device) as t:
        out = fn(*args, **kwargs)
    return out, t.seconds


def mean_after_warmup(values: list[float]) -> float:
    """Mean of all but the first value (the warm-up epoch: allocator, cuDNN, Ray start-up)."""
    vals = values[1:] if len(values) > 1 else values
    return sum(vals) / len(vals) if vals else float("nan")


def cpu_times(stat: Path = Path("/proc/stat")) -> tuple[int, int, int] | None:
    """All CPUs' (busy, steal, total) clock ticks since boot from ``/proc/stat``'s ``cpu`` line;
    None where there is no such file. Busy is user, nice, system, irq and softirq (a guest's time
    is in user and nice already); steal, the time the hypervisor gave to other machines, is not
    this machine's work."""
    try:
        with open(stat) as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal, sum(fields)


def quiesce(
    busy_below: float = 0.15,
    window_s: float = 1.0,
    max_wait_s: float = 60.0,
    read: Callable[[], tuple[int, int, int] | None] = cpu_times,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any] | None:
    """Wait until the machine's CPUs are idle: the busy share of all CPUs over one ``window_s``
    window below ``busy_below`` (nothing else running), or ``max_wait_s`` seconds gone. Returns
    the seconds waited (at least one window), the last window's busy and steal shares and whether
    it was quiet; None where the CPU times cannot be read (no ``/proc/stat``).

    Before a baseline run on a few shared cores: what ran just before it (processes started in the
    background, e.g. Ray workers importing torch) would otherwise slow the baseline."""
    start, last = clock(), read()
    if last is None:
        return None
    while True:
        sleep(window_s)
        cur = read()
        if cur is None:
            return None
        busy, steal, total = (c - p for c, p in zip(cur, last, strict=True))
        share = busy / total if total > 0 else 0.0
        waited = clock() - start
        if share < busy_below or waited >= max_wait_s:
            return {
                "waited_s": round(waited, 1),
                "busy_share": round(share, 3),
                "steal_share": round(steal / total if total > 0 else 0.0, 3),
                "quiet": share < busy_below,
            }
        last = cur


def whole(minimum: int) -> Callable[[str], int]:
    """argparse's type for a whole number >= ``minimum``: a bad one is a usage error (exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def scratch(prefix: str) -> Path:
    """A new temporary folder (``prefix`` names it), removed with everything in it when this
    process ends, however it ends: a benchmark's generated datasets, runs and checkpoints (a
    1M-row image set is 3 GB) do not pile up in the temporary folder run after run. Its results go
    to ``--out``.

    ``atexit`` removes it on a normal exit. A process ended by a signal (``timeout``'s SIGTERM, a
    SIGKILL, the OOM killer) runs no ``atexit``: a small process of its own (:data:`_REAPER`,
    one per benchmark process, in a session of its own so ``timeout`` does not signal it too)
    removes the folders once this process's end closes the pipe it reads them from. The signals
    keep their default action: a benchmark stuck in a CUDA or Ray call still ends when told."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    _reap_when_gone(path)
    return path


# Reads one folder a line until its stdin closes (the benchmark process has ended, however), then
# removes them; a folder already removed by atexit is skipped.
_REAPER = (
    "import shutil, sys\n"
    "paths = [line.rstrip('\\n') for line in sys.stdin]\n"
    "for p in paths:\n"
    "    shutil.rmtree(p, ignore_errors=True)\n"
)
_reaper: subprocess.Popen | None = None


def _reap_when_gone(path: Path) -> None:
    global _reaper
    # No process to spare (OSError): atexit still removes the folder on a normal exit.
    with contextlib.suppress(OSError):
        if _reaper is None or _reaper.poll() is not None:
            _reaper = subprocess.Popen(
                [sys.executable, "-c", _REAPER],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
        _reaper.stdin.write(f"{path}\n")
        _reaper.stdin.flush()


# --- the hardware record -----------------------------------------------------------------------
HARDWARE_KEYS = tuple(
    "cpu_model cpu_cores memory_gib gpu gpu_memory_gib cuda python torch ray lepton_ray git_sha "
    "date host_speed".split()
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return None


def git_sha() -> str | None:
    """The commit measured, with ``+dirty`` when the working tree differs from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return None
    return (sha + ("+dirty" if dirty else "")) or None


def hardware() -> dict[str, Any]:
    """CPU, memory, GPU (when torch sees one), library versions, git SHA, date and the host's speed
    (:func:`host_speed`) of this run."""
    hw: dict[str, Any] = dict.fromkeys(HARDWARE_KEYS)
    hw.update(
        cpu_model=cpu_model(),
        cpu_cores=os.cpu_count(),
        memory_gib=_memory_gib(),
        python=platform.python_version(),
        torch=_version("torch"),
        ray=_version("ray"),
        lepton_ray=_version("lepton-ray") or _version("lepton_ray"),
        git_sha=git_sha(),
        date=now(),
        host_speed=host_speed(),
    )
    try:
        import torch
    except ImportError:
        return hw
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        hw.update(
            gpu=f"{torch.cuda.device_count()}x {p.name}",
            gpu_memory_gib=round(p.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
    return hw


def host_speed() -> dict[str, float]:
    """How fast this host runs Python, best of three: a loop of a million additions (ms). Machines
    lent as one kind differed about 2x in the time their host took for one training step, and a
    loop bound by the CPU that launches its kernels runs only as fast as its host lets it.
    :func:`finish` adds the host's time per CUDA kernel launch once the run is over."""

    def loop() -> None:
        x = 0
        for i in range(1_000_000):
            x += i

    # device="cpu": host time alone (timed would wait for a GPU this process had used)
    return {"python_loop_ms": round(min(timed(loop, device="cpu")[1] for _ in range(3)) * 1e3, 1)}


def launch_us() -> float | None:
    """The host's time per launch of a one-element CUDA kernel (µs, best of three runs of 2,000);
    None without a GPU or where this process never imported torch. Measured after a run, never
    before: it creates a CUDA context in this process, which would change what a run that leaves
    the GPU to its workers measures (their start, the GPU's memory)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    try:
        t = torch.zeros(1, device="cuda")

        def launches() -> None:
            for _ in range(2000):
                t.add_(1)

        launches()  # the first launch's set-up is not a launch's cost
        torch.cuda.synchronize()
        runs = []
        for _ in range(3):
            runs.append(timed(launches, device="cpu")[1] / 2000 * 1e6)  # the launches alone
            torch.cuda.synchronize()  # the queue empty before the next run's clock starts
        return round(min(runs), 2)
    except Exception:  # noqa: BLE001 - a GPU this process cannot use: the result is kept without
        return None


def now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def hardware_summary(hw: Any) -> str:
    """One line for a doc; older results kept the hardware as a string or a ``summary`` key."""
    if not hw:
        return "hardware not recorded"
    if isinstance(hw, str):
        return hw
    if hw.get("summary"):
        return hw["summary"]
    parts = [f"{hw.get('cpu_model')} ({hw.get('cpu_cores')} cores)"]
    if hw.get("memory_gib"):
        parts.append(f"{hw['memory_gib']} GiB")
    parts.append(f"{hw['gpu']} ({hw.get('gpu_memory_gib')} GiB)" if hw.get("gpu") else "no GPU")
    parts.append(f"torch {hw.get('torch')}, Ray {hw.get('ray')}")
    speed = hw.get("host_speed") or {}
    if speed:
        host = f"host: a million Python additions in {speed['python_loop_ms']} ms"
        if speed.get("cuda_launch_us") is not None:
            host += f", {speed['cuda_launch_us']} µs per kernel launch"
        parts.append(host)
    if hw.get("git_sha"):
        parts.append(f"lepton_ray at {hw['git_sha']}")
    return ", ".join(parts)


# --- goals -------------------------------------------------------------------------------------
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Goal:
    """A target on one of a run's metrics; whether it is met is computed, never written.

    ``metric`` is a dotted path into the metrics a benchmark computes from its result
    (``"by_ingress.haproxy.p50_added_ms"``).
    """

    text: str
    metric: str
    op: str
    target: float | bool

    def __post_init__(self) -> None:
        if self.op not in _OPS:
            raise ValueError(f"Goal op must be one of {sorted(_OPS)}, not {self.op!r}")

    def value(self, metrics: Mapping[str, Any]) -> Any:
        node: Any = metrics
        for part in self.metric.split("."):
            if not isinstance(node, Mapping) or part not in node:
                return None
            node = node[part]
        return node

    def met(self, metrics: Mapping[str, Any]) -> bool | None:
        """True/False from the value; None when the run did not measure it."""
        v = self.value(metrics)
        return None if v is None else bool(_OPS[self.op](v, self.target))

    def line(self, metrics: Mapping[str, Any]) -> str:
        v, met = self.value(metrics), self.met(metrics)
        if met is None:
            return f"- Goal {self.text}: not measured in this run."
        verdict = "**met**" if met else "**not met**"
        return f"- Goal {self.text}: {verdict} ({self.metric} = {fmt(v, 3)})."


def goal_lines(goals: list[Goal], metrics: Mapping[str, Any]) -> str:
    return "\n".join(g.line(metrics) for g in goals)


# --- markdown ----------------------------------------------------------------------------------
def fmt(v: Any, digits: int = 1) -> str:
    """A number as a doc shows it: thousands separated, ``–`` for nothing."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[c if isinstance(c, str) else fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def provenance(result: Mapping[str, Any], key: str, benchmark: str | None = None) -> str:
    """The line under a heading: how it was run, when, on what, and which JSON holds it.

    ``benchmark`` names the module for results that do not record it. A ``note`` in the result
    (added to its JSON after the run, e.g. a bug found in the code it measured) follows the line.
    """
    hw = result.get("hardware")
    when = result.get("measured_at") or (hw.get("date") if isinstance(hw, dict) else None)
    name = result.get("benchmark") or benchmark or key
    command = f"`{result.get('command') or f'python -m benchmarks.{name}'}`"
    if not result.get("command") and not (ROOT / "benchmarks" / f"{name}.py").exists():
        command += " (a script since split up)"
    on = f"on {hardware_summary(hw)}"
    measured = f"measured {when} {on}" if when else f"measured {on} (the JSON records no date)"
    line = f"{command}, {measured}; results: `benchmarks/results/{key}.json`."
    note = result.get("note")  # what was learned about the run after it: kept in its JSON
    return f"{line}\n\nNote: {note}" if note else line


# --- files -------------------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_result(result: Mapping[str, Any], key: str, out: str | Path = RESULTS) -> Path:
    """``<out>/<key>.json``, written whole or not at all."""
    path = Path(out) / f"{key}.json"
    _write_atomic(path, json.dumps(result, indent=1, default=str) + "\n")
    return path


def load_result(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def begin_marker(key: str) -> str:
    return f"<!-- bench:{key} -->"


def end_marker(key: str) -> str:
    return f"<!-- /bench:{key} -->"


def replace_section(text: str, key: str, section: str) -> str:
    """``text`` with the section between ``key``'s markers replaced (appended when absent)."""
    begin, end = begin_marker(key), end_marker(key)
    block = f"{begin}\n{section.strip()}\n{end}"
    i = text.find(begin)
    if i < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    j = text.find(end, i)
    if j < 0:
        raise ValueError(f"{begin} has no {end} after it")
    return text[:i] + block + text[j + len(end) :]


def write_section(key: str, section: str, doc: Path = DOC) -> None:
    text = doc.read_text() if doc.exists() else DOC_HEADER
    _write_atomic(doc, replace_section(text, key, section))


# --- the command line --------------------------------------------------------------------------
def parser(doc: str, key: str) -> argparse.ArgumentParser:
    """A benchmark's parser: its docstring as help, plus where results go."""
    ap = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{key}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out",
        default=None,
        help="write the result JSON here instead (the committed doc is then left alone)",
    )
    ap.add_argument(
        "--no-doc",
        "--no-report",
        dest="no_doc",
        action="store_true",
        help="touch neither benchmarks/results/ nor docs/benchmarks.md; print the JSON only",
    )
    ap.add_argument("--key", default=key, help=f"result file stem and doc section (default {key})")
    ap.add_argument(
        "--render",
        metavar="JSON",
        default=None,
        help="measure nothing: write the doc section of an existing result file",
    )
    return ap


def record(benchmark: str, **setup: Any) -> dict[str, Any]:
    """The head of a result: what ran, how, when and on what."""
    argv = " ".join(sys.argv[1:])
    return {
        "benchmark": benchmark,
        "command": f"python -m benchmarks.{benchmark}" + (f" {argv}" if argv else ""),
        "measured_at": now(),
        "hardware": hardware(),
        **setup,
    }


def finish(
    args: argparse.Namespace, result: dict[str, Any], render: Callable[[dict, str], str]
) -> None:
    """Print the result (its last line is the JSON on one line), then save it and its section;
    the host's time per kernel launch goes into its hardware record first, where there is a GPU."""
    speed = (result.get("hardware") or {}).get("host_speed")
    if isinstance(speed, dict) and "cuda_launch_us" not in speed:
        launch = launch_us()
        if launch is not None:
            speed["cuda_launch_us"] = launch
    if args.out is not None:
        print(f"result: {save_result(result, args.key, args.out)} (doc left alone)")
    elif not args.no_doc:
        save_result(result, args.key)
        write_section(args.key, render(result, args.key))
        print(f"result: {RESULTS / (args.key + '.json')}; section {args.key} of {DOC}")
    print(json.dumps(result, default=str))


def render_only(args: argparse.Namespace, render: Callable[[dict, str], str]) -> None:
    """``--render FILE``: the section of a result measured before, from its JSON alone."""
    key = Path(args.render).stem if args.key == args.default_key else args.key
    write_section(key, render(load_result(args.render), key))
    print(f"section {key} of {DOC} rendered from {args.render}")


def main_for(
    doc: str,
    key: str,
    add_args: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict, str], str],
    argv: list[str] | None = None,
) -> None:
    """The whole of a benchmark's ``main``: parse, then measure and report, or only render."""
    ap = parser(doc, key)
    add_args(ap)
    args = ap.parse_args(argv)
    args.default_key = key
    if args.render:
        render_only(args, render)
        return
    finish(args, run(args), render)
