"""Synthetic scenes: 1-4 coloured shapes on a 3x3 grid, drawn with PIL and described in a caption."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (40, 90, 220),
    "yellow": (235, 205, 40),
    "purple": (145, 70, 190),
    "orange": (245, 130, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: tuple[str, ...] = ("small", "large")
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout, so they never overlap
MAX_OBJECTS = 4
MIN_SCENE_SIZE = 24

_SIZE_RADIUS = {"small": 0.24, "large": 0.42}  # half-extent as a fraction of the cell side
_CELL_WORDS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)


@dataclass(frozen=True)
class SceneObject:
    """One shape: its attributes, grid cell and pixel centre and half-extent."""

    color: str
    shape: str
    size: str
    row: int
    col: int
    cx: float
    cy: float
    radius: float

    def phrase(self) -> str:
        """'large red circle'."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """The objects of one image and its background grey level."""

    objects: tuple[SceneObject, ...]
    background: int
    size: int


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a random scene: 1-4 objects in distinct cells, each jittered inside its cell."""
    if size < MIN_SCENE_SIZE:
        raise ValueError(f"scene size must be at least {MIN_SCENE_SIZE} pixels, got {size}")
    cell = size / GRID
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    color_names = list(COLORS)
    objects = []
    for c in cells:
        row, col = divmod(c, GRID)
        size_name = SIZES[int(rng.integers(len(SIZES)))]
        radius = _SIZE_RADIUS[size_name] * cell
        slack = max(0.0, cell / 2 - radius - 1.0)
        jx, jy = rng.uniform(-slack, slack, size=2)
        objects.append(
            SceneObject(
                color=color_names[int(rng.integers(len(color_names)))],
                shape=SHAPES[int(rng.integers(len(SHAPES)))],
                size=size_name,
                row=row,
                col=col,
                cx=(col + 0.5) * cell + float(jx),
                cy=(row + 0.5) * cell + float(jy),
                radius=radius,
            )
        )
    background = int(rng.integers(15, 60))
    return Scene(objects=tuple(objects), background=background, size=size)


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x, y, r = obj.cx, obj.cy, obj.radius
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        s = r * 0.85  # same visual area class as the circle
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {obj.shape!r}")


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image."""
    image = Image.new("RGB", (scene.size, scene.size), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj)
    return image


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of an image (deterministic for identical pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def location_phrase(obj: SceneObject) -> str:
    """'at the top left', 'in the center'."""
    word = _CELL_WORDS[obj.row][obj.col]
    return "in the center" if word == "center" else f"at the {word}"


def caption(scene: Scene) -> str:
    """All objects in reading order with their place: 'a large red circle at the top left and ...'."""
    parts = [f"a {obj.phrase()} {location_phrase(obj)}" for obj in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]
