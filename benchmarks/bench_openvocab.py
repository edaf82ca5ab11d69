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
    """The CPU engine clipn_runtime opens for ``path`` (the runtime's session settings)."""
    from clipn_runtime.engine import open_engine

    return open_engine(path, device="cpu", threads=threads, log_severity=3)


def _encode(session: Any, ids: np.ndarray, lengths: np.ndarray, batch: int, cut: bool) -> float:
    t0 = time.perf_counter()
    for idx in length_batches(lengths, batch):
        x = ids[idx][:, : int(lengths[idx].max())] if cut else ids[idx]
        l2_normalize(session.run({"tokens": x})["text_features"])
    return time.perf_counter() - t0


def _measured_end_to_end(loaded: Any, work: Path, section: Any, files: Any, k: int, threads: int | None) -> Any:
    """The runtime's own code path (BankBuilder: tokenise, encode, ensemble, cache write), timed in full for
    1000 ImageNet classes × the first ``k`` official templates."""
    from clipn_runtime.bundle import Manifest, ModelIdentity, Preprocess, Scoring
    from clipn_runtime.openvocab import BankBuilder

    ps = PromptSet(f"first {k} official", load_prompts("clipn").yes[:k])
    manifest = Manifest(
        model=ModelIdentity("bench", variant=loaded.info.variant),
        preprocess=Preprocess(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        classes=["x"],
        prompts={**ps.to_dict(), "variant": loaded.info.variant},
        scoring=Scoring(),
        files=files,
        open_vocabulary=section,
    )
    builder = BankBuilder(work, manifest, threads=threads, cache_dir=work / "banks")
    t0 = time.perf_counter()
    banks = builder.banks(load_classes("imagenet"), ps, progress=True)
    return time.perf_counter() - t0, banks


def bench_bank(loaded: Any, args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], str]:
    from clipn_export.openvocab_export import write_open_vocabulary

    t0 = time.perf_counter()
    section, files = write_open_vocabulary(loaded, work)  # what clipn-export --open-vocabulary writes
    export_s = time.perf_counter() - t0
    paths = {t: work / section.text_encoders[t] for t in ("yes", "no")}
    tok = ClipTokenizer.from_file(work / section.tokenizer)

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

    e2e = None
    if args.measure_templates:
        e2e_s, e2e_banks = _measured_end_to_end(loaded, work, section, files, args.measure_templates, args.threads)
        e2e = {
            "templates": args.measure_templates,
            "distinct_prompts": e2e_banks.encoded["yes"],
            "seconds_measured": round(e2e_s, 1),
            "extrapolated_seconds_for_comparison": round(per_prompt * e2e_banks.encoded["yes"] * towers, 1),
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
        "measured_end_to_end": e2e,
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
        + (
            f"\n**Measured end to end** (the runtime's BankBuilder: tokenise, encode, ensemble, cache write) for "
            f"1000 classes × the first {e2e['templates']} official templates ({e2e['distinct_prompts']:,} distinct "
            f"prompts, both towers): **{e2e['seconds_measured'] / 60:.1f} min** (the extrapolation below predicts "
            f"{e2e['extrapolated_seconds_for_comparison'] / 60:.1f} min for it).\n"
            if e2e
            else ""
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

    # The head alone, where the two designs differ: milliseconds, so many alternated rounds are cheap and the
    # comparison is not drowned by the encoder's run-to-run noise on a shared machine.
    head_inputs = ox.export_head(head, bank_inputs=True)
    ox.add_bank_defaults(head_inputs, head.bank.numpy(), head.bank_no.numpy())
    h_baked = _session(baked_head.SerializeToString(), args.threads)
    h_inputs = _session(head_inputs.SerializeToString(), args.threads)
    f = np.random.default_rng(2).standard_normal((args.image_batch, d)).astype(np.float32)
    h_times: dict[str, list[float]] = {"baked": [], "inputs": [], "inputs_default": []}
    for _ in range(args.head_rounds):
        for name, sess, feeds in (
            ("baked", h_baked, {"feature": f}),
            ("inputs", h_inputs, {"feature": f, ox.BANK_INPUTS["yes"]: yes, ox.BANK_INPUTS["no"]: no}),
            ("inputs_default", h_inputs, {"feature": f}),
        ):
            t0 = time.perf_counter()
            sess.run(feeds)
            h_times[name].append(time.perf_counter() - t0)
    head_ms = {k: float(np.median(v)) * 1e3 for k, v in h_times.items()}
    payload["head_only_median_ms"] = head_ms
    payload["head_rounds"] = args.head_rounds
    for p in args.precisions:
        enc = {"fp32": encoder, "int8": prec.to_int8(encoder) if p == "int8" else None}[p]
        assert enc is not None
        baked = ox.chain([(ox.PREFIX_ENCODER, enc), (ox.PREFIX_HEAD, baked_head)])
        inputs = ox.chain([(ox.PREFIX_ENCODER, enc), (ox.PREFIX_HEAD, input_head)])
        ox.add_bank_defaults(inputs, yes, no)
        s_baked = _session(baked.SerializeToString(), args.threads)
        s_inputs = _session(inputs.SerializeToString(), args.threads)
        feeds_inputs = {"image": x, ox.BANK_INPUTS["yes"]: yes, ox.BANK_INPUTS["no"]: no}
        a = s_baked.run({"image": x})
        b = s_inputs.run(feeds_inputs)
        diff = max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in a)
        times: dict[str, list[float]] = {"baked": [], "inputs": [], "inputs_default": []}
        for _ in range(args.rounds):
            for name, sess, feeds in (
                ("baked", s_baked, {"image": x}),
                ("inputs", s_inputs, feeds_inputs),
                ("inputs_default", s_inputs, {"image": x}),
            ):
                t0 = time.perf_counter()
                sess.run(feeds)
                times[name].append(time.perf_counter() - t0)
        med = {k: float(np.median(v)) for k, v in times.items()}
        ips = {k: args.image_batch / v for k, v in med.items()}
        # speed of "fed" relative to "baked", paired within each round (both saw the same machine load)
        paired = float(np.median(np.array(times["baked"]) / np.array(times["inputs"])))
        payload[p] = {
            "median_batch_seconds": med,
            "images_per_second": ips,
            "fed_over_baked_speed_paired_median": paired,
            "max_abs_diff_outputs": diff,
        }
        rows.append(
            f"| {p} | {ips['baked']:.2f} | {ips['inputs']:.2f} | {ips['inputs_default']:.2f} | "
            f"{paired:.3f} | {diff:.1e} |\n"
        )
    enc_ms = payload["fp32"]["median_batch_seconds"]["baked"] * 1e3
    md = (
        f"### Image engine: banks baked vs banks as inputs ({args.model}, 1000 classes, batch {args.image_batch}, "
        f"median of {args.rounds} alternated batches)\n\n"
        "| encoder | baked img/s | banks fed img/s | banks defaulted img/s | fed/baked speed (paired median) "
        "| max abs Δ outputs |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        + "".join(rows)
        + f"\nThe scoring head alone (where the designs differ), median of {args.head_rounds} alternated runs: "
        f"baked {head_ms['baked']:.2f} ms, banks fed {head_ms['inputs']:.2f} ms, banks defaulted "
        f"{head_ms['inputs_default']:.2f} ms per batch of {args.image_batch} — a difference of "
        f"{head_ms['inputs'] - head_ms['baked']:+.2f} ms against {enc_ms:.0f} ms for the whole fp32 batch "
        f"({(head_ms['inputs'] - head_ms['baked']) / enc_ms:+.3%}).\n"
    )
    return payload, md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument(
        "--batches", type=int, default=5, help="text-encoder batches of the full schedule to time (spread evenly)"
    )
    ap.add_argument("--batch-size", type=int, default=256, help="prompts per text-encoder batch")
    ap.add_argument(
        "--measure-templates",
        type=int,
        default=4,
        help="also run the runtime's BankBuilder in full for 1000 classes × this many templates (0: skip)",
    )
    ap.add_argument("--image-batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=7, help="alternated whole-engine batches per variant")
    ap.add_argument("--head-rounds", type=int, default=300, help="alternated head-only runs per variant")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["bank", "engine"])
    ap.add_argument("--name", default="openvocab")
    args = ap.parse_args()

    from clipn_train.factory import create_clipn

    torch.manual_seed(0)
    loaded = create_clipn(args.model)
    prompt = loaded.model.prompt_no
    assert prompt is not None, "create_clipn's default variant learns prompts"
    with torch.no_grad():  # an untrained no tower equals the yes tower; make them differ
        prompt.normal_(0, 0.02)
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
