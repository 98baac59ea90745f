"""Closed-loop benchmark: simulated shoppers with a hidden click model, four copy policies on one stream.

    python benchmarks/closed_loop.py                     # 100,000 impressions, seed 1
    python benchmarks/closed_loop.py --impressions 20000 --plot docs/img/closed_loop.png

Shoppers of the default hidden population (livecopy/sim/default_population.yaml) browse, see
copy, click with the hidden model's probability. Per impression the student's candidates (K=4
drawn from a pooled sample per product x persona bucket x slot) are offered to four policies:
random, static (shipped CTR head, Thompson), online (the versions the online trainer publishes:
`models.training.online.OnlineTrainer` with the trainer worker's settings and gate, fed the
feedback records of what it showed), oracle (best candidate under the hidden model). The online
policy's copy is the one shown; the others are scored by the expected hidden CTR of their choice
on the same impression.
Prints the CTR of each policy over the last 20% of the run, online/static and the share of the
static->oracle gap the online policy recovers. In-process (no Kafka): see docs/demo.md for the
real-service demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impressions", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--population", default=None, help="Hidden population file (YAML/JSON); default: the shipped one.")
    ap.add_argument("--catalog", type=int, default=None, help="Catalog size (default: the population's).")
    ap.add_argument("--catalog-file", default=None,
                    help="A catalog file (JSON lines, e.g. catalogs/real_world.jsonl) instead of the synthetic one.")
    ap.add_argument("--users", type=int, default=None)
    ap.add_argument("--k", type=int, default=4, help="Candidates per impression.")
    ap.add_argument("--per-style", type=int, default=2, help="Copies sampled per style and pool key.")
    ap.add_argument("--style-temperature", type=float, default=None,
                    help="The trainer's style policy: p0(style) * exp(Q / this) (default: trainer.style_temperature).")
    ap.add_argument("--user-styles", type=float, default=None,
                    help="Prior strength of each shopper's style response learnt by the online policy "
                         "(engine.policy.StyleResponse); default: the copy service's "
                         "generation.style_response_strength (3); 0: off (the CTR head alone).")
    ap.add_argument("--update-every", type=int, default=None,
                    help="Feedback records between the trainer's refits (default: trainer.refit_every).")
    ap.add_argument("--window", type=int, default=0, help="Plot window (default: impressions / 50).")
    ap.add_argument("--student", default=None, help="Student checkpoint (default: the shipped one).")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default).")
    ap.add_argument("--plot", default=None, help="Write the CTR-over-time PNG here.")
    ap.add_argument("--json", default=None, help="Write the summary JSON here.")
    args = ap.parse_args(argv)

    import tempfile

    import torch
    from transformers.utils import logging as hf_logging

    from core.catalog import Catalog
    from core.settings import CopySettings, ResponseSettings, TrainerSettings
    from livecopy.sim.arms import ARMS, EXTRA_ARMS, ClosedLoopArms, ProfileBook
    from livecopy.sim.population import Population, load_population
    from livecopy.sim.report import plot, summary, table, version_changes
    from livecopy.sim.shoppers import ShopperSim, run_sessions
    from models.paths import shipped_student_dir
    from models.student import load_student
    from models.training.online import OnlineTrainer

    if args.user_styles is None:
        args.user_styles = CopySettings().style_response_strength
    responses = ResponseSettings()  # how `livecopy worker responses` ages the evidence
    hf_logging.disable_progress_bar()  # a version loaded and saved per refit
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = load_population(args.population, users=args.users, catalog_size=args.catalog)
    catalog = Catalog.load_jsonl(args.catalog_file) if args.catalog_file else \
        Catalog.generate(cfg.catalog_size, cfg.catalog_seed)
    if args.catalog_file:
        cfg = dataclasses.replace(cfg, catalog_size=len(catalog))
    pop = Population.build(cfg, catalog)
    student = load_student(args.student or shipped_student_dir(), device="cpu")
    book = ProfileBook(pop.catalog)
    # The trainer worker's class with its default settings; its registry in a temp dir.
    registry = tempfile.TemporaryDirectory(prefix="livecopy-closed-loop-")
    over: dict[str, object] = {"registry_dir": Path(registry.name)}
    if args.update_every is not None:
        over["refit_every"] = args.update_every
    if args.style_temperature is not None:
        over["style_temperature"] = args.style_temperature
    tcfg = TrainerSettings().model_copy(update=over)
    trainer = OnlineTrainer(args.student or shipped_student_dir(), tcfg, seed=args.seed)
    copy_cfg = CopySettings()
    arms = ClosedLoopArms(student, book, cfg, trainer, k=args.k, per_style=args.per_style, seed=args.seed,
                          user_style_strength=args.user_styles, user_style_half_life_ms=responses.half_life_ms,
                          user_style_temperature=copy_cfg.style_response_temperature, weights=copy_cfg.cpu_weights)
    sim = ShopperSim(pop, seed=args.seed)

    t0 = time.monotonic()
    last = [t0]
    sim_span = [2**63, 0]  # first and last impression time on the simulated clock

    def progress(o: object) -> None:
        arms.feedback(o.ask, o.shown)  # type: ignore[attr-defined]
        ts = o.ask.ts_ms  # type: ignore[attr-defined]
        sim_span[:] = [min(sim_span[0], ts), max(sim_span[1], ts)]
        n = len(arms.stats)
        if n % 10_000 == 0:
            now = time.monotonic()
            w = arms.stats
            print(f"  {n:>7,} impressions  {now - t0:6.0f} s  pools {len(arms.pools):,} ({arms.generated:,} copies)  "
                  + "  ".join(f"{a} {w.ctr(a, n - 10_000):.4f}" for a in ARMS)
                  + f"  [{arms.served.version}, {len(arms.versions) - 1} versions]", flush=True)
            last[0] = now

    shown = run_sessions(sim, arms, book.apply, impressions=args.impressions, concurrency=64, on_outcome=progress)
    elapsed = time.monotonic() - t0
    st = arms.stats
    series = {a: st.p_sum[a] for a in ARMS}
    s = summary(series)
    s["online_realised_ctr_last"] = st.realised(s["tail_from"])
    s.update({
        "seed": args.seed, "population": cfg.name,
        "catalog_file": args.catalog_file, "users": cfg.users, "catalog": cfg.catalog_size, "k": args.k,
        "per_style": args.per_style,
        "trainer_mode": tcfg.mode, "style_temperature": tcfg.style_temperature, "refit_every": tcfg.refit_every,
        "user_style_strength": args.user_styles, "user_style_half_life_days": responses.half_life_days,
        "online_versions": len(arms.versions) - 1, "trainer_refits": trainer.refits,
        "pool_keys": len(arms.pools), "copies_generated": arms.generated, "seconds": round(elapsed, 1),
        "student_version": student.meta.version,
        "style_share_last": {a: {k: v / max(1, sum(st.styles[a].values())) for k, v in st.styles[a].items()}
                             for a in ARMS},
    })
    print()
    print(table(s, f"closed loop (seed {args.seed}, population {cfg.name}, {cfg.users:,} shoppers, "
                   f"{cfg.catalog_size:,} products, K={args.k})"))
    print(f"online realised CTR (clicks / impressions shown) over the last 20%: {s['online_realised_ctr_last']:.4f}")
    s["simulated_days"] = max(0, sim_span[1] - sim_span[0]) / 86_400_000
    print(f"{shown:,} impressions in {elapsed:.0f} s ({s['simulated_days']:.1f} simulated days); "
          f"{len(arms.versions) - 1} versions published by the online trainer ({trainer.refits} refits gated); "
          f"{len(arms.pools):,} pool keys, {arms.generated:,} copies generated by student {student.meta.version}")
    ro = st.ctr("rerank_only", s["tail_from"])
    print(f"diagnostic: online CTR head re-ranking the static candidates only: {ro:.4f} "
          f"({ro / s['ctr']['static']:.3f} x static)")
    s["rerank_only_ctr_last"] = ro
    print("style share of each policy's choices (whole run):")
    for a in ARMS + EXTRA_ARMS:
        tot = max(1, sum(st.styles[a].values()))
        print(f"  {a:<8} " + "  ".join(f"{k} {v / tot:.2f}" for k, v in st.styles[a].items()))
    if args.plot:
        window = args.window or max(200, shown // 50)
        plot(args.plot, series, window, versions=version_changes(st.versions),
             title=f"Closed loop: CTR per policy ({shown:,} impressions, seed {args.seed})")
        print(f"plot: {args.plot}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(s, indent=2))
    return s


if __name__ == "__main__":
    main()
