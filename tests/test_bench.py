"""Benchmarks and pretraining on a miniature world: the commands produce what the docs are built from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flora.bench import BenchConfig, run_accuracy, run_speed
from flora.clip import CLIPBackbone
from flora.pretrain import PretrainConfig, pretrain_tiny

SHIPPED = (
    Path(__file__).resolve().parents[1] / "src" / "flora" / "clip" / "weights" / "flora-tiny.safetensors"
)
MINI = dict(num_colors=4, num_shapes=5, clip_pretrained=None)


def test_pretraining_is_deterministic_and_loadable(tmp_path: Path) -> None:
    cfg = PretrainConfig(steps=6, warmup=2, style_counts={"photo": 3, "dark": 2}, num_colors=3, num_shapes=3)
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


def test_shipped_weights_are_small_fp16_and_load() -> None:
    assert SHIPPED.exists(), "the tiny CLIP weights must ship with the package"
    assert SHIPPED.stat().st_size <= 20 * 2**20
    backbone = CLIPBackbone("flora-tiny", "shipped")
    assert backbone.embed_dim == 128


@pytest.mark.slow
def test_shipped_weights_match_the_command(tmp_path: Path) -> None:
    """`flora pretrain-tiny` with its defaults reproduces the shipped file bit for bit (~10 min)."""
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


def test_bench_speed_reports_phases(tmp_path: Path) -> None:
    result = run_speed(
        str(tmp_path / "docs"), str(tmp_path / "work"), rounds=2, devices=[1], cfg=BenchConfig(**MINI)
    )
    rows = {r["feature_cache"]: r for r in result["rows"]}
    assert set(rows) == {"memory", "off"}
    assert rows["off"]["image_s"] > 0 and rows["memory"]["image_s"] == 0  # the cache skips the image tower
    for r in rows.values():
        assert r["text_s"] > 0 and r["optim_s"] > 0 and r["images_per_s"] > 0
    assert "| memory | 1 |" in (tmp_path / "docs" / "performance.md").read_text()


def test_probe_measures_zero_shot_linear_probe_and_coop(tmp_path: Path) -> None:
    from flora.probe import ProbeConfig, run_probe

    cfg = ProbeConfig(
        num_colors=3, num_shapes=3, train_per_class=8, test_per_class=6, styles=["photo", "dark"]
    )
    out = tmp_path / "backbone.md"
    result = run_probe(config=cfg, output=str(out), progress=False)
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
    assert photo["zero_shot_base"] != photo["zero_shot_novel"]
    assert (
        f"| photo | {photo['zero_shot_base']:.1f} | {photo['coop_base']:.1f} | "
        f"{photo['coop_base'] - photo['zero_shot_base']:+.1f} | {photo['zero_shot_novel']:.1f} |" in text
    )
    assert "| linear probe >= 90 % |" in text
    # a random text tower knows nothing: zero-shot near chance, while a linear probe still fits the images
    random = run_probe(clip_pretrained=None, config=cfg, output=None, progress=False)["styles"]["photo"]
    assert random["zero_shot"] < photo["zero_shot"]
    with pytest.raises(ValueError, match="unknown style"):
        run_probe(config=ProbeConfig(styles=["watercolour"]), output=None, progress=False)


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
    args = ["bench", "probe", "--output", str(out), "--config.styles", "[sketch]", "--config.num_colors", "2"]
    assert main(args + ["--config.num_shapes", "2", "--config.train_per_class", "4"]) == 0
    assert "| sketch |" in out.read_text()
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
    assert json.loads((tmp_path / "docs" / "ablation.json").read_text())["command"] == "flora bench ablation"
    with pytest.raises(ValueError, match="unknown ablation variant"):
        run_ablation(str(tmp_path / "docs"), str(tmp_path / "work"), variants=["adapter sideways"], cfg=cfg)


def test_bench_ablation_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flora.cli import main

    args = ["bench", "ablation", "--out_dir", str(tmp_path / "docs"), "--work_dir", str(tmp_path / "w")]
    args += ["--seeds", "1", "--settings", "[label]", "--variants", "[mu 0]", "--cfg.rounds", "1"]
    args += ["--cfg.local_epochs", "1", "--cfg.num_colors", "4", "--cfg.num_shapes", "5"]
    assert main([*args, "--cfg.clip_pretrained", "null"]) == 0
    assert "| mu 0 | `mu=0.0` |" in (tmp_path / "docs" / "ablation.md").read_text()
    assert "[1/1] label    seed 0 mu 0" in capsys.readouterr().out
