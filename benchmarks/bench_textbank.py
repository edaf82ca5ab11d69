"""Text-bank speed: clipn_export.textbank (distinct prompts once, length-sorted batches cut to their longest
prompt, inference mode) against the naive way (full 77-token context, every template encoded per class).

Both run on the same random-init CLIPN (no download; the cost does not depend on the weights' values) with the
same prompts and classes, one after the other in one process; the result records the max |Δ| between the two
banks, the speed-up, and a per-class extrapolation to all 1000 ImageNet classes (clearly marked as such).

    python benchmarks/bench_textbank.py --model ViT-B-16 --classes 10   # ~7 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result

from clipn_export.textbank import build_text_bank, naive_text_bank
from clipn_runtime.classes import load_classes
from clipn_runtime.openvocab import fill
from clipn_runtime.prompts import load_prompts
from clipn_train.factory import create_clipn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument(
        "--classes",
        type=int,
        default=6,
        help="first N ImageNet classes (6 ≈ 4 min at the recorded 10-class run's pace)",
    )
    ap.add_argument("--prompts", default="clipn")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--name", default="textbank")
    args = ap.parse_args()

    torch.manual_seed(0)
    loaded = create_clipn(args.model)
    prompt = loaded.model.prompt_no
    assert prompt is not None, "create_clipn's default variant learns prompts"
    with torch.no_grad():  # an untrained no tower equals the yes tower; make the two banks differ
        prompt.normal_(0, 0.02)
    classes = load_classes("imagenet")[: args.classes]
    prompts = load_prompts(args.prompts)
    templates = prompts.templates_for("yes", loaded.info.variant)
    lengths = loaded.tokenizer([fill(t, c) for c in classes for t in templates]).argmax(dim=1) + 1
    threads = torch.get_num_threads()

    t0 = time.perf_counter()
    bank = build_text_bank(loaded, classes, prompts, batch_size=args.batch_size, cache_dir=None, progress=True)
    fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    yes, no = naive_text_bank(loaded, classes, prompts, progress=True)
    naive = time.perf_counter() - t0

    diff = float(max(np.abs(bank.yes - yes).max(), np.abs(bank.no - no).max()))
    n = len(classes)
    payload = {
        "model": args.model,
        "weights": "random init (timing does not depend on weight values)",
        "classes": n,
        "templates": len(templates),
        "prompts_encoded_per_tower": {"fast": bank.encoded, "naive": n * len(templates)},
        "tokens": {"max": int(lengths.max()), "mean": float(lengths.float().mean()), "naive_context": 77},
        "torch_threads": threads,
        "seconds": {"fast": round(fast, 2), "naive": round(naive, 2)},
        "speedup": round(naive / fast, 2),
        "max_abs_diff": diff,
        "extrapolated_1000_classes_seconds": {
            "fast": round(fast / n * 1000, 0),
            "naive": round(naive / n * 1000, 0),
            "note": "linear per-class extrapolation from this run, not measured",
        },
    }
    md = (
        f"## Text bank: fast vs naive ({args.model}, {n} ImageNet classes × {len(templates)} "
        f"'{args.prompts}' templates, both towers)\n\n"
        "| | seconds | prompts encoded / tower | context |\n|---|---:|---:|---|\n"
        f"| naive (full context, per class) | {naive:.1f} | {n * len(templates)} | 77 |\n"
        f"| clipn_export.textbank | {fast:.1f} | {bank.encoded['yes'] if bank.encoded else '?'} | "
        f"per batch, ≤ {int(lengths.max())} (mean prompt {float(lengths.float().mean()):.1f} tokens) |\n\n"
        f"Speed-up **{naive / fast:.2f}×**; max |Δ| between the banks **{diff:.2e}**. "
        f"torch threads: {threads} (CPU shared with other jobs; see the load average above).\n\n"
        f"Extrapolated (linear per class, *not measured*) to all 1000 classes: naive ≈ {naive / n * 1000 / 60:.0f} "
        f"min, fast ≈ {fast / n * 1000 / 60:.0f} min.\n"
    )
    j, m = write_result(args.name, payload, md)
    print(md)
    print(f"written: {j} {m}")


if __name__ == "__main__":
    main()
