"""`objective_loss` on the tiny UNet: the PoGDiff skip path is exact, psi = 0 is vanilla, CBDM's doubled batch.

The skip path drops the neighbour forward for rows with psi == 0 (e.g. a dropped caption) and for rows whose
neighbour has the sample's own caption. Both must change nothing: the loss and every parameter gradient equal
those of the unskipped computation, where the neighbour forward runs on all rows and a same-caption neighbour's
hidden states are the sample's own.
"""

import math

import pytest
import torch

from pogdiff.index import PoGDiffIndex
from pogdiff.objectives import NeighborDraw, StepMeans, cbdm_loss, draw_pogdiff_neighbors, pogdiff_draw_logs
from pogdiff.psi import PsiParams
from pogdiff.testing import tiny_sd_components
from pogdiff.training import GraphedNeighborForward, make_neighbor_forward, objective_loss

BATCH, TOKENS, WIDTH = 4, 8, 32  # tiny UNet: 16x16x4 latents, cross-attention width 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNet's ops gain nothing from threads; on a busy machine OpenMP waits made these tests 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def unet():
    return tiny_sd_components(seed=0)["unet"].train()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return {
        "noisy_latents": torch.randn((BATCH, 4, 16, 16), generator=g),
        "timesteps": torch.tensor([10, 400, 650, 999]),
        "target": torch.randn((BATCH, 4, 16, 16), generator=g),
        "encoder_hidden_states": torch.randn((BATCH, TOKENS, WIDTH), generator=g),
        "neighbor_hidden_states": torch.randn((BATCH, TOKENS, WIDTH), generator=g),
    }


def loss_and_grads(unet, objective, inputs, **kwargs):
    """objective_loss's loss and a copy of every parameter's gradient, from zeroed gradients."""
    unet.zero_grad(set_to_none=True)
    loss, logs = objective_loss(
        objective,
        unet,
        inputs["noisy_latents"],
        inputs["timesteps"],
        inputs["target"],
        inputs["encoder_hidden_states"],
        **kwargs,
    )
    loss.backward()
    grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad(set_to_none=True)
    return loss.detach(), logs, grads


def assert_grads_close(grads, ref_grads, rtol: float = 1e-4) -> None:
    """Every gradient equal up to float32 rounding: relative `rtol`, absolute `rtol` / 10 of the model's largest
    gradient entry (for entries whose true value is ~0 and carry only rounding noise)."""
    assert len(grads) == len(ref_grads)
    scale = max(float(g.abs().max()) for g in ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol / 10 * scale)


