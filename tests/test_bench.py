"""Benchmarks and pretraining on a miniature world: the commands produce what the docs are built from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flora.bench import BenchConfig, run_accuracy, run_speed
from flora.bench import speed as speed_bench
from flora.clip import CLIPBackbone
from flora.pretrain import PretrainConfig, pretrain_tiny

SHIPPED = (
    Path(__file__).resolve().parents[1] / "src" / "flora" / "clip" / "weights" / "flora-tiny.safetensors"
)
MINI = dict(num_colors=4, num_shapes=5, clip_pretrained=None)


TINY = dict(
    steps=6,
    warmup=2,
    recaption_steps=3,
    style_counts={"photo": 3, "dark": 2},
    num_colors=3,
    num_shapes=3,
)


def test_pretraining_is_deterministic_and_loadable(tmp_path: Path) -> None:
    cfg = PretrainConfig(**TINY)
    a = pretrain_tiny(tmp_path / "a.safetensors", cfg, progress=False)
    b = pretrain_tiny(tmp_path / "b.safetensors", cfg, progress=False)
    assert a["sha256"] == b["sha256"]
    weights = load_file(str(tmp_path / "a.safetensors"))
    assert all(t.dtype == torch.float16 for t in weights.values())
    backbone = CLIPBackbone("flora-tiny", str(tmp_path / "a.safetensors"))
    random_init = CLIPBackbone("flora-tiny", None, init_seed=0)
    assert backbone.fingerprint() != random_init.fingerprint()  # the weights were really loaded
    c = pretrain_tiny(
        tmp_path / "c.safetensors", PretrainConfig(**{**cfg.__dict__, "seed": 1}), progress=False
    )
    reseeded = load_file(c["output"])  # compare tensors: the file's metadata holds the config
    assert any(not torch.equal(weights[k], reseeded[k]) for k in weights)
    # the caption mix is part of the recipe: generic-only captions train different weights
    d = pretrain_tiny(
        tmp_path / "d.safetensors", PretrainConfig(**{**cfg.__dict__, "style_captions": 0.0}), progress=False
    )
    generic = load_file(d["output"])
    assert any(not torch.equal(weights[k], generic[k]) for k in weights)
    with pytest.raises(ValueError, match="style_captions"):
        pretrain_tiny(tmp_path / "e.safetensors", PretrainConfig(**{**cfg.__dict__, "style_captions": 1.5}))


def test_recaptioning_trains_the_text_tower_alone(tmp_path: Path) -> None:
    one = pretrain_tiny(tmp_path / "a.safetensors", PretrainConfig(**TINY), progress=False)
    none = pretrain_tiny(
        tmp_path / "b.safetensors", PretrainConfig(**{**TINY, "recaption_steps": 0}), progress=False
    )
    with_stage, without = load_file(one["output"]), load_file(none["output"])
    visual = [k for k in with_stage if k.startswith("visual.")]
    text = [k for k in with_stage if not k.startswith("visual.") and k != "logit_scale"]
    assert visual and all(torch.equal(with_stage[k], without[k]) for k in visual)
    assert torch.equal(with_stage["logit_scale"], without["logit_scale"])
    assert any(not torch.equal(with_stage[k], without[k]) for k in text)


def test_multi_positive_loss_is_clip_loss_with_one_positive_per_row() -> None:
    import open_clip

    from flora.pretrain import _multi_positive_clip_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=-1)
    reference = open_clip.ClipLoss()(img, txt, torch.tensor(10.0))
    ours = _multi_positive_clip_loss(10.0 * img @ txt.t(), torch.eye(6, dtype=torch.bool))
    assert torch.allclose(ours, reference, atol=1e-6)
    # a second positive in a row can only raise that row's probability mass: the loss drops
    two = torch.eye(6, dtype=torch.bool)
    two[0, 1] = two[1, 0] = True
    assert _multi_positive_clip_loss(10.0 * img @ txt.t(), two) < ours


def test_batch_plan_holds_every_class_in_distinct_styles_and_the_word_mix() -> None:
    import numpy as np
    import open_clip

    from flora.pretrain import _batch_plan

    cfg = PretrainConfig(
        **{**TINY, "style_counts": {"photo": 3, "sketch": 2, "dark": 2}, "images_per_class": 2, "steps": 5}
    )
    labels = np.tile(np.arange(9), 7)
    style_ids = np.repeat([0, 0, 0, 1, 1, 2, 2], 9)
    tok = open_clip.get_tokenizer("flora-tiny")
    plan = _batch_plan(cfg, labels, style_ids, ["photo", "sketch", "dark"], tok, 5, (1.0, 0.0, 1.0, 0.0), 0)
    idx, cls, sty, cap, spec = plan["batches"]
    assert idx.shape == (5, 18)
    for step in range(5):
        assert sorted(cls[step].tolist()) == sorted(list(range(9)) * 2)
        for k in range(9):
            styles = sty[step][cls[step] == k]
            assert len(set(styles.tolist())) == 2  # the class in two different styles
        assert (torch.as_tensor(labels)[idx[step]] == cls[step]).all()  # each image shows its class
        assert (torch.as_tensor(style_ids)[idx[step]] == sty[step]).all()
        assert ((spec[step] == -1) | (spec[step] == sty[step])).all()  # a style word names the image's style

    # own names only, then confused names only
    def words(shares: tuple[float, float, float, float]) -> set[str]:
        p = _batch_plan(cfg, labels, style_ids, ["photo", "sketch", "dark"], tok, 5, shares, 0)
        return {tok.decode(t.tolist()) for t in p["captions"]}

    own = " ".join(words((1.0, 0.0, 1.0, 0.0)))
    assert "red circle" in own and "orange" not in own
    confused = " ".join(words((0.0, 1.0, 0.0, 1.0)))
    assert "orange ring" in confused and "red circle" not in confused  # red -> orange, circle -> ring


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"color_own": 0.8, "color_confused": 0.3}, "color_own \\+ pretrain.color_confused"),
        ({"images_per_class": 3}, "images_per_class must be in \\[1, 2\\], got 3"),
        ({"patch_weight": -1.0}, "patch_weight must be >= 0"),
    ],
)
def test_pretraining_options_are_checked(tmp_path: Path, option: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        pretrain_tiny(tmp_path / "x.safetensors", PretrainConfig(**{**TINY, **option}), progress=False)


def test_shipped_weights_are_small_fp16_and_load() -> None:
    assert SHIPPED.exists(), "the tiny CLIP weights must ship with the package"
    assert SHIPPED.stat().st_size <= 20 * 2**20
    backbone = CLIPBackbone("flora-tiny", "shipped")
    assert backbone.embed_dim == 128


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the default pretraining alone takes ~12 min on 2 cores
def test_shipped_weights_match_the_command(tmp_path: Path) -> None:
    """`flora pretrain-tiny` with its defaults reproduces the shipped file bit for bit (~13 min)."""
    import hashlib

    report = pretrain_tiny(tmp_path / "w.safetensors", PretrainConfig(), progress=False)
    assert report["sha256"] == hashlib.sha256(SHIPPED.read_bytes()).hexdigest()


def test_bench_accuracy_writes_tables_and_figures(tmp_path: Path) -> None:
    cfg = BenchConfig(rounds=2, **MINI)
    result = run_accuracy(
        str(tmp_path / "docs"),
        str(tmp_path / "work"),
        seeds=2,
        settings=["label"],
        methods=["zero-shot", "PromptFL", "FLORA"],
        cfg=cfg,
        progress=False,
    )
    assert len(result["runs"]) == 6
    text = (tmp_path / "docs" / "results.md").read_text()
    for method in ("zero-shot", "PromptFL", "FLORA"):
        assert f"| {method} |" in text
    flora = [r["final"]["hm"] for r in result["runs"] if r["method"] == "FLORA"]
    assert f"{sum(flora) / 2:.1f} ±" in text  # the table is the mean over seeds of what the runs gave
    assert json.loads((tmp_path / "docs" / "results.json").read_text())["runs"][0]["setting"] == "label"
    for fig in ("accuracy_label.png", "clients_label.png", "partition_label.png"):
        assert (tmp_path / "docs" / "figures" / fig).stat().st_size > 1000


def _record(method: str, seed: int, curve: list[float], base: float = 50.0) -> dict:
    final = dict(local_acc_mean=curve[-1], base_acc_mean=base, novel_acc_mean=40.0, hm=45.0)
    return dict(setting="label", seed=seed, method=method, final=final, curve=list(enumerate(curve, 1)))


def test_results_state_convergence_and_the_comparisons_from_the_runs() -> None:
    from flora.bench.accuracy import _results_markdown

    runs = [
        _record("zero-shot", 0, [60.0, 60.0, 60.0], base=58.0),
        _record("zero-shot", 1, [60.0, 60.0, 60.0], base=58.0),
        # seed-mean Local of PromptFL: 70, 80, 80.5 (flat at the end although single seeds move)
        _record("PromptFL", 0, [70.0, 81.0, 80.0], base=61.0),
        _record("PromptFL", 1, [70.0, 79.0, 81.0], base=63.0),
        _record("FedOTP", 0, [50.0, 60.0, 66.0]),
        _record("FedOTP", 1, [50.0, 60.0, 64.0]),
    ]
    result = dict(
        machine="m", seconds=60.0, runs=runs, settings={"label": "label skew"}, config=BenchConfig().__dict__
    )
    text = _results_markdown(result)
    assert (
        "between rounds 2 and 3 the seed-mean Local of every method moved by at most 5.0 points (FedOTP)"
        in text
    )
    assert "more than 1 point: FedOTP (+5.0)." in text
    assert "PromptFL Base 62.0 % vs. zero-shot Base 58.0 % (above)" in text
    assert "FedOTP Local minus PromptFL Local: -15.5 points" in text
    assert "20 training images per class in label skew, 4 per class and style" in text
    runs[2]["curve"][-1] = (3, 90.0)  # PromptFL seed 0 still rising: seed mean +5.5
    assert "more than 1 point: PromptFL (+5.5), FedOTP (+5.0)." in _results_markdown(result)


def test_bench_speed_reports_phases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the compiled run goes through torch.compile, here as a recording pass-through (compiling for real
    # is tested in test_backbone.py; here it would only add half a minute)
    through_compile: list[object] = []

    def recording_compile(fn: object, **options: object) -> object:
        through_compile.append(fn)

        def run(*args: object, **kwargs: object) -> object:
            through_compile.append("call")
            return fn(*args, **kwargs)  # type: ignore[operator]

        return run

    monkeypatch.setattr(torch, "compile", recording_compile)
    result = run_speed(
        str(tmp_path / "docs"),
        str(tmp_path / "work"),
        rounds=2,
        devices=[1],
        cfg=BenchConfig(**MINI),
        client_batch=5,
        together_rounds=2,
        together_methods=["PromptFL"],
        compile_methods=["PromptFL"],
        step_steps=1,
        together_precisions=["32-true", "bf16-mixed"],
    )
    one, together, compiled, one_bf16, together_bf16 = result["together"]
    assert [r["client_batch"] for r in result["together"]] == [1, 5, 1, 1, 5]
    assert [r["compiled"] for r in result["together"]] == [
        False,
        False,
        True,
        False,
        False,
    ]  # compiled: first only
    assert [r["precision"] for r in result["together"]] == ["32-true"] * 3 + ["bf16-mixed"] * 2
    assert one["train_s"] > 0 and together["images_per_s"] > 0 and together_bf16["images_per_s"] > 0
    runs = tmp_path / "work" / "runs"
    final = [
        json.loads((runs / f"speed-PromptFL-{run}" / "summary.json").read_text())["final"]
        for run in ("batch1", "batch5", "batch1-compiled", "batch1-bf16-mixed", "batch5-bf16-mixed")
    ]
    for other in final[1:3]:  # the same training: stacked, and with the compiled text tower
        assert other["local_acc_mean"] == pytest.approx(final[0]["local_acc_mean"], abs=1e-4)
    precisions = [
        json.loads((runs / f"speed-PromptFL-{r}" / "summary.json").read_text())["trainer"]["precision"]
        for r in ("batch1", "batch5-bf16-mixed")
    ]
    assert precisions == ["32-true", "bf16-mixed"]
    rows = {r["feature_cache"]: r for r in result["rows"]}
    assert set(rows) == {"memory", "off"}
    assert rows["off"]["image_s"] > 0 and rows["memory"]["image_s"] == 0  # the cache skips the image tower
    for r in rows.values():
        assert r["text_s"] > 0 and r["optim_s"] > 0 and r["images_per_s"] > 0
    text = (tmp_path / "docs" / "performance.md").read_text()
    assert "| memory | 1 |" in text and "| PromptFL | 32-true | 5 |" in text
    # each precision is compared with one by one in that precision
    ratio = together_bf16["images_per_s"] / one_bf16["images_per_s"]
    assert f"| PromptFL | bf16-mixed | 5 | eager | {together_bf16['train_s']:.2f} |" in text
    assert f"{ratio:.2f}x |" in text.split("| PromptFL | bf16-mixed | 5 |")[1].splitlines()[0]
    steps = {r["pattern"]: r["ms_per_step"] for r in result["step"]["rows"]}
    assert set(steps) >= {
        "authors' pattern, fp32",
        "flora, cached features, fp32",
        "flora, raw images, fp32",
        "flora, cached features, fp32, every class's whole sequence",
        "flora, cached features, fp32, every class's whole sequence and the whole last block",
    }
    assert "| authors' pattern, fp32 |" in text and "| flora, cached features, fp32 |" in text
    assert not any("compiled" in pattern for pattern in steps)  # FLORA is not among compile_methods
    assert "| PromptFL | 32-true | 1 | compiled |" in text
    assert through_compile.count("call") > 10  # the compiled run's text tower went through torch.compile


def test_the_authors_pattern_computes_flora_s_loss() -> None:
    """The speed baseline does the authors' work (image tower, five full-length passes) for the same loss."""
    from flora.bench.step import authors_loss
    from flora.methods import FLORA

    module = FLORA(clip_model="flora-tiny", n_ctx=6, rank=3)
    names = [f"class {i}" for i in range(9)]
    module.set_task(names)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in (module.lowrank.A, module.prompt.ctx):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)  # random, so that every term matters
    size = module.backbone.image_size
    images, y = torch.randn(4, 3, size, size, generator=gen), torch.randint(0, 9, (4,), generator=gen)
    assert float(authors_loss(module, images, y, names)) == pytest.approx(
        float(module.compute_loss(images, y)[0]), abs=1e-5
    )


