"""Validation that watches the few-shot identities: which prompts to sample, with which seeds, in one grid.

A plain validation prompt says little about an imbalanced run: the majority identities look fine early and the
few-shot ("minority") ones are where PoGDiff has to help. So the trainer, by default, picks the prompts once
from the training data (:func:`auto_validation_prompts`): a couple of the identities with the most images and a
couple of the few-shot ones (at most ``few_shot_max`` images, the same cut as
:func:`pogdiff.identities.shot_split`). At every validation it samples ``num_validation_images`` images per prompt
with the seeds of :func:`pogdiff.seeds.validation_seed`, which do not depend on the step, so a row of one grid is directly
comparable with the same row of any other. :func:`validation_grid` lays out one row per prompt::

    step 200
                                train              samples
    Alice                     [img] [img] [pad] | [s0] [s1] [s2] [s3]
    2 train imgs · few-shot                     |
                                                |
    a photo of Alice smiling                    |
    at the camera, ...                          |

a label column, up to ``max_train_images`` of that identity's training images, a separator and the samples,
under an optional title (e.g. ``step 200``). :func:`save_validation_grid` writes it to
``output_dir/validation/step-000200.png``. The geometry is :func:`grid_layout`, a pure function of the counts
and sizes, so every box is testable exactly. PIL and the standard library only; no models.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import UserError
from .identities import identity_counts, is_few_shot

Box = tuple[int, int, int, int]
"""A pixel box ``(left, top, right, bottom)``, right/bottom exclusive (PIL's convention)."""

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
SEPARATOR_COLOR = (96, 96, 96)


def pipeline_guidance_scale(pipeline: Any) -> float:
    """The classifier-free guidance scale `pipeline` samples at when none is passed (7.5 for Stable Diffusion):
    the default of its `__call__`, read rather than copied so that it follows the pipeline."""
    return float(inspect.signature(type(pipeline).__call__).parameters["guidance_scale"].default)


def validation_sampling(
    guidance_scale: float | None, default_guidance_scale: float
) -> tuple[dict[str, float], str]:
    """The keyword arguments of a validation's pipeline call, and the title text that states the guidance used.

    `guidance_scale` None keeps the pipeline's own default (`default_guidance_scale`), and the title says so: a
    grid sampled at 7.5 next to an evaluation at another scale would otherwise be read as a change in the model.
    """
    if guidance_scale is None:
        return {}, f"guidance {default_guidance_scale:g} (the pipeline's default)"
    return {"guidance_scale": guidance_scale}, f"guidance {guidance_scale:g}"


@dataclass(frozen=True)
class ValidationPrompt:
    """One validation row: the prompt, and (for prompts chosen from the data) whose identity it shows.

    ``train_rows`` are the dataset rows of the identity's training images, in dataset order, for showing them
    beside the samples; empty for prompts the user gave. ``few_shot`` marks identities with at most
    ``few_shot_max`` training images.
    """

    prompt: str
    identity: str | None = None
    num_train_images: int | None = None
    train_rows: tuple[int, ...] = ()
    few_shot: bool = False

    @property
    def label(self) -> str:
        """One line for logs and captions: ``Alice · 2 train imgs · few-shot``, ``Bob · 30 train imgs``, or,
        for a user prompt (no identity), the prompt itself."""
        if self.identity is None:
            return self.prompt
        parts = [self.identity]
        if self.num_train_images is not None:
            parts.append(_train_images_text(self.num_train_images))
        if self.few_shot:
            parts.append("few-shot")
        return " · ".join(parts)


def _train_images_text(count: int) -> str:
    return f"{count} train img" if count == 1 else f"{count} train imgs"


def auto_validation_prompts(
    identities: Sequence[str],
    captions: Sequence[str],
    few_shot_max: int,
    num_majority: int = 2,
    num_few_shot: int = 2,
    template: str | None = None,
) -> list[ValidationPrompt]:
    """Validation prompts for the identities with the most images and the few-shot ones, deterministically.

    ``identities`` and ``captions`` are per training row. Few-shot identities have at most ``few_shot_max``
    images (as in :func:`pogdiff.identities.shot_split`); the others are the majority candidates. Chosen are the
    ``num_majority`` majority identities with the most images and the ``num_few_shot`` few-shot identities with
    the fewest, ties broken by name in both, majority rows first. When one group is empty (every identity
    few-shot, or none) only the other appears, so no identity is chosen twice. The prompt is the identity's
    first training caption, or ``template.format(name=identity)`` when a template is given.
    """
    if len(identities) != len(captions):
        raise ValueError(
            f"{len(identities)} identities but {len(captions)} captions: give one of each per row."
        )
    if num_majority < 0 or num_few_shot < 0:
        raise ValueError(
            f"num_majority and num_few_shot must be >= 0, got {num_majority} and {num_few_shot}."
        )
    counts = identity_counts(identities)
    rows: dict[str, list[int]] = {}
    for row, identity in enumerate(identities):
        rows.setdefault(identity, []).append(row)
    majority = sorted(
        (name for name in counts if not is_few_shot(counts[name], few_shot_max)),
        key=lambda n: (-counts[n], n),
    )
    few = sorted(
        (name for name in counts if is_few_shot(counts[name], few_shot_max)), key=lambda n: (counts[n], n)
    )
    chosen = [(name, False) for name in majority[:num_majority]] + [
        (name, True) for name in few[:num_few_shot]
    ]
    prompts = []
    for name, few_shot in chosen:
        prompt = captions[rows[name][0]] if template is None else _format_template(template, name)
        prompts.append(
            ValidationPrompt(
                prompt=prompt,
                identity=name,
                num_train_images=counts[name],
                train_rows=tuple(rows[name]),
                few_shot=few_shot,
            )
        )
    return prompts


def _format_template(template: str, name: str) -> str:
    try:
        return template.format(name=name)
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(
            f"The validation prompt template {template!r} must use only the field {{name}} (the identity), "
            f"e.g. 'a photo of {{name}}': {error!r}."
        ) from None


def prompts_from_user(prompts: Sequence[str]) -> list[ValidationPrompt]:
    """Validation rows for prompts the user gave: no identity, no training images."""
    if isinstance(prompts, str):
        raise TypeError("prompts_from_user takes a sequence of prompts, not one string.")
    return [ValidationPrompt(prompt=prompt) for prompt in prompts]


@dataclass(frozen=True)
class GridLayout:
    """Where everything of a validation grid goes, in pixels of a ``width`` x ``height`` canvas.

    ``labels[r]`` is row r's label box, ``train[r][j]`` / ``samples[r][j]`` its j-th training-image / sample
    cell; ``separator`` is the vertical bar between training images and samples (None without training
    columns); ``title``, ``train_header`` and ``samples_header`` are None when their height is 0 (or, for the
    train header, without training columns).
    """

    width: int
    height: int
    labels: tuple[Box, ...]
    train: tuple[tuple[Box, ...], ...]
    samples: tuple[tuple[Box, ...], ...]
    separator: Box | None
    title: Box | None
    train_header: Box | None
    samples_header: Box | None

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)