def small_index() -> PoGDiffIndex:
    """Batch rows 0-3 with k = 1 (the draw is deterministic) and their neighbours 4-7.

    row 0: neighbour 4, other identity and caption, s = 0.5, weight 2 -> psi = 0.5^2 * 2 = 0.5
    row 1: neighbour 5, same identity, s = 0.6 -> psi 0.6, but its caption is dropped -> psi = 0
    row 2: neighbour 6, same identity and caption, s = 0.9 -> psi 0.9, skipped (same caption)
    row 3: neighbour 7, same identity, other caption, s = 0.8 -> psi = 0.8
    """
    return PoGDiffIndex(
        neighbor_ids=torch.tensor([[4], [5], [6], [7], [0], [1], [2], [3]]),
        neighbor_sims=torch.tensor([[0.5], [0.6], [0.9], [0.8], [0.5], [0.6], [0.9], [0.8]]),
        identity_ids=torch.tensor([0, 1, 2, 3, 4, 1, 2, 3]),
        identity_names=["a", "b", "c", "d", "e"],
        text_ids=torch.tensor([0, 1, 2, 3, 4, 5, 2, 6]),
        txt_log_weights=torch.tensor([math.log(2.0), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
        elbo=torch.zeros(8),
        config={},
    )


def drawn_rows_0_and_3() -> NeighborDraw:
    """small_index's batch rows 0-3 drawn as the trainer does; row 1's caption dropped."""
    return draw_pogdiff_neighbors(
        small_index(),
        torch.arange(4),
        torch.Generator().manual_seed(0),
        PsiParams(a1=1.0, a2=1.0, a3=1.0, terms="img,txt"),
        caption_dropped=torch.tensor([False, True, False, False]),
    )


def test_skipping_neighbour_forwards_is_exact(unet, inputs):
    draw = drawn_rows_0_and_3()
    torch.testing.assert_close(draw.psi_drawn, torch.tensor([0.5, 0.0, 0.9, 0.8]))
    torch.testing.assert_close(draw.psi, torch.tensor([0.5, 0.0, 0.0, 0.8]))
    assert draw.needs_forward.tolist() == [True, False, False, True]
    assert draw.rows.tolist() == [4, 5, 6, 7]

    # Skipping: the neighbour forward runs on rows 0 and 3 only.
    nhs = inputs["neighbor_hidden_states"]
    skip_loss, skip_logs, skip_grads = loss_and_grads(
        unet, "pogdiff", inputs, neighbor_hidden_states=nhs[draw.needs_forward], draw=draw
    )
    # No skipping: the neighbour forward on all rows, row 2 with its own hidden states (same caption), row 1
    # with some other text (its psi is 0).
    full_nhs = nhs.clone()
    full_nhs[2] = inputs["encoder_hidden_states"][2]
    full_draw = NeighborDraw(
        rows=draw.rows,
        psi=draw.psi_drawn,
        psi_drawn=draw.psi_drawn,
        needs_forward=torch.ones(BATCH, dtype=torch.bool),
    )
    full_loss, full_logs, full_grads = loss_and_grads(
        unet, "pogdiff", inputs, neighbor_hidden_states=full_nhs, draw=full_draw
    )

    assert skip_logs["frac_skipped"] == 0.5 and full_logs["frac_skipped"] == 0.25
    assert skip_logs["loss_consistency"] > 0
    # Exact: the forward with grad is the same computation in both (same rows, same batch), so the main term
    # is bitwise equal.
    assert skip_logs["loss_main"] == full_logs["loss_main"]
    # Up to float32 rounding only: the neighbour forward runs on 2 rows in one case and 4 in the other, and row
    # 2's no-grad neighbour forward stands in for its grad forward; a CPU's kernels may block (and so round) a
    # batch of 2 differently from a batch of 4, or a no-grad forward differently from a grad one. Each neighbour
    # prediction then moves by a few float32 ulps of the activations (~1e-6 relative), which moves the
    # consistency term and its gradient 2 psi (a - c) / (B C H W) by about |dc| / |a - c| relative (~1e-5
    # here, where |a - c| ~ 0.1-1). rtol 1e-4 leaves a 10x margin; a wrong skip (row 2's term or row 1's
    # missing psi counted) changes the loss and the gradients by 1e-2 relative or more.
    torch.testing.assert_close(skip_loss, full_loss, rtol=1e-4, atol=0.0)
    assert len(skip_grads) == len(list(unet.parameters()))
    # Biases feeding a GroupNorm have an exactly-zero true gradient (pure rounding noise): the absolute tolerance
    # is scaled by the model's largest gradient, as in the CBDM test below.
    assert_grads_close(skip_grads, full_grads)


@pytest.mark.parametrize("snr", [False, True])
def test_pogdiff_with_psi_zero_is_vanilla_bitwise(unet, inputs, snr):
    snr_weights = torch.tensor([0.2, 1.0, 3.0, 5.0]) if snr else None
    draw = NeighborDraw(
        rows=torch.tensor([1, 2, 3, 0]),
        psi=torch.zeros(BATCH),
        psi_drawn=torch.zeros(BATCH),
        needs_forward=torch.zeros(BATCH, dtype=torch.bool),
    )
    pog_loss, pog_logs, pog_grads = loss_and_grads(
        unet, "pogdiff", inputs, draw=draw, snr_weights=snr_weights
    )
    van_loss, van_logs, van_grads = loss_and_grads(unet, "vanilla", inputs, snr_weights=snr_weights)
    assert torch.equal(pog_loss, van_loss)
    assert pog_logs["loss_consistency"] == 0.0 and pog_logs["frac_skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(pog_grads, van_grads))


def test_cbdm_doubled_batch_equals_two_forwards(unet, inputs):
    loss, logs, grads = loss_and_grads(
        unet,
        "cbdm",
        inputs,
        neighbor_hidden_states=inputs["neighbor_hidden_states"],
        num_train_timesteps=1000,
    )

    unet.zero_grad(set_to_none=True)
    own = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
    partner = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["neighbor_hidden_states"]).sample
    ref_loss, ref_logs = cbdm_loss(
        own, inputs["target"], partner, inputs["timesteps"], 1000, tau=1.0, gamma=0.25
    )
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad(set_to_none=True)

    # Not bitwise in general: a batch of 8 and two of 4 may go through differently blocked float32 kernels,
    # which sum in different orders. Observed on this CPU (1 and 2 threads): loss equal to 1e-7; loss_reg and
    # loss_commit, mse of two close predictions, to 1e-6 (a difference of nearby numbers loses relative
    # accuracy); gradients to 9e-7 of the largest gradient entry. Biases feeding a GroupNorm have an
    # exactly-zero true gradient, so theirs are pure rounding noise (~1e-9) with no relative accuracy: the
    # absolute tolerance is scaled by the largest gradient of the whole model, not per tensor. Tolerances
    # leave about 10x headroom.
    assert logs["loss_reg"] > 0 and logs["loss_commit"] > 0
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-6, atol=0)
    for key in ("loss_main", "loss_reg", "loss_commit"):
        assert float(logs[key]) == pytest.approx(float(ref_logs[key]), rel=1e-5)
    assert_grads_close(grads, ref_grads)


def test_neighbor_grad_one_forward_equals_two_forwards_with_grad(unet, inputs):
    """--neighbor_grad: the enlarged-batch forward gives the loss and gradients of two forwards with grad (the
    sample rows, and the needed neighbour rows), and differs from the stop-gradient default in its gradients
    only, not its loss."""
    draw = drawn_rows_0_and_3()
    nhs = inputs["neighbor_hidden_states"][draw.needs_forward]
    loss, logs, grads = loss_and_grads(
        unet, "pogdiff", inputs, neighbor_hidden_states=nhs, draw=draw, neighbor_grad=True
    )

    rows = draw.needs_forward.nonzero().flatten()
    unet.zero_grad(set_to_none=True)
    own = unet(inputs["noisy_latents"], inputs["timesteps"], inputs["encoder_hidden_states"]).sample
    neighbour = unet(inputs["noisy_latents"][rows], inputs["timesteps"][rows], nhs).sample
    psi = draw.psi
    per = lambda x, y: ((x - y) ** 2).mean(dim=(1, 2, 3))  # noqa: E731
    ref_loss = (per(own, inputs["target"]).sum() + (psi[rows] * per(own[rows], neighbour)).sum()) / BATCH
    ref_loss.backward()
    ref_grads = [p.grad.clone() for p in unet.parameters()]
    unet.zero_grad(set_to_none=True)

    assert logs["loss_consistency"] > 0
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=0)
    assert_grads_close(grads, ref_grads)
    stop_loss, _, stop_grads = loss_and_grads(unet, "pogdiff", inputs, neighbor_hidden_states=nhs, draw=draw)
    torch.testing.assert_close(stop_loss, loss, rtol=1e-5, atol=0)
    scale = max(float(g.abs().max()) for g in grads)
    assert max(float((a - b).abs().max()) for a, b in zip(grads, stop_grads)) > 1e-3 * scale


