"""Procedural images for the demo world: one object drawn over a mood-styled scene.

The object (what is in the picture) is a cartoon shape with a dark outline, placed with random
position, scale, rotation, mirror and colours, so it is recognisable by shape, not by colour.
The mood (the picture's tone) is carried by everything else: background palette and gradient,
texture overlays (confetti, waves, rain, branches, cracks, light rays) and a final colour grade
(brightness, contrast, saturation, vignette, grain). A per-post ``mood_strength`` in [0, 1]
blends the mood styling with a neutral random style, so weakly expressed moods overlap.

Drawing happens with PIL at ``SUPERSAMPLE`` times the output size and is downsampled with
LANCZOS for antialiasing; all coordinates are relative to the image size, so any size >= 16
works. The tables ``OBJECT_DRAWINGS`` and ``MOOD_STYLES`` are ordered like
``vise_jax.demo.world.OBJECTS`` and ``MOODS``; world.py checks this at import.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from vise_jax.demo.spec import MIN_IMAGE_SIZE

SUPERSAMPLE = 2

Colour = tuple[int, int, int]
Point = tuple[float, float]
HSV = tuple[float, float, float]

# Unit circle used to draw ellipses as polygons, so that they rotate with the object.
_CIRCLE_STEPS = 24
_UNIT_CIRCLE = np.stack(
    [
        np.cos(np.linspace(0, 2 * np.pi, _CIRCLE_STEPS, endpoint=False)),
        np.sin(np.linspace(0, 2 * np.pi, _CIRCLE_STEPS, endpoint=False)),
    ],
    axis=1,
)


# ---------------------------------------------------------------------------------------------
# Colour helpers


def hsv_colour(hue: float, saturation: float, value: float) -> Colour:
    """HSV in [0, 1] (hue wraps) to an 8-bit RGB tuple."""
    red, green, blue = colorsys.hsv_to_rgb(
        hue % 1.0, min(max(saturation, 0.0), 1.0), min(max(value, 0.0), 1.0)
    )
    return round(red * 255), round(green * 255), round(blue * 255)


def _jittered_hsv(rng: np.random.Generator, hsv: Sequence[float], jitter: Sequence[float]):
    """A colour near ``hsv``: each channel moved uniformly by up to ``jitter``."""
    hue, sat, val = (c + rng.uniform(-j, j) for c, j in zip(hsv, jitter, strict=True))
    return hue, min(max(sat, 0.0), 1.0), min(max(val, 0.0), 1.0)


def _mix(a: np.ndarray, b: np.ndarray, weight_of_b: float) -> np.ndarray:
    return a * (1.0 - weight_of_b) + b * weight_of_b


# ---------------------------------------------------------------------------------------------
# Objects: drawn in local coordinates where the object spans roughly [-1, 1] (y points down)


@dataclasses.dataclass(frozen=True)
class ObjectColours:
    """The colour roles a drawing uses; sampled per post."""

    main: Colour
    accent: Colour
    dark: Colour
    light: Colour
    natural: Colour  # the class's typical colour (green leaves, grey rock) or a random one
    outline: Colour


class Pen:
    """Draws shapes given in an object's local frame onto the supersampled canvas."""

    def __init__(
        self,
        draw: ImageDraw.ImageDraw,
        centre: Point,
        radius: float,
        angle: float,
        mirrored: bool,
        outline: Colour,
    ):
        self.draw = draw
        self.outline = outline
        self.outline_width = max(1, round(radius * 0.07))
        self.radius = radius
        cos, sin = math.cos(angle), math.sin(angle)
        flip = -1.0 if mirrored else 1.0
        # Row-vector transform: local point @ matrix * radius + centre.
        self._matrix = np.array([[flip * cos, flip * sin], [-sin, cos]]) * radius
        self._centre = np.asarray(centre, dtype=np.float64)

    def _to_canvas(self, points) -> list[float]:
        return (np.asarray(points, dtype=np.float64) @ self._matrix + self._centre).ravel().tolist()

    def polygon(self, points: Sequence[Point], fill: Colour, outlined: bool = True) -> None:
        outline = self.outline if outlined else None
        self.draw.polygon(
            self._to_canvas(points), fill=fill, outline=outline, width=self.outline_width
        )

    def ellipse(
        self, cx: float, cy: float, rx: float, ry: float, fill: Colour, outlined: bool = True
    ) -> None:
        self.polygon(_UNIT_CIRCLE * (rx, ry) + (cx, cy), fill, outlined)

    def line(self, points: Sequence[Point], fill: Colour, width: float) -> None:
        self.draw.line(self._to_canvas(points), fill=fill, width=max(1, round(width * self.radius)))


