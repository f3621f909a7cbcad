"""Sharded engines: the rank-consistency rule of PoGDiff's neighbour forward, and FSDP2 runs of the real trainer.

Under FSDP or DeepSpeed ZeRO-3 every forward all-gathers the parameters, so every rank must run the same number
of forwards; PoGDiff skips its no-grad neighbour forward per rank when no row of that rank needs it. The unit
tests pin the rule (`objective_loss(any_rank=...)`); the end-to-end tests run `train_pogdiff.py` under
`accelerate launch` with `examples/accelerate/fsdp.yaml` on 2 CPU processes (gloo), through
`tests/fsdp_on_cpu.py` (accelerate drops FSDP on CPU-only machines; the shim keeps it), on the tiny data set,
where with seed 0 and 2 rows per rank rank 0 has nothing to compute in steps 3 and 4 while rank 1 has.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import train_args, training_logs, unet_state

from pogdiff.objectives import NeighborDraw
from pogdiff.testing import run_process_group, tiny_sd_components
from pogdiff.training import objective_loss

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
BATCH = 4


@pytest.fixture(scope="module")
def tiny_unet():
    return tiny_sd_components(seed=0)["unet"]


class CountingUNet(torch.nn.Module):
    """A UNet, counting its forwards and the rows of each."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet
        self.rows: list[int] = []

    def forward(self, x, t, c, return_dict=False):
        self.rows.append(len(x))
        return self.unet(x, t, c, return_dict=return_dict)


def pogdiff_loss_with(unet, needs: list[bool], any_rank):
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn((BATCH, 4, 16, 16), generator=g), torch.randn((BATCH, 4, 16, 16), generator=g)
    c = torch.randn((BATCH, 8, 32), generator=g)
    needs_forward = torch.tensor(needs)
    psi = torch.where(needs_forward, 0.5, 0.0)
    draw = NeighborDraw(rows=torch.arange(BATCH), psi=psi, psi_drawn=psi, needs_forward=needs_forward)
    neighbor_states = torch.randn((int(needs_forward.sum()), 8, 32), generator=g)
    return objective_loss(
        "pogdiff", unet, x, torch.tensor([10, 400, 650, 999]), target, c,
        neighbor_hidden_states=neighbor_states if any(needs) else None, draw=draw, any_rank=any_rank,
    )  # fmt: skip


def test_a_rank_with_nothing_to_compute_joins_the_neighbour_forward_when_another_rank_needs_it(tiny_unet):
    unet = CountingUNet(tiny_unet)
    asked = []
    skipped_loss, _ = pogdiff_loss_with(unet, [False] * BATCH, any_rank=None)
    assert unet.rows == [BATCH]  # DDP / one process: the per-rank skip, one forward

    unet.rows.clear()
    loss, logs = pogdiff_loss_with(
        unet, [False] * BATCH, any_rank=lambda needed: asked.append(needed) or True
    )
    # One padded no-grad forward of one row, then the forward with grad; the loss is the skipped one, bitwise.
    assert asked == [False] and unet.rows == [1, BATCH]
    assert torch.equal(loss, skipped_loss)
    assert logs["neighbor_forward_padded"] == 1.0 and logs["loss_consistency"] == 0.0


def test_no_rank_needing_the_neighbour_forward_skips_it_everywhere(tiny_unet):
    unet = CountingUNet(tiny_unet)
    loss, logs = pogdiff_loss_with(unet, [False] * BATCH, any_rank=lambda needed: False)
    assert unet.rows == [BATCH] and logs["neighbor_forward_padded"] == 0.0


def test_a_rank_that_needs_the_neighbour_forward_runs_it_once_and_takes_part_in_the_vote(tiny_unet):
    unet = CountingUNet(tiny_unet)
    asked = []
    reference, _ = pogdiff_loss_with(CountingUNet(tiny_unet), [True, False, False, True], any_rank=None)
    loss, logs = pogdiff_loss_with(
        unet, [True, False, False, True], any_rank=lambda needed: asked.append(needed) or True
    )
    assert asked == [True] and unet.rows == [2, BATCH]
    assert torch.equal(loss, reference)
    assert logs["neighbor_forward_padded"] == 0.0 and logs["loss_consistency"] > 0