def test_full_batch_neighbour_forward_matches_compact(unet, inputs):
    """The CUDA-graph path's computation (full batch, stale text on skipped rows, rows selected after) gives
    the loss and gradients of the compact eager forward; run eagerly here (use_graph=False)."""
    draw = drawn_rows_0_and_3()
    nhs = inputs["neighbor_hidden_states"][draw.needs_forward]
    compact = loss_and_grads(unet, "pogdiff", inputs, neighbor_hidden_states=nhs, draw=draw)
    padded = loss_and_grads(
        unet,
        "pogdiff",
        inputs,
        neighbor_hidden_states=nhs,
        draw=draw,
        neighbor_forward=GraphedNeighborForward(unet, use_graph=False),
    )
    assert compact[1]["loss_consistency"] > 0
    # Batch 4 vs batch 2 in the neighbour forward: equal up to float32 rounding (see the skip test above).
    torch.testing.assert_close(padded[0], compact[0], rtol=1e-4, atol=0.0)
    assert_grads_close(padded[2], compact[2])


def test_static_batch_reused_for_a_smaller_batch(unet, inputs):
    """After a full batch, a smaller one runs in the first rows of the same static buffers (stale rows after
    it are computed and discarded) and gives the compact eager predictions."""
    forward = GraphedNeighborForward(unet, use_graph=False)
    nhs = inputs["neighbor_hidden_states"]
    with torch.no_grad():
        forward(inputs["noisy_latents"], inputs["timesteps"], nhs, torch.arange(BATCH))
        static = forward._static
        rows = torch.tensor([1])
        small = forward(inputs["noisy_latents"][2:], inputs["timesteps"][2:], nhs[:1], rows)
        expected = unet(inputs["noisy_latents"][3:4], inputs["timesteps"][3:4], nhs[:1], return_dict=False)[0]
    assert forward._static is static and static.x.shape[0] == BATCH
    torch.testing.assert_close(small, expected, rtol=1e-4, atol=1e-5)  # batch 4 vs batch 1 rounding