def test_probe_measures_zero_shot_linear_probe_and_coop(tmp_path: Path) -> None:
    from flora.probe import ProbeConfig, run_probe

    cfg = ProbeConfig(
        num_colors=3, num_shapes=3, train_per_class=8, test_per_class=6, styles=["photo", "dark"]
    )
    out = tmp_path / "backbone.md"
    result = run_probe(task=cfg, output=str(out), progress=False)
    assert set(result["styles"]) == {"photo", "dark"}
    photo = result["styles"]["photo"]
    assert photo["zero_shot"] > 100 / 9 + 20  # the shipped weights know the classes (chance 11 %)
    assert all(0 <= v <= 100 for r in result["styles"].values() for v in r.values())
    text = out.read_text()
    assert f"| photo | {photo['zero_shot']:.1f} | {photo['linear_probe']:.1f} | {photo['coop']:.1f} |" in text
    assert f"| {photo['patch_zero_shot']:.1f} |" in text  # the patch-token column (flora-tiny is a ViT)
    assert json.loads(out.with_suffix(".json").read_text())["styles"]["dark"] == result["styles"]["dark"]
    # base-to-novel: 5 base and 4 novel classes, each half scored as a task of its own
    assert {"zero_shot_base", "coop_base", "zero_shot_novel", "coop_novel"} <= set(photo)
    assert (
        f"| photo | {photo['zero_shot_base']:.1f} | {photo['coop_base']:.1f} | "
        f"{photo['coop_base'] - photo['zero_shot_base']:+.1f} | {photo['zero_shot_novel']:.1f} |" in text
    )
    assert "| linear probe >= 90 % |" in text
    # a random text tower knows nothing: zero-shot near chance, while a linear probe still fits the images
    random = run_probe(clip_pretrained=None, task=cfg, output=None, progress=False)["styles"]["photo"]
    assert random["zero_shot"] < photo["zero_shot"]
    with pytest.raises(ValueError, match="unknown style"):
        run_probe(task=ProbeConfig(styles=["watercolour"]), output=None, progress=False)


