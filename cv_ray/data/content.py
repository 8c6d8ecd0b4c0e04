"""Clean image content with checkable answers: labels in real fonts, charts, coloured shapes.

Every content kind splits into ``sample(rng, size, variant) -> params`` (all randomness, recorded
as a JSON-able dict) and ``render(params) -> Scene`` (pure and deterministic). A task stores the
params, so anyone can re-render the clean image, its answer and its answer box.

Boxes follow the project convention: ``[x1, y1, x2, y2]`` in continuous pixel coordinates with
exclusive ends. Shapes and plates are drawn without anti-aliasing over exactly their box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
from PIL import Image, ImageDraw

from cv_ray.data.images import FONTS, PHOTOS, font, photo
from cv_ray.types import Box

Params = dict[str, Any]

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (30, 150, 60), "blue": (40, 80, 220), "yellow": (245, 205, 30),
    "orange": (245, 130, 20), "purple": (140, 60, 180), "white": (250, 250, 250), "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
PLATE_COLORS = ("yellow", "white", "orange", "green", "blue", "red")
INK_FOR_PLATE = {"yellow": "black", "white": "black", "orange": "black", "green": "white", "blue": "white",
                 "red": "white"}
SHAPE_COLORS = ("red", "green", "blue", "orange", "purple", "black")
SHAPE_NAMES = ("circle", "square", "triangle")

WORDS = (
    "apple", "river", "garden", "silver", "planet", "window", "orange", "market", "bridge", "forest", "coffee",
    "rocket", "pencil", "castle", "harbor", "island", "winter", "summer", "candle", "mirror", "ticket", "violet",
    "meadow", "anchor", "falcon", "copper", "lantern", "station", "library", "thunder", "compass", "diamond",
    "harvest", "journey", "kitchen", "machine", "morning", "picture", "pyramid", "rainbow", "shelter", "sunrise",
    "theater", "tractor", "volcano", "weather", "whistle", "balloon", "blanket", "cabinet", "cottage", "crystal",
    "dolphin", "emerald", "fountain", "gallery", "horizon", "jasmine", "kingdom", "lobster", "mustard", "network",
    "octopus", "parade", "quartz", "saddle", "tunnel", "velvet", "walnut", "yellow", "zebra", "amber", "basket",
    "cactus", "desert", "engine", "feather", "glacier", "hammer", "igloo", "jacket", "kettle", "lemon", "magnet",
    "needle", "oyster", "pepper", "quiver", "ribbon", "saturn", "timber", "umbrella", "valley", "wizard", "bakery",
    "canyon", "museum", "puzzle", "signal", "spiral", "violin", "marble", "honey", "cobalt", "pillow",
)
CODE_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
CHART_LABELS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "North", "South", "East", "West", "Alpha",
                "Beta", "Gamma", "Delta", "Red", "Blue", "Green", "Gold")


@dataclass
class Scene:
    """A rendered clean image and what a task needs from it."""

    image: Image.Image
    answer: str
    box: Box
    """Where the answer is, in the clean image's frame."""
    question: str
    task_type: str


class ContentKind(Protocol):
    name: str

    def sample(self, rng: np.random.Generator, size: int, variant: str) -> Params: ...

    def render(self, params: Params) -> Scene: ...


def _background(params: Params) -> Image.Image:
    size = params["size"]
    background = params["background"]
    if background["type"] == "photo":
        return photo(background["name"], size)
    return Image.new("RGB", (size, size), tuple(background["color"]))


def _sample_background(rng: np.random.Generator, photo_share: float) -> Params:
    if rng.random() < photo_share:
        return {"type": "photo", "name": str(rng.choice(PHOTOS))}
    return {"type": "paper", "color": [int(v) for v in rng.integers(215, 256, size=3)]}


def _overlaps(box: Box, others: list[Box], margin: float) -> bool:
    return any(box[0] < o[2] + margin and o[0] < box[2] + margin and box[1] < o[3] + margin and o[1] < box[3] + margin
               for o in others)


