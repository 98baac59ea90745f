"""livecopy's decode beside its peers, on the same weights, in one run (CPU).

    pip install -e '.[peers]'          # ctranslate2
    python benchmarks/peers.py [--prompts 32] [--k 4] [--max-new-tokens 40] [--threads 1] [--json-out r.json]

The shipped student's trunk + LM head (tied to the token embedding) are exported to a
``transformers`` ``GPT2LMHeadModel`` (same weights, fp32; the CTR head has no place there) and from
it to CTranslate2 (``ctranslate2.converters.TransformersConverter``, fp32 and int8). Then, for
``--prompts`` copy prompts, K candidates each, up to ``--max-new-tokens`` new tokens, top-k 50 /
top-p 0.95 / temperature 0.9, stop at EOS, at batch 1 (one request at a time) and batch N (all
prompts in one call):

* **livecopy static**: ``models.generate.generate_candidates`` (the static engine's decode: style
  token first, the shopper's slot bans and spelled numbers banned, CTR head at EOS included), with
  the served ``generation.cpu_weights`` (int8 by default; ``livecopy cont. fp32`` beside it);
* **livecopy continuous**: ``models.continuous.ContinuousDecoder`` (the continuous engine's decode,
  same constraints, CTR head at EOS), all prompts admitted at once (batch N) or one at a time to one
  long-lived decoder of ``max_batch_size`` prompt slots, warmed up as the engine's is, with
  the served draft settings (speculative steps at small batches, ``generation.draft_tokens``): the
  draft table is first filled by ``--warm-requests`` other requests, as a serving process's is by
  its traffic, and every measured run starts from that table (``livecopy cont. no drafts`` beside it);
* **HF generate()**: ``GPT2LMHeadModel.generate`` (dynamic cache), ``suppress_tokens`` = the ids
  banned after the first token (the style constraint of the first token and the per-request slot
  bans cannot be expressed: the peers run slightly *less* constrained);
* **CT2 fp32 / int8**: ``Generator.generate_batch`` with ``num_hypotheses=K`` (one prefill per prompt),
  ``suppress_sequences`` = the same bans (global: CTranslate2 has no per-request bans nor a
  first-token constraint; ``generate_batch`` takes no logits processor);
* **CT2 int8 + CTR pass**: what CTranslate2 as livecopy's decode backend would cost at least: CT2
  returns no hidden state, so the CTR head needs one pass of the student over every candidate.

copies/s = prompts / wall time (a copy = one request's K candidates), the median of ``--repeats``
runs; in each round every system runs once, in turn, so a shared host's drift in speed reaches all
of them alike (the ratios are the figures to read). Quality, same for all: the
share of candidates that begin with a style token, that end with EOS, and that pass the serving
filter (grounding + copy rules on the filled text, ``StudentExecutor.render``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks._common import machine
from benchmarks.generation import make_requests
from core.settings import CopySettings
from engine.executor import CopyRequest, StudentExecutor, load_executor
from engine.serving import settle_heap
from models.continuous import ContinuousDecoder
from models.drafts import NGramDrafts
from models.generate import _banned_after_first, generate_candidates, request_biases
from models.paths import shipped_student_dir
from models.prefix_cache import PrefixCache
from models.sequences import encode_text, special_ids
from models.text.slots import available

SAMPLING: dict[str, Any] = {"temperature": 0.9, "top_k": 50, "top_p": 0.95}


def export_hf(student: Any, tokenizer: Any, out: Path) -> Path:
    """The student's trunk + tied LM head as a GPT2LMHeadModel directory (fp32, with the tokenizer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = student.config.to_dict()
    for key in ("ctr_hidden", "styles", "architectures", "model_type", "transformers_version", "dtype",
                "torch_dtype"):
        cfg.pop(key, None)
    cfg["tie_word_embeddings"] = True
    hf = GPT2LMHeadModel(GPT2Config(**cfg)).eval()
    missing, unexpected = hf.transformer.load_state_dict(student.transformer.state_dict(), strict=False)
    if [m for m in missing if not m.endswith(".attn.bias")] or unexpected:
        raise RuntimeError(f"export: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


def export_ct2(hf_dir: Path, out: Path, quantization: str | None) -> Path:
    from ctranslate2.converters import TransformersConverter

    TransformersConverter(str(hf_dir)).convert(str(out), quantization=quantization, force=True)
    return out


class Bench:
    def __init__(self, ex: StudentExecutor, reqs: list[CopyRequest], k: int, max_new: int) -> None:
        self.ex, self.reqs, self.k, self.max_new = ex, reqs, k, max_new
        self.weights = ex.cfg.cpu_weights
        self.model, self.tok = ex.student.model, ex.student.tokenizer
        self.sid = special_ids(self.tok)
        self.prompts = [ex._fit(r.ctx) for r in reqs]
        self.ids = encode_text(self.tok, self.prompts)
        self.slots_ok = [available(r.ctx) for r in reqs]
        self.banned = [b for b in _banned_after_first(self.tok, self.sid) if b < int(self.model.config.vocab_size)]
        self.warm: NGramDrafts | None = None  # the draft table a serving process has after some traffic
        self.drafts: NGramDrafts | None = None  # the one this run learns into (a copy of warm)
        self.steps = 0  # continuous decode steps run so far
        self.warm_prefix: PrefixCache | None = None  # the prompt cache a serving process has after some traffic
        self.prefix: PrefixCache | None = None  # the one this run fills (a copy of warm_prefix)
        # livecopy's decoders by setting, kept across calls and runs as a serving engine keeps its own
        self._decoders: dict[tuple[Any, ...], ContinuousDecoder] = {}

    def warm_drafts(self, reqs: list[CopyRequest], batch: int = 32) -> None:
        """Fill the draft table as serving would: the continuous decode of ``reqs`` (other requests
        than the measured ones), learning from every row that finishes."""
        if self.ex.drafts is None:
            return
        other = Bench(self.ex, reqs, self.k, self.max_new)
        other.drafts = NGramDrafts()
        other.prefix = PrefixCache(self.ex.prompt_cache.max_bytes) if self.ex.prompt_cache is not None else None
        for s in range(0, len(reqs), batch):
            other.livecopy_continuous(list(range(s, min(s + batch, len(reqs)))), 10_000 + s)
        self.warm, self.warm_prefix = other.drafts, other.prefix

    def reset(self) -> None:
        """Before each measured run: the warm table again (a run learns from its own earlier prompts only)."""
        self.drafts = self.warm.copy() if self.warm is not None else None
        self.prefix = self.warm_prefix.copy() if self.warm_prefix is not None else None
        for (_, drafts, _, _, prefix, _, _), dec in self._decoders.items():  # they read the new table and cache
            dec.drafts = self.drafts if drafts else None
            dec.prefix = self.prefix if prefix else None

    def quality(self, texts: list[list[str]], styled: list[list[bool]], ended: list[list[bool]]) -> dict[str, float]:
        ok = n = 0
        for req, group in zip(self.reqs, texts, strict=True):
            for t in group:
                n += 1
                ok += bool(StudentExecutor.render(t, req.ctx)[1].ok)
        flat = [x for g in styled for x in g]
        fin = [x for g in ended for x in g]
        return {"style_first": sum(flat) / max(len(flat), 1), "eos": sum(fin) / max(len(fin), 1),
                "filter_pass": ok / max(n, 1)}

    def _split(self, ids: list[int]) -> tuple[bool, str]:
        styled = bool(ids) and self.sid.style_of_id(ids[0]) is not None
        body = ids[1:] if styled else ids
        return styled, self.tok.decode([t for t in body if t != self.sid.eos], skip_special_tokens=True).strip()

    # -- livecopy
    def livecopy_static(self, idx: list[int], seed: int) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
        with torch.inference_mode():  # as StudentExecutor.run
            groups = generate_candidates(self.model, self.tok, [self.prompts[i] for i in idx], k=self.k,
                                         max_new_tokens=self.max_new, seed=seed,
                                         slots_ok=[self.slots_ok[i] for i in idx], weights=self.weights, **SAMPLING)
        return ([[c.text for c in g] for g in groups], [[c.style is not None for c in g] for g in groups],
                [[c.finished for c in g] for g in groups])

    def livecopy_continuous(self, idx: list[int], seed: int, weights: str | None = None, drafts: bool = True,
                            depth: int | None = None, spec_rows: int | None = None, prefix: bool = True,
                            spec_places: int | None = None, first: int | None = -1
                            ) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
        """(``depth`` / ``spec_rows`` / ``spec_places`` / ``first`` (-1: the served one, None: no cap): other
        draft settings than the served ones, benchmarks/speculation.py)"""
        cfg = self.ex.cfg  # as StudentExecutor.decoder builds it, with the served draft settings
        key = (weights, drafts, depth, spec_rows, prefix, spec_places, first)
        dec = self._decoders.get(key)
        if dec is None or dec.n_prompts < len(idx):  # a serving engine's: max_batch_size prompt slots, warmed up
            dec = self._decoders[key] = ContinuousDecoder(
                self.model, eos_id=self.sid.eos, pad_id=self.sid.pad, k=self.k, max_new_tokens=self.max_new, seed=seed,
                want_hidden=True, max_prompts=max(len(idx), cfg.max_batch_size), weights=weights or self.weights,
                drafts=self.drafts if drafts else None, draft_depth=cfg.draft_tokens if depth is None else depth,
                spec_rows=cfg.draft_max_rows if spec_rows is None else spec_rows,
                spec_places=cfg.draft_tail_places if spec_places is None else spec_places,
                first_drafts=cfg.draft_first_tokens if first == -1 else first,
                prefix=self.prefix if prefix else None, **SAMPLING)
            dec.warmup()
        dec.gen.manual_seed(seed)
        first, ban = request_biases(self.model, self.tok, len(idx), slots_ok=[self.slots_ok[i] for i in idx])
        dec.admit(list(range(len(idx))), [self.ids[i] for i in idx], first, ban)
        got: dict[int, Any] = {}
        while len(got) < len(idx):
            self.steps += 1
            for g in dec.step():
                got[g.gid] = g
        hidden = torch.cat([got[i].eos_hidden for i in range(len(idx))])
        with torch.no_grad():
            self.model.ctr_from_hidden(hidden)  # the CTR head at EOS, as the engine reads it
        texts, styled, ended = [], [], []
        for i in range(len(idx)):
            parts = [self._split(t) for t in got[i].tokens]
            texts.append([p[1] for p in parts])
            styled.append([p[0] for p in parts])
            ended.append(list(got[i].finished))
        return texts, styled, ended

    # -- peers
    def hf(self, model: Any, static_cache: bool = False) -> Callable[[list[int], int], tuple[
            list[list[str]], list[list[bool]], list[list[bool]]]]:
        from models.sequences import left_pad

        def run(idx: list[int], seed: int) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
            torch.manual_seed(seed)
            ids, mask = left_pad([self.ids[i] for i in idx], self.sid.pad)
            ids, mask = ids.to(model.device), mask.to(model.device)
            extra: dict[str, Any] = {"cache_implementation": "static"} if static_cache else {}
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=self.max_new,
                                     num_return_sequences=self.k, eos_token_id=self.sid.eos,
                                     pad_token_id=self.sid.pad, suppress_tokens=self._hf_ban,
                                     **SAMPLING, **extra)
            gen = out[:, ids.shape[1]:].tolist()
            return self._groups(gen, len(idx))

        return run

    @property
    def _hf_ban(self) -> list[int]:
        # the style tokens are banned after the first token by livecopy; a global ban would forbid them at
        # the first one too: leave them allowed (the peers are slightly less constrained, not more)
        styles = set(self.sid.style_id_list)
        return [b for b in self.banned if b not in styles]

    def ct2(self, gen: Any) -> Callable[[list[int], int], tuple[list[list[str]], list[list[bool]],
                                                                 list[list[bool]]]]:
        import ctranslate2

        eos_tok = self.tok.convert_ids_to_tokens(self.sid.eos)
        suppress = [[self.tok.convert_ids_to_tokens(b)] for b in self._hf_ban]
        toks = [self.tok.convert_ids_to_tokens(x) for x in self.ids]

        def run(idx: list[int], seed: int) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
            ctranslate2.set_random_seed(seed)
            # num_hypotheses: K samples of one prompt from one prefill (repeating the prompt K times made
            # CT2 int8 1.45x slower at batch 1 on this CPU)
            res = gen.generate_batch([toks[i] for i in idx], num_hypotheses=self.k, max_length=self.max_new,
                                     sampling_topk=SAMPLING["top_k"], sampling_topp=SAMPLING["top_p"],
                                     sampling_temperature=SAMPLING["temperature"], end_token=eos_tok,
                                     include_prompt_in_result=False, suppress_sequences=suppress,
                                     return_end_token=True)
            rows = [seq for r in res for seq in r.sequences_ids]
            return self._groups(rows, len(idx))

        return run

    def with_ctr(self, fn: Callable[[list[int], int], tuple[list[list[str]], list[list[bool]], list[list[bool]]]]
                 ) -> Callable[[list[int], int], tuple[list[list[str]], list[list[bool]], list[list[bool]]]]:
        """``fn`` + what a backend without hidden states needs for livecopy's CTR head: one pass of the
        student over ``prompt + style + copy + EOS`` of every candidate (``score_ctr_with_features``)."""
        from models.generate import score_ctr_with_features

        def run(idx: list[int], seed: int) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
            texts, styled, ended = fn(idx, seed)
            prompts = [self.prompts[i] for i, g in zip(idx, texts, strict=True) for _ in g]
            score_ctr_with_features(self.model, self.tok, prompts, [t for g in texts for t in g],
                                    styles=["quality"] * len(prompts))
            return texts, styled, ended

        return run

    def _groups(self, rows: list[list[int]], n: int) -> tuple[list[list[str]], list[list[bool]], list[list[bool]]]:
        texts, styled, ended = [], [], []
        for i in range(n):
            g = rows[i * self.k:(i + 1) * self.k]
            cut = []
            for r in g:
                end = r.index(self.sid.eos) if self.sid.eos in r else None
                cut.append((r[:end] if end is not None else [t for t in r if t != self.sid.pad], end is not None))
            parts = [self._split(c) for c, _ in cut]
            texts.append([p[1] for p in parts])
            styled.append([p[0] for p in parts])
            ended.append([e for _, e in cut])
        return texts, styled, ended