def test_regime_checks_follow_the_targets() -> None:
    from flora.probe import regime_checks

    good = dict(
        zero_shot=60.0,
        linear_probe=92.0,
        patch_zero_shot=40.0,
        zero_shot_base=58.0,
        coop_base=70.0,
        zero_shot_novel=62.0,
        coop_novel=55.0,
    )
    assert [ok for _, _, ok in regime_checks(good)] == [True] * 5
    bad = dict(good, linear_probe=79.0, coop_base=67.0, coop_novel=62.5, patch_zero_shot=35.0)
    assert [ok for _, _, ok in regime_checks(bad)] == [False] * 5


def test_bench_probe_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flora.cli import main

    out = tmp_path / "b.md"
    args = ["bench", "probe", "--output", str(out), "--task.styles", "[sketch]", "--task.num_colors", "2"]
    assert main(args + ["--task.num_shapes", "2", "--task.train_per_class", "4"]) == 0
    text = out.read_text()
    assert "| sketch |" in text and "| photo |" not in text  # the task options reached the probe
    assert "2 colours x 2 shapes" in text
    assert "flora probe: sketch" in capsys.readouterr().out


def test_bench_data_folders_follow_the_world(tmp_path: Path) -> None:
    from flora.bench import make_datamodule

    a = make_datamodule("feature", 0, BenchConfig(), tmp_path).root
    assert make_datamodule("feature", 0, BenchConfig(), tmp_path).root == a
    # another world (or seed) never reuses shards prepared for this one
    assert make_datamodule("feature", 0, BenchConfig(num_colors=4), tmp_path).root != a
    assert make_datamodule("feature", 1, BenchConfig(), tmp_path).root != a


