"""``clipn-train``: train CLIPN's "no" text tower, or cache the frozen features first.

torch is imported inside the commands, so ``clipn-train --help`` answers at once.

Exit codes: 0 done; 2 usage or input error (the message says what to fix); 130 interrupted (Ctrl-C or
SIGTERM: a checkpoint was saved, continue with ``--resume latest``).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from clipn_runtime.errors import UserError

EXIT_OK, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 2, 130

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


class _DefaultToTrain(click.Group):
    """A group whose default command is ``train`` (``clipn-train --train-data …``)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


def _version() -> str:
    from clipn_train import __version__

    return __version__


@click.group(cls=_DefaultToTrain, help=MAIN_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=_version(), prog_name="clipn-train")
def cli() -> None:
    pass


def _model_options(f: Any) -> Any:
    options = [
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
            default="clean",
            show_default=True,
            help="Template pairs for --variant handcrafted: clipn (official, verbatim), clean, or a "
            "yes<TAB>no file.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _data_options(f: Any) -> Any:
    options = [
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
            "--device",
            default="auto",
            show_default=True,
            help="auto (this rank's GPU if any, else CPU), cpu, cuda or cuda:N.",
        ),
        click.option(
            "--precision",
            type=click.Choice(["amp", "amp_bf16", "fp32"]),
            default="amp",
            show_default=True,
            help="amp = fp16 autocast + loss scaling on CUDA (bf16 autocast on CPU); amp_bf16; fp32.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _pretrained(value: str) -> str | None:
    return None if value.lower() == "none" else value


def _setup_logging(rank: int, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s {'' if rank == 0 else f'[rank {rank}] '}%(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@cli.command("train", context_settings={"show_default": True})
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
@click.option("--epochs", type=click.IntRange(min=1), default=10)
@click.option("--lr", type=float, default=3e-4, help="Peak learning rate (AdamW).")
@click.option("--beta1", type=float, default=0.9)
@click.option("--beta2", type=float, default=0.98)
@click.option("--eps", type=float, default=1e-6)
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
@click.option("--log-every-n-steps", type=click.IntRange(min=1), default=100)
@click.option("--no-tensorboard", "no_tensorboard", is_flag=True, help="Do not write tensorboard events.")
@click.option(
    "--dist-backend",
    type=click.Choice(["auto", "nccl", "gloo"]),
    default="auto",
    help="Process-group backend under torchrun (auto: nccl on GPUs, gloo on CPU).",
)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def train_command(**kw: Any) -> None:
    """Train the no tower (the default command).

    \b
    Writes logs/<name>/{out.log, params.json, results.jsonl, checkpoints/}; each epoch saves
    checkpoints/epoch_K.safetensors (no-tower tensors + metadata, what clipn-export reads) and
    epoch_K.state.pt (optimizer, RNG, data position). Ctrl-C or SIGTERM saves and exits with 130.
    Several GPUs: torchrun --nproc_per_node N -m clipn_train --train-data … (same options).
    """
    from clipn_train.distributed import init_distributed, shutdown_distributed
    from clipn_train.trainer import TrainConfig, Trainer

    verbose = kw.pop("verbose")
    backend = kw.pop("dist_backend")
    kw["augment"] = not kw.pop("no_augment")
    kw["tensorboard"] = not kw.pop("no_tensorboard")
    kw["pretrained"] = _pretrained(kw["pretrained"])
    cfg = TrainConfig(**kw)
    dist_info = init_distributed(cfg.device, backend)
    _setup_logging(dist_info.rank, verbose)
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
            result = Trainer(cfg, dist_info).run()
    finally:
        shutdown_distributed()
    if result.interrupted:
        if dist_info.is_main:
            click.echo(
                f"interrupted at step {result.global_step}; checkpoint {result.last_checkpoint}. Continue with: "
                f"clipn-train … -o {cfg.logs} --name {result.log_dir.name} --resume latest",
                err=True,
            )
        raise SystemExit(EXIT_INTERRUPTED)
    if dist_info.is_main:
        click.echo(
            f"done: {result.epochs_done} epoch(s), {result.global_step} steps; last checkpoint "
            f"{result.last_checkpoint}"
        )


@cli.command("cache-features", context_settings={"show_default": True})
@click.option(
    "--data", required=True, help="Webdataset shards (brace notation) or a .csv/.tsv file, as for --train-data."
)
@click.option("-o", "--output", required=True, help="New folder for the cache (manifest.json + .npy shards).")
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
@click.option("--dist-backend", type=click.Choice(["auto", "nccl", "gloo"]), default="auto")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cache_features_command(**kw: Any) -> None:
    """Run the frozen image and yes towers once over the data and store the features.

    \b
    Training from the cache (--train-data CACHE_DIR) runs only the no tower, so it is much faster, but
    gives up image augmentation: every epoch sees the same evaluation-transform features (and, for the
    hand-crafted variant, the same template pair per caption). The cache records the model and weights
    it was made with; training with another model is refused. Works under torchrun (one part per rank).
    """
    from clipn_train.cache import build_feature_cache
    from clipn_train.distributed import init_distributed, shutdown_distributed

    dist_info = init_distributed(kw["device"], kw["dist_backend"])
    _setup_logging(dist_info.rank, kw["verbose"])
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user mistakes print one line and exit 2, interrupts exit 130."""
    try:
        code = cli.main(args=argv, prog_name="clipn-train", standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    except click.ClickException as e:  # bad options and arguments
        e.show()
        code = EXIT_USER_ERROR
    except click.Abort:
        click.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = EXIT_INTERRUPTED
    except UserError as e:
        click.echo(f"clipn-train: error: {e}", err=True)
        code = EXIT_USER_ERROR
    sys.exit(code if isinstance(code, int) else EXIT_OK)


if __name__ == "__main__":
    main()
