"""The real trainer at real model size: `accelerate launch train_pogdiff.py` on SD1.5- and SDXL-sized random-weight
models.

`bench_step.py` times the trainer's step body in one process; this script runs the whole trainer, one
configuration at a time, as a user would: model loading, the PoGDiff index build, gradient checkpointing, EMA,
LoRA, checkpointing, resume, saving, and loading the result with `PoGDiffPipeline`. What it finds at real size
that a million-parameter model hides is memory (peak RSS of the process tree) and the cost of PoGDiff's
neighbour forward where the step is compute-bound.

Per configuration it records: wall time, mean step time after warm-up (from the wall-clock stamps of the
trainer's own TensorBoard `train_loss` events), peak RSS of the launch's process tree, the share of rows whose
neighbour forward was skipped (the trainer's `frac_skipped` log), pass/fail and why, and one image generated
from the result with `PoGDiffPipeline` (few DDIM steps). `resume` stops a run at its middle checkpoint, resumes
it, and compares the final weights with the uninterrupted run of the same configuration.

    python benchmarks/bench_real_size.py --preset tiny --output_dir outputs/real-size-tiny
    nice -n 5 python benchmarks/bench_real_size.py --preset sd15 --resolution 128 --warmup 1 --steps 2 \
        --output_dir benchmarks/results/cpu-2core/real-size-sd15-128 > real-size.log 2>&1 &
    nice -n 5 python benchmarks/bench_real_size.py --preset sdxl --resolution 128 --warmup 1 --steps 2 \
        --output_dir benchmarks/results/cpu-2core/real-size-sdxl-128 > real-size-sdxl.log 2>&1 &

`sdxl` runs the LoRA configurations only (its default `--configs`): a full fine-tune of the 2.57 B-parameter UNet
needs its fp32 weights, gradients and AdamW's two moments, 4 x 10.3 GB, before activations.
`tiny-sdxl` is the tiny SDXL of `pogdiff.testing` (the test model), so the SDXL path runs in the suite.

The models (`--scratch_dir/model-<preset>`) are built once and reused. Each configuration's result is written
to `<output_dir>/runs/<name>.json` as soon as it finishes; a later invocation skips configurations that already
have one (`--rerun` redoes them), so an interrupted invocation can be continued. The summary
(`bench_real_size.json` / `.md`) is rebuilt from all run files at the end of every invocation.

The synthetic data gives every image its own caption ("An image of alice, photo 3."), so no neighbour shares
the sample's caption and every row needs the neighbour forward: PoGDiff's worst case, the one the ~1.33x bound
is about (`--captions identity` uses one caption per identity instead, where most rows skip it).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# Run as `python benchmarks/bench_real_size.py`, Python puts benchmarks/ (not the repository root) on sys.path.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

GIB = 2**30
PROMPT = "An image of chen."


@dataclass(frozen=True)
class Config:
    """One trainer run: its name in the results, the comparison group (ratios are taken within it), flags."""

    name: str
    group: str
    objective: str
    flags: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return self.objective + (" --neighbor_grad" if "--neighbor_grad" in self.flags else "")


def _group(group: str, flags: tuple[str, ...]) -> list[Config]:
    # Vanilla first in each group, then PoGDiff, then --neighbor_grad: runs of one group follow each other, so
    # the ratio compares runs minutes apart on the same (shared) machine.
    return [
        Config(f"{group}-vanilla", group, "vanilla", flags),
        Config(f"{group}-pogdiff", group, "pogdiff", flags),
        Config(f"{group}-pogdiff-ngrad", group, "pogdiff", (*flags, "--neighbor_grad")),
    ]


# Cheapest first, full fine-tune + EMA (the most RAM: weights, gradients, two Adam moments and the EMA copy,
# all fp32) last, so that a run that does not fit does not keep the others from finishing.
CONFIGS: list[Config] = [
    *_group("lora", ("--use_lora", "--rank", "16")),
    *_group("full", ()),
    *_group("full-ema", ("--use_ema",)),
]
# The resume check: the run named here, stopped at its middle checkpoint and resumed.
RESUME = "resume"
RESUME_OF = "lora-pogdiff"
# The resume right after the LoRA group (cheap, and before the runs that may not fit in RAM).
CONFIG_NAMES = [c.name for c in CONFIGS if c.group == "lora"] + [RESUME]
CONFIG_NAMES += [c.name for c in CONFIGS if c.group != "lora"]


@dataclass(frozen=True)
class Preset:
    resolution: int
    description: str
    timeout_s: float  # per trainer launch
    configs: tuple[str, ...] = tuple(CONFIG_NAMES)  # the default --configs
    not_run: str | None = None  # why the configurations left out of `configs` are not run (in the summary)


_SDXL_LORA_ONLY = (
    "full fine-tunes (full-*) not run: the fp32 SDXL UNet's weights, gradients and AdamW's two moments are "
    "4 x 10.3 GB = 41 GB before activations, more than this machine's 24 GiB (and full + EMA one more copy)"
)
PRESETS = {
    "tiny": Preset(32, "pogdiff.testing's tiny Stable Diffusion (the test model)", 300),
    "tiny-sdxl": Preset(
        32,
        "pogdiff.testing's tiny Stable Diffusion XL (the test model)",
        300,
        ("lora-vanilla", "lora-pogdiff"),
        "the tiny SDXL runs the LoRA group only (the suite's check of the SDXL path)",
    ),
    "sd15": Preset(
        256,
        "SD1.5-sized UNet (859.5M), VAE (83.7M), CLIP ViT-L/14 text encoder (123.1M), random weights",
        3 * 3600,
    ),
    "sdxl": Preset(
        128,
        "SDXL-base-1.0-sized UNet (2567.5M), VAE (83.7M), CLIP ViT-L/14 (123.1M) and OpenCLIP ViT-bigG/14 "
        "(694.7M) text encoders, random weights",
        3 * 3600,
        ("lora-vanilla", "lora-pogdiff"),
        _SDXL_LORA_ONLY,
    ),
}


# ----------------------------------------------------------------------------------------------------------
# Model and data


def build_model(preset: str, folder: Path) -> Path:
    """The preset's model in the diffusers layout at `folder`, built once (a marker file, BUILT.json, says done).

    A real-sized model is built in a child process, so that the GiB it held are surely back with the system
    before the first trainer launch (an SDXL build holds 14 GB of fp32 weights)."""
    marker = folder / "BUILT.json"
    if marker.is_file():
        return folder
    if preset.startswith("tiny"):
        _build(preset, folder)
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "_build", preset, str(folder)]
        subprocess.run(command, check=True, env=_env(), cwd=_ROOT)
    if not marker.is_file():
        raise RuntimeError(f"building the {preset} model at {folder} did not finish")
    return folder


def _offline_tokenizer(folder: str):
    """The tiny model's offline character-level CLIP tokenizer (no download); its ids are < 49408, so the
    real-sized embedding tables take them. Step time does not depend on which tokens they are."""
    from transformers import CLIPTokenizer

    from pogdiff.testing import write_tiny_clip_vocab

    write_tiny_clip_vocab(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 77
    return tokenizer


def sdxl_scheduler():
    """SDXL base 1.0's scheduler config: EulerDiscrete over SD's scaled-linear betas (the trainer reads it as its
    DDPM training schedule, PoGDiffXLPipeline converts it to DDIM)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def sdxl_components(tokenizer, seed: int = 0) -> dict:
    """SDXL-base-1.0-sized components with random weights (fp32, no download): keyword arguments of
    `StableDiffusionXLPipeline`, `tokenizer` as both tokenizers.

    The configs are SDXL base 1.0's: its UNet as diffusers converts Stability's `sd_xl_base.yaml`
    (model_channels 320 x channel_mult [1, 2, 4], transformer_depth [1, 2, 10], 64-channel heads, linear
    projections, context_dim 2048, adm_in_channels 2816 = 1280 pooled + 6 x 256 time ids); its VAE, SD's
    AutoencoderKL with scaling factor 0.13025 and `force_upcast`; CLIP ViT-L/14's text encoder and OpenCLIP
    ViT-bigG/14's text tower (width 1280, 32 layers, 20 heads, MLP 4 x 1280, GELU, 1280-wide projection); and
    its scheduler, EulerDiscrete over SD's scaled-linear betas. The text encoders get the tokenizer's bos / eos
    / pad ids (they pool at the eos token).
    """
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
            **special,
        )
    )
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
            **special,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024,
        scaling_factor=0.13025,
        force_upcast=True,
    )
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer,
        "scheduler": sdxl_scheduler(),
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _build(preset: str, folder: Path) -> None:
    """Build `preset`'s pipeline, save it at `folder` (safetensors, fp32) and write BUILT.json."""
    import tempfile

    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from pogdiff.testing import tiny_sd_components, tiny_sdxl_components

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pogdiff-tok-") as tok_dir:
        if preset == "tiny":
            pipe = StableDiffusionPipeline(**tiny_sd_components(seed=0, tokenizer_dir=tok_dir))
        elif preset == "tiny-sdxl":
            # With the real SDXL's scheduler config, so that the suite runs the sdxl preset's scheduler too.
            components = tiny_sdxl_components(seed=0, tokenizer_dir=tok_dir)
            pipe = StableDiffusionXLPipeline(**{**components, "scheduler": sdxl_scheduler()})
        elif preset == "sd15":
            from benchmarks.bench_step import sd15_components

            tokenizer = _offline_tokenizer(tok_dir)
            pipe = StableDiffusionPipeline(
                **sd15_components(seed=0, special_token_ids=tokenizer),
                tokenizer=tokenizer,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        elif preset == "sdxl":
            pipe = StableDiffusionXLPipeline(**sdxl_components(_offline_tokenizer(tok_dir), seed=0))
        else:
            raise ValueError(f"unknown preset {preset!r}")
        counts = {
            name: sum(p.numel() for p in module.parameters())
            for name, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)
        }
        pipe.save_pretrained(folder, safe_serialization=True)
    (folder / "BUILT.json").write_text(
        json.dumps(
            {
                "preset": preset,
                "parameters": counts,
                "dtype": "float32",
                "build_s": time.perf_counter() - start,
            },
            indent=2,
        )
    )