def test_bench_ablation_changes_one_component(tmp_path: Path) -> None:
    from flora.bench import run_ablation

    cfg = BenchConfig(rounds=1, local_epochs=1, eval_every=1, **MINI)
    result = run_ablation(
        str(tmp_path / "docs"),
        str(tmp_path / "work"),
        seeds=1,
        settings=["label"],
        variants=["FLORA", "adapter none", "FedPGP"],
        cfg=cfg,
        progress=False,
    )
    assert [r["method"] for r in result["runs"]] == ["FLORA", "adapter none", "FedPGP"]
    # the variants really are different models trained from the same seed
    finals = {r["method"]: r["final"] for r in result["runs"]}
    assert finals["FLORA"] != finals["adapter none"]
    text = (tmp_path / "docs" / "ablation.md").read_text()
    assert "| adapter none | `adapter=none` |" in text
    delta = finals["adapter none"]["hm"] - finals["FLORA"]["hm"]
    assert f"| {delta:+.1f} |" in text  # HM difference against the reference row
    assert "- HM above FLORA's by more than the std:" in text
    # the header names the command line that reproduces this selection
    assert (
        f"`flora bench ablation --variants '[FLORA, adapter none, FedPGP]' --settings '[label]' --seeds 1 --out_dir {tmp_path / 'docs'}`"
        in text
    )
    assert json.loads((tmp_path / "docs" / "ablation.json").read_text())["command"] == "flora bench ablation"
    with pytest.raises(ValueError, match="unknown ablation variant"):
        run_ablation(str(tmp_path / "docs"), str(tmp_path / "work"), variants=["adapter sideways"], cfg=cfg)


