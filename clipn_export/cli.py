"""``clipn-export``: a CLIPN checkpoint + a class list → a deployable bundle (a thin layer over export_bundle)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from clipn_export.int8_calibration import DEFAULT_CALIBRATION_SIZE, MIN_CALIBRATION_IMAGES
from clipn_export.options import ExportOptions
from clipn_export.parity import ParityOptions
from clipn_runtime import clikit
from clipn_runtime.clikit import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from clipn_runtime.clikit import EXIT_PARTIAL as EXIT_ERROR
from clipn_runtime.errors import UserError
from clipn_runtime.prompts import DEFAULT_PROMPTS, PromptSet

if TYPE_CHECKING:
    from clipn_export.exporter import ExportResult
    from clipn_train.factory import LoadedCLIPN

log = logging.getLogger("clipn_export")

#: Only clipn-export has this one: the bundle is written but failed the parity gate.
EXIT_PARITY = 3
__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_PARITY", "EXIT_USAGE", "main"]

HELP = """Export a CLIPN model for a class list as a bundle: one ONNX engine per precision
(image encoder + the frozen yes/no class banks + the fused CTW/ATD scoring head),
the text banks, and a manifest (clipn.json) that clipn-detect reads.

\b
CKPT is a clipn-train checkpoint (.safetensors; give the same --model and
--pretrained it was trained on, or leave --pretrained out to use what the
checkpoint records) or an official CLIPN checkpoint (.pt; the whole CLIP is in
it, so no --pretrained).

\b
Examples:
  clipn-export --checkpoint logs/run/checkpoints/epoch_10.safetensors \\
      --model ViT-B-16 --pretrained laion2b_s34b_b88k --classes imagenet -o bundle/
  clipn-export --checkpoint CLIPN_ATD_Repeat2_epoch_10.pt --model ViT-B-16 \\
      --classes my_classes.txt --fp16 --tensorrt --max-batch 64 -o bundle/
  clipn-export --checkpoint ckpt.pt --classes classes.txt --int8 --uint8-input -o edge/
  clipn-export --checkpoint ckpt.pt --classes classes.txt --int8 \\
      --calibration my_id_images/ -o edge/      # static int8, calibrated on your images
  clipn-export --checkpoint ckpt.pt --classes classes.txt --triton-repo models/ -o bundle/
  clipn-export --checkpoint ckpt.pt --classes imagenet --open-vocabulary -o b/
      # then, torch-free: clipn-detect images/ --engine b/ --classes other.txt

\b
After the export, a parity gate runs a few generated images (with --calibration:
your images held out of it) through the ONNX engines (onnxruntime, OpenVINO) and
through the PyTorch model + the reference scoring and prints a table of the
differences. fp32 must match within --parity-atol with
identical decisions; fp16/bf16/int8 must keep the ATD ranking (--parity-min-rank-*).

\b
--int8 alone quantises dynamically (int8 weights, activations quantised per
batch at run time). With --calibration DIR (a few hundred of your own ID
images), it quantises statically (weights and activations int8, ranges measured
on those images; convolutions and the scoring head stay float): for CPUs with
VNNI or AMX, whose int8 arithmetic is up to 4x their fp32. A quarter of them
(16 to 64; --parity-images) are held out when enough remain, and the parity
gate checks every engine on those instead of on generated images. clipn.json
records how and on what (method, NNCF version, image count and fingerprint).
Check the result on your own ID and OOD images: clipn-eval --precision int8 vs
--precision fp32.

\b
--open-vocabulary also writes the yes/no text encoders (ONNX) and the tokenizer
(tokenizer.json), and the engines take the class banks as inputs (defaulting to
the baked ones): clipn-detect --classes then accepts any class list and computes
its banks without torch or a re-export.