def build_data(folder: Path, resolution: int, captions: str) -> Path:
    """pogdiff.testing's imbalanced imagefolder (2 majority identities x 6 images, 2 minority x 2) at
    `resolution`; with `captions="unique"` each image gets its own caption."""
    from pogdiff.testing import write_tiny_dataset

    if (folder / "metadata.jsonl").is_file():
        return folder
    write_tiny_dataset(folder, resolution=resolution)
    if captions == "unique":
        meta = folder / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        for row in rows:
            number = int(Path(row["file_name"]).stem.rsplit("_", 1)[1])
            row["text"] = f"An image of {row['identity']}, photo {number}."
        meta.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


# ----------------------------------------------------------------------------------------------------------
# Running a launch and measuring it


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return None


def _tree_usage(root: int) -> tuple[int, float]:
    """Summed RSS (bytes) and CPU time (user + system, s) of `root` and its live descendants, from /proc."""
    children: dict[int, list[int]] = {}
    usage: dict[int, tuple[int, float]] = {}
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # After the command name: state, ppid, ..., utime (11), stime (12), ..., rss in pages (21).
        pid, ppid = int(entry), int(fields[1])
        children.setdefault(ppid, []).append(pid)
        usage[pid] = (int(fields[21]) * page, (int(fields[11]) + int(fields[12])) / tick)
    rss, cpu, todo = 0, 0.0, [root]
    while todo:
        pid = todo.pop()
        rss += usage.get(pid, (0, 0.0))[0]
        cpu += usage.get(pid, (0, 0.0))[1]
        todo.extend(children.get(pid, []))
    return rss, cpu


