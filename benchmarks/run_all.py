"""Run every benchmark in turn and write benchmarks/results/summary.md.

    python benchmarks/run_all.py [--device cuda] [--quick]
    python benchmarks/run_all.py --summary-only     # re-render summary.md from the JSONs

The summary lists the quality bars (benchmarks/README.md) with the measured ratio and
MET / MISSED, then the full tables (times are best-of-repeats wall clock).
"""

from __future__ import annotations

import argparse
import json
import time

from _common import RESULTS

BENCHES = ("bench_core", "bench_rmt", "bench_peers")


#: How the quality bars of benchmarks/bench_core.py read in the summary table.
_BAR_LABELS = {
    "lanczos_step_over_hvp_cached_est":
        "one Lanczos step ≤ 1.2× one HVP (graph cached, the default here; 1 + bookkeeping/HVP)",
    "lanczos_step_over_hvp_est":
        "one Lanczos step ≤ 1.2× one HVP (HVP from scratch; 1 + bookkeeping/HVP)",
    "lanczos80_step_over_hvp_cached_est":
        "one Lanczos step ≤ 1.2× one HVP, 80-step run (graph cached; 1 + bookkeeping/HVP)",
    "slq8x80_step_over_product_est":
        "SLQ: one probe-step ≤ 1.2× one product, 8 probes × 80 steps batched "
        "(graph cached; 1 + bookkeeping/(matmat8/8))",
    "hvp_cached_over_grad":
        "one HVP ≤ 3× one gradient (graph cached, the default here)",
    "hvp_over_grad":
        "one HVP ≤ 3× one gradient (HVP from scratch: forward + backward + pullback)",
}


def _load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _f(x, nd=2):
    if x is None:
        return "–"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 1e-2 or abs(x) >= 1e4):
            return f"{x:.1e}"
        return f"{x:.{nd}f}"
    return str(x)