def test_bench_ablation_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flora.cli import main

    args = ["bench", "ablation", "--out_dir", str(tmp_path / "docs"), "--work_dir", str(tmp_path / "w")]
    # an extra variant (not in the default list) runs when named
    args += ["--seeds", "1", "--settings", "[label]", "--variants", "[mu 0, ortho norm gradient]"]
    args += ["--cfg.rounds", "1", "--cfg.local_epochs", "1", "--cfg.num_colors", "4", "--cfg.num_shapes", "5"]
    assert main([*args, "--cfg.clip_pretrained", "null"]) == 0
    text = (tmp_path / "docs" / "ablation.md").read_text()
    assert "| mu 0 | `mu=0.0` |" in text and "| ortho norm gradient | `ortho_grad_floor=0.0` |" in text
    out = capsys.readouterr().out
    assert "[1/2] label    seed 0 mu 0" in out and "[2/2] label    seed 0 ortho norm gradient" in out


def test_every_method_gets_the_same_budget() -> None:
    """``make_method`` reads the registry: each method maps the shared n_ctx / rank / lr to its own options."""
    from flora.bench import METHODS, PERSONALISED, make_method
    from flora.methods import REGISTRY

    assert METHODS == (
        "zero-shot",
        "Local",
        "PromptFL",
        "PromptFL+FT",
        "PromptPer",
        "PromptProx",
        "PromptAMP",
        "pFedPrompt",
        "FedOTP",
        "pFedMoAP",
        "FedPGP",
        "FLORA",
    )
    assert PERSONALISED == tuple(m for m in METHODS if m not in ("zero-shot", "PromptFL", "PromptProx"))
    prompt = {"n_ctx": 7, "lr": 0.001}
    expected = {name: prompt for name in METHODS}
    expected["zero-shot"] = {}  # nothing is learned
    expected["PromptPer"] = {"n_global": 4, "n_local": 3, "lr": 0.001}  # n_ctx - n_ctx // 2 shared
    expected["FedPGP"] = expected["FLORA"] = {**prompt, "rank": 4}
    expected["CMFL"] = {"lora_r": 4}  # registered, but not in the default runs (needs the cmfl extra)
    assert {name: cls.budget_options(7, 4, 0.001) for name, cls in REGISTRY.items()} == expected
    m = make_method("FLORA", BenchConfig(n_ctx=8, rank=4, clip_pretrained=None), adapter="none")
    assert (m.hparams["n_ctx"], m.hparams["rank"], m.hparams["lr"], m.adapter) == (8, 4, 0.001, None)
    assert m.hparams["clip_pretrained"] is None and m.hparams["clip_model"] == "flora-tiny"
    with pytest.raises(ValueError, match="unknown method 'FedAvg'"):
        make_method("FedAvg", BenchConfig())