def test_failed_graph_capture_falls_back_to_eager_exactly(unet, inputs, monkeypatch, caplog):
    def fail(*args, **kwargs):
        raise RuntimeError("capture not supported here")

    neighbor_forward = make_neighbor_forward(unet, torch.device("cuda"), "cuda_graph")  # lazy: no CUDA yet
    monkeypatch.setattr(GraphedNeighborForward, "__call__", fail)
    draw = drawn_rows_0_and_3()
    nhs = inputs["neighbor_hidden_states"][draw.needs_forward]
    eager = loss_and_grads(unet, "pogdiff", inputs, neighbor_hidden_states=nhs, draw=draw)
    with caplog.at_level("WARNING", logger="pogdiff.training"):
        fallback = loss_and_grads(
            unet, "pogdiff", inputs, neighbor_hidden_states=nhs, draw=draw, neighbor_forward=neighbor_forward
        )
    assert neighbor_forward.failed
    assert "capture not supported here" in caplog.text and "eager" in caplog.text
    assert torch.equal(fallback[0], eager[0])
    assert all(torch.equal(a, b) for a, b in zip(fallback[2], eager[2]))


def test_make_neighbor_forward_modes(unet):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert make_neighbor_forward(unet, cpu, "auto") is None
    assert make_neighbor_forward(unet, cpu, "eager") is None
    assert make_neighbor_forward(unet, cuda, "eager") is None
    assert make_neighbor_forward(unet, cuda, "auto", sharded=True) is None  # DeepSpeed / FSDP
    assert make_neighbor_forward(unet, cuda, "auto") is not None
    with pytest.raises(ValueError, match="--neighbor_forward cuda_graph needs a CUDA device"):
        make_neighbor_forward(unet, cpu, "cuda_graph")
    with pytest.raises(ValueError, match="sharded: True"):
        make_neighbor_forward(unet, cuda, "cuda_graph", sharded=True)
    with pytest.raises(ValueError, match="must be one of auto, eager, cuda_graph"):
        make_neighbor_forward(unet, cpu, "graphs")


def test_step_means_weigh_rows_and_skip_absent_micro_steps():
    """Gradient accumulation over 3 micro-steps: a loss averages over all 3; the minority's psi only over the
    micro-steps that drew minority rows, weighted by their row counts."""
    means = StepMeans()
    means.add("loss_main", 1.0)
    means.add("psi_minority", 4.0, weight=1)
    means.add("loss_main", 2.0)
    means.add("loss_main", 6.0)
    means.add("psi_minority", 1.0, weight=3)
    means.add("psi_majority", 9.0, weight=0)  # no rows: ignored
    assert means.pop() == {"loss_main": 3.0, "psi_minority": 1.75}
    assert means.pop() == {}


def test_pogdiff_draw_logs(unet, inputs):
    draw = drawn_rows_0_and_3()
    means = StepMeans()
    pogdiff_draw_logs(draw, torch.tensor([True, False, False, True]), means)
    logs = means.pop()
    # psi_drawn = (0.5, 0, 0.9, 0.8); rows 0 and 3 are the minority; small_index: rows 1-3 share identities.
    assert logs["psi_minority"] == pytest.approx(0.65) and logs["psi_majority"] == pytest.approx(0.45)
    assert logs["frac_skipped"] == 0.5 and logs["neighbor_same_identity"] == 0.75


def test_same_text_skip_uses_the_epochs_chosen_captions():
    """Rows 2 and 6 share their first caption (index text ids), but this epoch row 6 trains on another one of its
    captions: its neighbour term must run, not be skipped as 'same caption'."""
    index = small_index()
    psi = PsiParams(a1=1.0, a2=1.0, a3=1.0, terms="img,txt")
    first = draw_pogdiff_neighbors(index, torch.arange(4), torch.Generator().manual_seed(0), psi)
    assert first.needs_forward.tolist() == [True, True, False, True]
    epoch_ids = index.text_ids.clone()
    epoch_ids[6] = 99  # row 6's chosen caption this epoch differs from row 2's
    chosen = draw_pogdiff_neighbors(
        index, torch.arange(4), torch.Generator().manual_seed(0), psi, text_ids=epoch_ids
    )
    assert chosen.needs_forward.tolist() == [True, True, True, True]
    torch.testing.assert_close(chosen.psi[2], chosen.psi_drawn[2])