def _draw_ball(pen: Pen, colours: ObjectColours) -> None:
    pen.ellipse(0, 0, 0.9, 0.9, colours.main)
    pen.ellipse(0, 0, 0.45, 0.9, colours.accent)
    pen.ellipse(0, 0, 0.12, 0.9, colours.main)
    pen.ellipse(-0.4, -0.45, 0.16, 0.1, colours.light, outlined=False)


def _draw_house(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon([(0.45, -0.75), (0.65, -0.75), (0.65, -0.3), (0.45, -0.3)], colours.dark)  # chimney
    pen.polygon([(-0.7, -0.1), (0.7, -0.1), (0.7, 0.9), (-0.7, 0.9)], colours.main)
    pen.polygon([(-0.95, -0.05), (0.0, -0.9), (0.95, -0.05)], colours.accent)
    pen.polygon([(-0.45, 0.35), (-0.15, 0.35), (-0.15, 0.9), (-0.45, 0.9)], colours.dark)
    pen.polygon([(0.15, 0.15), (0.5, 0.15), (0.5, 0.5), (0.15, 0.5)], colours.light)


def _draw_tree(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon([(-0.14, 0.1), (0.14, 0.1), (0.18, 1.0), (-0.18, 1.0)], (110, 70, 35))
    pen.ellipse(-0.38, -0.05, 0.42, 0.38, colours.natural)
    pen.ellipse(0.38, -0.05, 0.42, 0.38, colours.natural)
    pen.ellipse(0.0, -0.45, 0.5, 0.45, colours.natural)


def _draw_mountain(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon([(0.05, 0.8), (0.55, -0.25), (1.0, 0.8)], colours.accent)
    pen.polygon([(-1.0, 0.8), (-0.15, -0.85), (0.75, 0.8)], colours.natural)
    pen.polygon(
        [(-0.15, -0.85), (-0.42, -0.33), (-0.25, -0.4), (-0.13, -0.28), (0.0, -0.4), (0.12, -0.33)],
        colours.light,
    )


def _draw_flower(pen: Pen, colours: ObjectColours) -> None:
    pen.line([(0.0, -0.2), (0.05, 0.5), (0.0, 1.0)], (40, 130, 50), 0.09)
    pen.ellipse(0.25, 0.6, 0.22, 0.1, (50, 150, 60))
    for step in range(6):
        angle = step * math.pi / 3
        pen.ellipse(
            0.36 * math.cos(angle), -0.35 + 0.36 * math.sin(angle), 0.24, 0.24, colours.main
        )
    pen.ellipse(0.0, -0.35, 0.2, 0.2, colours.accent)


def _draw_car(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon([(-0.5, 0.1), (-0.3, -0.35), (0.35, -0.35), (0.6, 0.1)], colours.main)
    pen.polygon([(-0.95, 0.05), (0.95, 0.05), (0.95, 0.55), (-0.95, 0.55)], colours.main)
    pen.polygon([(-0.38, 0.02), (-0.22, -0.25), (-0.02, -0.25), (-0.02, 0.02)], colours.light)
    pen.polygon([(0.08, 0.02), (0.08, -0.25), (0.3, -0.25), (0.45, 0.02)], colours.light)
    for wheel_x in (-0.52, 0.52):
        pen.ellipse(wheel_x, 0.58, 0.24, 0.24, colours.dark)
        pen.ellipse(wheel_x, 0.58, 0.09, 0.09, (170, 170, 170), outlined=False)


def _draw_boat(pen: Pen, colours: ObjectColours) -> None:
    pen.line([(0.0, 0.4), (0.0, -0.95)], colours.outline, 0.06)
    pen.polygon([(0.06, -0.9), (0.06, 0.25), (0.8, 0.25)], colours.main)
    pen.polygon([(-0.06, -0.6), (-0.06, 0.25), (-0.6, 0.25)], colours.light)
    pen.polygon([(-1.0, 0.35), (1.0, 0.35), (0.65, 0.8), (-0.65, 0.8)], colours.accent)


def _draw_fish(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon([(-0.25, -0.3), (0.05, -0.65), (0.25, -0.25)], colours.accent)  # dorsal fin
    pen.polygon([(0.45, 0.0), (0.98, -0.45), (0.98, 0.45)], colours.accent)
    pen.ellipse(-0.1, 0.0, 0.65, 0.4, colours.main)
    pen.ellipse(-0.45, -0.08, 0.12, 0.12, (250, 250, 250))
    pen.ellipse(-0.47, -0.08, 0.05, 0.05, (15, 15, 15), outlined=False)
    pen.line([(0.05, -0.3), (0.15, 0.0), (0.05, 0.3)], colours.outline, 0.05)


def _star_points(outer: float, inner: float, tips: int = 5) -> list[Point]:
    points = []
    for step in range(2 * tips):
        radius = outer if step % 2 == 0 else inner
        angle = -math.pi / 2 + step * math.pi / tips
        points.append((radius * math.cos(angle), radius * math.sin(angle)))
    return points


_STAR = _star_points(1.0, 0.42)


def _draw_star(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon(_STAR, colours.main)
    pen.ellipse(-0.1, -0.15, 0.08, 0.12, colours.light, outlined=False)


def _draw_cat(pen: Pen, colours: ObjectColours) -> None:
    pen.polygon([(-0.62, -0.15), (-0.52, -0.95), (-0.08, -0.5)], colours.main)
    pen.polygon([(0.62, -0.15), (0.52, -0.95), (0.08, -0.5)], colours.main)
    pen.ellipse(0.0, 0.12, 0.7, 0.62, colours.main)
    for side in (-1, 1):
        pen.ellipse(side * 0.27, -0.02, 0.12, 0.16, colours.light)
        pen.ellipse(side * 0.27, -0.02, 0.04, 0.12, (15, 15, 15), outlined=False)
        pen.line([(side * 0.2, 0.35), (side * 0.85, 0.25)], colours.outline, 0.03)
        pen.line([(side * 0.2, 0.42), (side * 0.85, 0.48)], colours.outline, 0.03)
    pen.polygon([(-0.1, 0.25), (0.1, 0.25), (0.0, 0.38)], (240, 130, 150))


# Ordered like vise_jax.demo.world.OBJECTS.
OBJECT_DRAWINGS: dict[str, Callable[[Pen, ObjectColours], None]] = {
    'ball': _draw_ball,
    'house': _draw_house,
    'tree': _draw_tree,
    'mountain': _draw_mountain,
    'flower': _draw_flower,
    'car': _draw_car,
    'boat': _draw_boat,
    'fish': _draw_fish,
    'star': _draw_star,
    'cat': _draw_cat,
}
# Typical colours (green leaves, grey rock), used for ``colours.natural`` about half the time so
# that colour hints at the class without giving it away; other classes use the random main colour.
_NATURAL_HSV = {'tree': (0.3, 0.65, 0.6), 'mountain': (0.6, 0.15, 0.55)}
_NATURAL_COLOUR_RATE = 0.5
_OBJECT_NAMES = tuple(OBJECT_DRAWINGS)


def _sample_object_colours(rng: np.random.Generator, object_name: str) -> ObjectColours:
    main_hue = rng.random()
    main = hsv_colour(main_hue, rng.uniform(0.45, 0.9), rng.uniform(0.65, 1.0))
    accent = hsv_colour(
        main_hue + rng.uniform(0.25, 0.75), rng.uniform(0.45, 0.9), rng.uniform(0.55, 1.0)
    )
    natural_hsv = _NATURAL_HSV.get(object_name)
    if natural_hsv is not None and rng.random() < _NATURAL_COLOUR_RATE:
        natural = hsv_colour(*_jittered_hsv(rng, natural_hsv, (0.06, 0.15, 0.15)))
    else:
        natural = main
    return ObjectColours(
        main=main,
        accent=accent,
        dark=hsv_colour(rng.random(), rng.uniform(0.2, 0.6), rng.uniform(0.12, 0.3)),
        light=hsv_colour(rng.random(), rng.uniform(0.0, 0.15), rng.uniform(0.88, 1.0)),
        natural=natural,
        outline=hsv_colour(0, 0, rng.uniform(0.02, 0.12)),
    )


def _draw_object(canvas: Image.Image, object_name: str, rng: np.random.Generator) -> None:
    """Place one object with random pose and colours; it may be slightly cropped at the edge."""
    size = canvas.width
    radius = size * rng.uniform(0.22, 0.36)
    margin = radius * 0.8
    centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
    angle = math.radians(rng.uniform(-25, 25))
    mirrored = bool(rng.random() < 0.5)
    colours = _sample_object_colours(rng, object_name)
    pen = Pen(ImageDraw.Draw(canvas), centre, radius, angle, mirrored, colours.outline)
    OBJECT_DRAWINGS[object_name](pen, colours)


# ---------------------------------------------------------------------------------------------
# Moods: palette, texture overlays and colour grade


@dataclasses.dataclass(frozen=True)
class Grade:
    """Colour grade at full mood strength; weaker moods move towards the identity."""

    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    vignette: float = 0.0
    grain: float = 0.0


Overlay = Callable[[ImageDraw.ImageDraw, np.random.Generator, int, float], None]


@dataclasses.dataclass(frozen=True)
class MoodStyle:
    # (top, bottom) HSV colours of the background gradient; one pair is picked per post.
    palettes: tuple[tuple[HSV, HSV], ...]
    radial: bool  # radial gradient (a glow at the centre) instead of a linear one
    behind: tuple[Overlay, ...]  # textures drawn before the object
    in_front: tuple[Overlay, ...]  # textures drawn over the object
    grade: Grade


def _alpha(strength: float, full: int) -> int:
    return int(round(full * strength))


def _confetti(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float
) -> None:
    for _ in range(int(rng.integers(15, 35))):
        x, y = rng.uniform(0, size, 2)
        half = size * rng.uniform(0.012, 0.03)
        colour = hsv_colour(rng.random(), 0.85, 1.0) + (_alpha(strength, 255),)
        if rng.random() < 0.5:
            draw.ellipse([x - half, y - half, x + half, y + half], fill=colour)
        else:
            draw.rectangle([x - half, y - half * 0.5, x + half, y + half * 0.5], fill=colour)


def _waves(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float) -> None:
    colour = (255, 255, 255, _alpha(strength, 120))
    phase = rng.uniform(0, 2 * math.pi)
    xs = np.linspace(0, size, 24)
    for row in range(int(rng.integers(3, 6))):
        base = size * (0.55 + 0.1 * row + rng.uniform(-0.03, 0.03))
        ys = base + size * 0.015 * np.sin(xs / size * 4 * math.pi + phase + row)
        draw.line(np.stack([xs, ys], 1).ravel().tolist(), fill=colour, width=max(1, size // 64))


def _clouds(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float
) -> None:
    for _ in range(int(rng.integers(1, 4))):
        x, y = rng.uniform(0, size), rng.uniform(0.05, 0.35) * size
        width, height = size * rng.uniform(0.15, 0.3), size * rng.uniform(0.05, 0.08)
        draw.ellipse(
            [x - width, y - height, x + width, y + height],
            fill=(255, 255, 255, _alpha(strength, 110)),
        )


def _rain(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float) -> None:
    slant = rng.uniform(0.1, 0.35)
    colour = (200, 210, 230, _alpha(strength, 150))
    width = max(1, size // 100)
    for _ in range(int(rng.integers(40, 80))):
        x, y = rng.uniform(-0.2 * size, size), rng.uniform(-0.1 * size, size)
        length = size * rng.uniform(0.06, 0.14)
        draw.line([x, y, x + slant * length, y + length], fill=colour, width=width)


def _random_walk(
    rng: np.random.Generator,
    start: np.ndarray,
    heading: float,
    steps: int,
    step_length: float,
    wiggle: float,
) -> list[float]:
    turns = heading + np.cumsum(rng.uniform(-wiggle, wiggle, steps))
    moves = np.stack([np.cos(turns), np.sin(turns)], 1) * step_length
    points = np.concatenate([start[None], start + np.cumsum(moves, 0)])
    return points.ravel().tolist()


def _branches(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float
) -> None:
    """Bare dark branches reaching in from the edges."""
    colour = (10, 8, 12, _alpha(strength, 230))
    for _ in range(int(rng.integers(2, 5))):
        edge = int(rng.integers(4))
        along = rng.uniform(0, size)
        start = np.array([(0, along), (size, along), (along, 0), (along, size)][edge], float)
        heading = (0.0, math.pi, math.pi / 2, -math.pi / 2)[edge] + rng.uniform(-0.5, 0.5)
        trunk = _random_walk(rng, start, heading, 8, size * 0.04, 0.6)
        draw.line(trunk, fill=colour, width=max(1, size // 40))
        for fork in range(2, len(trunk) // 2 - 1, 2):
            twig_start = np.array(trunk[2 * fork : 2 * fork + 2])
            twig = _random_walk(
                rng, twig_start, heading + rng.choice([-1, 1]) * 0.9, 3, size * 0.03, 0.5
            )
            draw.line(twig, fill=colour, width=max(1, size // 90))


def _eyes(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float) -> None:
    """Sometimes a pair of small glowing eyes in the dark."""
    if rng.random() > 0.5:
        return
    x, y = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size
    half, gap = size * 0.015, size * 0.035
    for eye_x in (x - gap, x + gap):
        draw.ellipse(
            [eye_x - half, y - half, eye_x + half, y + half],
            fill=(255, 230, 60, _alpha(strength, 255)),
        )


def _cracks(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float
) -> None:
    """Jagged zigzag cracks and red shards."""
    for _ in range(int(rng.integers(2, 4))):
        start = rng.uniform(0, size, 2)
        zigzag = _random_walk(rng, start, rng.uniform(0, 2 * math.pi), 7, size * 0.09, 1.6)
        draw.line(zigzag, fill=(20, 0, 0, _alpha(strength, 230)), width=max(1, size // 60))
    for _ in range(int(rng.integers(3, 7))):
        centre = rng.uniform(0, size, 2)
        corners = centre + rng.uniform(-0.07, 0.07, (3, 2)) * size
        draw.polygon(
            corners.ravel().tolist(),
            fill=hsv_colour(rng.uniform(-0.03, 0.06), 0.9, 0.9) + (_alpha(strength, 200),),
        )


def _rays(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float) -> None:
    """Light rays fanning out from a bright source near the top."""
    source = (rng.uniform(0.2, 0.8) * size, rng.uniform(-0.1, 0.2) * size)
    count = int(rng.integers(5, 9))
    start = rng.uniform(0, 2 * math.pi)
    reach = 2 * size
    for ray in range(count):
        angle = start + ray * 2 * math.pi / count
        half_width = rng.uniform(0.08, 0.16)
        left = (
            source[0] + reach * math.cos(angle - half_width),
            source[1] + reach * math.sin(angle - half_width),
        )
        right = (
            source[0] + reach * math.cos(angle + half_width),
            source[1] + reach * math.sin(angle + half_width),
        )
        draw.polygon([source, left, right], fill=(255, 240, 190, _alpha(strength, 70)))
    glow = size * 0.08
    draw.ellipse(
        [source[0] - glow, source[1] - glow, source[0] + glow, source[1] + glow],
        fill=(255, 250, 220, _alpha(strength, 200)),
    )


def _sparkles(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, strength: float
) -> None:
    colour = (255, 255, 255, _alpha(strength, 230))
    for _ in range(int(rng.integers(8, 20))):
        x, y = rng.uniform(0, size), rng.uniform(0, 0.6) * size
        arm = size * rng.uniform(0.008, 0.02)
        draw.line([x - arm, y, x + arm, y], fill=colour, width=max(1, size // 128))
        draw.line([x, y - arm, x, y + arm], fill=colour, width=max(1, size // 128))


# Ordered like vise_jax.demo.world.MOODS. Each mood has several palettes, some close to another
# mood's, so that the mood is carried by palette, texture and grade together, not by mean colour.
MOOD_STYLES: dict[str, MoodStyle] = {
    'joy': MoodStyle(
        palettes=(
            ((0.13, 0.6, 1.0), (0.97, 0.5, 0.95)),  # yellow to pink
            ((0.55, 0.5, 1.0), (0.3, 0.5, 0.95)),  # sky to meadow
            ((0.08, 0.7, 1.0), (0.15, 0.3, 1.0)),  # orange to cream
        ),
        radial=True,
        behind=(_confetti,),
        in_front=(),
        grade=Grade(brightness=1.1, contrast=1.05, saturation=1.15, grain=0.01),
    ),
    'calm': MoodStyle(
        palettes=(
            ((0.56, 0.3, 0.95), (0.45, 0.3, 0.8)),  # pale sky to teal
            ((0.08, 0.25, 0.95), (0.95, 0.2, 0.85)),  # pastel sunset
            ((0.3, 0.2, 0.85), (0.15, 0.15, 0.9)),  # sage to cream
        ),
        radial=False,
        behind=(_clouds, _waves),
        in_front=(),
        grade=Grade(brightness=1.05, contrast=0.75, saturation=0.75, vignette=0.05),
    ),
    'sadness': MoodStyle(
        palettes=(
            ((0.6, 0.15, 0.6), (0.62, 0.2, 0.4)),  # grey-blue
            ((0.1, 0.2, 0.55), (0.08, 0.25, 0.35)),  # dull brown
            ((0.45, 0.15, 0.5), (0.5, 0.1, 0.35)),  # grey-green
            ((0.65, 0.3, 0.3), (0.65, 0.2, 0.18)),  # rainy night
        ),
        radial=False,
        behind=(),
        in_front=(_rain,),
        grade=Grade(brightness=0.9, contrast=0.85, saturation=0.5, vignette=0.25, grain=0.02),
    ),
    'fear': MoodStyle(
        palettes=(
            ((0.76, 0.45, 0.38), (0.35, 0.5, 0.2)),  # bruised purple to swamp green
            ((0.0, 0.55, 0.35), (0.0, 0.3, 0.12)),  # dried blood
            ((0.58, 0.4, 0.38), (0.6, 0.3, 0.12)),  # night blue
            ((0.25, 0.2, 0.6), (0.3, 0.3, 0.35)),  # sickly fog
        ),
        radial=True,
        behind=(_branches, _eyes),
        in_front=(),
        grade=Grade(brightness=0.85, contrast=1.2, saturation=0.6, vignette=0.75, grain=0.04),
    ),
    'anger': MoodStyle(
        palettes=(
            ((0.0, 0.9, 0.75), (0.03, 0.9, 0.2)),  # red to black
            ((0.08, 0.9, 0.9), (0.0, 0.8, 0.3)),  # fire
            ((0.8, 0.6, 0.35), (0.97, 0.8, 0.55)),  # purple to crimson
            ((0.1, 0.3, 0.6), (0.08, 0.4, 0.25)),  # smoke
        ),
        radial=False,
        behind=(_cracks,),
        in_front=(),
        grade=Grade(contrast=1.3, saturation=1.15, vignette=0.3, grain=0.05),
    ),
    'awe': MoodStyle(
        palettes=(
            ((0.7, 0.75, 0.35), (0.11, 0.7, 0.95)),  # violet dusk to gold
            ((0.62, 0.8, 0.25), (0.55, 0.6, 0.65)),  # night sky
            ((0.9, 0.5, 0.6), (0.12, 0.5, 1.0)),  # pink dawn to gold
        ),
        radial=False,
        behind=(_rays, _sparkles),
        in_front=(),
        grade=Grade(contrast=1.15, saturation=1.15, vignette=0.15),
    ),
}
_STYLES = tuple(MOOD_STYLES.values())


# ---------------------------------------------------------------------------------------------
# Background and grade (numpy)


@functools.lru_cache(maxsize=16)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1] for a square image; cached per size, read-only."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    ys, xs = np.meshgrid(axis, axis, indexing='ij')
    ys.setflags(write=False)
    xs.setflags(write=False)
    return ys, xs


def _background_colours(style: MoodStyle, rng: np.random.Generator, strength: float):
    """Two gradient end colours: the mood palette blended towards a random neutral one."""
    neutral = [
        np.array(hsv_colour(rng.random(), rng.uniform(0.1, 0.5), rng.uniform(0.35, 0.9)), float)
        for _ in range(2)
    ]
    palette = style.palettes[int(rng.integers(len(style.palettes)))]
    mood = [
        np.array(hsv_colour(*_jittered_hsv(rng, hsv, (0.06, 0.2, 0.2))), float) for hsv in palette
    ]
    return [_mix(n, m, strength) / 255.0 for n, m in zip(neutral, mood, strict=True)]


def _background(
    style: MoodStyle, rng: np.random.Generator, size: int, strength: float
) -> np.ndarray:
    """Float RGB gradient in [0, 1] with low-frequency mottling, shape (size, size, 3)."""
    top, bottom = _background_colours(style, rng, strength)
    ys, xs = _unit_grid(size)
    # A weakly expressed mood is less likely to keep its typical gradient shape.
    radial = style.radial if rng.random() < 0.5 + 0.5 * strength else not style.radial
    if radial:
        cy, cx = rng.uniform(-0.4, 0.4, 2)
        position = np.clip(np.hypot(ys - cy, xs - cx) / 1.6, 0, 1)
    else:
        tilt = rng.uniform(-0.4, 0.4)
        position = np.clip((ys * math.cos(tilt) + xs * math.sin(tilt)) * 0.5 + 0.5, 0, 1)
    gradient = top + position[..., None] * (bottom - top)
    return gradient + _mottling(rng, size)[..., None]


def _mottling(
    rng: np.random.Generator, size: int, cells: int = 5, amplitude: float = 0.06
) -> np.ndarray:
    coarse = Image.fromarray(rng.normal(0, amplitude, (cells, cells)).astype(np.float32), 'F')
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))


def _apply_grade(
    pixels: np.ndarray, grade: Grade, strength: float, rng: np.random.Generator
) -> np.ndarray:
    """Mood grade scaled by strength, plus mood-independent per-post exposure and cast jitter."""

    def towards(target: float, identity: float = 1.0) -> float:
        return identity + strength * (target - identity)

    brightness = towards(grade.brightness) * rng.uniform(0.8, 1.2)
    contrast = towards(grade.contrast) * rng.uniform(0.9, 1.1)
    saturation = towards(grade.saturation) * rng.uniform(0.85, 1.15)
    cast = rng.uniform(-0.04, 0.04, 3).astype(np.float32)

    grey = pixels.mean(axis=2, keepdims=True)
    pixels = grey + (pixels - grey) * saturation
    pixels = 0.5 + (pixels - 0.5) * contrast
    pixels = pixels * brightness + cast

    size = pixels.shape[0]
    vignette = towards(grade.vignette, 0.0)
    if vignette > 0:
        ys, xs = _unit_grid(size)
        pixels = pixels * (1 - vignette * np.clip((ys * ys + xs * xs) / 2, 0, 1) ** 1.5)[..., None]
    grain = towards(grade.grain, 0.0) + 0.01
    pixels = pixels + rng.normal(0, grain, (size, size, 1)).astype(np.float32)
    return pixels


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Public entry point


def render_image(
    object_id: int, mood_id: int, rng: np.random.Generator, size: int, mood_strength: float
) -> np.ndarray:
    """Draws one post image: uint8 array of shape (size, size, 3).

    ``mood_strength`` in [0, 1]: 0 gives a neutral random style, 1 the full mood styling.
    Deterministic given the state of ``rng``.
    """
    _validate_render_args(object_id, mood_id, size, mood_strength)
    style = _STYLES[mood_id]
    canvas_size = size * SUPERSAMPLE

    background = _background(style, rng, canvas_size, mood_strength)
    canvas = Image.fromarray(_to_uint8(background), 'RGB')
    overlay_draw = ImageDraw.Draw(canvas, 'RGBA')
    for overlay in style.behind:
        overlay(overlay_draw, rng, canvas_size, mood_strength)
    _draw_object(canvas, _OBJECT_NAMES[object_id], rng)
    for overlay in style.in_front:
        overlay(overlay_draw, rng, canvas_size, mood_strength)

    small = canvas.resize((size, size), Image.Resampling.LANCZOS)
    pixels = np.asarray(small, dtype=np.float32) / 255.0
    return _to_uint8(_apply_grade(pixels, style.grade, mood_strength, rng))


def _validate_render_args(object_id: int, mood_id: int, size: int, mood_strength: float) -> None:
    if not 0 <= object_id < len(_OBJECT_NAMES):
        raise ValueError(f'object_id must be in [0, {len(_OBJECT_NAMES)}), got {object_id}')
    if not 0 <= mood_id < len(_STYLES):
        raise ValueError(f'mood_id must be in [0, {len(_STYLES)}), got {mood_id}')
    if size < MIN_IMAGE_SIZE:
        raise ValueError(f'image size must be >= {MIN_IMAGE_SIZE}, got {size}')
    if not 0.0 <= mood_strength <= 1.0:
        raise ValueError(f'mood_strength must be in [0, 1], got {mood_strength}')