def grid_layout(
    num_rows: int,
    num_train: int,
    num_samples: int,
    cell: int,
    label_width: int,
    gap: int,
    *,
    title_height: int = 0,
    header_height: int = 0,
    separator_width: int = 4,
) -> GridLayout:
    """The geometry of a validation grid: ``gap`` around and between everything.

    From the top: an optional title line (``title_height``, full width), an optional header line
    (``header_height``, "train" over the training columns, "samples" over the sample columns), then
    ``num_rows`` rows of ``cell`` height. Across a row: the label (``label_width``), ``num_train`` training
    cells, the separator (``separator_width``, only when ``num_train > 0``) and ``num_samples`` sample cells.
    """
    if (
        min(num_rows, num_train, num_samples, label_width, gap, title_height, header_height, separator_width)
        < 0
    ):
        raise ValueError("grid_layout: counts and sizes must be >= 0.")
    if cell <= 0:
        raise ValueError(f"grid_layout: cell must be > 0, got {cell}.")
    step = cell + gap
    label_left, label_right = gap, gap + label_width
    train_left = label_right + gap
    train_lefts = [train_left + j * step for j in range(num_train)]
    if num_train:
        separator_left = train_lefts[-1] + cell + gap
        samples_left = separator_left + separator_width + gap
    else:
        separator_left = None
        samples_left = train_left
    sample_lefts = [samples_left + j * step for j in range(num_samples)]
    width = (sample_lefts[-1] + cell if num_samples else samples_left - gap) + gap

    top = gap
    title = None
    if title_height:
        title = (gap, top, width - gap, top + title_height)
        top += title_height + gap
    train_header = samples_header = None
    if header_height:
        if num_train:
            train_header = (train_left, top, train_lefts[-1] + cell, top + header_height)
        if num_samples:
            samples_header = (samples_left, top, sample_lefts[-1] + cell, top + header_height)
        top += header_height + gap
    row_tops = [top + r * step for r in range(num_rows)]
    rows_bottom = row_tops[-1] + cell if num_rows else top - gap
    height = rows_bottom + gap

    separator = None
    if separator_left is not None and num_rows:
        separator = (separator_left, row_tops[0], separator_left + separator_width, rows_bottom)
    return GridLayout(
        width=width,
        height=height,
        labels=tuple((label_left, t, label_right, t + cell) for t in row_tops),
        train=tuple(tuple((x, t, x + cell, t + cell) for x in train_lefts) for t in row_tops),
        samples=tuple(tuple((x, t, x + cell, t + cell) for x in sample_lefts) for t in row_tops),
        separator=separator,
        title=title,
        train_header=train_header,
        samples_header=samples_header,
    )


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's default font at ``size`` pixels (Pillow >= 10.1), else its fixed-size bitmap default."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _drawable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """The bitmap fallback font only encodes Latin-1: replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.encode("latin-1", "replace").decode("latin-1")


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    return int(font.getbbox("Ag")[3]) + 2


