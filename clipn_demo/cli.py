"""``clipn-demo``: the command line of :func:`clipn_demo.demo.run_demo` (it prints the combined table)."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from clipn_demo.demo import FULL, QUICK, TARGET_TPR, calibrated_table, int8_line, run_demo, summary_table
from clipn_runtime import clikit
from clipn_runtime.clikit import EXIT_OK
from clipn_runtime.clikit import EXIT_PARTIAL as EXIT_EVAL_ERRORS

HELP = """Run the whole CLIPN chain on a CPU in minutes, on a toy world of coloured shapes.

\b
Stages (each logs its time; reruns with the same settings skip what is done):
  1. draw the toy world: training shards + held-out ID/OOD image folders
  2. pretrain a tiny open_clip CLIP contrastively (no pretrained CLIP is needed)
  3. train CLIPN's no tower with the real trainer from cached frozen features
  4. export bundles with the real exporter (fp32 + static int8, calibrated on
     ID training images) and a step-0 control
  5. calibrate each bundle's thresholds (TPR 0.95) on held-out ID images
  6. score the splits with clipn-eval's code; print the tables, write
     OUTPUT/report/

\b
Examples:
  clipn-demo                      # full run into demo/ (6 min 39 s measured on 2 quiet cores)
  clipn-demo --quick              # fewer images and steps, colour splits only (47 s measured)
  clipn-demo --seed 1 -o demo-s1 --threads 4

\b
Exit codes: 0 done; 1 done but some eval images could not be scored; 2 bad usage;
130 interrupted (Ctrl-C): rerun the same command and the finished stages are skipped.
"""


@click.command(
    "clipn-demo",
    cls=clikit.Command,
    help=HELP,
    interrupted="run the same command again to continue (finished stages are kept)",
    extras=("demo",),
    log_default=logging.WARNING,
)
@click.option("--quick", is_flag=True, help="The ~1-minute version (fewer images/steps, colour splits only).")
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of data and training."
)
@click.option(
    "-o",
    "--output",
    type=clikit.OutputPath("dir", Path),
    default=Path("demo"),
    show_default=True,
    metavar="DIR",
    help="Folder for everything the demo makes (checked before any work).",
)
@clikit.device_option(
    ["auto", "cpu"],
    "cpu",
    "Where the demo runs: its tiny models and measured timings are CPU ones, so auto is the CPU too.",
    why_not={k: "the demo runs on the CPU only" for k in ("cuda", "cuda:N", "tensorrt")},
)
@clikit.threads_option("torch and onnxruntime, and processes drawing the toy world", default=2)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars.")
@clikit.verbosity_options
@clikit.version_option
def main(
    quick: bool, seed: int, output: Path, device: str, threads: int, progress: bool, quiet: bool, verbose: int
) -> int:
    # clikit.Command turns UserError and Ctrl-C into one line and the documented exit code.
    settings = QUICK if quick else FULL

    def echo(message: str) -> None:
        if not quiet:
            click.echo(message, err=True)

    result = run_demo(output, settings, seed=seed, threads=threads, progress=progress and not quiet, echo=echo)
    click.echo(summary_table(result))
    click.echo(
        f"\nAt the thresholds calibrated at TPR {TARGET_TPR} on held-out ID images (ID kept / OOD let through):"
    )
    click.echo(calibrated_table(result))
    echo(f"\n{int8_line(result)}")
    echo(f"\nreport: {output / 'report' / 'summary.md'}; total {result.stage_seconds['total']:.0f} s")
    for name, verdict in result.parity.items():
        if verdict != "ok":
            click.echo(f"clipn-demo: {name}: {verdict}", err=True)
    return EXIT_EVAL_ERRORS if result.eval_errors else EXIT_OK


if __name__ == "__main__":
    main()