@dataclass
class Launch:
    returncode: int | None
    wall_s: float
    peak_tree_rss_bytes: int  # sampled sum over the process tree
    peak_process_rss_bytes: int  # the kernel's high-water mark of the largest process of the tree
    reason: str | None
    # (time.time(), CPU seconds of the tree so far), every 0.5 s: CPU time per step is what a shared machine's
    # other jobs disturb least (waiting for a core counts in wall time, not in CPU time).
    cpu_samples: list[tuple[float, float]]


def launch(command: list[str], log_path: Path, timeout: float, min_available_gib: float, env: dict) -> Launch:
    """Run `command` in its own session with output to `log_path`; sample its tree's RSS every 0.5 s.

    Stopped (the whole process group) when it runs past `timeout` or when the machine's available memory falls
    below `min_available_gib`: on a machine shared with other people's jobs, a run that does not fit is
    recorded as such instead of letting the kernel's OOM killer choose among everyone's processes.
    """
    start = time.perf_counter()
    peak_tree, reason, cpu_samples = 0, None, []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + shlex.join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=_ROOT
        )
        status, usage = None, None
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                rss, cpu = _tree_usage(process.pid)
                peak_tree = max(peak_tree, rss)
                cpu_samples.append((time.time(), cpu))
                available = _mem_available_bytes()
                if available is not None and available < min_available_gib * GIB:
                    reason = (
                        f"stopped: the machine's available memory fell below {min_available_gib} GiB "
                        f"(tree RSS then {peak_tree / GIB:.1f} GiB): needs more RAM than was free"
                    )
                elif time.perf_counter() - start > timeout:
                    reason = f"stopped: ran past the {timeout:.0f} s timeout"
                if reason:
                    os.killpg(process.pid, signal.SIGKILL)
                    _, status, usage = os.wait4(process.pid, 0)
                    break
                time.sleep(0.5)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
    returncode = os.waitstatus_to_exitcode(status)
    if reason is None and returncode != 0:
        reason = f"exit code {returncode}" + (
            " (killed by SIGKILL: out of memory?)" if returncode == -9 else ""
        )
    # ru_maxrss (KiB on Linux) of the waited-for launcher covers its waited-for children: the trainer's peak.
    peak_process = usage.ru_maxrss * 1024
    return Launch(returncode, time.perf_counter() - start, peak_tree, peak_process, reason, cpu_samples)