\b
Exit codes: 0 bundle written and the gate passed; 2 usage or input error
(nothing written); 3 parity gate failed (bundle written with parity.passed =
false in clipn.json, the table says where); 130 interrupted (nothing written;
the text-bank cache keeps finished banks); 1 unexpected error (also: the
--open-vocabulary check failed; nothing written).
"""


@click.command(
    "clipn-export",
    cls=clikit.Command,
    help=HELP,
    interrupted="no bundle written (the text-bank cache keeps finished banks)",
    extras=("export",),
)
@click.option(
    "--checkpoint",
    "-c",
    required=True,
    metavar="CKPT",
    type=click.Path(dir_okay=False),
    help="clipn-train checkpoint (.safetensors) or official CLIPN checkpoint (.pt).",
)
@click.option(
    "--classes",
    required=True,
    metavar="FILE|imagenet",
    help="Class list: a UTF-8 file with one class name per line (# comments and blank lines ignored), "
    "or 'imagenet' for the built-in 1000 ImageNet classes.",
)
@click.option(
    "--output",
    "-o",
    required=True,
    metavar="DIR",
    type=clikit.OutputPath("dir"),
    help="Bundle directory to write (checked before any work: it must be a folder that can be created or written).",
)
@click.option(
    "--model",
    default="ViT-B-16",
    show_default=True,
    metavar="NAME|CONFIG.json",
    help="open_clip model name or a model-config JSON (the architecture of the checkpoint).",
)
@click.option(
    "--pretrained",
    metavar="TAG|FILE",
    help="Base CLIP weights for a clipn-train checkpoint: an open_clip tag or a local weights file. "
    "Default: what the checkpoint records. Not with an official checkpoint.",
)
@click.option(
    "--variant",
    type=click.Choice(["learnable", "handcrafted"]),
    help="CLIPN variant. Default: what the checkpoint holds (official checkpoints: learnable).",
)
@click.option(
    "--prompts",
    default=DEFAULT_PROMPTS,
    show_default=True,
    metavar="clipn|clean|openai|FILE",
    help="Prompt templates: 'clipn' = the 128 official pairs verbatim, 'clean' = the same without the quote "
    "artefacts, 'openai' = the 80 CLIP ImageNet templates (learnable variant only), or a file (one template "
    "with '{}' per line, or yes<TAB>no pairs).",
)
@click.option(
    "--fp16", is_flag=True, help="Also write model.fp16.onnx: encoder in fp16, normalisation + head in fp32."
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also write model.int8.onnx (for CPUs): with --calibration, static int8 calibrated on your images; "
    "without, the encoder's MatMul weights dynamically quantised.",
)
@click.option(
    "--calibration",
    multiple=True,
    metavar="DIR|@LIST|FILE",
    help="With --int8: your own in-distribution images (a folder, searched with its subfolders; an @list.txt "
    "of paths; image files; repeatable), read and preprocessed as clipn-detect reads them. The int8 engine "
    "then quantises the encoder's MatMul/Gemm layers statically (NNCF, weights and activations int8, ranges "
    f"measured on these images). At least {MIN_CALIBRATION_IMAGES} readable images; unreadable ones are skipped "
    "and counted.",
)
@click.option(
    "--calibration-size",
    default=DEFAULT_CALIBRATION_SIZE,
    show_default=True,
    type=int,
    metavar="N",
    help="Use at most N of the --calibration images, spread evenly over the sorted list.",
)
@click.option(
    "--uint8-input",
    is_flag=True,
    help="Engines take raw uint8 NHWC crops and normalise inside (4× less host→device traffic).",
)
@click.option(
    "--open-vocabulary",
    is_flag=True,
    help="Also write the text encoders and tokenizer, and make the engines take the class banks as inputs, so "
    "that clipn-detect --classes can change the class list later without torch or a re-export.",
)
@click.option("--full-outputs", is_flag=True, help="Add per-class outputs: logits, logits_no, probs, p_no_all.")
@click.option("--embeddings", is_flag=True, help="Add the L2-normalised image feature as output 'embedding'.")
@click.option(
    "--mcm-bank/--no-mcm-bank",
    default=True,
    show_default=True,
    help="Bake MCM's one-prompt bank ('a photo of a <class>.', plain CLIP text tower) into the engines: output "
    "mcm_single, method mcm-single, MCM as its paper defines it (comparable with published MCM numbers; the "
    "mcm method uses CLIPN's prompt ensemble). Costs one C×D bank. Not with --open-vocabulary.",
)
@click.option(
    "--scale",
    type=float,
    metavar="S",
    help="Logit scale s of l = s·cos. Default: exp(logit_scale) of the checkpoint's CLIP (100 for the "
    "released weights).",
)
@click.option(
    "--max-batch", default=32, show_default=True, type=int, help="Largest batch (TensorRT profile, Triton)."
)
@click.option("--opt-batch", type=int, help="TensorRT profile's optimal batch. Default: max-batch / 2.")
@click.option(
    "--tensorrt", is_flag=True, help="Also build model.plan with TensorRT ≥ 10 (needs an NVIDIA GPU here)."
)
@click.option(
    "--timing-cache", type=clikit.OutputPath("file"), help="TensorRT timing cache file (read and updated)."
)
@click.option(
    "--triton-repo", type=clikit.OutputPath("dir"), metavar="DIR", help="Also write a Triton model repository."
)
@click.option("--triton-name", default="clipn", show_default=True, help="Model name inside --triton-repo.")
@click.option(
    "--parity-images",
    default=None,
    type=int,
    help="Images for the parity gate: generated ones [default: 16], or with --calibration that many of your "
    "images, held out of the calibration [default: a quarter of those found, 16 to 64].",
)
@click.option(
    "--parity-atol", default=1e-4, show_default=True, type=float, help="fp32 gate: max |Δ| of every output."
)
@click.option(
    "--parity-min-rank-fp16",
    default=0.99,
    show_default=True,
    type=float,
    help="fp16 gate: min ATD rank correlation.",
)
@click.option(
    "--parity-min-rank-bf16",
    default=0.99,
    show_default=True,
    type=float,
    help="bf16 gate (OpenVINO on CPUs with native bf16): min ATD rank correlation.",
)
@click.option(
    "--parity-min-rank-int8",
    default=0.95,
    show_default=True,
    type=float,
    help="int8 gate: min ATD rank correlation.",
)
@click.option("--no-parity", is_flag=True, help="Skip the parity gate (recorded as skipped in clipn.json).")
@click.option(
    "--cache-dir",
    type=clikit.OutputPath("dir"),
    help="Text-bank cache. Default: $CLIPN_CACHE (else $XDG_CACHE_HOME/clipn-ood or ~/.cache/clipn-ood), then text-banks/.",
)
@click.option("--no-cache", is_flag=True, help="Do not read or write the text-bank cache.")
@click.option(
    "--text-batch-size", default=256, show_default=True, type=int, help="Prompts per text-encoder batch."
)
@clikit.device_option(
    ["auto", "cpu", "cuda", "cuda:N"],
    "cpu",
    "Where PyTorch runs (text bank, tracing, the parity reference). auto: the GPU if torch sees one, else the CPU.",
    why_not={"tensorrt": "the export runs in PyTorch; add --tensorrt to also build a TensorRT plan"},
)
@clikit.threads_option("torch and onnxruntime (text bank, tracing, parity gate)")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing bundle at -o (and the Triton model directory)."
)
@clikit.verbosity_options
@clikit.version_option
def main(**params: Any) -> int:
    request, options = _parse(params)
    start = time.perf_counter()
    from clipn_train.cli import torch_threads  # light: click only; torch is imported inside, when used

    with torch_threads(options.threads):
        code = _run(request, options)
    if code in (EXIT_OK, EXIT_PARITY):
        log.info("done in %.1f s", time.perf_counter() - start)
    return code


@dataclass(frozen=True)
class _Request:
    """The options that are not :class:`ExportOptions` fields: what to load and where to write, and the parts
    the CLI turns into fields (--parity-*, --no-cache, -q)."""

    checkpoint: str
    classes: str
    output: str
    model: str
    pretrained: str | None
    variant: str | None
    device: str
    parity_images: int | None
    parity_atol: float
    parity_min_rank_fp16: float
    parity_min_rank_bf16: float
    parity_min_rank_int8: float
    no_parity: bool
    no_cache: bool
    quiet: bool
    verbose: int


def _parse(params: dict[str, Any]) -> tuple[_Request, ExportOptions]:
    """The click parameters (named like the fields) as the request and its :class:`ExportOptions`."""
    own = set(_Request.__dataclass_fields__)
    r = _Request(**{k: v for k, v in params.items() if k in own})
    if r.parity_images is not None and r.parity_images < 2:
        raise UserError("--parity-images must be ≥ 2 (a rank correlation needs at least two images)")
    default = ParityOptions()
    parity = ParityOptions(
        enabled=not r.no_parity,
        images=default.images if r.parity_images is None else r.parity_images,
        held_out=default.held_out if r.parity_images is None else r.parity_images,
        atol=r.parity_atol,
        min_rank_corr={
            "fp16": r.parity_min_rank_fp16,
            "bf16": r.parity_min_rank_bf16,
            "int8": r.parity_min_rank_int8,
        },
    )
    fields = {k: v for k, v in params.items() if k not in own}
    return r, ExportOptions(**fields, parity=parity, progress=not r.quiet)


def _run(r: _Request, options: ExportOptions) -> int:
    # Heavy imports here, so that --help and argument errors stay fast.
    from clipn_export.exporter import ParityGateError, export_bundle
    from clipn_export.openvocab_export import OpenVocabularyCheckError

    class_list, prompt_set, options = _check_inputs(r, options)
    loaded = _load_model(r)
    log.info(
        "%s CLIPN (%s), %d classes, prompts %s, scale %s",
        loaded.info.variant,
        loaded.info.model_name,
        len(class_list),
        prompt_set.name,
        options.scale if options.scale is not None else f"{loaded.model.scale:g} (checkpoint)",
    )
    try:
        result = export_bundle(loaded, class_list, r.output, options)
    except OpenVocabularyCheckError as e:
        click.echo(f"clipn-export: error: {e}", err=True)
        return EXIT_ERROR
    except ParityGateError as e:
        click.echo(e.result.parity.table() if e.result.parity else str(e))
        click.echo(
            f"clipn-export: error: parity gate FAILED; the bundle was written to {e.result.bundle_dir} "
            "with parity.passed = false (inspect it, or relax --parity-* if the differences are acceptable)",
            err=True,
        )
        return EXIT_PARITY
    _print_result(result)
    return EXIT_OK


def _check_inputs(r: _Request, options: ExportOptions) -> tuple[list[str], PromptSet, ExportOptions]:
    """Every input file and option, before the model loads: the class list, the prompts (loaded into ``options``),
    the text-bank cache, TensorRT, the output folders."""
    from clipn_export.exporter import check_request
    from clipn_export.textbank import default_cache_dir
    from clipn_runtime.classes import load_classes
    from clipn_runtime.prompts import load_prompts

    if not Path(r.checkpoint).is_file():
        raise UserError(f"--checkpoint {r.checkpoint}: no such file")
    class_list = load_classes(r.classes)
    prompts = load_prompts(options.prompts) if isinstance(options.prompts, str) else options.prompts
    if options.tensorrt:
        from clipn_export.tensorrt import require_tensorrt

        require_tensorrt()
    cache_dir = None if r.no_cache else (options.cache_dir or _usable(default_cache_dir()))
    options = replace(options, prompts=prompts, cache_dir=cache_dir)
    check_request(class_list, Path(r.output), options)  # an existing -o, --triton-name, --max-batch, --scale …
    if options.int8 and not options.calibration:
        log.info("int8: dynamic quantisation; add --calibration DIR (your ID images) for the faster static int8")
    return class_list, prompts, options


def _load_model(r: _Request) -> LoadedCLIPN:
    from clipn_train.distributed import pick_device
    from clipn_train.factory import create_clipn

    log.info("loading %s with --model %s", r.checkpoint, r.model)
    return create_clipn(
        r.model, r.pretrained, variant=r.variant, checkpoint=r.checkpoint, device=pick_device(r.device)
    )


def _print_result(result: ExportResult) -> None:
    """The parity table, the bundle's files, the open-vocabulary check and where Triton's model went."""
    if result.parity is not None:
        click.echo(result.parity.table())
    m = result.manifest
    click.echo(f"bundle: {result.bundle_dir}")
    for f in m.files:
        size = (result.bundle_dir / f.path).stat().st_size
        click.echo(f"  {f.path:<21} {f.role:<16} {f.precision or '':<5} {size / 1e6:9.1f} MB")
    ov = m.open_vocabulary
    if ov is not None and ov.parity:
        click.echo(
            f"open vocabulary: runtime bank vs PyTorch max |Δ| {ov.parity['max_abs']:.2g} "
            f"({ov.parity['classes_checked']} classes), tokenizer = open_clip on "
            f"{ov.parity['tokenizer']['compared']} prompts"
        )
    if result.triton_dir is not None:
        click.echo(f"triton: {result.triton_dir}")
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    log.info("stages: %s", stages)


def _usable(cache: Path) -> Path | None:
    """The default text-bank cache, or None (no cache) where it cannot be written: a cache is an optimisation,
    so a read-only home directory must not fail an export after the bank is built."""
    problem = clikit.output_problem(cache, "dir")
    if problem is None:
        return cache
    log.warning("text-bank cache off: %s (set $CLIPN_CACHE or --cache-dir to keep banks)", problem)
    return None