def _plate_box(text: str, font_name: str, font_size: int, x: int, y: int, pad: int) -> Box:
    left, top, right, bottom = font(font_name, font_size).getbbox(text)
    return [float(x), float(y), float(x + (right - left) + 2 * pad), float(y + (bottom - top) + 2 * pad)]


def _draw_label(draw: ImageDraw.ImageDraw, label: Params) -> Box:
    """A coloured plate with text on it; returns the plate's box (exclusive ends)."""
    box = _plate_box(label["text"], label["font"], label["font_size"], label["x"], label["y"], label["pad"])
    x1, y1, x2, y2 = (int(v) for v in box)
    draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=PALETTE[label["plate"]])
    glyphs = font(label["font"], label["font_size"])
    left, top, _, _ = glyphs.getbbox(label["text"])
    draw.text((x1 + label["pad"] - left, y1 + label["pad"] - top), label["text"], font=glyphs,
              fill=PALETTE[INK_FOR_PLATE[label["plate"]]])
    return box


def _random_text(rng: np.random.Generator, style: str) -> str:
    if style == "number":
        return str(int(rng.integers(100, 1_000_000)))
    if style == "code":
        return "".join(rng.choice(list(CODE_ALPHABET), size=int(rng.integers(4, 7))))
    word = str(rng.choice(WORDS))
    return word.upper() if rng.random() < 0.4 else word.capitalize() if rng.random() < 0.5 else word


def _place_labels(rng: np.random.Generator, size: int, texts: list[str], font_size_range: tuple[int, int],
                  max_area_fraction: float, pad: int) -> list[Params]:
    """Non-overlapping labels; each plate's area is at most ``max_area_fraction`` of the image."""
    labels: list[Params] = []
    boxes: list[Box] = []
    plates = list(rng.permutation(PLATE_COLORS))
    for i, text in enumerate(texts):
        font_name = str(rng.choice(FONTS))
        font_size = int(rng.integers(*font_size_range))
        while True:
            probe = _plate_box(text, font_name, font_size, 0, 0, pad)
            if (probe[2] * probe[3] <= max_area_fraction * size * size and probe[2] < size - 8) or font_size <= 6:
                break
            font_size -= 1
        for _ in range(200):
            x = int(rng.integers(4, max(5, size - int(probe[2]) - 4)))
            y = int(rng.integers(4, max(5, size - int(probe[3]) - 4)))
            box = _plate_box(text, font_name, font_size, x, y, pad)
            if not _overlaps(box, boxes, margin=6):
                break
        boxes.append(box)
        labels.append({"text": text, "font": font_name, "font_size": font_size, "x": x, "y": y, "pad": pad,
                       "plate": str(plates[i % len(plates)])})
    return labels


class TextLabels:
    """One to three labels with words or numbers; the question names the target by plate colour."""

    name = "text_labels"
    # variant -> (font size range at 448 px, max plate area fraction)
    _SIZES: ClassVar[dict[str, tuple[tuple[int, int], float]]] = {"large": ((34, 64), 0.2), "medium": ((22, 36), 0.08)}

    def sample(self, rng: np.random.Generator, size: int, variant: str) -> Params:
        (low, high), max_area = self._SIZES[variant]
        scale = size / 448
        style = str(rng.choice(["word", "word", "number"]))
        count = int(rng.integers(1, 4))
        texts = [_random_text(rng, style) for _ in range(count)]
        labels = _place_labels(rng, size, texts, (max(8, int(low * scale)), max(9, int(high * scale))), max_area,
                               pad=max(2, int(6 * scale)))
        return {"kind": self.name, "size": size, "style": style, "background": _sample_background(rng, 0.5),
                "labels": labels, "target": int(rng.integers(count))}

    def render(self, params: Params) -> Scene:
        image = _background(params)
        draw = ImageDraw.Draw(image)
        boxes = [_draw_label(draw, label) for label in params["labels"]]
        target = params["labels"][params["target"]]
        noun = "number" if params["style"] == "number" else "word"
        if len(params["labels"]) == 1:
            question = f"What {noun} is written on the label in the image? Answer with the exact text."
        else:
            question = (f"What {noun} is written on the {target['plate']} label in the image? "
                        "Answer with the exact text.")
        return Scene(image, target["text"], boxes[params["target"]], question, "ocr")