@pytest.mark.parametrize("objective", ["vanilla", "cbdm"])
def test_objectives_with_one_forward_never_ask(objective, tiny_unet):
    """Every other objective runs exactly one forward on every rank (CBDM's is enlarged), so no vote."""
    unet = CountingUNet(tiny_unet)
    g = torch.Generator().manual_seed(0)
    x = torch.randn((BATCH, 4, 16, 16), generator=g)
    c = torch.randn((BATCH, 8, 32), generator=g)

    def never(needed):
        raise AssertionError("asked")

    objective_loss(
        objective, unet, x, torch.tensor([10, 400, 650, 999]), x, c, neighbor_hidden_states=c, any_rank=never
    )
    assert len(unet.rows) == 1


def fsdp_launch(model: str, data: str, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(REPO / "examples" / "accelerate" / "fsdp.yaml"),
        "--num_processes", "2", "--mixed_precision", "no",
        str(REPO / "tests" / "fsdp_on_cpu.py"), str(REPO / "train_pogdiff.py"),
        *train_args(model, data, out, "--train_batch_size", "2", "--checkpointing_steps", "2", *extra, steps=steps),
    ]  # fmt: skip


def ddp_launch(model: str, data: str, out: Path, *extra: str, steps: int = 4) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(REPO / "train_pogdiff.py"),
        *train_args(model, data, out, "--train_batch_size", "2", "--checkpointing_steps", "2", *extra, steps=steps),
    ]  # fmt: skip