def test_bench_cmfl_compares_cmfl_with_its_variants(tmp_path: Path) -> None:
    from flora.bench import run_cmfl

    cfg = BenchConfig(rounds=1, local_epochs=1, eval_every=1, clients_per_round=3, **MINI)
    variants = ["CMFL", "CMFL no generated", "zero-shot"]
    result = run_cmfl(
        str(tmp_path / "docs"),
        str(tmp_path / "work"),
        seeds=1,
        settings=["label"],
        variants=variants,
        cfg=cfg,
        progress=False,
    )
    assert [r["method"] for r in result["runs"]] == variants
    finals = {r["method"]: r["final"] for r in result["runs"]}

    def first_round(variant: str) -> dict:
        path = tmp_path / "work" / "runs" / f"label-cmfl_{variant.replace(' ', '_')}-s0" / "metrics.jsonl"
        return json.loads(path.read_text().splitlines()[0])

    # the variants are different runs: generated images change the training loss
    assert first_round("CMFL")["train_loss"] != first_round("CMFL no generated")["train_loss"]
    # clients_per_round reaches the trainer: 3 of the 10 clients trained in the round
    assert len(first_round("CMFL")["clients"]) == 3
    text = (tmp_path / "docs" / "cmfl.md").read_text()
    g = result["generator"]
    assert f"**{g['generated_acc']:.1f} %** (chance {g['chance']:.1f} %)" in text
    assert (
        "| CMFL no generated | `diffusion_steps=10`, `guidance_scale=7.5`, `images_per_embedding=1`, " in text
    )
    delta = finals["zero-shot"]["hm"] - finals["CMFL"]["hm"]
    assert f"| {delta:+.1f} |" in text
    assert "Seconds per run: CMFL " in text
    assert json.loads((tmp_path / "docs" / "cmfl.json").read_text())["command"] == "flora bench cmfl"
    with pytest.raises(ValueError, match="unknown cmfl variant"):
        run_cmfl(str(tmp_path / "docs"), str(tmp_path / "work"), variants=["CMFL sideways"], cfg=cfg)


