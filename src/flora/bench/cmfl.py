"""``flora bench cmfl``: CMFL against the methods it is compared with, on a smaller budget; docs/cmfl.md.

CMFL reads raw images on every step and generates images on every client turn, so the
accuracy benchmark's budget (16 rounds x 3 local epochs, every client every round, 3
seeds) would take hours with it on a CPU. This benchmark runs it on a smaller budget
(:data:`CMFL_CONFIG`) in the same worlds, next to the reference methods under the same
budget, and with two variants that say what its generated images add:

* ``CMFL no generated``: generated images weigh 0 (the same as training on real data alone);
* ``CMFL random generator``: the same architecture randomly initialised (images without
  class signal).

It also measures the shipped generator on its own: the tiny CLIP's zero-shot accuracy on
images generated from every class name, against real photos
(:func:`flora.pretrain.generator.evaluate_generator`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from flora.bench.common import (
    SETTINGS,
    BenchConfig,
    describe_variants,
    machine,
    mean_std,
    run_variants,
    setting_table,
    variants_table,
    weights_digest,
    write_report,
)

#: CMFL's generation settings in this benchmark: the paper's guidance 7.5, 10 DDIM steps instead
#: of 50 and one image per received word, to keep generation within a CPU budget
CMFL_OPTIONS: dict[str, Any] = {"diffusion_steps": 10, "guidance_scale": 7.5, "images_per_embedding": 1}
CMFL_VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "CMFL": ("CMFL", dict(CMFL_OPTIONS), "the shipped tiny generator (diffusion: tiny)"),
    "CMFL no generated": (
        "CMFL",
        {**CMFL_OPTIONS, "generated_weight": 0.0},
        "generated images weigh 0: LoRA learns from real images alone",
    ),
    "CMFL random generator": (
        "CMFL",
        {**CMFL_OPTIONS, "diffusion": "tiny-random"},
        "a randomly initialised generator: images without class signal",
    ),
    "Local": ("Local", {}, "Local CoOp: a prompt per client, never shared"),
    "PromptFL": ("PromptFL", {}, "one prompt averaged over clients"),
    "zero-shot": ("zero-shot", {}, "the hand-written template, nothing trained"),
}
#: the variant the others are compared with
CMFL_REFERENCE = "CMFL"
#: the smaller budget: 8 rounds of 1 local epoch, half the clients of a round sampled
CMFL_CONFIG = BenchConfig(rounds=8, local_epochs=1, eval_every=4, clients_per_round=5)


def run_cmfl(
    out_dir: str = "docs",
    work_dir: str = "runs/bench",
    seeds: int = 2,
    settings: list[str] | None = None,
    variants: list[str] | None = None,
    cfg: BenchConfig | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """CMFL, its two variants and the reference methods; writes ``cmfl.md`` and ``cmfl.json`` into ``out_dir``.

    ``variants`` are names from :data:`CMFL_VARIANTS` (default: all); ``settings`` default to
    label skew and feature shift; ``cfg`` defaults to :data:`CMFL_CONFIG`.
    """
    from flora.diffusion import require_extra

    require_extra("flora bench cmfl")
    cfg = cfg or replace(CMFL_CONFIG)
    settings = settings or ["label", "feature"]
    variants = variants or list(CMFL_VARIANTS)
    unknown = [v for v in variants if v not in CMFL_VARIANTS]
    if unknown:
        raise ValueError(f"unknown cmfl variant(s) {unknown}; choose from {list(CMFL_VARIANTS)}")
    start = time.perf_counter()
    generator = _generator_check(cfg)
    chosen = {v: CMFL_VARIANTS[v] for v in variants}
    runs = run_variants("cmfl", chosen, settings, seeds, cfg, Path(work_dir), progress)
    result = {
        "command": "flora bench cmfl",
        "machine": machine(),
        "weights": weights_digest(cfg.clip_pretrained),
        "seconds": time.perf_counter() - start,
        "config": cfg.__dict__,
        "settings": {s: SETTINGS[s] for s in settings},
        "variants": describe_variants(chosen),
        "generator": generator,
        "runs": runs,
    }
    write_report(out_dir, "cmfl", result, _cmfl_markdown)
    return result


def _generator_check(cfg: BenchConfig) -> dict[str, Any]:
    """The shipped generator measured alone, with the benchmark's CLIP (2 images per class)."""
    from flora.clip import CLIPBackbone
    from flora.data.synthetic import SyntheticShapes
    from flora.diffusion import SHIPPED_GENERATOR, load_shipped
    from flora.pretrain.generator import GeneratorPretrainConfig, evaluate_generator, weights_digest

    ref = GeneratorPretrainConfig()
    world = SyntheticShapes(cfg.num_colors, cfg.num_shapes, 1, 1, 32, ["photo"], seed=0)
    backbone = CLIPBackbone("flora-tiny", cfg.clip_pretrained)
    report = evaluate_generator(
        load_shipped(),
        backbone,
        world.class_names,
        cfg.num_shapes,
        per_class=ref.eval_per_class,
        steps=ref.eval_steps,
        guidance=ref.eval_guidance,
    )
    report.update(
        steps=ref.eval_steps,
        guidance=ref.eval_guidance,
        per_class=ref.eval_per_class,
        sha256=weights_digest(SHIPPED_GENERATOR)[:16],
    )
    return report