def _wrap(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than a line is broken between characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    return lines


def _fit_lines(
    lines: list[str], font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, max_lines: int
) -> list[str]:
    """At most ``max_lines`` lines; when some are cut, the last kept one ends in ``...`` within ``width``."""
    if len(lines) <= max_lines:
        return lines
    if max_lines <= 0:
        return []
    kept = lines[:max_lines]
    last = kept[-1]
    while last and font.getlength(last + "...") > width:
        last = last[:-1]
    kept[-1] = last.rstrip() + "..."
    return kept


def _label_lines(
    prompt: ValidationPrompt, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, height: int
) -> list[str]:
    """The label column's text: identity, training images and few-shot marker, a blank line, the prompt."""
    head: list[str] = []
    if prompt.identity is not None:
        head.extend(_fit_lines(_wrap(_drawable(prompt.identity, font), font, width), font, width, 1))
        facts = []
        if prompt.num_train_images is not None:
            facts.append(_train_images_text(prompt.num_train_images))
        if prompt.few_shot:
            facts.append("few-shot")
        if facts:
            head.extend(_wrap(_drawable(" · ".join(facts), font), font, width))
    max_lines = max(height // _line_height(font), 1)
    if head and len(head) >= max_lines - 1:
        # No room for the prompt: who the row shows and how many images it had matter more.
        return _fit_lines(head, font, width, max_lines)
    body = _wrap(_drawable(prompt.prompt, font), font, width)
    return _fit_lines(head + ([""] if head else []) + body, font, width, max_lines)


def _paste_fitted(canvas: Image.Image, image: Image.Image, box: Box) -> None:
    """``image`` scaled to fit ``box`` (aspect kept, centred); an image of the box's size is pasted as is."""
    width, height = box[2] - box[0], box[3] - box[1]
    image = image.convert("RGB")
    if image.size != (width, height):
        image = ImageOps.contain(image, (width, height), Image.Resampling.LANCZOS)
    canvas.paste(image, (box[0] + (width - image.width) // 2, box[1] + (height - image.height) // 2))


def _draw_lines(
    canvas: Image.Image,
    box: Box,
    lines: Sequence[str],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    *,
    centered: bool = False,
) -> None:
    """Text lines drawn from the top of ``box`` (left-aligned or centred), clipped to the box."""
    width, height = box[2] - box[0], box[3] - box[1]
    if width <= 0 or height <= 0:
        return
    patch = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(patch)
    line_height = _line_height(font)
    for i, line in enumerate(lines):
        x = max((width - int(font.getlength(line))) // 2, 0) if centered else 0
        draw.text((x, i * line_height), line, fill=TEXT_COLOR, font=font)
    canvas.paste(patch, box[:2])


GridRow = tuple[ValidationPrompt, Sequence[Image.Image], Sequence[Image.Image]]
"""One row of a validation grid: the prompt, its identity's training images and the samples."""


@dataclass(frozen=True)
class _Style:
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    title_font: ImageFont.ImageFont | ImageFont.FreeTypeFont
    gap: int
    label_width: int
    separator_width: int


def _style(cell: int) -> _Style:
    """Fonts and spacing scaled with the cell: a 512-pixel cell gets 26-pixel text, 16-pixel gaps."""
    gap = max(4, cell // 32)
    return _Style(
        font=_font(max(12, round(cell / 20))),
        title_font=_font(max(14, round(cell / 14))),
        gap=gap,
        label_width=max(160, cell),
        separator_width=max(2, gap // 2),
    )


def _grid_cell(rows: Sequence[GridRow], cell: int | None) -> int:
    if not rows:
        raise ValueError("validation_grid needs at least one row.")
    if cell is not None:
        return int(cell)
    first = next((samples[0] for _, _, samples in rows if len(samples)), None)
    if first is None:
        raise ValueError("validation_grid: no samples to take the cell size from; pass cell=.")
    return max(first.size)


def validation_grid_layout(
    rows: Sequence[GridRow], *, cell: int | None = None, max_train_images: int = 3, title: str | None = None
) -> GridLayout:
    """The :class:`GridLayout` that :func:`validation_grid` draws these rows with (same arguments)."""
    if max_train_images < 0:
        raise ValueError(f"max_train_images must be >= 0, got {max_train_images}.")
    cell = _grid_cell(rows, cell)
    style = _style(cell)
    return grid_layout(
        len(rows),
        min(max_train_images, max(len(train) for _, train, _ in rows)),
        max(len(samples) for _, _, samples in rows),
        cell,
        style.label_width,
        style.gap,
        title_height=_line_height(style.title_font) if title else 0,
        header_height=_line_height(style.font),
        separator_width=style.separator_width,
    )


def validation_grid(
    rows: Sequence[GridRow],
    *,
    cell: int | None = None,
    max_train_images: int = 3,
    title: str | None = None,
) -> Image.Image:
    """One labelled RGB image of a validation: per row ``(prompt, training images, samples)``.

    Each row shows the label (identity, number of training images, few-shot marker, then the prompt wrapped
    and cut with ``...`` to the cell's height), up to ``max_train_images`` training images under a "train"
    header, a separator and the samples under a "samples" header; rows with fewer images than the widest row
    are padded with white. ``cell`` (pixels, square) defaults to the larger side of the first sample; images
    of another size are scaled to fit their cell, centred. ``title`` (e.g. ``"step 200"``) goes on a line on
    top. White background, black text, PIL's default font scaled with the cell. The boxes are
    :func:`validation_grid_layout`'s.
    """
    layout = validation_grid_layout(rows, cell=cell, max_train_images=max_train_images, title=title)
    style = _style(_grid_cell(rows, cell))
    font, title_font = style.font, style.title_font
    canvas = Image.new("RGB", layout.size, BACKGROUND)
    if layout.title is not None and title:
        width = layout.title[2] - layout.title[0]
        lines = _fit_lines(_wrap(_drawable(title, title_font), title_font, width), title_font, width, 1)
        _draw_lines(canvas, layout.title, lines, title_font)
    if layout.train_header is not None:
        _draw_lines(canvas, layout.train_header, ["train"], font, centered=True)
    if layout.samples_header is not None:
        _draw_lines(canvas, layout.samples_header, ["samples"], font, centered=True)
    if layout.separator is not None:
        canvas.paste(SEPARATOR_COLOR, layout.separator)
    for r, (prompt, train, samples) in enumerate(rows):
        box = layout.labels[r]
        _draw_lines(canvas, box, _label_lines(prompt, font, box[2] - box[0], box[3] - box[1]), font)
        for image, cell_box in zip(train, layout.train[r]):
            _paste_fitted(canvas, image, cell_box)
        for image, cell_box in zip(samples, layout.samples[r]):
            _paste_fitted(canvas, image, cell_box)
    return canvas


def validation_grid_name(global_step: int) -> str:
    """The file name of the grid of step ``global_step``: ``step-000200.png`` (sorts by step)."""
    if global_step < 0:
        raise ValueError(f"global_step must be >= 0, got {global_step}.")
    return f"step-{int(global_step):06d}.png"


def save_validation_grid(grid: Image.Image, output_dir: str | Path, global_step: int) -> Path:
    """Write ``grid`` to ``output_dir/validation/step-{global_step:06d}.png`` (folders made) and return it."""
    path = Path(output_dir) / "validation" / validation_grid_name(global_step)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
