"""benchmarks/bench_step.py and bench_index.py run end to end at toy sizes and report what they claim."""

import json
import math
import sys

import pytest
import torch

from benchmarks import bench_index, bench_real_size, bench_step
from pogdiff.objectives import draw_pogdiff_neighbors
from pogdiff.psi import PsiParams


def test_synthetic_index_skips_exactly_the_requested_fraction():
    index, skippable, active = bench_step.synthetic_index(pool_size=20, k=5, seed=0)
    assert len(skippable) == 24 and len(active) == 20  # skippable rows come in groups of k + 1 = 6
    rows = bench_step.batch_rows(skippable, active, 8, 0.25, torch.Generator().manual_seed(1))
    assert len(set(rows.tolist())) == 8 and int(torch.isin(rows, skippable).sum()) == 2
    draw = draw_pogdiff_neighbors(
        index, rows, torch.Generator().manual_seed(2), PsiParams(a1=1.0, a2=1.0, a3=1.0, terms="img,txt")
    )
    assert draw.needs_forward.tolist() == (~torch.isin(rows, skippable)).tolist()
    assert bool((draw.psi_drawn > 0).all())


def test_bench_step_tiny(tmp_path):
    result = bench_step.main(
        [
            "--preset",
            "tiny",
            "--batch_size",
            "2",
            "--warmup",
            "2",
            "--steps",
            "3",
            "--skippable_fraction",
            "0.5",
            "--output_dir",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "bench_step.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert list(saved["results"]) == ["vanilla", "pogdiff", "cbdm", "t2h"]
    for r in saved["results"].values():
        assert r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert math.isclose(r["images_per_s"], 2 / (r["median_ms"] / 1e3))
        assert r["peak_gib"] is None  # CPU: no per-method peak, reported as n/a
    assert saved["results"]["vanilla"]["ratio_to_vanilla"] == 1.0
    # One of the two rows of every batch has a same-caption neighbour: its forward is skipped.
    assert saved["results"]["pogdiff"]["frac_skipped"] == 0.5
    assert saved["config"]["resolution"] == 32 and saved["config"]["mixed_precision"] == "no"
    assert saved["command"].startswith("python benchmarks/bench_step.py --preset tiny")
    assert saved["machine"]["torch"] == torch.__version__
    table = (tmp_path / "bench_step.md").read_text()
    assert "| pogdiff |" in table and "| 1.000 |" in table and "n/a on CPU" in table


def test_bench_step_cached_latents_and_lora():
    args = [
        "--preset",
        "tiny",
        "--batch_size",
        "4",
        "--warmup",
        "0",
        "--steps",
        "2",
        "--methods",
        "pogdiff,cbdm",
    ]
    result = bench_step.main([*args, "--skippable_fraction", "0.25", "--cache_latents", "--lora"])
    assert list(result["results"]) == ["pogdiff", "cbdm"]
    assert result["config"]["cache_latents"] and result["config"]["lora"]
    assert result["results"]["pogdiff"]["frac_skipped"] == 0.25
    assert result["results"]["pogdiff"]["ratio_to_vanilla"] is None  # no vanilla run to compare with


def test_bench_step_reference_and_eager_rows(tmp_path):
    """diffusers' own train_text_to_image step and PoGDiff's eager neighbour forward run in the same table."""
    methods = "diffusers,vanilla,pogdiff,pogdiff-eager"
    argv = f"--preset tiny --batch_size 2 --warmup 0 --steps 2 --methods {methods} --output_dir {tmp_path}"
    result = bench_step.main(argv.split())
    assert list(result["results"]) == ["diffusers", "vanilla", "pogdiff", "pogdiff-eager"]
    # CPU: `auto` is the eager forward for both PoGDiff rows; the reference has no neighbour forward.
    assert result["results"]["pogdiff"]["neighbor_forward"] == "eager"
    assert result["results"]["pogdiff-eager"]["neighbor_forward"] == "eager"
    assert "neighbor_forward" not in result["results"]["diffusers"]
    ratio = result["results"]["vanilla"]["median_ms"] / result["results"]["diffusers"]["median_ms"]
    table = (tmp_path / "bench_step.md").read_text()
    assert (
        f"The trainer's vanilla step takes {ratio:.3f}x the time of diffusers' train_text_to_image.py"
        in table
    )


def test_bench_step_rejects_reference_with_cached_latents(capsys):
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--methods", "diffusers,vanilla", "--cache_latents"])
    assert "has no latent cache; drop --cache_latents" in capsys.readouterr().err


def test_bench_index_small(tmp_path):
    result = bench_index.main(
        [
            "--sizes",
            "2000",
            "--density_sizes",
            "2000",
            "--chunk_size",
            "512",
            "--density_max_steps",
            "20",
            "--threads",
            "1",
            "--output_dir",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "bench_index.json").read_text())
    assert saved == json.loads(json.dumps(result))
    (knn,) = saved["knn"]
    assert (knn["n"], knn["dim"], knn["k"], knn["chunk_size"]) == (2000, 768, 5, 512)
    assert knn["seconds"] > 0 and knn["n_by_n_float32_mib"] == 2000 * 2000 * 4 / 2**20
    assert knn["embeddings_mib"] == 2000 * 768 * 4 / 2**20
    # 100 well-separated clusters of ~20 points: the exact 5 nearest neighbours share the row's cluster.
    assert knn["same_cluster_neighbour_fraction"] == 1.0
    (density,) = saved["density"]
    assert density["n"] == 2000 and density["max_steps"] == 20
    stages = density["fit_seconds"] + density["elbo_seconds"] + density["weights_seconds"]
    assert stages > 0 and math.isclose(density["seconds"], stages)
    for r in (knn, density):  # Linux: per-call peak RSS, measured from the call's start
        assert r["rss_growth_mib"] >= 0 and r["rss_peak_mib"] >= r["rss_start_mib"]
    table = (tmp_path / "bench_index.md").read_text()
    assert "| 2,000 x 768, 5 | cpu |" in table and "| 2,000 x 768 | cpu |" in table


def test_long_tailed_text_embeddings_counts():
    embeddings, counts = bench_index.long_tailed_text_embeddings(1000, 16, seed=0)
    assert embeddings.shape == (1000, 16)
    # 100 captions, each at least once; rows of one caption are identical and carry its count.
    distinct, inverse = torch.unique(embeddings, dim=0, return_inverse=True)
    assert len(distinct) == 100
    assert torch.equal(counts, torch.bincount(inverse)[inverse])


# ---- bench_real_size.py: the real trainer through accelerate launch, on the tiny model ----------------------


def check_real_size_summary(summary: dict, output_dir, names: list[str]) -> None:
    assert summary == json.loads((output_dir / "bench_real_size.json").read_text())
    assert list(summary["runs"]) == names
    assert summary["machine"]["cpu_count"] >= 1 and summary["machine"]["ram_gib"] > 0
    assert summary["git"]["commit"] and summary["resolution"] == 32
    for name, run in summary["runs"].items():
        assert run["passed"], (name, run.get("reason"))
        assert run["returncode"] == 0 and run["wall_s"] > 0 and run["peak_gib"] > 0
        if name != "resume":
            assert run["generate"]["passed"] and (output_dir / "runs" / f"{name}.json").is_file()
            assert len(run["step_times_s"]) == summary["steps"] and run["step_s"] > 0
            assert run["ratio_to_vanilla"] > 0
    table = (output_dir / "bench_real_size.md").read_text()
    assert all(f"| {name} |" in table for name in names) and "FAIL" not in table


@pytest.mark.long(seconds=98)
def test_bench_real_size_tiny(tmp_path, capsys):
    out, scratch = tmp_path / "results", tmp_path / "scratch"
    argv = ["--preset", "tiny", "--warmup", "1", "--steps", "1", "--inference_steps", "1",
            "--configs", "lora-vanilla,lora-pogdiff,resume", "--output_dir", str(out), "--scratch_dir", str(scratch)]  # fmt: skip
    summary = bench_real_size.main(argv)
    check_real_size_summary(summary, out, ["lora-vanilla", "lora-pogdiff", "resume"])
    # Stopped at its middle checkpoint and resumed: the same weights as the uninterrupted run.
    assert summary["runs"]["resume"]["weights"]["equal"] is True
    runs = summary["runs"]
    assert runs["lora-vanilla"]["ratio_to_vanilla"] == 1.0 and runs["lora-vanilla"]["frac_skipped"] is None
    # Every image has its own caption: no neighbour shares it, so no row skips the neighbour forward.
    assert runs["lora-pogdiff"]["frac_skipped"] == 0.0
    assert (scratch / "runs-tiny-32px" / "lora-pogdiff.png").is_file()
    # Resumable: a second invocation keeps the finished results and launches nothing.
    capsys.readouterr()
    again = bench_real_size.main(argv)
    assert "lora-pogdiff: result exists, skipped" in capsys.readouterr().out
    assert again["runs"] == summary["runs"]
    # --rerun trains again in the same scratch folder: only the new run's steps are read.
    rerun = bench_real_size.main([*argv[:-5], "lora-vanilla", *argv[-4:], "--rerun"])
    assert rerun["runs"]["lora-vanilla"]["passed"] and rerun["runs"]["lora-vanilla"]["steps_logged"] == 2


@pytest.mark.e2e
@pytest.mark.long(seconds=25)
def test_bench_real_size_tiny_sdxl(tmp_path):
    """The sdxl preset's path on the tiny SDXL: two text encoders and tokenizers, SDXL's scheduler config, the
    trainer's SDXL LoRA run and PoGDiffPipeline loading the result (one launch: PoGDiff, the costlier objective)."""
    out, scratch = tmp_path / "results", tmp_path / "scratch"
    summary = bench_real_size.main(
        ["--preset", "tiny-sdxl", "--warmup", "1", "--steps", "1", "--inference_steps", "1",
         "--configs", "lora-pogdiff", "--output_dir", str(out), "--scratch_dir", str(scratch)]
    )  # fmt: skip
    model = scratch / "model-tiny-sdxl"
    index = json.loads((model / "model_index.json").read_text())
    assert (
        index["_class_name"] == "StableDiffusionXLPipeline"
        and index["scheduler"][1] == "EulerDiscreteScheduler"
    )
    assert set(json.loads((model / "BUILT.json").read_text())["parameters"]) == {
        "unet", "vae", "text_encoder", "text_encoder_2"
    }  # fmt: skip
    run = summary["runs"]["lora-pogdiff"]
    assert run["passed"], run.get("reason")
    assert run["generate"]["passed"] and run["frac_skipped"] == 0.0 and len(run["step_times_s"]) == 1
    assert (scratch / "runs-tiny-sdxl-32px" / "lora-pogdiff.png").is_file()
    assert "train_pogdiff.py" in (out / "runs" / "lora-pogdiff.log").read_text()
    assert (out / "runs" / "lora-pogdiff-generate.log").is_file()
    assert "Not run: the tiny SDXL runs the LoRA group only" in (out / "bench_real_size.md").read_text()


def test_bench_real_size_sdxl_preset_runs_lora_only():
    """A full fine-tune of the SDXL UNet does not fit the machines the script is for: not in the default grid,
    and the summary says why."""
    args = bench_real_size.parse_args(["--preset", "sdxl", "--output_dir", "unused"])
    assert args.configs == ["lora-vanilla", "lora-pogdiff"] and args.resolution == 128
    assert "4 x 10.3 GB" in bench_real_size.PRESETS["sdxl"].not_run
    assert bench_real_size.parse_args(["--output_dir", "unused"]).configs == bench_real_size.CONFIG_NAMES


def test_bench_real_size_declares_every_configuration():
    """The full grid (run at real size, not in the suite: each configuration is one more trainer launch)."""
    configs = {c.name: c for c in bench_real_size.CONFIGS}
    assert set(bench_real_size.CONFIG_NAMES) == set(configs) | {bench_real_size.RESUME}
    assert configs["full-ema-pogdiff-ngrad"].label == "pogdiff --neighbor_grad"
    assert {c.group for c in configs.values()} == {"lora", "full", "full-ema"}


def test_real_size_step_times_skip_the_warmup():
    logs = {"train_loss": [(1, 10.0, 0.1), (2, 12.5, 0.1), (3, 13.0, 0.1), (4, 16.0, 0.1)]}
    assert bench_real_size.step_times(logs, warmup=1) == [2.5, 0.5, 3.0]
    assert bench_real_size.step_times(logs, warmup=2) == [0.5, 3.0]


def test_real_size_launch_is_stopped_when_memory_runs_short(tmp_path):
    """A run that would exhaust a shared machine's memory is stopped and recorded as a fail, with why."""
    result = bench_real_size.launch(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        tmp_path / "log.txt",
        timeout=120,
        min_available_gib=1e9,  # more than any machine has: stopped at the first check
        env=None,
    )
    assert result.returncode == -9 and result.wall_s < 30
    assert result.reason.startswith("stopped: the machine's available memory fell below")