class SmallLabel:
    """A tiny tag with a code on a real photo, among decoy tags; reading it needs a crop."""

    name = "small_label"
    # variant -> (font size range at 448 px, max plate area fraction of the image)
    _SIZES: ClassVar[dict[str, tuple[tuple[int, int], float]]] = {"small": ((12, 17), 0.008), "tiny": ((8, 11), 0.0025)}

    def sample(self, rng: np.random.Generator, size: int, variant: str) -> Params:
        (low, high), max_area = self._SIZES[variant]
        scale = size / 448
        count = int(rng.integers(1, 4))
        texts = [_random_text(rng, "code") for _ in range(count)]
        labels = _place_labels(rng, size, texts, (max(6, int(low * scale)), max(7, int(high * scale))), max_area,
                               pad=max(1, int(2 * scale)))
        return {"kind": self.name, "size": size, "background": _sample_background(rng, 1.0), "labels": labels,
                "target": int(rng.integers(count))}

    def render(self, params: Params) -> Scene:
        image = _background(params)
        draw = ImageDraw.Draw(image)
        boxes = [_draw_label(draw, label) for label in params["labels"]]
        target = params["labels"][params["target"]]
        question = f"What code is printed on the small {target['plate']} tag in the image? Answer with the exact code."
        return Scene(image, target["text"], boxes[params["target"]], question, "ocr")


