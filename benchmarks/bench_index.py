"""Time and memory of the PoGDiff index build's heavy parts, on synthetic data.

- `knn_cosine` (pogdiff/neighbors.py): exact top-k cosine neighbours of N image embeddings, O(N^2 D) time.
  Its memory must stay O(chunk^2 + N D): the table reports the peak RSS growth next to what one N x N float32
  matrix would take.
- the text density (pogdiff/density.py): `fit_text_density` + `elbo` + `inverse_density_log_weights`.

Image embeddings are clustered (N/20 centres plus noise, like images of N/20 identities), text embeddings are
long-tailed (N/10 captions with Zipf counts, duplicates exact, as identical captions give identical embeddings).
Everything the index build does around these parts (image and text encoders) is model inference and not timed.

    python benchmarks/bench_index.py --sizes 10000,100000 --output_dir outputs/bench
    python benchmarks/bench_index.py --device cuda --sizes 1000000 --density_sizes 100000 --output_dir outputs/bench

Writes `bench_index.json` and `bench_index.md` into `--output_dir`.
"""

from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys
import time
from pathlib import Path

import torch

# Run as `python benchmarks/bench_index.py`, Python puts benchmarks/ (not the repository root) on sys.path.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks.bench_step import machine_info, num_threads, publish  # noqa: E402
from pogdiff.density import elbo, fit_text_density, inverse_density_log_weights  # noqa: E402
from pogdiff.neighbors import default_chunk_size, knn_cosine  # noqa: E402

MIB = 2**20


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


