"""`picollm` command line: thin Typer commands over one pydantic validation each.

Bad input of any kind (config, override, model reference, file, data) prints one line and exits 2.
Tracebacks appear only with --debug or PICOLLM_DEBUG=1.
"""

from __future__ import annotations

import gc
import importlib
import os
import platform
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperGroup

from picollm.config import (
    ANALYSIS_SECTIONS,
    BenchConfig,
    CompareConfig,
    DPORunConfig,
    ServerConfig,
    TrainRunConfig,
    load_config,
)
from picollm.runtime import logs
from picollm.tracking import limits, links
from pipelines import progress
from pipelines.progress import RichReporter as RichReporter  # re-exported: tests patch the train bar here
from pipelines.progress import console, timing_warnings
from pipelines.tables import compare_table, dpo_table, family_table, markdown

err_console = Console(stderr=True)
STATE = {"debug": os.environ.get("PICOLLM_DEBUG", "") not in ("", "0")}


@contextmanager
def guarded() -> Iterator[None]:
    """One clear line and exit 2 for the user's mistakes; 130 for Ctrl-C; 1 for our own bugs."""
    from picollm.errors import PicollmError, elide

    try:
        yield
    except PicollmError as e:
        if STATE["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {escape(elide(str(e)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise typer.Exit(130) from None
    except (typer.Exit, typer.TyperException, typer.Abort):
        raise  # usage errors and explicit exits: click reports them
    except Exception as e:
        if STATE["debug"]:
            raise
        first = (str(e).strip().splitlines() or [""])[0]  # one line, even for a multi-line message
        line = escape(elide(f"{type(e).__name__}: {first}"))
        err_console.print(
            f"[bold red]error:[/] {line}  (rerun with --debug for the traceback)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _flow(name: str) -> ModuleType:
    """`pipelines.<name>`, imported, with everything alive so far frozen out of the cyclic garbage
    collector: torch's and MLflow's import-time objects live until exit, and each full collection of a
    run would walk them again (0.4 s of `make train-linear`; the one at exit is `main`'s)."""
    module = importlib.import_module(f"pipelines.{name}")
    if STATE.get("own_process"):  # not inside another program (tests' CliRunner): its objects are its own
        gc.freeze()
    return module


def _plain_flags(command: Any, ctx: typer.Context) -> None:
    """Flags (--resume, --help, ...) take no value: their help shows none (Typer's default is `<bool>`)."""
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""


class PlainFlagsGroup(TyperGroup):
    """A group whose help, and its commands' help, show flags without a value."""

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command, ctx)
        return command

    def format_help(self, ctx: typer.Context, formatter: Any) -> None:
        _plain_flags(self, ctx)
        super().format_help(ctx, formatter)


class GuardedGroup(PlainFlagsGroup):
    """Runs every command (subgroups' too: they are invoked from here) inside `guarded`, once."""

    def invoke(self, ctx: typer.Context) -> Any:
        with guarded():
            return super().invoke(ctx)


app = typer.Typer(
    cls=GuardedGroup,
    help="picollm: tiny Transformers on integer sequences, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(
    cls=PlainFlagsGroup, help="Registered models: list them, move the champion alias.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
server_app = typer.Typer(
    cls=PlainFlagsGroup,
    help="Team tracking server: PostgreSQL + mlflow server in the background (see README).",
    no_args_is_help=True,
)
app.add_typer(server_app, name="server")

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file, e.g. configs/linear.yaml")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]


def versions() -> str:
    """picollm's version and those of the libraries its results depend on (read without importing them)."""
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return f"picollm {v('picollm')} (torch {v('torch')}, mlflow {v('mlflow')}, Python {platform.python_version()})"


def _version(value: bool) -> None:
    if value:
        console.print(versions(), highlight=False)
        raise typer.Exit(0)


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log library messages.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the versions and exit.")
    ] = False,
) -> None:
    STATE["debug"] = debug or os.environ.get("PICOLLM_DEBUG", "") not in ("", "0")  # per call, not sticky
    logs.configure(verbose)  # library messages (urllib3's retries, MLflow's) only with -v
    STATE["announced"] = None
    links.listen(_run_started)  # the first run a command opens: its link, while it works