def test_bench_scaling_measures_each_federation_size_in_its_own_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`flora bench scaling` on a small world: 4 and 24 clients, some without test samples."""
    from flora.cli import main

    args = ["bench", "scaling", "--out_dir", str(tmp_path / "docs"), "--work_dir", str(tmp_path / "w")]
    args += ["--clients", "[4, 24]", "--rounds", "2", "--eval_clients", "3"]
    assert main(args + ["--train_per_class", "4", "--test_per_class", "1"]) == 0
    result = json.loads((tmp_path / "docs" / "scaling-bench.json").read_text())
    small, large = result["rows"]
    assert [small["clients"], large["clients"]] == [4, 24]
    assert [small["clients_per_round"], large["clients_per_round"]] == [1, 3]  # 10 % per round, at least 1
    for row in (small, large):
        run = tmp_path / "w" / "runs" / f"clients{row['clients']}"
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert row["rounds"] == len(records) == 2
        assert row["peak_rss_mb"] == max(r["peak_rss_mb"] for r in records) > 100
        assert row["client_states_mb"] > 0  # the disk state store under the run folder
        # the last round evaluated every client with test samples, the first a sample of 3
        assert row["clients_evaluated_last"] + row["clients_without_test"] == row["clients"]
        assert records[0]["eval_sampled"] == (row["clients_evaluated_last"] > 3)
        assert row["eval_full_s"] == records[-1]["time_eval_s"]
    assert large["clients_without_test"] > 0  # 100 test images over 24 clients of Dirichlet(1.0)
    text = (tmp_path / "docs" / "scaling-bench.md").read_text()
    assert "| 24 | 3 |" in text and "figures/scaling.png" in text
    assert (tmp_path / "docs" / "figures" / "scaling.png").stat().st_size > 1000
    assert "24 clients:" in capsys.readouterr().out


def test_scaling_doc_quotes_the_bench_it_names() -> None:
    """docs/scaling.md's table is the one `flora bench scaling` wrote into docs/scaling-bench.json."""
    docs = Path(__file__).parents[1] / "docs"
    rows = json.loads((docs / "scaling-bench.json").read_text())["rows"]
    text = (docs / "scaling.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == len(rows)
    for line, row in zip(table, rows, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        sample = "-" if row["eval_sampled_s"] != row["eval_sampled_s"] else f"{row['eval_sampled_s']:.1f}"
        assert cells == [
            f"{row['clients']:,}",
            str(row["clients_per_round"]),
            f"{row['train_s']:.1f}",
            sample,
            f"{row['eval_full_s']:.1f}",
            f"{row['peak_rss_mb']:.0f}",
            f"{row['client_states_mb']:.1f}",
        ]
    assert rows[-1]["clients"] >= 1000 and rows[-1]["clients_evaluated_last"] == rows[-1]["clients"]


def test_bench_scaling_names_a_failed_size_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An impossible federation (500 clients of 100 images) stops the bench with the child's error and its log."""
    from flora.cli import main

    args = ["bench", "scaling", "--out_dir", str(tmp_path / "docs"), "--work_dir", str(tmp_path / "w")]
    assert main(args + ["--clients", "[500]", "--train_per_class", "1", "--test_per_class", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "preparing 500 clients failed (exit 1): flora: error: Dirichlet(alpha=1.0) cannot give" in err
    log = tmp_path / "w" / "logs" / "prepare-500.log"
    assert f"(output: {log})" in err and "cannot give each of 500 clients" in log.read_text()
    assert not (tmp_path / "docs" / "scaling-bench.json").exists()  # no report from a failed bench


@pytest.mark.parametrize("native", [True, False])
def test_speed_comparison_adds_bf16_only_where_the_device_has_it(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(speed_bench, "native_bf16", lambda: native)
    expected = ["32-true", "bf16-mixed"] if native else ["32-true"]
    assert speed_bench.comparison_precisions("32-true") == expected
    assert speed_bench.comparison_precisions("bf16-mixed") == ["bf16-mixed"]
    assert speed_bench.comparison_precisions("32-true", ["16-mixed", "16-mixed"]) == ["16-mixed"]
    with pytest.raises(ValueError, match="together_precisions"):
        speed_bench.comparison_precisions("32-true", [])
    with pytest.raises(ValueError, match=r"together_precisions: \['bf17-mixed'\] not among"):
        speed_bench.comparison_precisions("32-true", ["32-true", "bf17-mixed"])