def trainer_logs(output_dir: Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar the trainer logged to TensorBoard: tag -> [(step, wall time, value)] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs: dict[str, list[tuple[int, float, float]]] = {}
    for path in sorted((output_dir / "logs").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            logs.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in events.Scalars(tag))
    return {tag: sorted(values) for tag, values in logs.items()}


def step_times(logs: dict, warmup: int) -> list[float]:
    """Seconds of each step after the first `warmup`: the trainer logs `train_loss` once per optimizer step,
    after the step, so consecutive stamps bound one step (data loading, forwards, backward, optimizer, EMA)."""
    stamps = [wall for _, wall, _ in logs.get("train_loss", [])]
    return [b - a for a, b in zip(stamps[max(warmup, 1) - 1 :], stamps[max(warmup, 1) :])]


def step_cpu_times(logs: dict, warmup: int, cpu_samples: list[tuple[float, float]]) -> list[float]:
    """CPU seconds of the process tree during each step after the first `warmup` (the steps of `step_times`),
    interpolated from the 0.5 s samples at the trainer's `train_loss` stamps."""
    if len(cpu_samples) < 2:
        return []
    times, cpus = zip(*cpu_samples)

    def cpu_at(t: float) -> float:
        i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
        t0, t1, c0, c1 = times[i - 1], times[i], cpus[i - 1], cpus[i]
        return c0 + (c1 - c0) * (min(max(t, t0), t1) - t0) / max(t1 - t0, 1e-9)

    stamps = [wall for _, wall, _ in logs.get("train_loss", [])]
    first = max(warmup, 1)
    return [cpu_at(b) - cpu_at(a) for a, b in zip(stamps[first - 1 :], stamps[first:])]


def trained_weights(output_dir: Path) -> Path | None:
    for rel in ("pytorch_lora_weights.safetensors", "unet/diffusion_pytorch_model.safetensors"):
        if (output_dir / rel).is_file():
            return output_dir / rel
    return None


def compare_weights(a: Path, b: Path) -> dict:
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    if ta.keys() != tb.keys():
        return {"equal": False, "reason": "different tensor names"}
    max_diff = max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)
    different = sum(not bool((ta[k] == tb[k]).all()) for k in ta)
    return {
        "equal": different == 0,
        "tensors": len(ta),
        "tensors_different": different,
        "max_abs_diff": max_diff,
    }