def _ms(t):
    return "–" if t is None else (f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s")


def render_summary() -> str:
    core, rmt, peers = (_load(n) for n in ("bench_core", "bench_rmt", "bench_peers"))
    L = ["# Benchmark summary", ""]
    envs = [d["environment"] for d in (core, rmt, peers) if d]
    if envs:
        e = envs[0]
        L += [f"Machine: {e.get('cpu_count')} CPU cores ({e.get('machine')}), torch {e.get('torch')}, "
              f"numpy {e.get('numpy')}, scipy {e.get('scipy')}, torch threads "
              f"{e.get('torch_threads')}, device {e.get('device')}; 1-min load average at start "
              + ", ".join(_f(d.get("loadavg_1min"), 1) for d in envs) + ".", ""]
    L += ["## Quality bars", "", "| bar | measured | verdict |", "|---|---|---|"]
    if core:
        for key, b in core["bars"].items():
            label = _BAR_LABELS.get(key, key)
            per = "; ".join(f"{k}: {_f(v)}" for k, v in b["per_row"].items())
            L.append(f"| {label} | worst {_f(b['worst'])} ({per}) | {'MET' if b['met'] else 'MISSED'} |")
    if rmt:
        b = rmt["bars"]["spiked_goe_1e6_seconds"]
        L.append(f"| spiked GOE top eigenvalue, n = 10⁶, ≈ 1 s | {_f(b['measured_s'])} s "
                 f"| {'MET' if b['met'] else 'MISSED'} |")
    if peers:
        for k, b in peers["bars"].items():
            need = "≥ 1 (no slower)" if "curvlinops" in k else "> 1 (faster)"
            L.append(f"| {k}: peer time / our time {need} | {_f(b['ratio_peer_over_ours'])} "
                     f"(peer: {b['peer_status']}) | {'MET' if b['met'] else 'MISSED'} |")
    L.append("| GPU (CUDA) runs | not measured: no GPU in this environment | UNMEASURED |")
    L.append("")
    if core:
        L += ["## Core primitives (bench_core)", "",
              "Ratios of best-of-repeats times; 'c' = operator with `cache_graph=True` "
              "(what `cache_graph=\"auto\"` picks for these data); HVP without 'c' = from "
              "scratch (forward + backward + pullback). Lz/HVP = m `nets.lanczos` "
              "steps (full reorthogonalisation) against m bare products, both long runs, so "
              "noisy (±20 % on this shared machine); 'Lz bookkeeping' = the recurrence's "
              "own cost per step, timed on a diagonal operator, and 'est' = 1 + bookkeeping/"
              "HVP, the robust estimate used for the bar. vmapK = speed-up of one K-column "
              "`matmat` over K `matvec`s.", ""]
        ks = sorted({int(k[4:-8]) for r in core["rows"] for k in r if k.startswith("vmap") and k.endswith("_speedup")})
        hdr = ["model", "dtype", "P", "grad", "HVP", "HVPc", "HVP/grad", "HVPc/grad", "Lz/HVP",
               "Lzc/HVPc", "Lz bookkeeping", "Lz/HVP est", "Lzc/HVPc est", "Lz80c est",
               "SLQ 8×80 bookkeeping /probe-step", "SLQ 8×80 est", "eigsh/HVPc",
               "bare rev/fwd"] + \
              [f"vmap{k}" for k in ks] + [f"vmap{k}c" for k in ks]
        L += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        for r in core["rows"]:
            t = r["times_s"]
            cells = [r.get("model"), r.get("dtype"), str(r["P"]), _ms(t.get("grad")), _ms(t.get("hvp")),
                     _ms(t.get("hvp_cached")), _f(r.get("hvp_over_grad")), _f(r.get("hvp_cached_over_grad")),
                     _f(r.get("lanczos_step_over_hvp")), _f(r.get("lanczos_step_over_hvp_cached")),
                     f"{r['lanczos_bookkeeping_per_step_us']:.0f} µs",
                     _f(r.get("lanczos_step_over_hvp_est")), _f(r.get("lanczos_step_over_hvp_cached_est")),
                     _f(r.get("lanczos80_step_over_hvp_cached_est")),
                     (f"{r['slq8x80_bookkeeping_per_probe_step_us']:.0f} µs"
                      if "slq8x80_bookkeeping_per_probe_step_us" in r else "–"),
                     _f(r.get("slq8x80_step_over_product_est")),
                     _f(r.get("eigsh_matvec_over_hvp_cached")), _f(r.get("rev_over_fwd"))] + \
                    [_f(r.get(f"vmap{k}_speedup")) for k in ks] + \
                    [_f(r.get(f"vmap{k}_speedup_cached")) for k in ks]
            L.append("| " + " | ".join(cells) + " |")
        for b in core.get("bfloat16", []):
            L.append(f"\nbfloat16 products, {b['model']}: relative error {_f(b['hvp_rel_err'])} against "
                     f"float64; `nets.lanczos(op, 30)` on the raw bfloat16 operator stops after "
                     f"{b['raw_bf16_steps']} step(s) with top Ritz value {b['raw_bf16_top']:.4g} (false "
                     f"breakdown, float64: {b['top_float64']:.4g}); through `paper_scale."
                     f"LowPrecisionProducts` {b['wrapped_bf16_steps']} steps, top {b['wrapped_bf16_top']:.4g} "
                     f"(rel. err {_f(b['wrapped_top_rel_err'])}).")
        for r in core["rows"]:
            for name in ("fwd_over_rev", "rev_over_rev"):
                if f"compile_{name}_speedup" in r:
                    L.append(f"\ntorch.compile of the bare {name} HVP ({r['model']}, {r['dtype']}): "
                             f"{_f(r[f'compile_{name}_speedup'])}× the eager bare HVP, "
                             f"{_f(r[f'compile_{name}_speedup_vs_operator'])}× `op.matvec`, after "
                             f"{_f(r[f'compile_{name}_time_s'], 0)} s of compilation.")
                elif f"compile_{name}_error" in r:
                    L.append(f"\ntorch.compile {name} ({r['model']}, {r['dtype']}): failed "
                             f"({r[f'compile_{name}_error']}).")
        L.append("")
    if peers:
        L += ["## Peers (bench_peers)", "",
              "Digits MLP 64-32-10 (P = 2410), full digits set (N = 1797) in one batch. "
              "Top-5: each method at its cheapest setting reaching max relative error ≤ "
              f"{peers['args']['target']:g} against the dense float64 Hessian; time from "
              "(model, data) to eigenvalues. SLQ: same probes × steps for all. "
              "ratio = method time / ours.", ""]
        for res in peers["results"]:
            L += [f"### {res['dtype']}: top-5 eigenvalues", "",
                  "| method | setting | HVPs | max rel err | status | time | ratio |", "|---|---|---|---|---|---|---|"]
            for r in res["top_k"]:
                L.append(f"| {r['method']} | {r.get('setting', '–')} | {r.get('products') or '–'} | "
                         f"{_f(r.get('rel_err'))} | {r['status']} | {_ms(r.get('time_s'))} | "
                         f"{_f(r.get('ratio_vs_ours'))} |")
            L += ["", f"### {res['dtype']}: SLQ density, {res['slq_probes']} probes × "
                  f"{res['slq_steps']} steps", "",
                  "| method | tr(H)/P rel err | tr(H²)/P rel err | status | time | ratio |",
                  "|---|---|---|---|---|---|"]
            for r in res["slq"]:
                L.append(f"| {r['method']} | {_f(r.get('trace_rel_err'))} | "
                         f"{_f(r.get('trace_sq_rel_err'))} | {r['status']} | {_ms(r.get('time_s'))} | "
                         f"{_f(r.get('ratio_vs_ours'))} |")
            L.append("")
    if rmt:
        b = rmt["tridiagonal_big"]
        L += ["## Random matrices (bench_rmt)", "",
              f"- Tridiagonal spiked GOE, n = {b['n']:,}, θ = {rmt['spike']}: {_f(b['time_s'])} s best "
              f"({_f(b['median_s'])} s median; sampling {_f(b['sample_s'])} s, bisection "
              f"{_f(b['bisection_s'])} s). Top eigenvalues " + ", ".join(f"{x:.5f}" for x in b["tops"])
              + f" vs θ + 1/θ = {rmt['theory_mean']:.5f} ± {b['theory_sd']:.1e}."]
        for n, d in rmt["dense_vs_tridiagonal"].items():
            L.append(f"- n = {n}: dense `eigvalsh` {_f(d['dense_s'])} s vs tridiagonal "
                     f"{d['tridiagonal_s'] * 1e3:.2f} ms ({d['ratio_dense_over_tridiagonal']:.0f}×).")
        d = rmt["distribution"]
        L.append(f"- Distribution at n = {d['n']}: dense mean {d['dense_mean']:.5f} (sd {d['dense_sd']:.4f}, "
                 f"{d['dense_samples']} draws) vs tridiagonal {d['tri_mean']:.5f} (sd {d['tri_sd']:.4f}, "
                 f"{d['tri_samples']} draws); theory sd {d['theory_sd']:.4f}; z(mean difference) "
                 f"{d['z_mean_difference']:+.2f}; two-sample KS p = {d['ks_pvalue']:.2f}.")
        if "distribution_small_n" in rmt:
            d = rmt["distribution_small_n"]
            L.append(f"- Distribution at n = {d['n']} ({d['samples_each']} draws each): dense mean "
                     f"{d['dense_mean']:.5f} (sd {d['dense_sd']:.4f}) vs tridiagonal {d['tri_mean']:.5f} "
                     f"(sd {d['tri_sd']:.4f}); z(mean difference) {d['z_mean_difference']:+.2f}; "
                     f"KS p = {d['ks_pvalue']:.2f}.")
        sk = rmt["scikit_rmt"]
        if sk["status"] == "ok":
            for key, e in sk["times"].items():
                n, form = key.split("_")
                extra = f" ({e['ratio_vs_ours_tridiagonal']:.0f}× ours)" if "ratio_vs_ours_tridiagonal" in e else ""
                L.append(f"- scikit-rmt GOE n = {n} ({form} form, sample + all eigenvalues): "
                         f"{_f(e['min'])} s{extra}.")
            L.append("- scikit-rmt at n = 10⁶: impossible (its tridiagonal form is a dense n×n array).")
        else:
            L.append(f"- scikit-rmt: {sk['status']}.")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--summary-only", action="store_true")
    p.add_argument("--compile", action="store_true", help="passed to bench_core")
    args = p.parse_args(argv)
    if not args.summary_only:
        import bench_core
        import bench_peers
        import bench_rmt

        common = ["--device", args.device] + (["--quick"] if args.quick else [])
        for name, mod, extra in (("bench_core", bench_core, ["--compile"] if args.compile else []),
                                 ("bench_rmt", bench_rmt, []),
                                 ("bench_peers", bench_peers, [])):
            t0 = time.perf_counter()
            print(f"\n##### {name}", flush=True)
            mod.main(common + extra if name != "bench_rmt" else
                     (["--quick"] if args.quick else []))
            print(f"##### {name} took {time.perf_counter() - t0:.0f} s", flush=True)
    text = render_summary()
    path = RESULTS / "summary.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
