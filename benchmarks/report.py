"""The benchmark's report: issue 8's targets checked against the measurements, and the printed tables."""

from __future__ import annotations


def check_targets(report: dict) -> list[dict]:
    """Issue 8's targets, each with the measured value and whether it is met."""
    headline = report["settings"]["headline_precision"]
    targets = []

    def add(name, measured, target, met):
        targets.append({"target": name, "measured": measured, "goal": target, "met": bool(met)})

    speedups = report["speedup_vs_baseline"]
    add(f"our stage-2 loop vs the baseline loop ({headline})", speedups[headline], ">= 2x", speedups[headline] >= 2)
    if f"{headline}_compiled" in speedups:
        value = speedups[f"{headline}_compiled"]
        add(f"our stage-2 loop, torch.compile, vs the baseline loop ({headline})", value, ">= 2x", value >= 2)
    if "latent_vs_pixel" in report:
        ratio = report["latent_vs_pixel"]["ratio"]
        add("latent DDPM vs pixel DDPM images/s (same UNet)", ratio, ">= 8x", ratio >= 8)
    add("training step FLOP/s vs matmul peak", report["flops"]["fraction_of_peak"], ">= 0.40",
        report["flops"]["fraction_of_peak"] >= 0.4)
    latent_loader = report["data_pipeline"]["latent"]
    add("latent loader images/s vs the step's", latent_loader["loader_to_step_ratio"], "> 1 (never the bottleneck)",
        latent_loader["loader_to_step_ratio"] > 1)
    sampling = report.get("sampling", {}).get("results")
    if sampling:
        by = {(r["sampler"], r["steps"]): r for r in sampling}
        ddpm, dpm20 = by[("ddpm", None)], by[("dpmsolver", 20)]
        if "fd" in ddpm:
            add("DPM-Solver++ 20 FD vs DDPM-1000 FD", dpm20["fd"] / ddpm["fd"], "<= 1.10",
                dpm20["fd"] <= 1.1 * ddpm["fd"])
            add("DPM-Solver++ 20 classes covered vs DDPM-1000", dpm20["classes_covered"] - ddpm["classes_covered"],
                ">= 0", dpm20["classes_covered"] >= ddpm["classes_covered"])
        speed = ddpm["sampling_seconds_per_sample"] / dpm20["sampling_seconds_per_sample"]
        add("DDPM (all T) vs DPM-Solver++ 20 sampling time, VAE decoding included", speed, ">= 40x", speed >= 40)
        if "denoising_seconds_per_sample" in dpm20:
            speed = ddpm["denoising_seconds_per_sample"] / dpm20["denoising_seconds_per_sample"]
            add("DDPM (all T) vs DPM-Solver++ 20 sampling time, denoising only", speed, ">= 40x", speed >= 40)
    guided = report.get("sampling", {}).get("guided")
    if guided:
        ratio = guided["time_vs_unguided"]
        add(f"guided (w = {guided['guidance_scale']:g}) vs unguided DPM-Solver++ 20 time per sample, denoising",
            ratio, "<= 2.1x", ratio <= 2.1)
    return targets


def format_report(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [f"stagediff benchmark: {m['device']} ({m['processor']}), {m['torch_threads']} torch threads, "
             f"torch {m['torch']}, load average at start {m['load_average_at_start']}",
             f"UNet {s['unet']}, batch {s['batch_size']}, {s['data']}, VAE: {s['vae']}", "",
             "| training loop | space | precision | images/s (median) | timed windows | peak memory, MiB (rise) |",
             "|---|---|---|---|---|---|"]
    for name, r in report["training"].items():
        memory = (f"{r['peak_gpu_memory_mib']:.0f} (GPU)" if "peak_gpu_memory_mib" in r
                  else f"{r['peak_rss_mib']:.0f} RSS (+{r['peak_rss_rise_mib']:.0f})")
        loop = r["loop"].split(":")[0] + (f" (compiled, {r['compile']})" if r.get("compile") else "")
        lines.append(f"| {loop} | {r['space']} {'x'.join(map(str, r['sample_shape']))} | {r['precision']} | "
                     f"{r['images_per_s']:.1f} | {len(r['window_images_per_s'])} x {r['steps_per_window']} steps"
                     + (f", best of rounds {', '.join(f'{v:.0f}' for v in r['round_images_per_s'])}"
                        if len(r.get("round_images_per_s", [])) > 1 else "") + f" | {memory} |")
    lines += ["", "| ratio | value |", "|---|---|"]
    for precision, value in report["speedup_vs_baseline"].items():
        lines.append(f"| ours / baseline, latent, {precision} | {value:.2f}x |")
    if "latent_vs_pixel" in report:
        lines.append(f"| latent / pixel DDPM images/s | {report['latent_vs_pixel']['ratio']:.2f}x |")
    f = report["flops"]
    lines.append(f"| training step: {f['flop_per_image'] / 1e6:.1f} MFLOP/image, achieved "
                 f"{f['achieved_flop_per_s'] / 1e9:.1f} GFLOP/s of a "
                 f"{f['matmul_peak']['flop_per_s'] / 1e9:.1f} GFLOP/s "
                 f"{f['matmul_peak']['dtype']} matmul peak | {100 * f['fraction_of_peak']:.0f}% |")
    if f["dense_ops_fraction_of_peak"] is not None:
        lines.append(f"| convolutions and matmuls alone, of the peak | {100 * f['dense_ops_fraction_of_peak']:.0f}% |")
    lines.append("| step time by op kind | " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                    f["time_fraction_by_op_kind"].items()) + " |")
    for space, d in report["data_pipeline"].items():
        if "loader_to_step_ratio" in d:
            lines.append(f"| {space} loader images/s / step images/s | {d['loader_images_per_s']:.0f} / "
                         f"{d['step_images_per_s']:.0f} = {d['loader_to_step_ratio']:.0f}x |")
    sampling = report.get("sampling", {})
    if sampling.get("results"):
        lines += ["", f"| sampler ({sampling['num_samples']} samples, seeds {sampling['seeds']}) | FD | "
                      "classes covered | class KL | seconds / image |", "|---|---|---|---|---|"]
        for r in sampling["results"]:
            steps = "all T" if r["steps"] is None else r["steps"]
            lines.append(f"| {r['sampler']} {steps} | {r.get('fd', float('nan')):.3g} | "
                         f"{r.get('classes_covered', float('nan')):g} | "
                         f"{r.get('class_kl', float('nan')):.3g} | {r['sampling_seconds_per_sample']:.4f} |")
        if "vae_decode_seconds_per_sample" in sampling:
            lines.append(f"| (of which VAE decoding) | | | | {sampling['vae_decode_seconds_per_sample']:.4f} |")
        if "guided" in sampling:
            g = sampling["guided"]
            lines.append(f"| dpmsolver 20, guidance w = {g['guidance_scale']:g} | {g.get('fd', float('nan')):.3g} | "
                         f"{g.get('classes_covered', float('nan')):g} | {g.get('class_kl', float('nan')):.3g} | "
                         f"{g['sampling_seconds_per_sample']:.4f} |")
    elif "skipped" in sampling:
        lines.append(f"\nsampling skipped: {sampling['skipped']}")
    lines += ["", "| target | goal | measured | met |", "|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['measured']:.3g} | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines)