def _run_started(experiment_id: str, run_id: str, run_name: str) -> None:
    """The link of the command's run as soon as it opens (a sweep worker's trials: the first only)."""
    if STATE.get("announced"):
        return
    STATE["announced"] = run_id
    url = links.run_url(links.ui_base(), experiment_id, run_id)
    console.print(f"[dim]run {escape(run_name)} started:[/] {url}", highlight=False, soft_wrap=True)


def print_links(run_id: str) -> None:
    """The run's page (its charts) and, where it logged one, its report: the answer one click away."""
    try:
        found = links.run_links(run_id)
    except Exception as e:  # the result is printed already; a store hiccup must not turn it into a failure
        console.print(f"[dim]run {run_id} (no link: {escape(str(e).splitlines()[0][:120])})[/]", highlight=False)
        return
    console.print(f"run     {found.run}", highlight=False, soft_wrap=True)
    if found.report:
        console.print(f"report  {found.report}", highlight=False, soft_wrap=True)
    if found.verdict:
        console.print(f"verdict {found.verdict}", highlight=False, soft_wrap=True)
    if found.grouped:
        console.print(f"grouped {found.grouped}", highlight=False, soft_wrap=True)


@app.command()
def train(
    config: ConfigArg,
    overrides: SetOpt = None,
    resume: Annotated[str | None, typer.Option(help="Continue this run id from its last checkpoint.")] = None,
) -> None:
    """Train a model, log it to MLflow and register it."""
    cfg = load_config(TrainRunConfig, config, overrides)
    with progress.reporter("train") as reporter:  # before the imports: a line (or the bar) within seconds
        out = _flow("train").run(cfg, resume=resume, ui=reporter)
    if not out.run_id:  # a DDP rank other than 0: rank 0 reports
        return
    console.print(family_table(out.test_metrics, out.families))
    reg = f"  registered {cfg.tracking.registered_model} v{out.registered_version}" if out.registered_version else ""
    console.print(f"run {out.run_id}{reg}", highlight=False)
    if out.reproduction is not None:  # the config's reference results: matched, or what drifted (tag `reproduced`)
        style = "green" if out.reproduction.outcome == "true" else "yellow"
        console.print(f"[{style}]{escape(out.reproduction.line)}[/{style}]", highlight=False, soft_wrap=True)
    print_links(out.run_id)
    if out.registered_version and cfg.tracking.registered_model:
        url = links.model_version_url(links.ui_base(), cfg.tracking.registered_model, out.registered_version)
        console.print(f"model   {url}", highlight=False, soft_wrap=True)