def run(command: list[str]):
    proc = run_process_group(command, cwd=REPO, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.e2e
@pytest.mark.multi_process
@pytest.mark.long(seconds=200)
def test_fsdp_pogdiff_with_a_skip_mismatch_trains_checkpoints_resumes_and_equals_ddp(
    tiny_sd_path, tiny_dataset_path, tmp_path
):
    # A large Adam epsilon for the engine comparison only: biases feeding a GroupNorm have an exactly-zero true
    # gradient, and Adam divides their rounding noise (which FSDP's reduce-scatter and DDP's all-reduce round
    # differently) by its own square root, turning 1e-9 into a full lr-sized step of either sign.
    extra = ("--adam_epsilon", "1e-3", "--validation_prompts", "An image of chen.",
             "--num_validation_inference_steps", "2", "--validation_steps", "2")  # fmt: skip
    fsdp = tmp_path / "fsdp"
    proc = run(fsdp_launch(tiny_sd_path, tiny_dataset_path, fsdp, *extra))
    assert "Distributed environment: DistributedType.FSDP" in proc.stderr
    logs = training_logs(fsdp)
    # The forced mismatch happened: rank 0 (whose logs these are) had no row to compute while rank 1 had.
    assert logs["neighbor_forward_padded"][2:] == [1.0, 1.0] and logs["frac_skipped"][2:] == [1.0, 1.0]
    assert (fsdp / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # sharded checkpoint: every rank's part
    assert (fsdp / "model_index.json").is_file() and (fsdp / "val_imgs_grid.png").is_file()
    assert sorted(p.name for p in (fsdp / "validation").iterdir())  # the mid-run validation at step 2 ran

    ddp = tmp_path / "ddp"
    run(ddp_launch(tiny_sd_path, tiny_dataset_path, ddp, *extra))
    torch.testing.assert_close(logs["train_loss"], training_logs(ddp)["train_loss"], rtol=1e-5, atol=0)
    fsdp_unet, ddp_unet, base = unet_state(fsdp), unet_state(ddp), unet_state(Path(tiny_sd_path))
    moved = max((ddp_unet[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # training moved the weights ...
    for key in base:  # ... and both engines moved them alike
        torch.testing.assert_close(fsdp_unet[key], ddp_unet[key], rtol=0, atol=1e-5)

    # Resume from the sharded checkpoint-2: bitwise the uninterrupted run.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(fsdp / "checkpoint-2", resumed / "checkpoint-2")
    run(fsdp_launch(tiny_sd_path, tiny_dataset_path, resumed, *extra, "--resume_from_checkpoint", "latest"))
    resumed_unet = unet_state(resumed)
    assert all(torch.equal(resumed_unet[k], fsdp_unet[k]) for k in fsdp_unet)


@pytest.mark.e2e
@pytest.mark.parametrize(
    "extra", [("--objective", "cbdm"), ("--neighbor_grad",)], ids=["cbdm", "neighbor_grad"]
)
@pytest.mark.multi_process
def test_fsdp_objectives_with_enlarged_batches_train(extra, tiny_sd_path, tiny_dataset_path, tmp_path):
    """CBDM's and --neighbor_grad's one forward has a batch that may differ per rank: FSDP allows that."""
    out = tmp_path / "out"
    run(fsdp_launch(tiny_sd_path, tiny_dataset_path, out, *extra, steps=2))
    trained, base = unet_state(out), unet_state(Path(tiny_sd_path))
    assert all(torch.isfinite(v).all() for v in trained.values())
    assert any(not torch.equal(trained[k], base[k]) for k in base)


@pytest.mark.e2e
@pytest.mark.multi_process
def test_fsdp_lora_equals_ddp_lora(tiny_sd_path, tiny_dataset_path, tmp_path):
    lora = ("--use_lora", "--rank", "4")
    run(fsdp_launch(tiny_sd_path, tiny_dataset_path, tmp_path / "fsdp", *lora))
    run(ddp_launch(tiny_sd_path, tiny_dataset_path, tmp_path / "ddp", *lora))
    fsdp = load_file(tmp_path / "fsdp" / "pytorch_lora_weights.safetensors")
    ddp = load_file(tmp_path / "ddp" / "pytorch_lora_weights.safetensors")
    assert fsdp.keys() == ddp.keys() and any("lora" in k for k in fsdp)
    assert any(v.abs().max() > 0 for k, v in ddp.items() if "lora_B" in k or "lora.up" in k)
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=0, atol=1e-5)


@pytest.mark.e2e
@pytest.mark.multi_process
def test_fsdp_refuses_ema_in_one_line(tiny_sd_path, tiny_dataset_path, tmp_path):
    proc = run_process_group(
        fsdp_launch(tiny_sd_path, tiny_dataset_path, tmp_path / "out", "--use_ema"),
        cwd=REPO,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "error: --use_ema does not work under FSDP" in proc.stderr
    assert not (tmp_path / "out" / "checkpoint-2").exists()


@pytest.mark.parametrize(
    "name, engine",
    [
        ("ddp", "MULTI_GPU"),
        ("multi_node", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("zero2", "DEEPSPEED"),
        ("zero3", "DEEPSPEED"),
    ],
)
def test_example_accelerate_configs_are_valid(name, engine):
    """accelerate's own loader reads each shipped config (unknown keys or bad values fail here)."""
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == engine
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "zero3":
        # full_model gathers the final weights through accelerate's get_state_dict, which needs this under ZeRO-3.
        assert (
            config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]
        )


def test_checkpoints_are_saved_by_every_rank(tmp_path):
    """DeepSpeed and FSDP write each rank's part in save_state: a non-main rank must call it too."""
    from pogdiff.checkpointing import save_checkpoint

    class Rank1:
        is_main_process = False

        def __init__(self):
            self.saved = []

        def wait_for_everyone(self):
            pass

        def save_state(self, folder):
            self.saved.append(folder)

    accelerator = Rank1()
    save_checkpoint(accelerator, str(tmp_path), 3, {}, None)
    assert [Path(p).name for p in accelerator.saved] == [".tmp-checkpoint-3"]
