"""``clipn-train``: train CLIPN's "no" text tower, or cache the frozen features first.

torch is imported inside the commands, so ``clipn-train --help`` answers at once.

Exit codes: 0 done; 2 usage or input error (the message says what to fix); 130 interrupted (Ctrl-C or
SIGTERM: a checkpoint was saved, continue with ``--resume latest``).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from clipn_runtime import clikit
from clipn_runtime.clikit import EXIT_INTERRUPTED, EXIT_OK
from clipn_runtime.clikit import EXIT_USAGE as EXIT_USER_ERROR
from clipn_runtime.prompts import DEFAULT_PROMPTS

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USER_ERROR", "cli", "main", "torch_threads"]
#: Timestamps: a training run is long, and its log is read afterwards.
LOG_FORMAT = "%(asctime)s {prog} %(levelname)s: %(message)s"

MAIN_HELP = """Train CLIPN's "no" text tower (ICCV 2023) on image-caption data.

\b
The image tower, the "yes" text tower and the logit scale of an open_clip CLIP stay frozen; a copy of the text
tower (plus 16 learnable "no" prompts) learns to say "this is NOT a <caption>". The defaults are the official
recipe: ViT-B-16 laion2b_s34b_b88k, AdamW 3e-4 (0.9, 0.98, 1e-6), weight decay 0.2, cosine, AMP, 10 epochs.

\b
Commands (`train` is the default, so `clipn-train --train-data …` trains):
  train            train from webdataset shards, a CSV/TSV file or a feature cache
  cache-features   run the frozen towers once and store their features (faster training, no augmentation)

\b
Examples:
  clipn-train --train-data 'cc3m/{00000..00331}.tar' --train-num-samples 2905954 --name cc3m
  torchrun --nproc_per_node 4 -m clipn_train --train-data 'cc3m/{00000..00331}.tar' --name cc3m
  clipn-train --train-data pairs.csv --csv-img-key filepath --csv-caption-key title --batch-size 128
  clipn-train cache-features --data 'cc3m/{00000..00331}.tar' -o cc3m-cache
  clipn-train --train-data cc3m-cache --name cc3m-cached
  clipn-train --train-data 'cc3m/{00000..00331}.tar' --name cc3m --resume latest