@app.command()
def dpo(
    config: Annotated[Path, typer.Argument(help="DPO config, e.g. configs/dpo.yaml")],
    overrides: SetOpt = None,
) -> None:
    """SFT a reference on stories, then DPO it on corrupted continuations; register both."""
    cfg = load_config(DPORunConfig, config, overrides)
    # The SFT steps on the bar; the flow's lines (reference log-probs, DPO evaluations) above it or between beats.
    with progress.reporter("dpo", after_training="reference log-probs, DPO") as reporter:
        out = _flow("dpo").run(cfg, ui=reporter, echo=reporter)
    console.print(dpo_table(out.table, out.split, cfg.dpo.loss_type, out.step0_loss, out.seconds["total"]))
    reg = f"  registered {cfg.tracking.registered_model} v{out.registered_version}" if out.registered_version else ""
    console.print(f"run {out.run_id}  reference {out.reference}{reg}", highlight=False)
    print_links(out.run_id)


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="Compare config")] = Path("configs/compare.yaml"),
    overrides: SetOpt = None,
    from_runs: Annotated[
        str | None,
        typer.Option(
            "--from-runs",
            metavar="PARENT_RUN_ID",
            help="Build the verdict page (verdict.html) of this existing compare parent run; no training.",
        ),
    ] = None,
) -> None:
    """Attention variants against a baseline: train (or load) each over seeds, evaluate, report with CIs (MLflow)."""
    if from_runs is not None:
        page, path = _flow("compare").from_runs(from_runs)
        for part in markdown(page.split("![", 1)[0].splitlines(), console.width):  # the verdicts in words
            console.print(part, highlight=False)
        console.print(f"{path} logged on parent run {from_runs}", highlight=False)
        print_links(from_runs)
        return
    cfg = load_config(CompareConfig, config, overrides)
    with progress.reporter("compare", epoch_lines=False) as reporter:
        out = _flow("compare").run(cfg, progress=reporter)
    n = {v: sum(m.variant == v for m in out.members) for v in out.variants}
    console.print(compare_table(out.rows, n, cfg.compare.confidence))
    if out.lrs:
        console.print(
            "lr per variant (grid on validation data): " + ", ".join(f"{v} {lr:g}" for v, lr in out.lrs.items())
        )
    timing_warnings(out.timing_warnings)  # report.html's efficiency section flags them too
    console.print(
        f"parent run {out.parent_run_id} ({out.mode}, {len(out.members)} child runs), report.md and "
        f"{len(out.artifacts) - 4} figures logged (report.html renders in the MLflow UI), {out.seconds:.0f} s",
        highlight=False,
    )
    print_links(out.parent_run_id)


@app.command(help=f"Interpretability report of a model, logged to MLflow. Sections: {', '.join(ANALYSIS_SECTIONS)}.")
def analyze(
    model_ref: Annotated[
        str, typer.Argument(help="NAME, NAME@ALIAS, NAME/VERSION, models:/..., runs:/... or a run id")
    ],
    what: Annotated[
        str | None,
        typer.Option("--what", "-w", help=f"Sections, comma-separated (default: all): {', '.join(ANALYSIS_SECTIONS)}"),
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Analysis config (default: configs/analysis.yaml if present)")
    ] = None,
    overrides: SetOpt = None,
) -> None:
    with progress.reporter("analyze") as reporter:
        flow = _flow("analyze")
        cfg = flow.load_config(model_ref, config, overrides, what)
        out = flow.run(cfg, progress=reporter)
    for line in out.summary:
        console.print(line, highlight=False)  # wrapped at spaces to the terminal's width
    console.print(
        f"run {out.run_id}  analysed {out.source.label}  {len(out.artifacts)} artifacts, "
        f"{len(out.metrics)} metrics, {out.seconds:.0f} s",
        highlight=False,
    )
    print_links(out.run_id)


def _checked(check: Any) -> Any:
    """A Typer callback running one of the library's checks (picollm/tracking/limits.py, which the served
    model runs too): the same limits and messages on the command line and over REST."""
    from picollm.errors import PicollmError

    def callback(value: Any) -> Any:
        try:
            return check(value)
        except PicollmError as e:
            raise typer.BadParameter(str(e)) from None

    return callback


