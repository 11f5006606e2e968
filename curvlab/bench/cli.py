"""The ``curvlab`` command: ``list``, ``bench``, ``report``, ``compare``, ``overhead``,
``products``, ``reproduce`` and ``smw-cost``.

Exit codes: 0 success; 1 a run or report failed (e.g. data files missing); 2 a usage error
(unknown problem / optimizer / preset name, bad option or hyperparameter value).

``bench --nproc N`` runs data-parallel on N processes of this machine: it starts itself again
under torchrun (``--standalone``; gloo on CPU, NCCL with ``--device cuda``, one GPU per
process). A ``bench`` started by torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, e.g.
on several nodes) joins that run instead. Only rank 0 draws progress and writes the record;
the record's ``summary["comm"]`` has the bytes communicated per step.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvlab.bench.cost.overhead import add_overhead_parser, run_overhead_command
from curvlab.bench.cost.products import add_products_parser, run_products_command
from curvlab.bench.cost.smw import add_smw_cost_parser, run_smw_cost_command
from curvlab.bench.listing import catalog, format_catalog
from curvlab.bench.problems import get_problem
from curvlab.bench.records import environment, load_records, record_path, write_json
from curvlab.bench.registry import UnknownNameError
from curvlab.bench.report import markdown_table, summarize, write_report
from curvlab.bench.reproduce import add_reproduce_parser, register, run_reproduce_command
from curvlab.bench.runner import Budget, resolve_device, run
from curvlab.bench.specs import COMPARE_DEFAULT, get_optimizer, presets_for
from curvlab.distributed import (
    DEFAULT_TIMEOUT_S,
    MODES,
    destroy_process_group,
    from_environment,
    in_torchrun,
    torchrun_command,
)

__all__ = ["main", "parse_value"]

DEFAULT_COMPARE_PROBLEM = "curves-autoencoder"
DEFAULT_COMPARE_SECONDS = 30.0


class UsageError(Exception):
    """A bad command line: reported on stderr with exit code 2."""


def parse_value(text: str) -> Any:
    """A ``--set`` value: bool, None, int, float, a comma-separated list of those, or str."""
    if "," in text:
        return [parse_value(part) for part in text.split(",")]
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--set: expected key=value, got {item!r}")
        values[key.strip()] = parse_value(raw.strip())
    return values


def _budget(args: argparse.Namespace, default: Budget) -> Budget:
    if args.steps is None and args.epochs is None and args.seconds is None:
        return default
    try:
        return Budget(steps=args.steps, epochs=args.epochs, seconds=args.seconds)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _add_run_options(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=int, help="stop after N optimizer steps")
    budget.add_argument("--epochs", type=float, help="stop after E epochs")
    budget.add_argument("--seconds", type=float, help="stop after S seconds of training time")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--subset", type=int, help="train on the first N training examples")
    p.add_argument("--threads", type=int, help="torch.set_num_threads(T)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--out", default="results", help="records directory (default results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="curvlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="optimizers, problems and presets")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("bench", help="one problem × optimizer run → JSON record")
    p.add_argument("--problem", required=True)
    p.add_argument("--optimizer", required=True)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="hyperparameter override (int/float/bool/str, a,b for lists)",
    )
    p.add_argument("--preset", help="named hyperparameters for this optimizer and problem")
    p.add_argument("--label", help="name in reports and folder (default: the optimizer)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last epoch-end checkpoint (single process)",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="data-parallel processes on this machine, started with torchrun (default 1)",
    )
    p.add_argument(
        "--dist-mode",
        choices=MODES,
        default="inverses",
        help="data-parallel: owners broadcast inverses (default) or preconditioned gradients",
    )
    p.add_argument(
        "--ddp", action="store_true", help="data-parallel: wrap the model in DDP (default: not)"
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"data-parallel: collective timeout in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )
    _add_run_options(p)

    p = sub.add_parser("report", help="report.md and PNG plots from a records directory")
    p.add_argument("dir")
    p.add_argument("--target", type=float, help="add a time-to-training-loss column")

    p = sub.add_parser("compare", help="several optimizers on one problem, then the report")
    p.add_argument(
        "--problem",
        default=DEFAULT_COMPARE_PROBLEM,
        help=f"default {DEFAULT_COMPARE_PROBLEM}; budget default --seconds "
        f"{DEFAULT_COMPARE_SECONDS:g} per optimizer",
    )
    p.add_argument(
        "--optimizers",
        help="comma-separated (default: sgd-m, adam and one of each curvature method: "
        + ",".join(COMPARE_DEFAULT)
        + ")",
    )
    p.add_argument(
        "--preset",
        default="thesis",
        help="preset used where one exists for the pair (default thesis; 'none' off)",
    )
    _add_run_options(p)

    add_overhead_parser(sub)
    add_products_parser(sub)
    add_reproduce_parser(sub)
    add_smw_cost_parser(sub)
    return parser


def _cmd_list(args: argparse.Namespace) -> int:
    print(json.dumps(catalog(), indent=1) if args.json else format_catalog())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    problem = get_problem(args.problem)
    get_optimizer(args.optimizer)
    hparams = _parse_sets(args.set)
    budget = _budget(args, Budget(epochs=1))
    if args.nproc < 1:
        raise UsageError(f"--nproc: must be at least 1, got {args.nproc}")
    if args.dist_timeout <= 0:
        raise UsageError(f"--dist-timeout: must be positive, got {args.dist_timeout}")
    if args.nproc > 1 and not in_torchrun():
        # Start this command again on N local processes; torchrun stops them all if one fails.
        return subprocess.call(
            torchrun_command(args.nproc, "curvlab.bench.cli", _without_nproc(args.argv))
        )
    communicator = None
    device = resolve_device(args.device)
    if in_torchrun():
        communicator, device = from_environment(device, timeout_s=args.dist_timeout)
    checkpoint = None
    if communicator is None:  # single process: a checkpoint at every epoch end
        label = args.label or args.optimizer
        checkpoint = record_path(args.out, problem.name, label, args.seed).with_suffix(".ckpt.pt")
        if args.resume and not checkpoint.is_file():
            raise UsageError(f"--resume: no checkpoint at {checkpoint}")
    elif args.resume:
        raise UsageError("--resume: data-parallel runs (--nproc) cannot resume yet")
    try:
        record = run(
            problem,
            args.optimizer,
            hparams,
            seed=args.seed,
            budget=budget,
            device=device,
            progress=not args.no_progress,
            subset=args.subset,
            threads=args.threads,
            preset=args.preset,
            label=args.label,
            communicator=communicator,
            dist_mode=args.dist_mode,
            ddp=args.ddp,
            checkpoint=checkpoint,
            resume=args.resume,
        )
    finally:
        if communicator is not None:
            destroy_process_group()
    if communicator is not None and communicator.rank != 0:
        return 0  # rank 0 writes the record
    path = record.save(args.out)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # the run finished: its record is what remains
    _write_environment(args.out, record.config["device"])
    s = record.summary
    print(
        f"{path}: {s['steps']} steps, {s['epochs']:.2f} epochs, train loss "
        f"{s['final_train_loss']:.5g}, {record.config['test_metric']} "
        f"{s['final_test_metric']:.5g}, {s['wall_s']:.1f} s, {s['status']}"
    )
    return 0


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` (torchrun's parser would take it for its own
    ``--nproc-per-node``; the workers know their number from torchrun)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _write_environment(out: str | Path, device: str) -> None:
    write_json(Path(out) / "environment.json", environment(device))


def _cmd_report(args: argparse.Namespace) -> int:
    paths = write_report(args.dir, args.target)
    for path in paths:
        print(path)
    return 0


def _compare_optimizers(args: argparse.Namespace) -> list[str]:
    if args.optimizers:
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    else:
        names = list(COMPARE_DEFAULT)
    for name in names:
        get_optimizer(name)
    if not names:
        raise UsageError("--optimizers: give at least one name")
    return names


def _cmd_compare(args: argparse.Namespace) -> int:
    problem = get_problem(args.problem)
    names = _compare_optimizers(args)
    budget = _budget(args, Budget(seconds=DEFAULT_COMPARE_SECONDS))
    for name in names:
        preset = args.preset if args.preset in presets_for(name, problem.name) else None
        print(
            f"{name}: {'preset ' + preset if preset else 'default hyperparameters'}",
            file=sys.stderr,
        )
        record = run(
            problem,
            name,
            None,
            seed=args.seed,
            budget=budget,
            device=args.device,
            progress=not args.no_progress,
            subset=args.subset,
            threads=args.threads,
            preset=preset,
        )
        record.save(args.out)
        _write_environment(args.out, record.config["device"])
    paths = write_report(args.out)
    mine = [r for r in load_records(args.out) if r.problem == problem.name and r.label in names]
    print(markdown_table(summarize(mine)))
    print("\n".join(str(p) for p in paths))
    return 0


_COMMANDS = {
    "list": _cmd_list,
    "bench": _cmd_bench,
    "report": _cmd_report,
    "compare": _cmd_compare,
    "overhead": run_overhead_command,
    "products": run_products_command,
    "reproduce": run_reproduce_command,
    "smw-cost": run_smw_cost_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvlab`` console script; returns the exit code."""
    register()  # the reproductions' problems (e.g. fmnist-mlp-tanh) are benchmarkable too
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else 2
    args.argv = argv  # bench --nproc starts itself again with them under torchrun
    try:
        return _COMMANDS[args.command](args)
    except (UnknownNameError, UsageError) as err:
        print(f"curvlab {args.command}: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"curvlab {args.command}: invalid value: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:
        print(f"curvlab {args.command}: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
