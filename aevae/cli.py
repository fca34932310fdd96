"""`aevae` console script: one subcommand per capability; bad input is one line and exit code 2."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Callable, Sequence

from aevae import console
from aevae.errors import CommandFailed, TrainingDiverged, UsageError, causes
from aevae.tracking import mask_secrets
from aevae.ui import snapshot, ui


OPEN_HINT = "open it: aevae ui"


def train(args: Sequence[str]) -> int:
    """Train an AE or VAE from an experiment config, recorded as one MLflow run."""
    from aevae.training import parse_config, run_training

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop like Ctrl-C: the run ends KILLED, exit 1
    if console.level() == "quiet":  # only the result: no progress bar, no model summary
        args = [*args, "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    result = run_training(parse_config(args))
    if result.run_id:
        console.say(f"run {result.run_id} finished: {mask_secrets(result.tracking_uri)}")
        console.summary(OPEN_HINT)
    return 0


def sweep(args: Sequence[str]) -> int:
    """Run or resume an Optuna sweep (sweeps/*.yaml): one MLflow parent run, one child run per trial."""
    from aevae.sweep import sweep_command

    return sweep_command(args)


def best(args: Sequence[str]) -> int:
    """Print a study's best trial (or Pareto front): params, scores, MLflow run ids."""
    from aevae.sweep import best_command

    return best_command(args)


def analyze(args: Sequence[str]) -> int:
    """Recompute a run's latent-space analysis from its logged checkpoint and add it to the run."""
    from aevae.reanalysis import analyze_run

    uri, latent = analyze_run(args)
    console.say(" ".join(f"{key}={value:.4g}" for key, value in latent.scores.items() if not key.startswith("kl_dim")))
    console.summary(f"analysis logged under latent/: {mask_secrets(uri)}")
    return 0


def compare(args: Sequence[str]) -> int:
    """Train AE and VAE over seeds (experiments/ae_vs_vae.yaml): side-by-side figure and score table."""
    from aevae.compare import run_compare

    result = run_compare(args)
    console.say(result.markdown)
    console.summary(f"figure: {result.figure}")
    console.summary(f"parent run {result.parent_run_id}: {mask_secrets(result.tracking_uri)}")
    console.summary(OPEN_HINT)
    return 0


def server(args: Sequence[str]) -> int:
    """Start a team's MLflow tracking server (PostgreSQL or SQLite, proxied artifacts, basic auth)."""
    from aevae.server import server as start_server

    return start_server(args)


def reproduce(args: Sequence[str]) -> int:
    """Retrain a finished run or a sweep's best trial on any devices; compare; register the model."""
    from aevae.reproduce import reproduce_command

    return reproduce_command(args)


def ood(args: Sequence[str]) -> int:
    """Out-of-distribution detection: score a run's test images against another data set's (AUROC, AUPR, FPR95)."""
    from aevae.ood import ood_command

    return ood_command(args)


def samples(args: Sequence[str]) -> int:
    """Sample quality: VAE prior and AE/VAE + GMM samples against test images (Fréchet distance, precision/recall)."""
    from aevae.samples import samples_command

    return samples_command(args)


COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"train": train, "ui": ui, "snapshot": snapshot, "sweep": sweep, "best": best, "analyze": analyze, "compare": compare, "reproduce": reproduce, "server": server, "ood": ood, "samples": samples}
QUIET_COMMANDS = {"ui", "snapshot", "server"}  # they import no library that chatters: not Lightning, not Optuna
CONSOLE_FLAGS = ("--verbose", "--quiet")


def console_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """--verbose and --quiet, wherever they stand (before or after the command), taken out of the arguments."""
    verbose, quiet = "--verbose" in argv, "--quiet" in argv
    if verbose and quiet:
        raise UsageError("--verbose, --quiet: choose one")
    return [arg for arg in argv if arg not in CONSOLE_FLAGS], verbose, quiet


def usage() -> str:
    lines = [
        "usage: aevae [--allow-import PACKAGE] COMMAND [options]   (aevae COMMAND --help for a command's options)",
        "",
        "--allow-import PACKAGE  let configs name classes from PACKAGE (default: only aevae and torch.nn)",
        "--verbose               also show the libraries' own messages (Lightning, MLflow, Optuna)",
        "--quiet                 print only the result",
        "",
        "exit codes: 0 done, 1 failed (diverged, every trial failed, not reproduced), 2 bad input, 130 interrupted",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {handler.__doc__.splitlines()[0]}" for name, handler in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while len(argv) >= 2 and argv[0] == "--allow-import":  # trust code outside aevae and torch.nn
        from aevae.training import ALLOWED_IMPORTS

        ALLOWED_IMPORTS.append(argv[1])
        argv = argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, args = argv[0], argv[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        print(f"aevae: error: unknown command {command!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("MPLBACKEND", "Agg")  # headless plots; set before matplotlib is imported
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # keep MLflow's database INFO lines off stderr
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # the same where mlflow was imported already
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        args, verbose, quiet = console_flags(args)
        console.configure(verbose, quiet)
        chatty = command not in QUIET_COMMANDS
        if chatty:
            console.quiet_libraries()
        with console.command_warnings(lightning=chatty):
            return handler(args)
    except UsageError as err:
        print(f"aevae {command}: error: {mask_secrets(str(err))}", file=sys.stderr)
        return 2
    except (TrainingDiverged, CommandFailed) as err:  # the run is recorded FAILED with the same message
        print(f"aevae {command}: {mask_secrets(str(err))}", file=sys.stderr)
        return 1


INTERRUPTED_EXIT = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT)


def run() -> None:
    """The console script: main(), with Ctrl-C (or SIGTERM in a sweep) one line and exit code 130, not a traceback.
    The runs and trials were closed (KILLED, queued again) on the way out."""
    try:
        code = main()
    except BaseException as err:
        # Lightning turns Ctrl-C inside fit into exit(1) once it has shut down; a Ctrl-C that lands inside
        # torch.save surfaces as the writer's RuntimeError. Either way, the cause is the interrupt.
        if not any(isinstance(cause, KeyboardInterrupt) for cause in causes(err)):
            raise
        code = interrupted()
    sys.exit(code)


def interrupted() -> int:
    print("aevae: interrupted", file=sys.stderr)
    return INTERRUPTED_EXIT


if __name__ == "__main__":
    run()
