"""What every bench suite shares: options (--quick, --out), the result JSON (the exact command,
params, machine; atomic), pairing, tables and launching under a hard limit (docs/bench.md).

Not tied to a checkout: paths are relative to the current folder. The MPI launcher is the first
of $HDB_MPIRUN (a command line), scripts/mpirun_local.sh under the current folder (the repository
root: what `make bench` uses, with --oversubscribe, --bind-to none and Open MPI's root variables)
and `mpirun` on PATH. Default data: data/fashion-mnist.h5; config: the package's fashion_mnist.yaml.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from argparse import ArgumentParser, Namespace
from collections.abc import Callable
from typing import Any

import torch

from hpc_dualbatch.atomic import write_json
from hpc_dualbatch.config import OptimConfig
from hpc_dualbatch.errors import ConfigError
from hpc_dualbatch.runtime.engine import make_optimizer, train_step
from hpc_dualbatch.runtime.launch import run_main
from hpc_dualbatch.runtime.model import build_model

DATA = os.path.join("data", "fashion-mnist.h5")
CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "fashion_mnist.yaml")
LOCAL_MPIRUN = os.path.join("scripts", "mpirun_local.sh")
LAUNCHER_ENV = "HDB_BENCH_LAUNCHER"  # set by `command_for`: the launcher part of a job's command


def parser(suite: str, doc: str, out: bool = True, **options: tuple) -> ArgumentParser:
    """options: name=(default, help[, choices]); the type is the default's, a bool is a flag, a
    list a repeatable KEY=VALUE."""
    p = ArgumentParser(prog=f"hpc-dualbatch bench {suite}", description=doc.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the harness, measures nothing")
    if out:
        p.add_argument("--out", default=os.path.join("results", "bench", f"{suite}.json"))
    for name, (default, help_, *choices) in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true", help=help_)
        elif isinstance(default, list):
            p.add_argument(flag, action="append", default=default, metavar="KEY=VALUE", help=help_)
        else:
            choice = choices[0] if choices else None
            p.add_argument(flag, type=type(default), default=default, help=help_, choices=choice)
    return p


def start(p: ArgumentParser, argv: list[str], positive: str = "", **quick: Any) -> Namespace:
    """Parse argv; --quick sets the given options; the options named in `positive` must be >= 1;
    SIGTERM (a `bench all` time limit) exits through SystemExit, so temporary folders go too."""
    args = p.parse_args(argv)
    for name, value in quick.items() if args.quick else ():
        setattr(args, name, value)
    low = [f"--{n.replace('_', '-')} {getattr(args, n)}" for n in positive.split() if getattr(args, n) < 1]
    if low:
        raise ConfigError(f"{p.prog}: {', '.join(low)}: must be >= 1")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return args


def machine() -> dict[str, Any]:
    """Where a result was measured: host, cores, torch threads, versions, load at the time."""
    info: dict[str, Any] = {
        "host": platform.node(), "cpus": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "python": platform.python_version(),
        "loadavg_1m": round(os.getloadavg()[0], 2),  # other engineers' jobs share this machine
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip
    if "mpi4py.MPI" in sys.modules:
        from mpi4py import MPI

        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip().rstrip("\x00")
        info["mpi_ranks"] = MPI.COMM_WORLD.Get_size()
    return info


def write_result(path: str, suite: str, args: Namespace, argv: list[str], **fields: Any) -> None:
    """Write {bench, command, params, machine, **fields} atomically. The command is this process's
    as it was typed, led by the launcher when `launch` started it; when argv is not its tail (a
    suite's main() called in-process), the equivalent command."""
    typed = getattr(sys, "orig_argv", [sys.executable, *sys.argv])  # Python < 3.10: argv[0] as resolved
    command = " ".join(filter(None, [os.environ.get(LAUNCHER_ENV), shlex.join(typed)]))
    if sys.argv[len(sys.argv) - len(argv) :] != argv:
        command = shlex.join(["python", "-m", "hpc_dualbatch", "bench", suite, *argv])
    write_json(
        path, {"bench": suite, "command": command, "params": vars(args), "machine": machine(), **fields}
    )
    print(f"wrote {path}")


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-repeat ratios a_i / b_i (pairs measured next to each other)."""
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def alternate(repeats: int, kinds: tuple[str, ...], job: Callable[[str, int], dict]) -> dict[str, list]:
    """`repeats` rounds of one job per kind, in order in even rounds and reversed in odd ones (a
    drifting load favours none); job(kind, repeat) returns a dict with img_s."""
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(repeats):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            runs[kind].append(job(kind, i))
        rates = ", ".join(f"{k} {runs[k][-1]['img_s']:.1f} img/s" for k in kinds)
        print(f"repeat {i + 1}/{repeats}: {rates}", flush=True)
    return runs


def resnet(width: int, classes: int = 10, channels: int = 1, lr: float = 0.01, device: Any = "cpu") -> tuple:
    """resnet18_cifar (torch seed 0) in training mode, with the package's default SGD: (model, optimizer)."""
    torch.manual_seed(0)
    model = build_model("resnet18_cifar", classes, channels, width).to(device).train()
    return model, make_optimizer(model, OptimConfig(), lr=lr)


def train_seconds(model: Any, opt: Any, batches: Any) -> tuple[float, int]:
    """Wall seconds and samples of `engine.train_step` over `batches` (a loader's start-up
    included); the loss's .item() in each step waits for it, on a GPU too."""
    t0, n = time.perf_counter(), 0
    for x, y in batches:
        train_step(model, opt, x, y)
        n += len(y)
    return time.perf_counter() - t0, n


def table(columns: str, rows: list[list]) -> str:
    """columns: "head:format|..."; right-aligned, left where the head starts with '<'; None prints '-'."""
    cols = [c.partition(":") for c in columns.split("|")]
    cells = [[h.lstrip("<") for h, _, _ in cols]]
    cells += [["-" if v is None else format(v, f) for v, (_, _, f) in zip(r, cols)] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    return "\n".join(
        " ".join(c.ljust(w) if h[:1] == "<" else c.rjust(w) for c, w, (h, _, _) in zip(row, widths, cols))
        for row in cells
    )


def launcher() -> list[str]:
    """The MPI launcher (see the module docstring)."""
    if os.environ.get("HDB_MPIRUN"):
        return shlex.split(os.environ["HDB_MPIRUN"])
    if os.path.isfile(LOCAL_MPIRUN):
        return [os.path.abspath(LOCAL_MPIRUN)]
    if shutil.which("mpirun"):
        return ["mpirun"]
    raise ConfigError(
        "bench: no MPI launcher: set HDB_MPIRUN (e.g. HDB_MPIRUN='mpirun --oversubscribe'), put mpirun "
        f"on PATH, or run from the repository root (where {LOCAL_MPIRUN} is)"
    )


def command_for(args: list[str], ranks: int = 0) -> tuple[list[str], dict[str, str]]:
    """`python -m hpc_dualbatch ARGS`, under the MPI launcher on `ranks` > 0 ranks: (command, env to add)."""
    cmd = [sys.executable, "-m", "hpc_dualbatch", *args]
    prefix = [*launcher(), "-np", str(ranks)] if ranks else []
    return [*prefix, *cmd], {LAUNCHER_ENV: shlex.join(prefix)} if ranks else {}


def launch(ranks: int, args: list[str], timeout: float) -> str:
    """`python -m hpc_dualbatch ARGS` on `ranks` MPI ranks (0: a plain process) under a hard limit."""
    return run(*command_for(args, ranks), timeout)


def run(cmd: list[str], env: dict[str, str], timeout: float, own_group: bool = False) -> str:
    """Run `cmd`; returns stdout, raises RuntimeError with the output's tail. Past the limit:
    SIGTERM (mpirun passes it on to its ranks), 10 s, SIGKILL; with own_group to the child's whole
    process group (a suite and the MPI jobs it launched), so no stray rank keeps loading the machine."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=own_group,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL: what is left, the child or its group
            try:
                os.killpg(proc.pid, sig) if own_group else proc.send_signal(sig)  # the group made here only
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        proc.communicate()
        raise RuntimeError(f"{shlex.join(cmd)}: no result after {timeout:.0f} s (stopped)") from None
    if proc.returncode != 0:
        tail = "\n".join((out + err).strip().splitlines()[-15:])
        raise RuntimeError(f"{shlex.join(cmd)} exited with {proc.returncode}:\n{tail}")
    return out


def staged_file(file: str, source: str, resolutions: str, tmp: str) -> str:
    """--file; else DATA when present and no --source is asked for; else `source` staged into
    `tmp` (fashion-mnist where Debian's copy is installed, synthetic otherwise)."""
    if file or (not source and os.path.exists(DATA)):
        return file or DATA
    from hpc_dualbatch.data import prepare
    from hpc_dualbatch.data.fashion_mnist import FASHION_MNIST_DIR

    source = source or ("fashion-mnist" if os.path.isdir(FASHION_MNIST_DIR) else "synthetic")
    path = os.path.join(tmp, f"{source}.h5")
    prepare(source, None, resolutions, path, log=lambda s: None)
    return path


def module_main(main: Callable[[list[str]], int]) -> None:
    """`python -m hpc_dualbatch.bench.SUITE ARGS`: as `hpc-dualbatch bench SUITE ARGS`."""
    sys.exit(run_main(main, sys.argv[1:]))
