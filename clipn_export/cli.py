"""``clipn-export``: a CLIPN checkpoint + a class list → a deployable bundle (a thin layer over export_bundle)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import click

from clipn_runtime.errors import UserError

log = logging.getLogger("clipn_export")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_PARITY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

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
  clipn-export --checkpoint ckpt.pt --classes classes.txt --triton-repo models/ -o bundle/
  clipn-export --checkpoint ckpt.pt --classes imagenet --open-vocabulary -o b/
      # then, torch-free: clipn-detect images/ --engine b/ --classes other.txt

\b
After the export, a parity gate runs a few generated images through the ONNX
engines (onnxruntime) and through the PyTorch model + the reference scoring and
prints a table of the differences. fp32 must match within --parity-atol with
identical decisions; fp16/int8 must keep the ATD ranking (--parity-min-rank-*).

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


def _setup_logging(quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("clipn-export: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.propagate = False


@click.command(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
    type=click.Path(file_okay=False),
    help="Bundle directory to write.",
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
    default="clipn",
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
    "--int8", is_flag=True, help="Also write model.int8.onnx: encoder MatMul weights dynamically quantised (CPU)."
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
    "--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read and updated)."
)
@click.option(
    "--triton-repo", type=click.Path(file_okay=False), metavar="DIR", help="Also write a Triton model repository."
)
@click.option("--triton-name", default="clipn", show_default=True, help="Model name inside --triton-repo.")
@click.option(
    "--parity-images", default=16, show_default=True, type=int, help="Generated images for the parity gate."
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
    "--parity-min-rank-int8",
    default=0.95,
    show_default=True,
    type=float,
    help="int8 gate: min ATD rank correlation.",
)
@click.option("--no-parity", is_flag=True, help="Skip the parity gate (recorded as skipped in clipn.json).")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Text-bank cache. Default: $CLIPN_CACHE (else $XDG_CACHE_HOME/clipn-ood or ~/.cache/clipn-ood), then text-banks/.",
)
@click.option("--no-cache", is_flag=True, help="Do not read or write the text-bank cache.")
@click.option(
    "--text-batch-size", default=256, show_default=True, type=int, help="Prompts per text-encoder batch."
)
@click.option(
    "--device", default="cpu", show_default=True, help="Torch device for the text bank and tracing (cpu, cuda)."
)
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing bundle at -o (and the Triton model directory)."
)
@click.option("--quiet", "-q", is_flag=True, help="Only warnings, errors and the parity table.")
def main(
    checkpoint: str,
    classes: str,
    output: str,
    model: str,
    pretrained: str | None,
    variant: str | None,
    prompts: str,
    fp16: bool,
    int8: bool,
    uint8_input: bool,
    open_vocabulary: bool,
    full_outputs: bool,
    embeddings: bool,
    scale: float | None,
    max_batch: int,
    opt_batch: int | None,
    tensorrt: bool,
    timing_cache: str | None,
    triton_repo: str | None,
    triton_name: str,
    parity_images: int,
    parity_atol: float,
    parity_min_rank_fp16: float,
    parity_min_rank_int8: float,
    no_parity: bool,
    cache_dir: str | None,
    no_cache: bool,
    text_batch_size: int,
    device: str,
    overwrite: bool,
    quiet: bool,
) -> None:
    opts = dict(locals())
    _setup_logging(quiet)
    start = time.perf_counter()
    try:
        code = _run(**opts)
    except UserError as e:
        click.echo(f"clipn-export: error: {e}", err=True)
        code = EXIT_USAGE
    except KeyboardInterrupt:
        click.echo("clipn-export: interrupted; no bundle written", err=True)
        code = EXIT_INTERRUPTED
    if code in (EXIT_OK, EXIT_PARITY):
        log.info("done in %.1f s", time.perf_counter() - start)
    sys.exit(code)


def _run(**o: object) -> int:
    # Heavy imports here, so that --help and argument errors stay fast.
    from clipn_export.exporter import ParityGateError, export_bundle
    from clipn_export.openvocab_export import OpenVocabularyCheckError
    from clipn_export.parity import ParityOptions
    from clipn_export.textbank import default_cache_dir
    from clipn_runtime.classes import load_classes
    from clipn_runtime.prompts import load_prompts

    if o["parity_images"] < 2:  # type: ignore[operator]
        raise UserError("--parity-images must be ≥ 2 (a rank correlation needs at least two images)")
    if not Path(str(o["checkpoint"])).is_file():
        raise UserError(f"--checkpoint {o['checkpoint']}: no such file")
    class_list = load_classes(str(o["classes"]))
    prompt_set = load_prompts(str(o["prompts"]))
    if o["tensorrt"]:
        from clipn_export.tensorrt import require_tensorrt

        require_tensorrt()

    import torch

    from clipn_train.model import create_clipn

    device = str(o["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch here; use --device cpu")

    log.info("loading %s with --model %s", o["checkpoint"], o["model"])
    loaded = create_clipn(
        str(o["model"]),
        o["pretrained"],  # type: ignore[arg-type]
        variant=o["variant"],  # type: ignore[arg-type]
        checkpoint=str(o["checkpoint"]),
        device=device,
    )
    log.info(
        "%s CLIPN (%s), %d classes, prompts %s, scale %s",
        loaded.info.variant,
        loaded.info.model_name,
        len(class_list),
        prompt_set.name,
        o["scale"] if o["scale"] is not None else f"{loaded.model.scale:g} (checkpoint)",
    )
    parity = ParityOptions(
        enabled=not o["no_parity"],
        images=int(o["parity_images"]),  # type: ignore[call-overload]
        atol=float(o["parity_atol"]),  # type: ignore[arg-type]
        min_rank_corr={"fp16": float(o["parity_min_rank_fp16"]), "int8": float(o["parity_min_rank_int8"])},  # type: ignore[arg-type]
    )
    cache_dir = None if o["no_cache"] else (o["cache_dir"] or default_cache_dir())
    try:
        result = export_bundle(
            loaded,
            class_list,
            str(o["output"]),
            prompts=prompt_set,
            fp16=bool(o["fp16"]),
            int8=bool(o["int8"]),
            uint8_input=bool(o["uint8_input"]),
            full_outputs=bool(o["full_outputs"]),
            embeddings=bool(o["embeddings"]),
            scale=o["scale"],  # type: ignore[arg-type]
            max_batch=int(o["max_batch"]),  # type: ignore[call-overload]
            opt_batch=o["opt_batch"],  # type: ignore[arg-type]
            tensorrt=bool(o["tensorrt"]),
            timing_cache=o["timing_cache"],  # type: ignore[arg-type]
            triton_repo=o["triton_repo"],  # type: ignore[arg-type]
            triton_name=str(o["triton_name"]),
            parity=parity,
            cache_dir=cache_dir,  # type: ignore[arg-type]
            text_batch_size=int(o["text_batch_size"]),  # type: ignore[call-overload]
            overwrite=bool(o["overwrite"]),
            progress=not o["quiet"],
            open_vocabulary=bool(o["open_vocabulary"]),
        )
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
    return EXIT_OK
