"""One training step's objective-specific work, shared by `train_pogdiff.py` and `benchmarks/`.

The script does what diffusers' train_text_to_image.py does (encode, noise, timesteps, text encoding, target);
these functions add what each objective needs on top: the neighbour draw and psi (PoGDiff), the random partner
(CBDM), the target transfer (T2H), and the UNet forwards and the loss. Keeping them here means a benchmark
times exactly the code path the trainer runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.training_utils import compute_snr

from pogdiff.families import Conditioning, TextEncoders, as_conditioning, unet_prediction
from pogdiff.objectives import LossInputs, NeighborDraw, StepMeans, get_objective
from pogdiff.psi import PsiParams

from .errors import UserError
from .noising import noise_latents
from .settings import NEIGHBOR_FORWARD_MODES

logger = logging.getLogger(__name__)


@torch.no_grad()
def encode_latent_parameters(
    vae,
    get_pixels: Callable[[int], torch.Tensor],
    num_rows: int,
    batch_size: int = 16,
    show_progress: bool = True,
) -> torch.Tensor:
    """The VAE's latent distribution parameters (mean and log-variance, (N, 2C, h, w)) of every row, on CPU.

    Caching the *distribution* rather than one sample keeps training stochastic exactly as without the cache:
    each step still draws `DiagonalGaussianDistribution(params).sample(generator)`.
    """
    from tqdm.auto import tqdm

    device, dtype = vae.device, vae.dtype
    chunks = []
    for start in tqdm(range(0, num_rows, batch_size), desc="Caching latents", disable=not show_progress):
        pixels = torch.stack([get_pixels(i) for i in range(start, min(start + batch_size, num_rows))])
        chunks.append(vae.encode(pixels.to(device, dtype)).latent_dist.parameters.cpu())
    return torch.cat(chunks)


def fused_adamw_kwargs(device: torch.device) -> dict[str, bool]:
    """Extra `torch.optim.AdamW` arguments for parameters on `device`: `fused=True` on CUDA, else none.

    The fused implementation does the same AdamW update in fewer kernel launches than torch's default
    multi-tensor (`foreach`) path; diffusers' train_text_to_image leaves it off. Elsewhere torch's default is
    kept, so CPU runs (and their bitwise resume tests) are unchanged.
    """
    return {"fused": True} if device.type == "cuda" else {}


class GraphedNeighborForward:
    """PoGDiff's no-grad neighbour forward, replayed from a CUDA graph of the full batch.

    Why: at SD1.5 size and batch 8 on an H200, a UNet forward is bound by the CPU launching its kernels, not
    by the GPU running them (the eager neighbour forward cost as much with half the rows as with all), so
    an extra eager forward costs its launch time whatever the number of rows. A graph replays them all with
    one launch. It is captured once for the full batch and reused every step; rows without a neighbour term
    are computed on stale text and discarded, which costs little GPU time and keeps the shapes static. A
    smaller batch (an epoch's last) fills the graph's first rows; a larger one or a new shape recaptures.

    The graph reads the model's parameters in place, so optimizer steps, `load_state` and EMA copies
    that write into the same tensors are seen by the next replay. Autocast's weight-cast cache is turned
    off while capturing: the casts are replayed with the graph, and the graph's memory pool holds one
    forward's activations, not a bf16 copy of every weight.

    Use `make_neighbor_forward` to build one. `use_graph=False` runs the same padded computation eagerly
    (what the CPU tests check).
    """

    def __init__(self, model: Callable, use_graph: bool = True) -> None:
        self.model = model
        self.use_graph = use_graph
        self._static: _StaticBatch | None = None
        # CUDA memory reserved by capturing (the graph's pool and its buffers), for memory reports.
        self.reserved_bytes = 0

    def __call__(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        neighbor_hidden_states: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Neighbour predictions of `rows` (compact, in batch order), as the eager compact forward gives."""
        batch = noisy_latents.shape[0]
        neighbor = as_conditioning(neighbor_hidden_states)
        key = (
            tuple(noisy_latents.shape[1:]),
            tuple(None if t is None else tuple(t.shape[1:]) for t in neighbor.tensors()),
            noisy_latents.dtype,
        )
        static = self._static
        # A smaller batch (an epoch's last) fills the first rows of the captured one; a new shape or a larger
        # batch replaces the graph (the old one is released first: one pool at a time).
        if static is None or static.key != key or static.x.shape[0] < batch:
            self._static = None  # release the old graph and its pool before capturing a new one
            self._static = static = self._build(key, noisy_latents, timesteps, neighbor, rows)
        static.x[:batch].copy_(noisy_latents)
        static.t[:batch].copy_(timesteps)
        for buffer, value in zip(static.c.tensors(), neighbor.tensors()):
            if buffer is not None:
                buffer.index_copy_(0, rows, value)
        if static.graph is None:
            return unet_prediction(self.model, static.x, static.t, static.c).index_select(0, rows)
        static.graph.replay()
        return static.out.index_select(0, rows)

    def _build(self, key, noisy_latents, timesteps, neighbor: Conditioning, rows) -> _StaticBatch:
        # Static buffers for every part of the conditioning (SDXL: pooled embeddings and time ids too).
        def buffer(value: torch.Tensor) -> torch.Tensor:
            full = value.new_zeros((noisy_latents.shape[0], *value.shape[1:]))
            return full.index_copy_(0, rows, value)

        static = _StaticBatch(key, noisy_latents.clone(), timesteps.clone(), neighbor.map(buffer))
        if not self.use_graph:
            return static
        # Capturing empties the allocator's cache; empty it first so that the growth of reserved memory is
        # the graph's own pool and buffers (a delta taken before that would count the released cache).
        torch.cuda.empty_cache()
        reserved = torch.cuda.memory_reserved()
        cache_enabled = torch.is_autocast_cache_enabled()
        torch.set_autocast_cache_enabled(False)
        try:
            # Warm-up on a side stream (lazy cuBLAS / cuDNN initialisation must not happen during capture).
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    eager = unet_prediction(self.model, static.x, static.t, static.c)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static.out = unet_prediction(self.model, static.x, static.t, static.c)
        finally:
            torch.set_autocast_cache_enabled(cache_enabled)
        graph.replay()
        self.reserved_bytes = torch.cuda.memory_reserved() - reserved
        diff = (static.out - eager).abs().max().item()
        scale = eager.abs().max().item()
        logger.info(
            f"Captured a CUDA graph of the neighbour forward for inputs {tuple(noisy_latents.shape)}; "
            f"max |graph - eager| = {diff:.3g} (max |eager| = {scale:.3g}); "
            f"{self.reserved_bytes / 2**30:.2f} GiB reserved by the capture."
        )
        if not diff <= 1e-2 * scale + 1e-3:
            raise RuntimeError(f"the graph's output differs from the eager forward by {diff:.3g}")
        static.graph = graph
        return static


@dataclass
class _StaticBatch:
    """The fixed-address inputs and output a captured graph reads and writes (graph None: run eagerly)."""

    key: tuple
    x: torch.Tensor
    t: torch.Tensor
    c: Conditioning
    out: torch.Tensor | None = None
    graph: object | None = None


def make_neighbor_forward(model: Callable, device: torch.device, mode: str = "auto", sharded: bool = False):
    """The callable `objective_loss` uses for PoGDiff's neighbour forward, or None for the eager default.

    `mode` is `--neighbor_forward`: `eager` (a plain no-grad forward of just the needed rows), `cuda_graph`
    (`GraphedNeighborForward`; needs CUDA and an unsharded model), `auto` (`cuda_graph` on CUDA unless
    the model is sharded by DeepSpeed / FSDP, else `eager`). `model` is the unwrapped module with its
    mixed-precision forward (DDP adds nothing to a no-grad forward).
    """
    if mode not in NEIGHBOR_FORWARD_MODES:
        raise UserError(
            f"--neighbor_forward must be one of {', '.join(NEIGHBOR_FORWARD_MODES)}, got {mode!r}."
        )
    usable = device.type == "cuda" and not sharded
    if mode == "cuda_graph" and not usable:
        raise UserError(
            "--neighbor_forward cuda_graph needs a CUDA device and a model that DeepSpeed / FSDP do not shard; "
            f"got device {device} (sharded: {sharded}). Use --neighbor_forward eager or auto."
        )
    if mode == "eager" or not usable:
        return None
    return _FallbackToEager(GraphedNeighborForward(model))


class _FallbackToEager:
    """Runs a `GraphedNeighborForward`; if it fails (capture or replay), warns once and returns None from then
    on, which makes `objective_loss` run the eager forward."""

    def __init__(self, graphed: GraphedNeighborForward) -> None:
        self.graphed, self.failed = graphed, False

    @property
    def reserved_bytes(self) -> int:
        return self.graphed.reserved_bytes

    def __call__(self, noisy_latents, timesteps, neighbor_hidden_states, rows) -> torch.Tensor | None:
        if self.failed:
            return None
        try:
            return self.graphed(noisy_latents, timesteps, neighbor_hidden_states, rows)
        except Exception as error:  # any failure falls back to the exact eager path
            self.failed = True
            logger.warning(
                f"CUDA graph of the neighbour forward unavailable ({error}); using the eager forward."
            )
            return None


def objective_loss(
    objective: str,
    unet: Callable,
    noisy_latents: torch.Tensor,
    timesteps: torch.Tensor,
    target: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    *,
    neighbor_hidden_states: torch.Tensor | None = None,
    draw: NeighborDraw | None = None,
    snr_weights: torch.Tensor | None = None,
    num_train_timesteps: int = 1000,
    cbdm_tau: float = 1.0,
    cbdm_gamma: float = 0.25,
    neighbor_forward: Callable | None = None,
    neighbor_grad: bool = False,
    any_rank: Callable[[bool], bool] | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """UNet forward(s) and the loss of the registered objective named `objective` for one batch
    (`objectives.get_objective(objective).loss`; see `objectives.Vanilla`, `PoGDiff`, `CBDM` and `T2H`).

    - vanilla / t2h: one forward, MSE to `target` (T2H's target transfer happens before, in `t2h_targets`).
    - pogdiff: one no-grad forward for just the rows that need a neighbour prediction (`draw.needs_forward`),
      replaced by `neighbor_forward` (from `make_neighbor_forward`) when given, then the forward with grad; with
      `neighbor_grad` the neighbour rows join the sample rows in one forward with grad.
    - cbdm: both conditions in ONE forward on the doubled batch (a DDP model may only run one forward per
      backward).

    `any_rank` makes the number of forwards the same on every process, which a sharded model needs (FSDP and
    ZeRO-3 all-gather the parameters in every forward: a rank that skips one while another runs it deadlocks
    or aborts the collective). Given this rank's "I need the neighbour forward", it returns whether any rank
    does (`any_process`); a rank with no row to compute then runs the no-grad forward on one row and discards
    it. Only PoGDiff's skippable no-grad forward needs this: every other objective runs exactly one forward per
    micro-step on every rank (`--neighbor_grad` and CBDM enlarge that one forward's batch, which may differ per
    rank). None (DDP, one process) keeps the per-rank skip: DDP's no-grad forward has no collective.
    """
    return get_objective(objective).loss(
        unet,
        LossInputs(
            noisy_latents,
            timesteps,
            target,
            encoder_hidden_states,
            neighbor_hidden_states=neighbor_hidden_states,
            draw=draw,
            snr_weights=snr_weights,
            num_train_timesteps=num_train_timesteps,
            cbdm_tau=cbdm_tau,
            cbdm_gamma=cbdm_gamma,
            neighbor_forward=neighbor_forward,
            neighbor_grad=neighbor_grad,
            any_rank=any_rank,
        ),
    )


class CaptionStates:
    """The conditioning of the captions dataset rows train on: for the batch and for drawn neighbours or
    partners, from the family's text encoders or (--cache_latents) from precomputed states.

    Args:
        text_encoders: the family's frozen `TextEncoders` (on `device`).
        distinct_input_ids: token ids of each distinct caption (U first), as `text_encoders.tokenize` gives.
        row_text_ids: (N,) which distinct caption each row trains on this epoch (`RowCaptions.ids`); replace it
            at every epoch's start.
        empty_input_ids: token ids of the empty prompt (caption dropout), one caption's worth.
        device: where the states are needed.
        text_cache: precomputed conditioning of the U distinct captions and, as row U, the empty prompt.
    """

    def __init__(
        self,
        text_encoders: TextEncoders,
        distinct_input_ids: torch.Tensor,
        row_text_ids: torch.Tensor,
        empty_input_ids: torch.Tensor | None,
        device: torch.device,
        text_cache: Conditioning | None = None,
    ) -> None:
        self.text_encoders = text_encoders
        self.distinct_input_ids = distinct_input_ids
        self.row_text_ids = row_text_ids
        self.empty_input_ids = empty_input_ids
        self.device = device
        self.text_cache = text_cache

    def of_rows(self, rows: torch.Tensor) -> Conditioning:
        """The caption part of the conditioning of the captions `rows` train on (for neighbours and partners;
        no gradient)."""
        ids = self.row_text_ids[rows.cpu()]
        if self.text_cache is not None:
            return self.text_cache[ids.to(self.text_cache.hidden_states.device)]
        with torch.no_grad():
            return self.text_encoders.encode(self.distinct_input_ids[ids].to(self.device))

    def of_batch(
        self, rows: torch.Tensor, input_ids: torch.Tensor | None, dropped: torch.Tensor
    ) -> Conditioning:
        """The caption part of the batch's conditioning: its tokens, or the empty prompt where the caption was
        dropped."""
        if self.text_cache is not None:
            ids = torch.where(dropped, len(self.distinct_input_ids), self.row_text_ids[rows.cpu()])
            return self.text_cache[ids.to(self.text_cache.hidden_states.device)]
        if bool(dropped.any()):
            mask = dropped.view(-1, *([1] * (input_ids.ndim - 1)))
            input_ids = torch.where(mask, self.empty_input_ids[None], input_ids.cpu())
        return self.text_encoders.encode(input_ids.to(self.device))


@dataclass
class NoisedBatch:
    """One micro-batch made ready for the UNet, as train_text_to_image.py's loop makes it."""

    rows: torch.Tensor  # (B,) dataset rows, on the CPU
    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_latents: torch.Tensor
    encoder_hidden_states: Conditioning | torch.Tensor  # the UNet's conditioning (`families.Conditioning`)
    target: torch.Tensor
    caption_dropped: torch.Tensor  # (B,) bool, on the CPU


def noised_batch(
    batch: dict,
    *,
    vae,
    noise_scheduler,
    captions: CaptionStates,
    generator: torch.Generator,
    cpu_generator: torch.Generator,
    weight_dtype: torch.dtype,
    latent_cache: torch.Tensor | None = None,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    caption_dropout_prob: float = 0.0,
) -> NoisedBatch:
    """Latents -> noise -> timesteps -> x_t -> text states -> target, the steps of train_text_to_image.py.

    Every draw comes from the given generators (device draws from `generator`, caption dropout from
    `cpu_generator`), never from the global RNG, so that a resumed run repeats the uninterrupted one exactly.
    `batch` holds `index` (dataset rows), `input_ids` and `pixel_values` (not needed with `latent_cache`, the
    VAE's latent distribution parameters of every row).
    """
    rows = batch["index"].cpu()
    device = generator.device
    if latent_cache is not None:
        latent_dist = DiagonalGaussianDistribution(latent_cache[rows].to(device, weight_dtype))
    else:
        # The VAE's own dtype: SDXL's runs in float32 whatever the mixed precision (see `families`).
        latent_dist = vae.encode(batch["pixel_values"].to(vae.dtype)).latent_dist
    latents = (latent_dist.sample(generator=generator) * vae.config.scaling_factor).to(weight_dtype)
    bsz = latents.shape[0]
    noise, timesteps, noisy_latents, target = noise_latents(
        latents, noise_scheduler, generator, noise_offset=noise_offset, input_perturbation=input_perturbation
    )

    caption_dropped = torch.zeros(bsz, dtype=torch.bool)
    if caption_dropout_prob > 0:
        caption_dropped = torch.rand(bsz, generator=cpu_generator) < caption_dropout_prob
    encoder_hidden_states = captions.of_batch(rows, batch.get("input_ids"), caption_dropped)
    if "time_ids" in batch:
        # SDXL's micro-conditioning belongs to the image (its size and crop), not to the caption.
        time_ids = batch["time_ids"].to(device, weight_dtype)
        encoder_hidden_states = Conditioning(
            encoder_hidden_states.hidden_states, encoder_hidden_states.text_embeds, time_ids
        )
    return NoisedBatch(
        rows, latents, noise, timesteps, noisy_latents, encoder_hidden_states, target, caption_dropped
    )


def any_process(flag: bool, accelerator) -> bool:
    """Whether `flag` is True on any process: one all-reduce of one number (and a host sync to read it).

    Used as `objective_loss(any_rank=...)` under sharded engines; every process must call it the same number of
    times, like any collective.
    """
    count = accelerator.reduce(torch.tensor([int(flag)], device=accelerator.device), reduction="sum")
    return bool(count.item() > 0)


def sharded_engine(accelerator) -> bool:
    """Whether the trained model is split over the ranks (FSDP, DeepSpeed): then every forward, save and gather
    is a collective, and accelerate saves and loads the model itself."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def full_model(accelerator, model, model_cls):
    """The trained `model` as a plain, whole module for saving or sampling; a collective under a sharded engine.

    Under FSDP / DeepSpeed every rank holds a part of the weights: every rank must call this (the weights are
    gathered), and the main process gets a fresh `model_cls` built from the model's config holding them (None
    elsewhere). Otherwise it is `accelerator.unwrap_model(model)` itself, on every rank, with no communication.
    """
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    if not sharded_engine(accelerator):
        return unwrapped
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return None
    whole = model_cls.from_config(unwrapped.config)
    # LoRA: the same adapters first, so that the gathered keys (base_layer, lora_A/B) have a place to go.
    for name, config in (getattr(unwrapped, "peft_config", None) or {}).items():
        whole.add_adapter(config, adapter_name=name)
    whole.load_state_dict(state_dict)
    return whole.to(accelerator.device)


@dataclass(frozen=True)
class ObjectiveSettings:
    """What decides the loss of a batch: the objective and its parameters (from the trainer's flags)."""

    objective: str = "pogdiff"
    psi: PsiParams = PsiParams()
    neighbor_grad: bool = False
    cbdm_tau: float = 1.0
    cbdm_gamma: float = 0.25
    snr_gamma: float | None = None

    def __post_init__(self) -> None:
        get_objective(self.objective)  # a UserError naming the choices for an unknown one

    @classmethod
    def from_args(cls, args) -> ObjectiveSettings:
        return cls(
            objective=args.objective,
            psi=PsiParams.from_args(args),
            neighbor_grad=args.neighbor_grad,
            cbdm_tau=args.cbdm_tau,
            cbdm_gamma=args.cbdm_gamma,
            snr_gamma=args.snr_gamma,
        )


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
    """Min-SNR loss weights (arXiv 2303.09556), as train_text_to_image.py computes them: min(SNR, gamma) / SNR,
    over SNR + 1 for v-prediction."""
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "v_prediction":
        return weights / (snr + 1)
    return weights / snr


def objective_step(
    settings: ObjectiveSettings,
    unet: Callable,
    inputs: NoisedBatch,
    *,
    noise_scheduler,
    captions: CaptionStates,
    generator: torch.Generator,
    index=None,
    num_rows: int | None = None,
    minority: torch.Tensor | None = None,
    neighbor_forward: Callable | None = None,
    any_rank: Callable[[bool], bool] | None = None,
) -> tuple[torch.Tensor, StepMeans]:
    """The objective's part of a training step: what replaces `model_pred = unet(...)` and the MSE upstream.

    Draws what the objective needs from `generator` (PoGDiff's neighbours and psi from `index`, CBDM's random
    partners among `num_rows` rows, T2H's transferred targets), runs the UNet forward(s) (`objective_loss`)
    and returns the loss with the step's logs. `minority` (N,) bool marks the rows of few-shot identities for
    PoGDiff's psi logs. `any_rank` keeps the forwards rank-consistent under a sharded engine (see
    `objective_loss`). The trainer's loop and `benchmarks/bench_step.py` both call this.
    """
    objective = get_objective(settings.objective)
    snr_weights = None
    if settings.snr_gamma is not None:
        # With PoGDiff the weights multiply both terms of each sample's loss.
        snr_weights = min_snr_weights(noise_scheduler, inputs.timesteps, settings.snr_gamma)

    drawn = objective.draw(
        settings,
        inputs,
        noise_scheduler=noise_scheduler,
        captions=captions,
        generator=generator,
        index=index,
        num_rows=num_rows,
    )
    loss, logs = objective_loss(
        objective.name,
        unet,
        inputs.noisy_latents,
        inputs.timesteps,
        drawn.target,
        inputs.encoder_hidden_states,
        neighbor_hidden_states=drawn.neighbor_hidden_states,
        draw=drawn.draw,
        snr_weights=snr_weights,
        num_train_timesteps=noise_scheduler.config.num_train_timesteps,
        cbdm_tau=settings.cbdm_tau,
        cbdm_gamma=settings.cbdm_gamma,
        neighbor_forward=neighbor_forward,
        neighbor_grad=settings.neighbor_grad,
        any_rank=any_rank,
    )
    means = StepMeans()
    # Logged values stay tensors until the optimizer step: no host sync per micro-step.
    objective.add_logs(drawn, logs, means, rows=inputs.rows, minority=minority)
    return loss, means


__all__ = [
    "encode_latent_parameters",
    "fused_adamw_kwargs",
    "GraphedNeighborForward",
    "make_neighbor_forward",
    "NEIGHBOR_FORWARD_MODES",
    "objective_loss",
    "CaptionStates",
    "NoisedBatch",
    "noised_batch",
    "ObjectiveSettings",
    "any_process",
    "full_model",
    "sharded_engine",
    "min_snr_weights",
    "objective_step",
    "unet_prediction",
]