# ----------------------------------------------------------------------------------------------------------
# One configuration


def trainer_command(
    args: argparse.Namespace, config: Config, model: Path, data: Path, out: Path, steps: int, extra=()
) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
        "--mixed_precision", args.mixed_precision, "--dynamo_backend", "no", "--cpu",
        str(_ROOT / "train_pogdiff.py"),
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--resolution", str(args.resolution),
        "--center_crop",
        "--train_batch_size", "1",
        "--gradient_checkpointing",
        "--max_train_steps", str(steps),
        "--learning_rate", "1e-5",
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--seed", "0",
        "--objective", config.objective,
        "--neighbor_encoder", args.neighbor_encoder,
        "--num_neighbors", "3",
        "--checkpointing_steps", "100000",
        "--dataloader_num_workers", "0",
        *config.flags,
        *extra,
    ]  # fmt: skip


def generate_command(result_dir: Path, image: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, str(Path(__file__).resolve()), "_generate", str(result_dir), str(image),
        "--resolution", str(args.resolution), "--inference_steps", str(args.inference_steps),
    ]  # fmt: skip


def _env() -> dict:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH")) if p),
    }


def run_training(
    args, config: Config, model: Path, data: Path, out: Path, steps: int, extra=(), fresh: bool = True
) -> dict:
    if fresh:
        # A new run starts from an empty folder: TensorBoard events (and checkpoints) left there by an earlier
        # invocation would otherwise be read as this run's steps.
        shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    command = trainer_command(args, config, model, data, out, steps, extra)
    result = launch(command, out.parent / f"{out.name}.log", args.timeout_s, args.min_available_gib, _env())
    record = {
        "command": shlex.join(command),
        "returncode": result.returncode,
        "wall_s": result.wall_s,
        "peak_tree_rss_gib": result.peak_tree_rss_bytes / GIB,
        "peak_process_rss_gib": result.peak_process_rss_bytes / GIB,
        "peak_gib": max(result.peak_tree_rss_bytes, result.peak_process_rss_bytes) / GIB,
        "reason": result.reason,
    }
    logs = trainer_logs(out) if (out / "logs").is_dir() else {}
    times = step_times(logs, args.warmup)
    record["steps_logged"] = len(logs.get("train_loss", []))
    record["step_times_s"] = times
    record["step_s"] = statistics.fmean(times) if times else None
    cpu_times = step_cpu_times(logs, args.warmup, result.cpu_samples)
    record["step_cpu_times_s"] = cpu_times
    record["step_cpu_s"] = statistics.fmean(cpu_times) if cpu_times else None
    skipped = [v for _, _, v in logs.get("frac_skipped", [])]
    record["frac_skipped"] = statistics.fmean(skipped) if skipped else None
    record["train_loss"] = [v for _, _, v in logs.get("train_loss", [])]
    if result.returncode == 0 and record["steps_logged"] != steps:
        record["reason"] = f"{record['steps_logged']} steps logged, {steps} expected"
    record["passed"] = result.returncode == 0 and record["reason"] is None
    return record


def run_generation(args, result_dir: Path) -> dict:
    image = result_dir.parent / f"{result_dir.name}.png"
    command = generate_command(result_dir, image, args)
    result = launch(command, result_dir.parent / f"{result_dir.name}-generate.log", args.timeout_s,
                    args.min_available_gib, _env())  # fmt: skip
    return {
        "command": shlex.join(command),
        "passed": result.returncode == 0 and image.is_file(),
        "wall_s": result.wall_s,
        "peak_gib": max(result.peak_tree_rss_bytes, result.peak_process_rss_bytes) / GIB,
        "reason": result.reason,
    }