@app.command()
def generate(
    model_ref: Annotated[
        str, typer.Argument(help="NAME, NAME@ALIAS, NAME/VERSION, models:/..., runs:/... or a run id")
    ],
    prompt: Annotated[str, typer.Argument(help="Space-separated integers, e.g. '2 4 6 8'")],
    max_new_tokens: Annotated[
        int,
        typer.Option(
            "--max-new-tokens",
            "-n",
            callback=_checked(limits.check_max_new_tokens),
            help=f"1..{limits.MAX_NEW_TOKENS}.",
        ),
    ] = 8,
    temperature: Annotated[
        float,
        typer.Option(
            callback=_checked(limits.check_temperature), help="0 = greedy; tiny values act greedy, huge ones uniform"
        ),
    ] = 0.0,
    top_k: Annotated[
        int | None, typer.Option(callback=_checked(limits.check_top_k), help="Larger than the vocabulary = no limit.")
    ] = None,
    top_p: Annotated[
        float | None, typer.Option(callback=_checked(limits.check_top_p), help="0..1; 0 keeps only the best token.")
    ] = None,
    seed: Annotated[int, typer.Option(callback=_checked(limits.check_seed), help="0..2^63-1.")] = 0,
) -> None:
    """Continue a prompt with a registered (or logged) model."""
    from picollm.tracking.prompts import continue_prompts
    from picollm.tracking.registry import load_model

    model = load_model(model_ref)
    [out] = continue_prompts(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed)
    console.print(f"{' '.join(prompt.split())} [bold green]{out}[/]", highlight=False)


@app.command()
def bench(
    config: Annotated[Path, typer.Argument(help="Bench config")] = Path("configs/bench.yaml"),
    overrides: SetOpt = None,
) -> None:
    """Benchmarks logged to MLflow: step time of both attentions vs length, DDP speedup, MLflow overhead."""
    cfg = load_config(BenchConfig, config, overrides)
    with progress.reporter("bench") as reporter:
        out = _flow("bench").run(cfg, progress=reporter)
    for part in markdown(out.report, console.width):  # its tables as console tables: within the terminal's width
        console.print(part, highlight=False)
    timing_warnings(out.warnings)
    console.print(f"run {out.run_id} (bench.md and metrics in experiment {cfg.tracking.experiment})")
    print_links(out.run_id)


@app.command()
def sweep(
    config: Annotated[Path, typer.Argument(help="Sweep config")] = Path("configs/sweep.yaml"),
    overrides: SetOpt = None,
    trials: Annotated[int | None, typer.Option(min=1, help="Finished trials the study should have in all.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="Local processes on the study (cores shared).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage: sqlite:///PATH, postgresql://..., or team.")
    ] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: <base config name>-sweep).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the study (after a crash or Ctrl-C).")] = False,
    promote: Annotated[
        bool, typer.Option("--promote", help="Train and register the best config, move @champion to it.")
    ] = False,
    worker: Annotated[
        bool, typer.Option("--worker", help="Only run trials of the existing study (another machine joining).")
    ] = False,
) -> None:
    """Hyperparameter search (Optuna) over a training config: one MLflow parent run, a child per trial."""
    from picollm.config import apply_overrides, read_yaml, validate
    from picollm.config.sweep import SweepConfig

    options = {"trials": trials, "workers": workers, "storage": storage, "study": study, "promote": promote or None}
    raw = apply_overrides(read_yaml(config), overrides or []) | {k: v for k, v in options.items() if v is not None}
    cfg = validate(SweepConfig, raw, source=str(config))
    with progress.reporter("sweep", epoch_lines=False) as reporter:
        out = _flow("sweep").run(cfg, resume=resume, worker=worker, progress=reporter)
    c = out.counts
    done = f"{c.complete} complete, {c.pruned} pruned, {c.failed} failed"
    if out.parent_run_id is None:
        console.print(f"worker done: study {out.study} has {done}", highlight=False)
        return
    if out.best_trial is not None:
        params = "  ".join(f"{k}={v}" for k, v in out.best_params.items())
        console.print(
            f"best trial {out.best_trial}: {cfg.objective.metric} {out.best_value:.4g}  {params}", highlight=False
        )
    for r in out.top_k:
        console.print(
            f"top {r['rank']} (trial {r['trial']}): {r['mean']:.4g} [{r['ci_low']:.4g}, {r['ci_high']:.4g}] "
            f"over {r['n']} seeds",
            highlight=False,
        )
    if out.promoted:
        console.print(f"registered {out.promoted} (@champion)", highlight=False)
    console.print(
        f"study {out.study} ({done}) in {out.storage}; parent run {out.parent_run_id}, {out.seconds:.0f} s",
        highlight=False,
        soft_wrap=True,
    )
    print_links(out.parent_run_id)