class PeakMemory:
    """Peak resident memory (and CUDA memory) growth over a block, measured from the block's start.

    On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS (VmHWM) to the current RSS, so each block
    gets its own peak. Where that is not possible `rss_peak_mib` stays None rather than report the process's
    lifetime peak as the block's.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.resettable = True
        try:
            with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
                f.write("5")
        except OSError:
            self.resettable = False
        # Read after the reset: the peak (VmHWM, the highest RSS since the reset) is then never below the start,
        # which a start read before it could be when memory is returned in between (seen under load in CI).
        self.rss_start = _proc_status("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.wall
        self.cpu_seconds = time.process_time() - self.cpu
        peak = _proc_status("VmHWM") if self.resettable else None
        if peak is not None:
            # The kernel updates VmHWM lazily (not on every page the block maps or returns), so it can lag the
            # RSS read at the start or now; the block's peak is at least both.
            peak = max(peak, self.rss_start or 0, _proc_status("VmRSS") or 0)
        self.rss_start_mib = self.rss_start / MIB if self.rss_start is not None else None
        self.rss_peak_mib = peak / MIB if peak is not None else None
        self.rss_growth_mib = (peak - self.rss_start) / MIB if peak is not None and self.rss_start else None
        self.cuda_growth_mib = None
        if self.device.type == "cuda":
            self.cuda_growth_mib = (torch.cuda.max_memory_allocated(self.device) - self.cuda_start) / MIB

    def as_dict(self) -> dict:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "rss_start_mib": self.rss_start_mib,
            "rss_peak_mib": self.rss_peak_mib,
            "rss_growth_mib": self.rss_growth_mib,
            "cuda_growth_mib": self.cuda_growth_mib,
        }


def clustered_embeddings(
    n: int, dim: int, points_per_cluster: int = 20, noise: float = 0.7, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) float32 embeddings around n / points_per_cluster random centres, and each row's cluster."""
    generator = torch.Generator().manual_seed(seed)
    num_clusters = max(1, n // points_per_cluster)
    labels = torch.randint(0, num_clusters, (n,), generator=generator)
    x = torch.randn((num_clusters, dim), generator=generator)[labels]
    x += noise * torch.randn((n, dim), generator=generator)
    return x, labels


def long_tailed_text_embeddings(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, dim) embeddings of n / 10 captions with Zipf(1.1) counts (every caption at least once), and counts."""
    generator = torch.Generator().manual_seed(seed)
    num_captions = max(2, n // 10)
    probs = 1.0 / torch.arange(1, num_captions + 1, dtype=torch.float64) ** 1.1
    extra = torch.multinomial(probs / probs.sum(), n - num_captions, replacement=True, generator=generator)
    caption_of_row = torch.cat([torch.arange(num_captions), extra])
    counts = torch.bincount(caption_of_row, minlength=num_captions)
    return torch.randn((num_captions, dim), generator=generator)[caption_of_row], counts[caption_of_row]


def bench_knn(n: int, dim: int, k: int, chunk_size: int | None, device: torch.device, seed: int) -> dict:
    embeddings, labels = clustered_embeddings(n, dim, seed=seed)
    embeddings = embeddings.to(device)
    chunk_size = chunk_size or default_chunk_size(device)
    with PeakMemory(device) as mem:
        sims, ids = knn_cosine(embeddings, k, chunk_size=chunk_size, show_progress=True)
    same_cluster = (labels[ids.cpu()] == labels[:, None]).float().mean().item()
    result = {
        "n": n,
        "dim": dim,
        "k": k,
        "chunk_size": chunk_size,
        "device": str(device),
        **mem.as_dict(),
        "embeddings_mib": n * dim * 4 / MIB,
        "n_by_n_float32_mib": n * n * 4 / MIB,
        "same_cluster_neighbour_fraction": same_cluster,
        "mean_top1_similarity": sims[:, 0].mean().item(),
    }
    del embeddings, sims, ids
    return result


def combined(blocks: list[PeakMemory]) -> dict:
    """Consecutive blocks as one: summed times, memory growth from the first block's start to the highest peak.

    (Nesting the blocks instead would not work: each block resets the process's peak RSS.)
    """
    first = blocks[0]
    result = {
        "seconds": sum(b.seconds for b in blocks),
        "cpu_seconds": sum(b.cpu_seconds for b in blocks),
        "rss_start_mib": first.rss_start_mib,
        "rss_peak_mib": None,
        "rss_growth_mib": None,
        "cuda_growth_mib": None,
    }
    if all(b.rss_peak_mib is not None for b in blocks) and first.rss_start_mib is not None:
        result["rss_peak_mib"] = max(b.rss_peak_mib for b in blocks)
        result["rss_growth_mib"] = result["rss_peak_mib"] - first.rss_start_mib
    if first.cuda_growth_mib is not None:
        peak = max(b.cuda_start / MIB + b.cuda_growth_mib for b in blocks)
        result["cuda_growth_mib"] = peak - first.cuda_start / MIB
    return result


def bench_density(n: int, dim: int, device: torch.device, seed: int, max_steps: int) -> dict:
    embeddings, counts = long_tailed_text_embeddings(n, dim, seed=seed)
    embeddings = embeddings.to(device)
    with PeakMemory(device) as fit:
        model = fit_text_density(embeddings, seed=seed, max_steps=max_steps, show_progress=True)
    with PeakMemory(device) as lower_bound:
        sample_elbo = elbo(model, embeddings, seed=seed)
    with PeakMemory(device) as weights:
        log_w = inverse_density_log_weights(sample_elbo).cpu()
    # Rare captions must get larger weights than the most frequent one: a check that the fit meant something.
    rare, common = counts == 1, counts == counts.max()
    result = {
        "n": n,
        "dim": dim,
        "device": str(device),
        "max_steps": max_steps,
        **combined([fit, lower_bound, weights]),
        "fit_seconds": fit.seconds,
        "elbo_seconds": lower_bound.seconds,
        "weights_seconds": weights.seconds,
        "embeddings_mib": n * dim * 4 / MIB,
        "mean_log_weight_single_captions": log_w[rare].mean().item() if bool(rare.any()) else None,
        "mean_log_weight_most_frequent_caption": log_w[common].mean().item(),
    }
    del embeddings, model
    return result


def _sizes(text: str) -> list[int]:
    return [int(s.replace("_", "")) for s in text.split(",") if s.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="Comma-separated N for knn_cosine.")
    parser.add_argument("--density_sizes", default="10000", help="Comma-separated N for the density model.")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument(
        "--chunk_size",
        type=int,
        default=None,
        help="knn_cosine's block size (default: its per-device default).",
    )
    parser.add_argument(
        "--density_max_steps", type=int, default=2000, help="fit_text_density's step cap (its default)."
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.sizes, args.density_sizes = _sizes(args.sizes), _sizes(args.density_sizes)
    return args


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown_report(result: dict) -> str:
    info = result["machine"]
    lines = [
        "# bench_index",
        "",
        f"`{result['command']}`",
        "",
        f"- machine: {info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} torch threads)"
        + (f", GPU {info['gpu']}" if info["gpu"] else "")
        + f"; load average {info.get('load_average_at_start')} -> {info.get('load_average_at_end')}",
        f"- torch {info['torch']}",
        "",
        "## knn_cosine",
        "",
        "| N x D, k | device | wall s | CPU s | RSS growth MiB | CUDA growth MiB | embeddings MiB | N x N float32 MiB "
        "| same-cluster neighbours |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["knn"]:
        lines.append(
            f"| {r['n']:,} x {r['dim']}, {r['k']} | {r['device']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{_fmt(r['rss_growth_mib'], '.0f')} | {_fmt(r['cuda_growth_mib'], '.0f')} | {r['embeddings_mib']:.0f} | "
            f"{r['n_by_n_float32_mib']:,.0f} | {r['same_cluster_neighbour_fraction']:.3f} |"
        )
    lines += [
        "",
        "## text density (fit + ELBO + inverse-density weights)",
        "",
        "| N x D | device | fit s | ELBO s | weights s | total wall s | total CPU s | RSS growth MiB "
        "| mean log w: single captions / most frequent |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["density"]:
        lines.append(
            f"| {r['n']:,} x {r['dim']} | {r['device']} | {r['fit_seconds']:.1f} | {r['elbo_seconds']:.2f} | "
            f"{r['weights_seconds']:.3f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | "
            f"{_fmt(r['rss_growth_mib'], '.0f')} | {_fmt(r['mean_log_weight_single_captions'], '.2f')} / "
            f"{r['mean_log_weight_most_frequent_caption']:.2f} |"
        )
    density_by_n = {r["n"]: r for r in result["density"]}
    totals = [(r, density_by_n[r["n"]]) for r in result["knn"] if r["n"] in density_by_n]
    if totals:
        lines += ["", "## index build from embeddings (k-NN + text density, one after the other)", ""]
        for knn, density in totals:
            lines.append(
                f"- N = {knn['n']:,} x {knn['dim']}, k = {knn['k']}, {knn['device']}: "
                f"{knn['seconds'] + density['seconds']:.1f} s wall ({knn['seconds']:.1f} + {density['seconds']:.1f})"
            )
    lines += [
        "",
        "RSS growth = peak resident memory during the call minus resident memory at its start (inputs excluded).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    with num_threads(args.threads):
        info = machine_info(device)
        knn = [bench_knn(n, args.dim, args.k, args.chunk_size, device, args.seed) for n in args.sizes]
        density = [
            bench_density(n, args.dim, device, args.seed, args.density_max_steps) for n in args.density_sizes
        ]
    if hasattr(os, "getloadavg"):
        info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {
        "command": "python benchmarks/bench_index.py " + shlex.join(args.argv),
        "machine": info,
        "knn": knn,
        "density": density,
    }
    publish(result, markdown_report(result), args.output_dir, "bench_index")
    return result


if __name__ == "__main__":
    main()