class Chart:
    """A bar or line chart with printed values; the question asks one category's value."""

    name = "chart"

    def sample(self, rng: np.random.Generator, size: int, variant: str) -> Params:
        count = int(rng.integers(3, 7))
        start = int(rng.integers(0, len(CHART_LABELS) - count + 1))
        return {"kind": self.name, "size": size, "style": variant,
                "labels": list(CHART_LABELS[start:start + count]),
                "values": [int(v) for v in rng.choice(np.arange(5, 96), size=count, replace=False)],
                "color": str(rng.choice(["blue", "green", "orange", "purple", "red"])),
                "font": str(rng.choice(FONTS)), "target": int(rng.integers(count))}

    @staticmethod
    def layout(params: Params) -> tuple[list[float], float, float, float]:
        """Slot centres (x), slot width, the axis baseline y and pixels per value unit."""
        size = params["size"]
        left, right, top, bottom = 0.1 * size, 0.95 * size, 0.18 * size, 0.82 * size
        slot = (right - left) / len(params["values"])
        centres = [left + slot * (i + 0.5) for i in range(len(params["values"]))]
        return centres, slot, bottom, (bottom - top) / 100.0

    def render(self, params: Params) -> Scene:
        size = params["size"]
        image = Image.new("RGB", (size, size), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        centres, slot, base, per_unit = self.layout(params)
        glyphs = font(params["font"], max(8, int(size * 0.032)))
        draw.line([(0.08 * size, base), (0.97 * size, base)], fill=PALETTE["black"], width=1)
        draw.text((0.1 * size, 0.05 * size), "Values by category", font=glyphs, fill=PALETTE["black"])
        color = PALETTE[params["color"]]
        boxes: list[Box] = []
        points = []
        for centre, value, label in zip(centres, params["values"], params["labels"]):
            top = round(base - value * per_unit)
            if params["style"] == "bar":
                x1, x2 = round(centre - slot * 0.3), round(centre + slot * 0.3)
                draw.rectangle([x1, top, x2 - 1, round(base) - 1], fill=color)
                mark = [x1, top, x2, round(base)]
            else:
                radius = max(2, round(size * 0.01))
                points.append((round(centre), top))
                mark = [round(centre) - radius, top - radius, round(centre) + radius + 1, top + radius + 1]
            value_text, label_text = str(value), label
            vw = glyphs.getlength(value_text)
            value_xy = (centre - vw / 2, mark[1] - glyphs.size * 1.4)
            draw.text(value_xy, value_text, font=glyphs, fill=PALETTE["black"])
            lw = glyphs.getlength(label_text)
            label_xy = (centre - lw / 2, base + 0.02 * size)
            draw.text(label_xy, label_text, font=glyphs, fill=PALETTE["black"])
            boxes.append([float(min(mark[0], value_xy[0], label_xy[0])), float(value_xy[1]),
                          float(max(mark[2], value_xy[0] + vw, label_xy[0] + lw)),
                          float(label_xy[1] + glyphs.size * 1.3)])
        if points:
            draw.line(points, fill=color, width=max(1, size // 224))
            radius = max(2, round(size * 0.01))
            for x, y in points:
                draw.rectangle([x - radius, y - radius, x + radius, y + radius], fill=color)
        target = params["target"]
        noun = "bar" if params["style"] == "bar" else "point"
        question = f"In the chart, what value is shown for the {noun} labelled '{params['labels'][target]}'?"
        return Scene(image, str(params["values"][target]), boxes[target], question, "general")


class Shapes:
    """Coloured circles, squares and triangles; the question counts one colour-and-shape pair."""

    name = "shapes"

    def sample(self, rng: np.random.Generator, size: int, variant: str) -> Params:
        target_shape, target_color = str(rng.choice(SHAPE_NAMES)), str(rng.choice(SHAPE_COLORS))
        wanted = int(rng.integers(1, 7))
        shapes: list[Params] = []
        boxes: list[Box] = []
        total = wanted + int(rng.integers(3, 9))
        for i in range(total):
            if i < wanted:
                shape, color = target_shape, target_color
            else:  # a decoy: differs from the target in shape, colour or both
                while True:
                    shape, color = str(rng.choice(SHAPE_NAMES)), str(rng.choice(SHAPE_COLORS))
                    if (shape, color) != (target_shape, target_color):
                        break
            side = int(rng.integers(max(10, size // 18), max(12, size // 8)))
            for _ in range(300):
                x, y = int(rng.integers(2, size - side - 2)), int(rng.integers(2, size - side - 2))
                box = [float(x), float(y), float(x + side), float(y + side)]
                if not _overlaps(box, boxes, margin=4):
                    boxes.append(box)
                    shapes.append({"shape": shape, "color": color, "box": box})
                    break
        return {"kind": self.name, "size": size, "background": {"type": "paper", "color": [245, 245, 240]},
                "shapes": shapes, "target_shape": target_shape, "target_color": target_color}

    def render(self, params: Params) -> Scene:
        image = _background(params)
        draw = ImageDraw.Draw(image)
        matches: list[Box] = []
        for item in params["shapes"]:
            x1, y1, x2, y2 = (int(v) for v in item["box"])
            fill = PALETTE[item["color"]]
            if item["shape"] == "circle":
                draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=fill)
            elif item["shape"] == "square":
                draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=fill)
            else:
                draw.polygon([((x1 + x2 - 1) / 2, y1), (x1, y2 - 1), (x2 - 1, y2 - 1)], fill=fill)
            if (item["shape"], item["color"]) == (params["target_shape"], params["target_color"]):
                matches.append(item["box"])
        box = [min(b[0] for b in matches), min(b[1] for b in matches), max(b[2] for b in matches),
               max(b[3] for b in matches)]
        question = (f"How many {params['target_color']} {params['target_shape']}s are in the image? "
                    "Answer with a number.")
        return Scene(image, str(len(matches)), box, question, "count")


CONTENT_KINDS: dict[str, ContentKind] = {k.name: k for k in (TextLabels(), SmallLabel(), Chart(), Shapes())}


def render_content(params: Params) -> Scene:
    """Re-create the clean scene from recorded params."""
    kind = params.get("kind")
    if kind not in CONTENT_KINDS:
        raise KeyError(f"unknown content kind {kind!r}; known: {', '.join(CONTENT_KINDS)}")
    return CONTENT_KINDS[kind].render(params)