@models_app.command("list")
def models_list() -> None:
    """Registered models with their latest version and aliases."""
    from picollm.tracking.registry import list_models
    from picollm.tracking.store import init_tracking

    init_tracking()
    table = Table(title="registered models: latest version and its test metrics")
    for col in ("name", "latest", "aliases", "test acc", "/ceiling", "test loss"):
        right = col in ("test acc", "/ceiling", "test loss")
        table.add_column(col, justify="right" if right else "left", no_wrap=col == "name")
    for m in list_models():
        aliases = " ".join(f"@{a}=v{v}" for a, v in sorted(m["aliases"].items()))
        met = m["metrics"]
        cells = [
            f"{met[k]:.3f}" if k in met else "-" for k in ("test/accuracy", "test/accuracy_vs_ceiling", "test/loss")
        ]
        table.add_row(m["name"], f"v{m['latest']} of {m['versions']}", aliases, *cells)
    console.print(table)


@models_app.command("promote")
def models_promote(
    name: str,
    version: str,
    alias: Annotated[str, typer.Option(help="Alias to move onto this version.")] = "champion",
) -> None:
    """Point an alias (default: champion) at a version."""
    from picollm.tracking.registry import promote
    from picollm.tracking.store import init_tracking

    init_tracking()
    promote(name, version, alias)
    console.print(f"{name}@{alias} -> version {version}")


ServerConfigArg = Annotated[Path | None, typer.Argument(help="Server config, e.g. configs/server.yaml")]


@server_app.command("start")
def server_start(config: ServerConfigArg = None, overrides: SetOpt = None) -> None:
    """Start PostgreSQL and mlflow server in the background (idempotent); print the tracking URI to export."""
    cfg = load_config(ServerConfig, config, overrides)
    from picollm.tracking import server

    info = server.start(cfg)
    for line in server.describe_start(info):
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"export MLFLOW_TRACKING_URI={info['url']}", highlight=False, soft_wrap=True)


@server_app.command("stop")
def server_stop(config: ServerConfigArg = None, overrides: SetOpt = None) -> None:
    """Stop the mlflow server and PostgreSQL that `picollm server start` started (idempotent)."""
    cfg = load_config(ServerConfig, config, overrides)
    from picollm.tracking import server

    for line in server.describe_stop(server.stop(cfg)):
        console.print(line, highlight=False, soft_wrap=True)


@server_app.command("status")
def server_status(config: ServerConfigArg = None, overrides: SetOpt = None) -> None:
    """Whether the mlflow server and its PostgreSQL are running, with their PIDs."""
    cfg = load_config(ServerConfig, config, overrides)
    from picollm.tracking import server

    for line in server.describe_status(server.status(cfg)):
        console.print(line, highlight=False, soft_wrap=True)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so `kill` marks the MLflow run KILLED, like Ctrl-C


def main() -> None:
    STATE["own_process"] = True  # the `picollm` process: `_flow` may freeze its objects
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as e:  # usage errors (missing argument, bad option value): one line too
        if type(e).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
            from picollm.errors import elide

            line = escape(elide(e.format_message() + hint))
            err_console.print(f"[bold red]error:[/] {line}", highlight=False, soft_wrap=True)
        code = e.exit_code
    except typer.Abort:
        err_console.print("[yellow]interrupted[/]")
        code = 130
    # The interpreter's shutdown collection walks every object still alive (about 1 s of a 26 s
    # `make train-linear`, most of it torch's and MLflow's); frozen, they are left to the OS. Nothing is
    # lost: runs, files and the store were closed above, and atexit handlers and module teardown still run.
    gc.freeze()
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