def test_step_means_update_merges_sums_and_weights():
    """The trainer adds objective_step's per-micro-step logs into its step's means: same as adding directly."""
    direct, merged = StepMeans(), StepMeans()
    for values in ({"loss": 2.0, "psi_minority": (3.0, 2)}, {"loss": 4.0}):
        part = StepMeans()
        for key, value in values.items():
            value, weight = value if isinstance(value, tuple) else (value, 1)
            direct.add(key, torch.tensor(value), weight=weight)
            part.add(key, torch.tensor(value), weight=weight)
        merged.update(part)
    assert merged.pop() == direct.pop() == {"loss": 3.0, "psi_minority": 3.0}


class _StubCaptions:
    """CaptionStates' interface over fixed hidden states: row r's caption is text id r."""

    def __init__(self, states: torch.Tensor):
        self.states = states
        self.row_text_ids = torch.arange(len(states))

    def of_rows(self, rows):
        return self.states[rows.cpu()]


def test_objective_step_is_objective_loss_after_the_draw(unet, inputs):
    """objective_step = the objective's draw from the step's generator, then objective_loss: the same loss and
    logs as calling the two by hand, for PoGDiff and for vanilla."""
    from pogdiff.testing import sd15_noise_scheduler
    from pogdiff.training import NoisedBatch, ObjectiveSettings, objective_step

    index = small_index()
    rows = torch.arange(4)
    neighbour_states = torch.randn((len(index), TOKENS, WIDTH), generator=torch.Generator().manual_seed(5))
    batch = NoisedBatch(
        rows=rows,
        latents=inputs["noisy_latents"],
        noise=inputs["target"],
        timesteps=inputs["timesteps"],
        noisy_latents=inputs["noisy_latents"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        target=inputs["target"],
        caption_dropped=torch.tensor([False, True, False, False]),
    )
    psi = PsiParams(a3=2.0)
    with torch.no_grad():
        loss, means = objective_step(
            ObjectiveSettings("pogdiff", psi),
            unet,
            batch,
            noise_scheduler=sd15_noise_scheduler(),
            captions=_StubCaptions(neighbour_states),
            generator=torch.Generator().manual_seed(7),
            index=index,
            num_rows=len(index),
            minority=torch.tensor([False, False, True, True, True, True, True, True]),
        )
        draw = draw_pogdiff_neighbors(
            index,
            rows,
            torch.Generator().manual_seed(7),
            psi,
            caption_dropped=batch.caption_dropped,
            text_ids=torch.arange(len(index)),
        )
        expected, logs = objective_loss(
            "pogdiff",
            unet,
            batch.noisy_latents,
            batch.timesteps,
            batch.target,
            batch.encoder_hidden_states,
            neighbor_hidden_states=neighbour_states[draw.rows[draw.needs_forward]],
            draw=draw,
        )
    assert torch.equal(loss, expected)
    means = means.pop()
    assert means["loss_main"] == pytest.approx(float(logs["loss_main"]))
    assert means["psi_majority"] == pytest.approx(float(draw.psi_drawn[:2].mean()))
    assert means["psi_minority"] == pytest.approx(float(draw.psi_drawn[2:].mean()))
    assert means["frac_skipped"] == pytest.approx(1.0 - float(draw.needs_forward.float().mean()))

    with torch.no_grad():
        vanilla, _ = objective_step(
            ObjectiveSettings("vanilla"),
            unet,
            batch,
            noise_scheduler=sd15_noise_scheduler(),
            captions=_StubCaptions(neighbour_states),
            generator=torch.Generator().manual_seed(7),
        )
        reference, _ = objective_loss(
            "vanilla", unet, batch.noisy_latents, batch.timesteps, batch.target, batch.encoder_hidden_states
        )
    assert torch.equal(vanilla, reference)


def test_trainer_and_benchmark_call_the_same_step():
    """The benchmark times the trainer's own code: both take noised_batch and objective_step from
    pogdiff.training, and neither calls objective_loss itself."""
    import inspect

    import train_pogdiff
    from benchmarks import bench_step
    from pogdiff import training

    for module in (train_pogdiff, bench_step):
        assert (
            module.noised_batch is training.noised_batch and module.objective_step is training.objective_step
        )
        assert "objective_loss(" not in inspect.getsource(module)