\b
Exit codes: 0 done, 2 usage/input error, 130 interrupted (checkpoint saved; rerun with --resume latest).
"""


class _DefaultToTrain(clikit.Group):
    """A group whose default command is ``train`` (``clipn-train --train-data …``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group("clipn-train", cls=_DefaultToTrain, help=MAIN_HELP, extras=("train",))
@clikit.version_option
def cli() -> None:
    pass


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (None: torch's default); every torch CLI's --threads."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _stacked(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying ``options`` so that --help lists them in the order given."""

    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


#: --dist-backend, and what every clipn-ood CLI has: --device, --threads, -q/-v, --version.
_common_options = _stacked(
    click.option(
        "--dist-backend",
        type=click.Choice(["auto", "nccl", "gloo"]),
        default="auto",
        help="Process-group backend under torchrun (auto: nccl on GPUs, gloo on CPU).",
    ),
    clikit.device_option(
        ["auto", "cpu", "cuda", "cuda:N"],
        "auto",
        "Where PyTorch runs. auto: this rank's GPU if torch sees one, else the CPU.",
        why_not={
            "tensorrt": "training runs in PyTorch; TensorRT serves exported bundles (clipn-export --tensorrt)"
        },
    ),
    clikit.threads_option("torch, per process"),
    clikit.verbosity_options,
    clikit.version_option,
)

_model_options = _stacked(
    click.option(
        "--model",
        default="ViT-B-16",
        show_default=True,
        help="open_clip model name, or a path to an open_clip model-config JSON (custom/tiny models).",
    ),
    click.option(
        "--pretrained",
        default="laion2b_s34b_b88k",
        show_default=True,
        help="Base CLIP weights: an open_clip tag (downloaded) or a local weights file "
        "(.pt/.bin/.safetensors). 'none' = random init (tests only).",
    ),
    click.option(
        "--variant",
        type=click.Choice(["learnable", "handcrafted"]),
        default="learnable",
        show_default=True,
        help="learnable: 16 learned 'no' prompts (the paper's main model); handcrafted: each caption "
        "wrapped in a random (yes, no) template pair.",
    ),
    click.option(
        "--prompts",
        default=DEFAULT_PROMPTS,
        show_default=True,
        help="Template pairs for --variant handcrafted: clipn (official, verbatim; what clipn-export uses by "
        "default), clean, or a yes<TAB>no file.",
    ),
)

_data_options = _stacked(
    click.option(
        "--dataset-type",
        type=click.Choice(["auto", "webdataset", "csv", "cache"]),
        default="auto",
        show_default=True,
        help="How to read the data; auto decides from the name.",
    ),
    click.option(
        "--csv-img-key",
        default="filepath",
        show_default=True,
        help="CSV column with image paths (relative paths are relative to the CSV file).",
    ),
    click.option("--csv-caption-key", default="title", show_default=True, help="CSV column with captions."),
    click.option(
        "--csv-separator",
        default="\t",
        show_default=repr("\t"),
        help="CSV field separator (TAB for .tsv; use ',' for comma-separated files).",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=4,
        show_default=True,
        help="Data-loading worker processes per GPU (0 = load in the main process).",
    ),
    click.option(
        "--precision",
        type=click.Choice(["amp", "amp_bf16", "fp32"]),
        default="amp",
        show_default=True,
        help="amp = fp16 autocast + loss scaling on CUDA (bf16 autocast on CPU); amp_bf16; fp32.",
    ),
)


def _command(name: str, interrupted: str) -> Callable[[Any], Any]:
    """A clipn-train subcommand: defaults shown in --help, the train extra, time-stamped log lines."""
    return cli.command(
        name,
        context_settings={"show_default": True},
        interrupted=interrupted,
        extras=("train",),
        log_format=LOG_FORMAT,
    )


def _pretrained(value: str) -> str | None:
    return None if value.lower() == "none" else value


@_command("train", interrupted="rerun the same command with --resume latest to continue")
@click.option(
    "--train-data",
    required=True,
    help="Webdataset shards in brace notation ('cc3m/{00000..00331}.tar', .jpg/.png + .txt per "
    "sample), a .csv/.tsv file, or a feature-cache folder made by `clipn-train cache-features`.",
)
@click.option(
    "--train-num-samples",
    type=click.IntRange(min=1),
    default=None,
    help="Samples per epoch. Needed for shards without a sizes.json/__len__ file beside them.",
)
@click.option(
    "--val-data",
    default=None,
    help="Held-out data (same formats); its first --val-batch-size pairs give the per-epoch p_no report. "
    "Without it the report uses the first training pairs (not held out).",
)
@click.option("--val-batch-size", type=click.IntRange(min=2), default=256, help="Pairs in the p_no report batch.")
@_model_options
@_data_options
@click.option("--batch-size", type=click.IntRange(min=1), default=512, help="Pairs per GPU/process and step.")
@click.option("--epochs", type=click.IntRange(min=1), default=10, help="Passes over --train-data.")
@click.option("--lr", type=float, default=3e-4, help="Peak learning rate (AdamW).")
@click.option("--beta1", type=float, default=0.9, help="AdamW β1.")
@click.option("--beta2", type=float, default=0.98, help="AdamW β2.")
@click.option("--eps", type=float, default=1e-6, help="AdamW ε.")
@click.option("--wd", type=float, default=0.2, help="Weight decay, on tensors with ≥2 dimensions only.")
@click.option(
    "--warmup", type=click.IntRange(min=0), default=0, help="Linear warmup steps before the cosine decay."
)
@click.option(
    "--grad-clip",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Clip the gradient norm to this value (off by default, as in the official recipe).",
)
@click.option(
    "--local-loss",
    is_flag=True,
    help="With several GPUs: each rank scores only its own rows against all columns (n×N instead of "
    "N×N memory); same loss and gradients.",
)
@click.option(
    "--no-augment",
    "no_augment",
    is_flag=True,
    help="Train with the evaluation transform (resize + centre crop) instead of RandomResizedCrop.",
)
@click.option("--seed", type=int, default=0, help="Seed for data order, augmentation and prompt draws.")
@click.option(
    "-o",
    "--output",
    "logs",
    default="logs",
    type=clikit.OutputPath("dir"),
    help="Folder that holds the run folders (logs/<name>/…). Named -o/--output, not --logs, because torchrun "
    "rejects --logs as an ambiguous abbreviation of its own --logs-specs.",
)
@click.option("--name", default=None, help="Run folder name under --output (default: date, model, settings).")
@click.option("--save-frequency", type=click.IntRange(min=1), default=1, help="Save a checkpoint every N epochs.")
@click.option(
    "--resume",
    default=None,
    help="'latest' (the newest state in logs/<name>; a fresh start if there is none) or a path to a "
    "*.state.pt / epoch_K.safetensors with its state file beside it.",
)
@click.option(
    "--log-every-n-steps", type=click.IntRange(min=1), default=100, help="Steps between loss/throughput log lines."
)
@click.option("--no-tensorboard", "no_tensorboard", is_flag=True, help="Do not write tensorboard events.")
@_common_options
def train_command(**kw: Any) -> int:
    """Train the no tower (the default command).

    \b
    Writes logs/<name>/{out.log, params.json, results.jsonl, checkpoints/}; each epoch saves
    checkpoints/epoch_K.safetensors (no-tower tensors + metadata, what clipn-export reads) and
    epoch_K.state.pt (optimizer, RNG, data position). Ctrl-C or SIGTERM saves and exits with 130.
    Several GPUs: torchrun --nproc_per_node N -m clipn_train --train-data … (same options).

    \b
    Examples:
      clipn-train --train-data pairs.csv --csv-caption-key title --batch-size 128 --name mine
      clipn-train --train-data cc3m-cache --name cc3m --resume latest --threads 8

    \b
    Exit codes: 0 done; 2 usage or input error (one line says what to fix); 130 interrupted
    (checkpoint saved; rerun the same command with --resume latest).
    """
    from clipn_train.distributed import init_distributed, shutdown_distributed
    from clipn_train.trainer import TrainConfig, Trainer

    quiet, threads = kw.pop("quiet"), kw.pop("threads")
    kw.pop("verbose")  # clikit.Command has set the log level
    backend = kw.pop("dist_backend")
    kw["augment"] = not kw.pop("no_augment")
    kw["tensorboard"] = not kw.pop("no_tensorboard")
    kw["pretrained"] = _pretrained(kw["pretrained"])
    cfg = TrainConfig(**kw)
    dist_info = init_distributed(cfg.device, backend)
    try:
        with _console(threads, quiet):
            result = Trainer(cfg, dist_info).run()
    finally:
        shutdown_distributed()
    if result.interrupted:
        if dist_info.is_main:
            click.echo(
                f"interrupted at step {result.global_step}; checkpoint {result.last_checkpoint}. To continue, rerun "
                f"the same command with --name {result.log_dir.name} --resume latest",
                err=True,
            )
        return EXIT_INTERRUPTED
    if dist_info.is_main:
        click.echo(
            f"done: {result.epochs_done} epoch(s), {result.global_step} steps; last checkpoint "
            f"{result.last_checkpoint}"
        )
    return EXIT_OK


class _NotATerminal:
    """stderr as tqdm sees it with -q: the bars of the trainer and the cache builder are tqdm's automatic kind
    (disable=None), which stay off when stderr is not a terminal; every write still reaches stderr."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _console(threads: int | None, quiet: bool) -> Iterator[None]:
    """--threads for torch, -q for the progress bars, and log lines that do not tear the bars."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    # The redirect must reach the handlers clikit put on the package loggers (they do not propagate to root).
    loggers = [logging.getLogger(name) for name in clikit.PACKAGE_LOGGERS]
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(threads))
        if quiet:
            stack.enter_context(contextlib.redirect_stderr(_NotATerminal(sys.stderr)))  # type: ignore[arg-type]
        stack.enter_context(logging_redirect_tqdm(loggers))
        yield


@_command("cache-features", interrupted="rerun the same command to build the cache again")
@click.option(
    "--data", required=True, help="Webdataset shards (brace notation) or a .csv/.tsv file, as for --train-data."
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=clikit.OutputPath("dir"),
    help="New folder for the cache (manifest.json + .npy shards).",
)
@_model_options
@_data_options
@click.option("--batch-size", type=click.IntRange(min=1), default=256, help="Images per forward pass.")
@click.option(
    "--cache-dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    help="Storage type of the features (float16 halves the disk; float32 is bit-faithful).",
)
@click.option("--shard-size", type=click.IntRange(min=1), default=100_000, help="Samples per cache shard file.")
@click.option("--seed", type=int, default=0, help="Seed of the hand-crafted template draw.")
@_common_options
def cache_features_command(**kw: Any) -> int:
    """Run the frozen image and yes towers once over the data and store the features.

    \b
    Training from the cache (--train-data CACHE_DIR) runs only the no tower, so it is much faster, but
    gives up image augmentation: every epoch sees the same evaluation-transform features (and, for the
    hand-crafted variant, the same template pair per caption). The cache records the model and weights
    it was made with; training with another model is refused. Works under torchrun (one part per rank).

    \b
    Example:
      clipn-train cache-features --data 'cc3m/{00000..00331}.tar' -o cc3m-cache --batch-size 512

    \b
    Exit codes: 0 cache written; 2 usage or input error (one line says what to fix); 130 interrupted
    (rerun the same command).
    """
    from clipn_train.cache import build_feature_cache
    from clipn_train.distributed import init_distributed, shutdown_distributed

    dist_info = init_distributed(kw["device"], kw["dist_backend"])
    try:
        with _console(kw["threads"], kw["quiet"]):
            summary = build_feature_cache(
                data=kw["data"],
                output=kw["output"],
                model=kw["model"],
                pretrained=_pretrained(kw["pretrained"]),
                variant=kw["variant"],
                prompts=kw["prompts"],
                dataset_type=kw["dataset_type"],
                csv_img_key=kw["csv_img_key"],
                csv_caption_key=kw["csv_caption_key"],
                csv_separator=kw["csv_separator"],
                batch_size=kw["batch_size"],
                workers=kw["workers"],
                precision=kw["precision"],
                dtype=kw["cache_dtype"],
                shard_size=kw["shard_size"],
                seed=kw["seed"],
                dist_info=dist_info,
            )
    finally:
        shutdown_distributed()
    if dist_info.is_main:
        click.echo(
            f"cached {summary.samples} samples ({summary.corrupt} skipped) in {summary.folder} "
            f"at {summary.samples_per_second:.1f} samples/s"
        )
    return EXIT_OK


def main(argv: list[str] | None = None) -> None:
    """Console entry point (exits with the documented code; see clikit.Command)."""
    cli.main(args=argv, prog_name="clipn-train")


if __name__ == "__main__":
    main()
