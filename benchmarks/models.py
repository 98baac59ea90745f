"""Teacher vs student, in one run: parameters, held-out perplexity, copies/s at batch 1 and 32.

    python benchmarks/models.py [--teacher runs/teacher] [--student models/shipped/livecopy-student]
                                [--rows 600] [--samples 20] [--threads 1] [--json-out report.json]

Perplexity: held-out split (products never seen in training), copy tokens + EOS given prompt and
style token. Both models' summed NLL is divided by the *teacher's* token count of the same text
(the student tokenizer is a merge-closed subset of the teacher's, so on corpus text the two
tokenizations coincide; the share of rows where they do is printed); per-word perplexity (summed
NLL / whitespace words + 1 for the end of copy) and bits per UTF-8 byte are printed as the
tokenizer-free checks. Speed: the same hand-written KV-cached decode loop for both
models, one sampled copy per prompt (temperature 0.9, top-k 50, top-p 0.95, at most 48 new
tokens), fp32 on this CPU, after a warm-up call; the student's time includes its CTR read at EOS.
Both models run with the same torch thread count (``--threads``, default 1: on a CPU shared with
other jobs one thread each is the fairer comparison); the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.evaluate import (
    copy_nll_rows,
    demo_contexts,
    dir_size_mb,
    heldout_examples,
    load_any,
    measure_speed,
    sample_copies,
)
from models.paths import shipped_student_dir, shipped_teacher_adapter_dir

TARGETS = {"params_ratio_max": 0.10, "speed_ratio_b32_min": 5.0, "ppl_ratio_max": 1.35}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="runs/teacher")
    ap.add_argument("--student", default=str(shipped_student_dir()))
    ap.add_argument("--rows", type=int, default=600, help="held-out rows for perplexity")
    ap.add_argument("--samples", type=int, default=20, help="student sample copies to print (0: none)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both models (0: torch default)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_before = os.getloadavg()
    if not Path(args.teacher, "config.json").exists():
        print(f"no teacher at {args.teacher}: rebuild the one the shipped student was distilled from with\n"
              f"  livecopy train teacher-from-adapter {shipped_teacher_adapter_dir()} --out {args.teacher}\n"
              f"or train one with `livecopy train teacher` (see docs/models.md)", file=sys.stderr)
        return 2
    teacher = load_any(args.teacher)
    student = load_any(args.student)
    rows = heldout_examples(args.rows)
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with "
          f"{torch.get_num_threads()} thread(s) per model; load average before: "
          f"{' '.join(f'{x:.2f}' for x in load_before)}")
    print(f"held-out rows: {len(rows)} (products never seen in training)")

    t_nll, t_n = copy_nll_rows(teacher, rows)
    s_nll, s_n = copy_nll_rows(student, rows)
    same = float(np.mean(t_n == s_n))
    n_bytes = sum(len(r.copy.encode()) + 1 for r in rows)
    n_words = sum(len(r.copy.split()) + 1 for r in rows)  # +1: the end of the copy (EOS)
    res: dict[str, dict[str, float]] = {}
    for name, m, nll in (("teacher", teacher, t_nll), ("student", student, s_nll)):
        res[name] = {
            "params": float(m.params),
            "disk_mb": dir_size_mb(m.path),
            "ppl": float(np.exp(nll.sum() / t_n.sum())),
            "ppl_word": float(np.exp(nll.sum() / n_words)),
            "bits_per_byte": float(nll.sum() / np.log(2) / n_bytes),
        }
    prompts = [r.prompt for r in rows[:96]]
    for name, m, n1, n32 in (("teacher", teacher, 6, 64), ("student", student, 48, 320)):
        res[name]["copies_per_s_b1"] = measure_speed(m, prompts, 1, n1)["copies_per_s"]
        res[name]["copies_per_s_b32"] = measure_speed(m, prompts, 32, n32)["copies_per_s"]

    t, s = res["teacher"], res["student"]
    ratios = {
        "params": s["params"] / t["params"],
        "ppl": s["ppl"] / t["ppl"],
        "ppl_word": s["ppl_word"] / t["ppl_word"],
        "bits_per_byte": s["bits_per_byte"] / t["bits_per_byte"],
        "speed_b1": s["copies_per_s_b1"] / t["copies_per_s_b1"],
        "speed_b32": s["copies_per_s_b32"] / t["copies_per_s_b32"],
    }
    line = "{:<26}{:>16}{:>16}{:>12}"
    print()
    print(line.format("", "teacher", "student", "ratio"))
    print(line.format("parameters", f"{t['params'] / 1e6:.2f} M", f"{s['params'] / 1e6:.2f} M",
                      f"{ratios['params']:.3f}"))
    print(line.format("checkpoint on disk", f"{t['disk_mb']:.1f} MB", f"{s['disk_mb']:.1f} MB",
                      f"{s['disk_mb'] / t['disk_mb']:.3f}"))
    print(line.format("held-out perplexity", f"{t['ppl']:.3f}", f"{s['ppl']:.3f}", f"{ratios['ppl']:.3f}"))
    print(line.format("held-out ppl per word", f"{t['ppl_word']:.3f}", f"{s['ppl_word']:.3f}",
                      f"{ratios['ppl_word']:.3f}"))
    print(line.format("held-out bits/byte", f"{t['bits_per_byte']:.4f}", f"{s['bits_per_byte']:.4f}",
                      f"{ratios['bits_per_byte']:.3f}"))
    print(line.format("copies/s, batch 1", f"{t['copies_per_s_b1']:.2f}", f"{s['copies_per_s_b1']:.2f}",
                      f"{ratios['speed_b1']:.1f}x"))
    print(line.format("copies/s, batch 32", f"{t['copies_per_s_b32']:.2f}", f"{s['copies_per_s_b32']:.2f}",
                      f"{ratios['speed_b32']:.1f}x"))
    print(f"\nidentical tokenization on {same:.1%} of held-out rows (perplexity per teacher token; "
          f"{int(t_n.sum())} teacher tokens, {n_words} words, {n_bytes} bytes)")
    checks = {
        f"student params <= {TARGETS['params_ratio_max']:.0%} of teacher":
            ratios["params"] <= TARGETS["params_ratio_max"],
        f"student >= {TARGETS['speed_ratio_b32_min']:.0f}x teacher copies/s at batch 32":
            ratios["speed_b32"] >= TARGETS["speed_ratio_b32_min"],
        f"student perplexity <= {TARGETS['ppl_ratio_max']}x teacher": ratios["ppl"] <= TARGETS["ppl_ratio_max"],
        "shipped checkpoint <= 25 MB": s["disk_mb"] <= 25.0,
    }
    for k, ok in checks.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {k}")
    meta = student.meta.metrics
    if meta.get("ctr_auc_heldout") is not None:
        share = student.meta.training.get("config", {}).get("mismatch_share")
        print("\nCTR head on the held-out split, synthetic labels (clicks sampled from the corpus's prior click "
              "model), from the student's livecopy.json:")
        as_trained = f"{share:.0%}" if isinstance(share, int | float) else "the corpus's"
        print(f"  {as_trained} off-product rows (as trained): AUC {meta['ctr_auc_heldout']:.3f}, "
              f"the prior's own probabilities reach {meta['ctr_auc_prior_ceiling']:.3f} on the same clicks")
        mix = [k for k in meta if k.startswith("ctr_auc_heldout_mix")]
        for k in mix:
            ceil = meta.get(k.replace("ctr_auc_heldout", "ctr_auc_prior_ceiling"))
            print(f"  {float(k.rsplit('mix', 1)[1]):.0%} off-product rows (default corpus): AUC {meta[k]:.3f}, "
                  f"prior ceiling {ceil:.3f}")

    samples: list[dict[str, object]] = []
    if args.samples:
        ctxs = demo_contexts(max(1, -(-args.samples // 4)))[: args.samples]
        samples, stats = sample_copies(student, ctxs, k=4, seed=0)
        print(f"\nstudent samples (best of 4 candidates by CTR among those passing the filter; "
              f"filter pass rate {stats.as_dict()['pass_rate']:.0%}, fallbacks {stats.fallbacks}):")
        last = None
        for smp in samples:
            if smp["product"] != last:
                extra = (f", {smp['discount_pct']}% off" if smp["discount_pct"] else "")
                extra += ", eco" if smp["eco"] else ""
                print(f"\n  {smp['product']} (${smp['price']:.2f}{extra})")
                last = smp["product"]
            fb = " (fallback template: no candidate passed the filter)" if smp["fallback"] else ""
            print(f"    {smp['persona']:<15} [{smp['style']}] {smp['text']}{fb}")
    load_after = os.getloadavg()
    print(f"\nbenchmark wall time: {time.perf_counter() - t_start:.0f} s; load average after: "
          f"{' '.join(f'{x:.2f}' for x in load_after)} (the CPU is shared with other jobs: absolute copies/s "
          f"vary run to run, the ratios are measured in the same run)")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"results": res, "ratios": ratios, "checks": checks, "identical_tokenization": same,
             "threads": torch.get_num_threads(), "load_before": load_before, "load_after": load_after,
             "samples": samples}, indent=2, default=str))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