def run_config(args, config: Config, model: Path, data: Path, runs: Path) -> dict:
    steps = args.warmup + args.steps
    print(f"[{time.strftime('%H:%M:%S')}] {config.name}: training ({steps} steps) ...", flush=True)
    out = runs / config.name
    record = {"name": config.name, "group": config.group, "objective": config.label}
    record.update(run_training(args, config, model, data, out, steps))
    if record["passed"]:
        print(f"[{time.strftime('%H:%M:%S')}] {config.name}: generating one image ...", flush=True)
        record["generate"] = run_generation(args, out)
        record["passed"] = record["generate"]["passed"]
        if not record["passed"]:
            record["reason"] = "generation failed: " + str(record["generate"]["reason"])
    if not args.keep_outputs:
        _remove_large_files(out)
    return record


def run_resume(args, model: Path, data: Path, runs: Path) -> dict:
    """`RESUME_OF` run to its middle checkpoint, then resumed to the end; final weights vs the uninterrupted run."""
    config = next(c for c in CONFIGS if c.name == RESUME_OF)
    steps = args.warmup + args.steps
    middle = max(steps // 2, 1)
    out = runs / RESUME
    record = {"name": RESUME, "group": config.group, "objective": config.label, "resume_of": RESUME_OF}
    print(f"[{time.strftime('%H:%M:%S')}] {RESUME}: {RESUME_OF} to step {middle} ...", flush=True)
    first = run_training(args, config, model, data, out, middle, ("--checkpointing_steps", str(middle)))
    record["first_part"] = first
    if first["passed"]:
        print(f"[{time.strftime('%H:%M:%S')}] {RESUME}: resumed to step {steps} ...", flush=True)
        extra = ("--checkpointing_steps", str(middle), "--resume_from_checkpoint", "latest")
        second = run_training(args, config, model, data, out, steps, extra, fresh=False)
        # The resumed run's TensorBoard folder also holds the first part's events: steps 1..steps in all.
        record.update({k: second[k] for k in ("command", "returncode", "wall_s", "peak_gib", "reason")})
        record["passed"] = second["passed"]
        reference = trained_weights(runs / RESUME_OF)
        mine = trained_weights(out)
        if reference is None or mine is None:
            record["weights"] = {"equal": None, "reason": f"{RESUME_OF}'s weights are missing (run it first)"}
        else:
            record["weights"] = compare_weights(mine, reference)
        if record["passed"] and record["weights"]["equal"] is not True:
            record["passed"] = False
            record["reason"] = "resumed weights differ from the uninterrupted run's: " + json.dumps(
                record["weights"]
            )
    else:
        record.update({k: first[k] for k in ("returncode", "wall_s", "peak_gib", "reason")})
        record["passed"] = False
    if not args.keep_outputs:
        _remove_large_files(out)
    return record


def _remove_large_files(out: Path) -> None:
    """A full SD1.5 result is 4 GiB (8 more with a checkpoint's optimizer state); keep only the small files.

    The trained weights of `RESUME_OF` stay until the resume check has read them."""
    for path in sorted(out.rglob("*"), reverse=True):
        if (
            path.is_file()
            and path.stat().st_size > 64 * 2**20
            and not (out.name == RESUME_OF and path.name == "pytorch_lora_weights.safetensors")
        ):
            path.unlink()


# ----------------------------------------------------------------------------------------------------------
# Summary


def machine_info() -> dict:
    import platform

    import diffusers
    import torch
    import transformers

    cpu = platform.machine()
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    ram = None
    with contextlib.suppress(OSError, StopIteration), open("/proc/meminfo", encoding="utf-8") as f:
        ram = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal")) / GIB
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "ram_gib": ram,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def git_commit() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=_ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def add_ratios(runs: dict[str, dict]) -> None:
    """ratio_to_vanilla (wall) and cpu_ratio_to_vanilla: a run's mean step time over the vanilla run's of the
    same group."""
    for record in runs.values():
        vanilla = runs.get(f"{record['group']}-vanilla")
        for key, ratio in (("step_s", "ratio_to_vanilla"), ("step_cpu_s", "cpu_ratio_to_vanilla")):
            if record["name"] != RESUME and vanilla and vanilla.get(key) and record.get(key):
                record[ratio] = record[key] / vanilla[key]
            else:
                record[ratio] = None


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_report(summary: dict) -> str:
    m = summary["machine"]
    precision = summary.get("mixed_precision", "no")
    precision = "fp32" if precision == "no" else f"{precision} mixed precision"
    lines = [
        f"Preset `{summary['preset']}` ({summary['description']}), {summary['resolution']} px, batch 1, "
        f"`--gradient_checkpointing`, {precision}, {summary['warmup']} warm-up + {summary['steps']} measured steps per "
        f"run; {m['cpu']}, {m['cpu_count']} cores, {_fmt(m['ram_gib'], '.0f')} GiB RAM; commit "
        f"{str(summary['git']['commit'])[:10]}.",
        "",
        "| configuration | objective | step s (wall) | ratio to vanilla | step CPU s | CPU ratio | rows skipped "
        "| peak GiB | wall s | pass |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in CONFIG_NAMES:
        r = summary["runs"].get(name)
        if r is None:
            continue
        status = "pass" if r["passed"] else f"FAIL: {r.get('reason')}"
        if name == RESUME and "weights" in r:
            status += f" (weights equal to {RESUME_OF}'s: {r['weights'].get('equal')})"
        lines.append(
            f"| {name} | {r['objective']} | {_fmt(r.get('step_s'), '.2f')} | "
            f"{_fmt(r.get('ratio_to_vanilla'), '.3f')} | {_fmt(r.get('step_cpu_s'), '.2f')} | "
            f"{_fmt(r.get('cpu_ratio_to_vanilla'), '.3f')} | {_fmt(r.get('frac_skipped'), '.2f')} | "
            f"{_fmt(r.get('peak_gib'), '.1f')} | {_fmt(r.get('wall_s'), '.0f')} | {status} |"
        )
    if summary.get("not_run"):
        lines += ["", f"Not run: {summary['not_run']}."]
    return "\n".join(lines) + "\n"


def summarize(args, runs_dir: Path, model_info: dict) -> dict:
    runs = {}
    for name in CONFIG_NAMES:
        path = runs_dir / f"{name}.json"
        if path.is_file():
            runs[name] = json.loads(path.read_text())
    add_ratios(runs)
    return {
        "preset": args.preset,
        "description": PRESETS[args.preset].description,
        "resolution": args.resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "captions": args.captions,
        "neighbor_encoder": args.neighbor_encoder,
        "mixed_precision": args.mixed_precision,
        "not_run": PRESETS[args.preset].not_run,
        "model": model_info,
        "machine": machine_info(),
        "git": git_commit(),
        "command": "python benchmarks/bench_real_size.py " + shlex.join(args.argv),
        "runs": runs,
    }


# ----------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="tiny")
    parser.add_argument("--resolution", type=int, default=None, help="Pixels (default: the preset's).")
    parser.add_argument("--steps", type=int, default=3, help="Measured steps per run, after --warmup.")
    parser.add_argument("--warmup", type=int, default=1, help="Steps not timed at the start of each run.")
    parser.add_argument(
        "--configs",
        default=None,
        help=f"Comma-separated subset, run in the order given: {', '.join(CONFIG_NAMES)} (default: the "
        "preset's: all of them, the LoRA group for sdxl and tiny-sdxl).",
    )
    parser.add_argument(
        "--mixed_precision",
        choices=["no", "bf16"],
        default="no",
        help="The trainer's --mixed_precision (bf16 casts the frozen weights; CPUs without bf16 units run slower).",
    )
    parser.add_argument("--captions", choices=["unique", "identity"], default="unique")
    parser.add_argument(
        "--neighbor_encoder",
        default="vae",
        help="The trainer's --neighbor_encoder ('vae' needs no download).",
    )
    parser.add_argument("--inference_steps", type=int, default=2, help="DDIM steps of the generated image.")
    parser.add_argument("--output_dir", required=True, help="runs/<config>.json, bench_real_size.json / .md.")
    parser.add_argument(
        "--scratch_dir",
        default="outputs/bench_real_size",
        help="Models (built once, reused), data and the trainer's output folders.",
    )
    parser.add_argument("--rerun", action="store_true", help="Redo configurations that have a result file.")
    parser.add_argument(
        "--keep_outputs", action="store_true", help="Keep the trained weights (GiB at SD1.5)."
    )
    parser.add_argument("--timeout_s", type=float, default=None, help="Per launch (default: the preset's).")
    parser.add_argument(
        "--min_available_gib",
        type=float,
        default=1.0,
        help="Stop a run (recorded as a fail) when the machine's available memory falls below this.",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.resolution = args.resolution or PRESETS[args.preset].resolution
    args.timeout_s = args.timeout_s or PRESETS[args.preset].timeout_s
    if args.configs is None:
        args.configs = ",".join(PRESETS[args.preset].configs)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = sorted(set(args.configs) - set(CONFIG_NAMES))
    if unknown:
        parser.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIG_NAMES)}")
    if RESUME in args.configs and RESUME_OF not in args.configs:
        # The resume is compared with the uninterrupted run; it must exist (now or from an earlier invocation).
        args.configs.insert(args.configs.index(RESUME), RESUME_OF)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    runs_dir = output_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(args.scratch_dir)
    print(f"[{time.strftime('%H:%M:%S')}] model ({args.preset}) ...", flush=True)
    model = build_model(args.preset, scratch / f"model-{args.preset}")
    model_info = json.loads((model / "BUILT.json").read_text())
    data = build_data(scratch / f"data-{args.resolution}px-{args.captions}", args.resolution, args.captions)
    train_dir = scratch / f"runs-{args.preset}-{args.resolution}px"
    configs = {c.name: c for c in CONFIGS}
    for name in args.configs:
        path = runs_dir / f"{name}.json"
        if path.is_file() and not args.rerun:
            print(f"[{time.strftime('%H:%M:%S')}] {name}: result exists, skipped", flush=True)
            continue
        if name == RESUME:
            record = run_resume(args, model, data, train_dir)
        else:
            record = run_config(args, configs[name], model, data, train_dir)
        # The launch logs, next to the record: the scratch folder's are overwritten by the next invocation that
        # runs the same configuration at the same size, whatever its --output_dir.
        for suffix in (".log", "-generate.log"):
            if (train_dir / f"{name}{suffix}").is_file():
                shutil.copyfile(train_dir / f"{name}{suffix}", runs_dir / f"{name}{suffix}")
        record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        record["load_average"] = list(os.getloadavg())
        record["git"] = git_commit()
        path.write_text(json.dumps(record, indent=2))
        print(
            f"[{time.strftime('%H:%M:%S')}] {name}: {'pass' if record['passed'] else 'FAIL'}, step "
            f"{_fmt(record.get('step_s'), '.2f')} s, peak {_fmt(record.get('peak_gib'), '.1f')} GiB, wall "
            f"{_fmt(record.get('wall_s'), '.0f')} s"
            + ("" if record["passed"] else f": {record.get('reason')}"),
            flush=True,
        )
    summary = summarize(args, runs_dir, model_info)
    report = markdown_report(summary)
    (output_dir / "bench_real_size.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "bench_real_size.md").write_text(report)
    print(report)
    return summary


def generate(argv: list[str]) -> None:
    """`_generate RESULT_DIR IMAGE`: load a trainer result with PoGDiffPipeline and save one image."""
    parser = argparse.ArgumentParser()
    parser.add_argument("result_dir")
    parser.add_argument("image")
    parser.add_argument("--resolution", type=int, required=True)
    parser.add_argument("--inference_steps", type=int, required=True)
    args = parser.parse_args(argv)
    import numpy as np
    import torch
    from PIL import Image

    from pipeline_pogdiff import PoGDiffPipeline

    pipe = PoGDiffPipeline.from_pretrained(args.result_dir)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        PROMPT,
        height=args.resolution,
        width=args.resolution,
        num_inference_steps=args.inference_steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    if not np.isfinite(images).all():
        sys.exit("the generated image is not finite")
    Image.fromarray((images[0] * 255).round().astype("uint8")).save(args.image)


if __name__ == "__main__":
    if sys.argv[1:2] == ["_generate"]:
        generate(sys.argv[2:])
    elif sys.argv[1:2] == ["_build"]:
        _build(sys.argv[2], Path(sys.argv[3]))
    else:
        main()