def _cmfl_markdown(result: dict[str, Any]) -> str:
    seeds = sorted({r["seed"] for r in result["runs"]})
    cfg = result["config"]
    g = result["generator"]
    per_round = (
        "every client" if cfg.get("clients_per_round") is None else f"{cfg['clients_per_round']} clients"
    )
    lines = [
        "# CMFL on the synthetic world (tiny CLIP, tiny generator)",
        "",
        "Generated by `flora bench cmfl` (`make bench`); every number below is from that command, as",
        "measured. CMFL trains the image tower (LoRA) on raw images and generates images on every",
        "client turn, so it runs on a smaller budget than `flora bench accuracy`; the other rows",
        "run under the same budget here (compare rows within this page, not with results.md).",
        "",
        f"- machine: {result['machine']}",
        f"- backbone: `flora-tiny`, {result.get('weights', 'weights not recorded')}; generator: the shipped "
        f"`diffusion: tiny` (tensors sha256 {g['sha256']})",
        f"- run time: {result['seconds'] / 60:.1f} min for {len(result['runs'])} runs",
        f"- seeds: {seeds}; mean ± std over seeds",
        f"- every run: {cfg['rounds']} rounds, {cfg['local_epochs']} local epoch(s), {per_round} per round, "
        f"batch {cfg['batch_size']}, evaluation every {cfg['eval_every']} rounds; prompt methods: SGD lr "
        f"{cfg['lr']}, n_ctx {cfg['n_ctx']}; CMFL: LoRA rank {cfg['rank']}, its own AdamW settings",
        "",
        "## The generator alone",
        "",
        f"The tiny CLIP's zero-shot accuracy (template `a photo of a {{}}.`) on {g['per_class']} images generated "
        f"from every class name ({g['steps']} DDIM steps, guidance {g['guidance']}): "
        f"**{g['generated_acc']:.1f} %** (chance {g['chance']:.1f} %); the predicted class has the right colour "
        f"in {g['generated_color_acc']:.1f} % and the right shape in {g['generated_shape_acc']:.1f} % of them.",
        "",
        "## Variants",
        "",
    ]
    lines += variants_table(result, CMFL_VARIANTS[CMFL_REFERENCE][0])
    lines += [
        "Local: each client's own test split; Base: the whole base-class test set; Novel: the",
        "novel-class test set with the personalised model (Novel-G: with the global part alone);",
        "HM: harmonic mean of Local, Base and Novel. All in percent, final round.",
        "",
    ]
    for setting, description in result["settings"].items():
        table_lines, rows = setting_table(result, setting, CMFL_REFERENCE)
        seconds = {
            v: mean_std(
                [r["seconds"] for r in result["runs"] if r["setting"] == setting and r["method"] == v]
            )[0]
            for v in rows
        }
        lines += [f"## {setting}: {description}", ""] + table_lines
        lines += ["Seconds per run: " + ", ".join(f"{v} {s:.0f}" for v, s in seconds.items()) + ".", ""]
    return "\n".join(lines) + "\n"
