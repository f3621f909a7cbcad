"""Validation prompts, seeds and the labelled grid: exact choices, exact boxes, exact pixels (no models)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from pogdiff import validation
from pogdiff.errors import UserError
from pogdiff.seeds import validation_seed
from pogdiff.validation import (
    BACKGROUND,
    SEPARATOR_COLOR,
    GridLayout,
    ValidationPrompt,
    auto_validation_prompts,
    grid_layout,
    prompts_from_user,
    save_validation_grid,
    validation_grid,
    validation_grid_layout,
    validation_grid_name,
)

# Rows, interleaved on purpose: Bob 4 images, Alice 4 (ties Bob, wins by name), Carl 3, Dora 2, Eve 1, Finn 2.
IDENTITIES = ["Bob", "Alice", "Carl", "Bob", "Dora", "Alice", "Eve", "Bob", "Carl", "Alice"]
IDENTITIES += ["Finn", "Dora", "Bob", "Alice", "Carl", "Finn"]
CAPTIONS = [f"caption {row} of {name}" for row, name in enumerate(IDENTITIES)]

RED, GREEN, BLUE, YELLOW, CYAN = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)


def solid(color: tuple[int, int, int], size: tuple[int, int] = (32, 32)) -> Image.Image:
    return Image.new("RGB", size, color)


def crop(image: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(image.crop(box))


def is_solid(image: Image.Image, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> bool:
    return bool((crop(image, box) == np.array(color, dtype=np.uint8)).all())


# ---------------------------------------------------------------- prompts


def test_auto_prompts_majority_then_few_shot_with_ties_by_name():
    prompts = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=2)
    assert [p.identity for p in prompts] == ["Alice", "Bob", "Eve", "Dora"]
    assert [p.prompt for p in prompts] == [
        "caption 1 of Alice",
        "caption 0 of Bob",
        "caption 6 of Eve",
        "caption 4 of Dora",
    ]
    assert [p.num_train_images for p in prompts] == [4, 4, 1, 2]
    assert [p.few_shot for p in prompts] == [False, False, True, True]
    assert prompts[0].train_rows == (1, 5, 9, 13)
    assert prompts[1].train_rows == (0, 3, 7, 12)
    assert prompts[2].train_rows == (6,)
    assert prompts[3].train_rows == (4, 11)  # Dora and Finn tie at 2: Dora by name


def test_auto_prompts_counts_and_threshold():
    prompts = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=3, num_majority=3, num_few_shot=1)
    # Only Alice and Bob have more than 3 images; Carl (3) is now few-shot but Eve (1) has fewer.
    assert [p.identity for p in prompts] == ["Alice", "Bob", "Eve"]
    prompts = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=2, num_majority=0, num_few_shot=9)
    assert [p.identity for p in prompts] == ["Eve", "Dora", "Finn"]


def test_auto_prompts_without_few_shot_identities_is_majority_only():
    prompts = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=0, num_majority=3)
    assert [p.identity for p in prompts] == ["Alice", "Bob", "Carl"]
    assert not any(p.few_shot for p in prompts)


def test_auto_prompts_when_everyone_is_few_shot_is_few_shot_only():
    prompts = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=10)
    assert [p.identity for p in prompts] == ["Eve", "Dora"]
    assert all(p.few_shot for p in prompts)
    everyone = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=10, num_few_shot=10)
    assert [p.identity for p in everyone] == ["Eve", "Dora", "Finn", "Carl", "Alice", "Bob"]
    assert len({p.identity for p in everyone}) == len(everyone)


def test_auto_prompts_template():
    prompts = auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=2, template="a photo of {name}")
    assert [p.prompt for p in prompts] == [
        "a photo of Alice",
        "a photo of Bob",
        "a photo of Eve",
        "a photo of Dora",
    ]
    assert prompts[0].train_rows == (1, 5, 9, 13)
    with pytest.raises(UserError, match=r"\{name\}"):
        auto_validation_prompts(IDENTITIES, CAPTIONS, few_shot_max=2, template="a photo of {person}")


def test_auto_prompts_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="captions"):
        auto_validation_prompts(["a", "b"], ["only one"], few_shot_max=2)


def test_prompts_from_user():
    prompts = prompts_from_user(["a cat", "a dog"])
    assert prompts == [ValidationPrompt("a cat", None, None, ()), ValidationPrompt("a dog", None, None, ())]
    assert prompts[0].label == "a cat"
    with pytest.raises(TypeError):
        prompts_from_user("a cat")


def test_labels():
    assert ValidationPrompt("p", "Alice", 2, (0, 1), few_shot=True).label == "Alice · 2 train imgs · few-shot"
    assert ValidationPrompt("p", "Bob", 30, tuple(range(30))).label == "Bob · 30 train imgs"
    assert ValidationPrompt("p", "Eve", 1, (6,), few_shot=True).label == "Eve · 1 train img · few-shot"
    assert ValidationPrompt("a photo of a cat").label == "a photo of a cat"


# ---------------------------------------------------------------- seeds


def test_validation_seed_exact_values():
    assert validation_seed(0, 0, 0) == 0
    assert validation_seed(42, 0, 3) == 45
    assert validation_seed(42, 2, 1) == 2043
    assert validation_seed(7, 1, 999) == 2006
    seeds = {validation_seed(5, p, i) for p in range(4) for i in range(8)}
    assert len(seeds) == 32
    with pytest.raises(ValueError):
        validation_seed(0, 0, 1000)
    with pytest.raises(ValueError):
        validation_seed(0, -1, 0)


# ---------------------------------------------------------------- layout


def test_grid_layout_exact_boxes():
    layout = grid_layout(2, 1, 2, cell=10, label_width=20, gap=2, title_height=5, header_height=3)
    # x: gap 2 | label 2..22 | gap | train 24..34 | gap | separator 36..40 | gap | samples 42..52, 54..64 | gap
    # y: gap 2 | title 2..7 | gap | header 9..12 | gap | rows 14..24, 26..36 | gap
    assert layout == GridLayout(
        width=66,
        height=38,
        labels=((2, 14, 22, 24), (2, 26, 22, 36)),
        train=(((24, 14, 34, 24),), ((24, 26, 34, 36),)),
        samples=(((42, 14, 52, 24), (54, 14, 64, 24)), ((42, 26, 52, 36), (54, 26, 64, 36))),
        separator=(36, 14, 40, 36),
        title=(2, 2, 64, 7),
        train_header=(24, 9, 34, 12),
        samples_header=(42, 9, 64, 12),
    )
    assert layout.size == (66, 38)


def test_grid_layout_without_training_images_title_or_header():
    layout = grid_layout(1, 0, 1, cell=10, label_width=20, gap=2)
    assert layout == GridLayout(
        width=36,
        height=14,
        labels=((2, 2, 22, 12),),
        train=((),),
        samples=(((24, 2, 34, 12),),),
        separator=None,
        title=None,
        train_header=None,
        samples_header=None,
    )


# ---------------------------------------------------------------- grid


def grid_rows() -> list:
    alice = ValidationPrompt("a photo of Alice", "Alice", 2, (0, 1), few_shot=True)
    bob = ValidationPrompt("a photo of Bob", "Bob", 30, tuple(range(2, 32)))
    user = ValidationPrompt("a user prompt")
    return [
        (bob, [solid(CYAN), solid(CYAN), solid(CYAN), solid(CYAN)], [solid(RED), solid(GREEN), solid(BLUE)]),
        (alice, [solid(YELLOW), solid(GREEN, (64, 32))], [solid(BLUE), solid(RED), solid(GREEN)]),
        (user, [], [solid(GREEN), solid(BLUE)]),
    ]


def test_validation_grid_size_is_the_layouts():
    rows = grid_rows()
    layout = validation_grid_layout(rows, title="step 200")
    grid = validation_grid(rows, title="step 200")
    assert grid.mode == "RGB"
    assert grid.size == layout.size
    assert len(layout.labels) == 3
    assert [len(r) for r in layout.train] == [3, 3, 3]  # max_train_images caps Bob's 4
    assert [len(r) for r in layout.samples] == [3, 3, 3]
    assert all(b[2] - b[0] == 32 and b[3] - b[1] == 32 for r in layout.samples for b in r)
    assert layout.title is not None
    assert validation_grid_layout(rows).title is None
    assert validation_grid(rows).height < grid.height


def test_validation_grid_pixels():
    rows = grid_rows()
    layout = validation_grid_layout(rows, title="step 200")
    grid = validation_grid(rows, title="step 200")
    # Sample cells are the given images, pixel for pixel.
    for r, (_, _, samples) in enumerate(rows):
        for box, sample in zip(layout.samples[r], samples):
            assert (crop(grid, box) == np.asarray(sample)).all()
    # Training images land in their boxes; a wide one is fitted and centred (32x16 at rows 8..24).
    for box in layout.train[0]:
        assert is_solid(grid, box, CYAN)
    assert is_solid(grid, layout.train[1][0], YELLOW)
    left, top, right, bottom = layout.train[1][1]
    assert is_solid(grid, (left, top + 8, right, top + 24), GREEN)
    assert is_solid(grid, (left, top, right, top + 8), BACKGROUND)
    assert is_solid(grid, (left, top + 24, right, bottom), BACKGROUND)
    # Padding cells (Alice's third training image, the user row's training images and third sample) are white.
    for box in [layout.train[1][2], *layout.train[2], layout.samples[2][2]]:
        assert is_solid(grid, box, BACKGROUND)
    # The separator is visible; the labels, the headers and the title have text in them.
    assert layout.separator is not None and is_solid(grid, layout.separator, SEPARATOR_COLOR)
    for box in [*layout.labels, layout.title, layout.train_header, layout.samples_header]:
        assert crop(grid, box).max(axis=2).min() < 100, box


def test_long_prompt_stays_in_its_label_box():
    prompt = ValidationPrompt(
        "word " * 200 + "Supercalifragilisticexpialidocious" * 5, "Alice", 2, few_shot=True
    )
    rows = [(prompt, [solid(RED)], [solid(BLUE)])]
    layout = validation_grid_layout(rows)
    grid = validation_grid(rows)
    label = layout.labels[0]
    outside = np.asarray(grid).copy()
    outside[label[1] : label[3], label[0] : label[2]] = 255
    for box in [
        *layout.train[0],
        *layout.samples[0],
        layout.separator,
        layout.train_header,
        layout.samples_header,
    ]:
        outside[box[1] : box[3], box[0] : box[2]] = 255
    assert (outside == 255).all()  # nothing drawn outside the boxes


def test_wrap_and_fit_lines():
    font = validation._font(12)
    lines = validation._wrap("a photo of " + "x" * 80, font, 60)
    assert lines[0] == "a photo of" and all(font.getlength(line) <= 60 for line in lines)
    assert "".join(lines[1:]) == "x" * 80
    fitted = validation._fit_lines(lines, font, 60, 2)
    assert len(fitted) == 2 and fitted[0] == "a photo of" and fitted[1].endswith("...")
    assert font.getlength(fitted[1]) <= 60
    assert validation._fit_lines(["one", "two"], font, 60, 2) == ["one", "two"]


def test_grid_without_sized_font_and_non_latin_text(monkeypatch):
    original = ImageFont.load_default

    def old_pillow(size=None):
        if size is not None:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return original()

    monkeypatch.setattr(ImageFont, "load_default", old_pillow)
    rows = [(ValidationPrompt("一張照片 of Zoë ✓", "Zoë", 2, (0, 1), True), [solid(RED)], [solid(BLUE)])]
    grid = validation_grid(rows, title="step 1 ✓")
    assert grid.size == validation_grid_layout(rows, title="step 1 ✓").size


def test_validation_grid_errors_and_explicit_cell():
    with pytest.raises(ValueError):
        validation_grid([])
    with pytest.raises(ValueError, match="cell"):
        validation_grid([(ValidationPrompt("p"), [], [])])
    rows = [(ValidationPrompt("p"), [], [solid(RED, (64, 64))])]
    layout = validation_grid_layout(rows, cell=32)
    grid = validation_grid(rows, cell=32)
    assert grid.size == layout.size
    assert is_solid(grid, layout.samples[0][0], RED)  # 64x64 scaled down to the 32-pixel cell


# ---------------------------------------------------------------- saving


def test_save_validation_grid(tmp_path):
    assert validation_grid_name(200) == "step-000200.png"
    assert validation_grid_name(1234567) == "step-1234567.png"
    grid = validation_grid([(ValidationPrompt("p"), [], [solid(RED)])], title="step 200")
    path = save_validation_grid(grid, tmp_path / "run", 200)
    assert path == tmp_path / "run" / "validation" / "step-000200.png"
    with Image.open(path) as saved:
        assert saved.size == grid.size
        assert (np.asarray(saved) == np.asarray(grid)).all()
    with pytest.raises(ValueError):
        validation_grid_name(-1)


def test_a_small_cell_keeps_identity_and_count_before_the_prompt():
    """With room for only two lines, the label shows who the row is and how many images it had; the prompt goes."""
    from pogdiff.validation import _font, _label_lines, _line_height

    font = _font(12)
    prompt = ValidationPrompt("An image of Alice.", identity="Alice", num_train_images=2, few_shot=True)
    two_lines = 2 * _line_height(font)
    assert _label_lines(prompt, font, 160, two_lines) == ["Alice", "2 train imgs · few-shot"]
    # With room to spare the prompt follows after a blank line.
    assert _label_lines(prompt, font, 160, 5 * _line_height(font)) == [
        "Alice", "2 train imgs · few-shot", "", "An image of Alice.",
    ]  # fmt: skip