def measure(systems: dict[str, Callable[[list[int], int], Any]], n: int, batch: int, bench: Bench,
            repeats: int) -> dict[str, dict[str, Any]]:
    """Per system: copies/s of ``n`` prompts in chunks of ``batch`` (median of ``repeats`` runs), the
    quality of its last run's copies and its draft counters. The systems take turns, one run each per
    round, so a shared host's drift in speed reaches them alike (their ratios are what is compared)."""
    idx = list(range(n))
    rates: dict[str, list[float]] = {name: [] for name in systems}
    out: dict[str, dict[str, Any]] = {}
    for fn in systems.values():
        bench.reset()
        fn(idx[:min(batch, 2)], 0)  # warm-up
    for r in range(repeats):
        for name, fn in systems.items():
            bench.reset()
            t0 = time.perf_counter()
            texts: list[list[str]] = []
            styled: list[list[bool]] = []
            ended: list[list[bool]] = []
            for s in range(0, n, batch):
                a, b, c = fn(idx[s:s + batch], 1000 * r + s)
                texts += a
                styled += b
                ended += c
            rates[name].append(n / (time.perf_counter() - t0))
            guessed = bench.drafts.proposed if bench.drafts is not None else 0
            kept = bench.drafts.acceptance if bench.drafts is not None else None
            out[name] = {**bench.quality(texts, styled, ended), "drafts": guessed, "drafts_kept": kept}
    for name in systems:
        out[name]["copies_per_s"] = statistics.median(rates[name])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=shipped_student_dir())
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (on CUDA: HF with its static cache too, CT2 fp16/int8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warm-requests", type=int, default=128,
                    help="Requests (not the measured ones) decoded first to fill the draft table, as traffic would.")
    ap.add_argument("--only", default="", help="Comma-separated subset of the systems (names as printed).")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    ex = load_executor(a.model, CopySettings(device=a.device, candidates=a.k, max_new_tokens=a.max_new_tokens))
    bench = Bench(ex, make_requests(a.prompts, seed=3), a.k, a.max_new_tokens)
    systems: dict[str, Callable[[list[int], int], Any]] = {
        "livecopy static": bench.livecopy_static,
        "livecopy continuous": bench.livecopy_continuous,
    }
    if ex.drafts is not None and not cuda:
        bench.warm_drafts(make_requests(a.warm_requests, seed=7))
        systems["livecopy cont. no drafts"] = lambda idx, seed: bench.livecopy_continuous(idx, seed, drafts=False)
    if ex.prompt_cache is not None and not cuda:
        systems["livecopy cont. no prompt cache"] = lambda idx, seed: bench.livecopy_continuous(idx, seed, prefix=False)
    if ex.cfg.cpu_weights != "fp32" and not cuda:
        systems["livecopy cont. fp32"] = lambda idx, seed: bench.livecopy_continuous(idx, seed, "fp32")
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = export_hf(ex.student.model, ex.student.tokenizer, Path(tmp) / "hf")
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(str(hf_dir), dtype=torch.bfloat16 if cuda else torch.float32)
        hf = hf.to(a.device).eval()
        systems["HF generate()"] = bench.hf(hf)
        if cuda:
            systems["HF generate() static"] = bench.hf(hf, static_cache=True)
        kinds = ((("float16", "CT2 fp16"), ("int8_float16", "CT2 int8")) if cuda
                 else ((None, "CT2 fp32"), ("int8", "CT2 int8")))
        try:
            import ctranslate2

            for quant, name in kinds:
                d = export_ct2(hf_dir, Path(tmp) / f"ct2-{quant or 'fp32'}", quant)
                gen = ctranslate2.Generator(str(d), device="cuda" if cuda else "cpu", inter_threads=1,
                                            intra_threads=a.threads, compute_type=quant or "float32")
                systems[name] = bench.ct2(gen)
            if "CT2 int8" in systems:
                systems["CT2 int8 + CTR pass"] = bench.with_ctr(systems["CT2 int8"])
        except Exception as exc:  # not installed, or no CUDA build
            print(f"CTranslate2 skipped ({type(exc).__name__}: {exc}); pip install -e '.[peers]'")
        only = {x.strip() for x in a.only.split(",") if x.strip()}
        if only:
            systems = {k: v for k, v in systems.items() if k in only}
        where = torch.cuda.get_device_name(0) if cuda else f"CPU: {machine()}"
        print(f"{where}; torch {torch.__version__}, {a.threads} thread(s); {a.prompts} prompts, K={a.k}, "
              f"<= {a.max_new_tokens} new tokens, top-k 50 / top-p 0.95 / T 0.9, median of {a.repeats}")
        print(f"\n{'system':24} {'batch':>5} {'copies/s':>9} {'style 1st':>9} {'EOS':>6} {'filter':>7}")
        results: dict[str, dict[int, Any]] = {}
        settle_heap()  # as CopyEngine.start() does in a serving process
        for batch in (1, a.prompts):
            for name, m in measure(systems, a.prompts, batch, bench, a.repeats).items():
                results.setdefault(name, {})[batch] = m
        for name, by in results.items():
            for batch, m in by.items():
                kept = m["drafts_kept"]
                print(f"{name:24} {batch:5d} {m['copies_per_s']:9.2f} {m['style_first']:9.2f} {m['eos']:6.2f} "
                      f"{m['filter_pass']:7.2f}" + (f"  kept {kept:.2f} of {m['drafts']} guesses" if kept else ""),
                      flush=True)
    if bench.warm is not None:
        print(f"\ndraft table after {a.warm_requests} warm-up requests (not the measured ones): "
              f"{len(bench.warm)} contexts")
    if cuda:
        torch.cuda.synchronize()
    ref = "CT2 int8"
    if ref in results:
        print(f"\nratios to {ref}:")
        for name, by in results.items():
            print(f"  {name:24} " + "  ".join(f"batch {b}: {v['copies_per_s'] / results[ref][b]['copies_per_s']:.2f}x"
                                               for b, v in by.items()))
    if a.json_out:
        a.json_out.write_text(json.dumps({"machine": machine(), "device": a.device, "threads": a.threads,
                                          "results": results}, indent=2))


if __name__ == "__main__":
    main()
