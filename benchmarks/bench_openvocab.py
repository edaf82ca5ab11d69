"""Open-vocabulary bundles: what a new class list costs in the runtime, and what banks-as-inputs cost the engine.

Two measurements on a random-init CLIPN of the real size (no download; timings do not depend on weight values):

1. ``bank``: the runtime's new-bank computation (clipn_runtime.openvocab: tokenizer.json + the ONNX yes/no
   text encoders in onnxruntime, distinct prompts once, length-sorted batches cut to their longest prompt) for
   the 1000 ImageNet classes × the 128 official templates. The full set is 2 towers × ~128k prompts — hours on
   this CPU — so by default a few batches (``--batches``) of the runtime's real schedule (length-sorted batches,
   each cut to its longest prompt), spread from the shortest to the longest prompts, are timed and the mean
   batch time is extrapolated to all batches, and by prompt count to smaller prompt sets (``openai``: 80
   templates; the first 8/16/32 official templates, as a smaller ``--prompts`` file would give). Tokenising all
   128k prompts is measured in full. One batch at the full 77-token context shows what the dynamic sequence
   axis saves. Every extrapolated number is labelled as such.
2. ``engine``: the image engine with the yes/no banks as graph inputs (initialisers that are also inputs, fed
   by the runtime) against the same engine with the banks baked in, 1000 classes, fp32 and int8, batches
   alternated in one process so both see the same machine load.

    python benchmarks/bench_openvocab.py --model ViT-B-16 --batches 5         # ~15 min on 2 busy cores
    python benchmarks/bench_openvocab.py --model ViT-B-16 --batches 1000      # every batch: the full set (hours)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

from clipn_runtime.classes import load_classes
from clipn_runtime.openvocab import length_batches, plan_prompts
from clipn_runtime.prompts import PromptSet, load_prompts
from clipn_runtime.scoring import l2_normalize
from clipn_runtime.tokenizer import ClipTokenizer


def _session(path: Path | bytes, threads: int | None) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    src = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def _encode(session: Any, ids: np.ndarray, lengths: np.ndarray, batch: int, cut: bool) -> float:
    t0 = time.perf_counter()
    for idx in length_batches(lengths, batch):
        x = ids[idx][:, : int(lengths[idx].max())] if cut else ids[idx]
        l2_normalize(session.run(None, {"tokens": x})[0])
    return time.perf_counter() - t0


def bench_bank(loaded: Any, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str]:
    from clipn_export.text_export import export_text_encoder
    from clipn_export.tokenizer_export import write_tokenizer

    t0 = time.perf_counter()
    paths = {}
    for tower in ("yes", "no"):
        paths[tower] = work / f"text_{tower}.onnx"
        paths[tower].write_bytes(export_text_encoder(loaded.model, tower).SerializeToString())
    export_s = time.perf_counter() - t0
    tok = ClipTokenizer.from_file(write_tokenizer(work / "tokenizer.json", loaded.tokenizer))

    classes = load_classes("imagenet")
    ps = load_prompts("clipn")
    variant = loaded.info.variant
    plan = plan_prompts(classes, ps, variant)
    strings = [plan.strings[i] for i in plan.used["yes"]]
    towers = 2  # learnable variant: both towers encode the same distinct strings
    t0 = time.perf_counter()
    full = tok.encode(strings)
    tokenize_s = time.perf_counter() - t0

    # The runtime's schedule over the full set: length-sorted batches, each cut to its longest prompt. A few
    # batches spread evenly over it (short to long) are encoded through both towers; the mean batch time ×
    # the number of batches extrapolates to the full set.
    schedule = list(length_batches(full.lengths, args.batch_size))
    k = min(args.batches, len(schedule))
    picked = sorted({round(i) for i in np.linspace(0, len(schedule) - 1, k)})
    sessions = {t: _session(p, args.threads) for t, p in paths.items()}
    _encode(sessions["yes"], full.ids[:8], full.lengths[:8], 8, True)  # warm-up
    batch_s: list[float] = []
    n = 0
    for b in picked:
        idx = schedule[b]
        n += len(idx)
        batch_s.append(
            sum(_encode(sessions[t], full.ids[idx], full.lengths[idx], len(idx), True) for t in ("yes", "no"))
        )
    cut_s = float(sum(batch_s))
    total_s = float(np.mean(batch_s)) * len(schedule)
    per_prompt = total_s / (len(strings) * towers)  # seconds per (prompt, tower), dynamic context
    mid = schedule[picked[len(picked) // 2]]
    n77 = len(mid)
    full_s = sum(_encode(sessions[t], full.ids[mid], full.lengths[mid], n77, False) for t in ("yes", "no"))
    mid_s = batch_s[len(picked) // 2]

    def predicted(p: PromptSet, label: str) -> dict[str, Any]:
        pl = plan_prompts(classes, p, variant)
        distinct = len(pl.used["yes"])
        return {
            "prompts": label,
            "templates": len(p.yes),
            "distinct_prompts": distinct,
            "encodings": distinct * towers,
            "extrapolated_minutes": round(per_prompt * distinct * towers / 60, 1),
        }

    official = ps.yes
    rows = [
        predicted(ps, "clipn (128 official)"),
        predicted(load_prompts("openai"), "openai (80)"),
        *(predicted(PromptSet(f"first {k}", official[:k]), f"first {k} official") for k in (32, 16, 8)),
    ]
    payload = {
        "model": args.model,
        "weights": "random init (timing does not depend on weight values)",
        "classes": len(classes),
        "distinct_prompts": len(strings),
        "tokens": {
            "mean": float(full.lengths.mean()),
            "max": int(full.lengths.max()),
            "context": tok.context_length,
        },
        "export_text_encoders_seconds": round(export_s, 1),
        "tokenize_all_seconds_measured": round(tokenize_s, 2),
        "schedule_batches": len(schedule),
        "sample": {
            "batches": picked,
            "prompts": n,
            "towers": towers,
            "seconds": round(cut_s, 2),
            "batch_seconds": [round(b, 2) for b in batch_s],
        },
        "extrapolated_full_set_seconds": round(total_s, 0),
        "seconds_per_prompt_per_tower": {"dynamic_extrapolated_mean": per_prompt},
        "full_context": {
            "batch": picked[len(picked) // 2],
            "seconds_cut": round(mid_s, 2),
            "seconds_77": round(full_s, 2),
            "slowdown": round(full_s / mid_s, 2),
        },
        "extrapolated": rows,
        "threads": args.threads or "onnxruntime default",
        "batch_size": args.batch_size,
    }
    md = (
        f"### New class bank in the runtime ({args.model}, onnxruntime CPU, both towers)\n\n"
        f"Measured: tokenising all {len(strings):,} distinct prompts of 1000 ImageNet classes × 128 official "
        f"templates: **{tokenize_s:.1f} s** (mean {full.lengths.mean():.1f} tokens, max {full.lengths.max()}). "
        f"The runtime encodes them in {len(schedule)} length-sorted batches of {args.batch_size}; {len(picked)} of "
        f"those batches spread from the shortest to the longest prompts ({n:,} prompts) took **{cut_s:.1f} s** "
        f"through both towers, {np.mean(batch_s):.1f} s per batch. The middle one at the full 77-token context "
        f"instead of cut to its longest prompt: {full_s:.1f} s vs {mid_s:.1f} s (**{full_s / mid_s:.1f}×**).\n\n"
        "| prompt set | templates | distinct prompts | encodings (2 towers) | **extrapolated** time |\n"
        "|---|---:|---:|---:|---:|\n"
        + "".join(
            f"| {r['prompts']} | {r['templates']} | {r['distinct_prompts']:,} | {r['encodings']:,} | "
            f"≈ {r['extrapolated_minutes']} min |\n"
            for r in rows
        )
        + f"\nExtrapolated (not measured in full): mean sampled batch time × {len(schedule)} batches for the "
        "128-template set, and the same time per prompt for the smaller sets. Tokenising adds "
        f"≈ {tokenize_s:.0f} s for the 128-template set. Exporting the two ONNX text encoders took "
        f"{export_s:.0f} s.\n"
    )
    return payload, md


def bench_engine(loaded: Any, args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    from clipn_export import onnx_export as ox
    from clipn_export import precision as prec
    from clipn_export.head import ScoringHead

    c, d = 1000, int(loaded.model.embed_dim)
    g = np.random.default_rng(0)
    yes = l2_normalize(g.standard_normal((c, d))).astype(np.float32)
    no = l2_normalize(g.standard_normal((c, d))).astype(np.float32)
    head = ScoringHead(yes, no, 100.0)
    size = int(loaded.info.image_size)
    encoder = ox.export_encoder(loaded.model, size)
    baked_head = ox.export_head(head)
    input_head = ox.export_head(head, bank_inputs=True)
    x = np.random.default_rng(1).standard_normal((args.image_batch, 3, size, size)).astype(np.float32)
    rows = []
    payload: dict[str, Any] = {"classes": c, "image_batch": args.image_batch, "rounds": args.rounds}
    for p in args.precisions:
        enc = {"fp32": encoder, "int8": prec.to_int8(encoder) if p == "int8" else None}[p]
        assert enc is not None
        baked = ox.chain([(ox.PREFIX_ENCODER, enc), (ox.PREFIX_HEAD, baked_head)])
        inputs = ox.chain([(ox.PREFIX_ENCODER, enc), (ox.PREFIX_HEAD, input_head)])
        ox.add_bank_defaults(inputs, yes, no)
        s_baked = _session(baked.SerializeToString(), args.threads)
        s_inputs = _session(inputs.SerializeToString(), args.threads)
        feeds_inputs = {"image": x, ox.BANK_INPUTS["yes"]: yes, ox.BANK_INPUTS["no"]: no}
        a = s_baked.run(None, {"image": x})
        b = s_inputs.run(None, feeds_inputs)
        diff = max(
            float(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64)).max())
            for u, v in zip(a, b, strict=True)
        )
        times: dict[str, list[float]] = {"baked": [], "inputs": [], "inputs_default": []}
        for _ in range(args.rounds):
            for name, sess, feeds in (
                ("baked", s_baked, {"image": x}),
                ("inputs", s_inputs, feeds_inputs),
                ("inputs_default", s_inputs, {"image": x}),
            ):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ips = {k: args.image_batch / v for k, v in med.items()}
        payload[p] = {"median_batch_seconds": med, "images_per_second": ips, "max_abs_diff_outputs": diff}
        rows.append(
            f"| {p} | {ips['baked']:.2f} | {ips['inputs']:.2f} | {ips['inputs_default']:.2f} | "
            f"{ips['inputs'] / ips['baked']:.3f} | {diff:.1e} |\n"
        )
    md = (
        f"### Image engine: banks baked vs banks as inputs ({args.model}, 1000 classes, batch {args.image_batch}, "
        f"median of {args.rounds} alternated batches)\n\n"
        "| encoder | baked img/s | banks fed img/s | banks defaulted img/s | fed / baked | max abs Δ outputs |\n"
        "|---|---:|---:|---:|---:|---:|\n" + "".join(rows)
    )
    return payload, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument(
        "--batches", type=int, default=5, help="text-encoder batches of the full schedule to time (spread evenly)"
    )
    ap.add_argument("--batch-size", type=int, default=256, help="prompts per text-encoder batch")
    ap.add_argument("--image-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["bank", "engine"])
    ap.add_argument("--name", default="openvocab")
    args = ap.parse_args()

    from clipn_train.model import create_clipn

    torch.manual_seed(0)
    loaded = create_clipn(args.model)
    with torch.no_grad():  # an untrained no tower equals the yes tower; make them differ
        loaded.model.prompt_no.normal_(0, 0.02)
    payload: dict[str, Any] = {"model": args.model}
    md = ""
    with tempfile.TemporaryDirectory(prefix="bench-openvocab-") as tmp:
        if "engine" not in args.skip:
            p, m = bench_engine(loaded, args)
            payload["engine"], md = p, md + m + "\n"
            print(m, flush=True)
        if "bank" not in args.skip:
            p, m = bench_bank(loaded, args, Path(tmp))
            payload["bank"], md = p, md + m + "\n"
            print(m, flush=True)
    j, mdp = write_result(args.name, payload, md)
    print(f"wrote {j} and {mdp}")


if __name__ == "__main__":
    main()
