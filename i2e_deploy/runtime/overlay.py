"""Annotated view of one prediction: the frame with its top-k labels, and beside it the T
event frames the spiking network sees (ON red, OFF blue), tiled two rows high; and the banner
of a source that is not live."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from .frames import Frame, Prediction, SourceState

# BGR, since the canvas goes straight to cv2.VideoWriter / imshow.
ON_BGR = np.array([60, 70, 255], np.uint8)
OFF_BGR = np.array([255, 140, 70], np.uint8)
BACKGROUND = 24
_PALETTE = np.array([[BACKGROUND] * 3, ON_BGR, OFF_BGR, ON_BGR // 2 + OFF_BGR // 2], np.uint8)
MIN_HEIGHT, MAX_HEIGHT = 256, 720
FONT = cv2.FONT_HERSHEY_SIMPLEX


def event_tiles(events: np.ndarray, tile: int, rows: int = 2) -> np.ndarray:
    """[T, 2, H, W] 0/1 events -> BGR mosaic of T tiles (rows x T/rows), each ``tile`` px."""
    T, _, height, width = events.shape
    cols = -(-T // rows)
    codes = np.zeros((rows * cols, height, width), np.uint8)
    codes[:T] = events[:, 0] + 2 * events[:, 1]  # 0 none, 1 ON, 2 OFF, 3 both
    coloured = np.take(_PALETTE, codes, axis=0)  # [rows*cols, H, W, 3]; take: 5x fancy indexing
    grid = coloured.reshape(rows, cols, height, width, 3).transpose(0, 2, 1, 3, 4)
    mosaic = cv2.resize(
        grid.reshape(rows * height, cols * width, 3),
        (cols * tile, rows * tile),
        interpolation=cv2.INTER_NEAREST,
    )
    for r in range(1, rows):
        mosaic[r * tile] = BACKGROUND
    for c in range(cols + 1):
        mosaic[:, min(c * tile, cols * tile - 1)] = BACKGROUND
    for t in range(T):
        r, c = divmod(t, cols)
        cv2.putText(
            mosaic,
            f"t{t}",
            (c * tile + 5, r * tile + 16),
            FONT,
            0.4,
            (200, 200, 200),
            1,
            cv2.LINE_AA,
        )
    return mosaic


def _panel(image_rgb: np.ndarray) -> np.ndarray:
    height = image_rgb.shape[0]
    target = min(max(height, MIN_HEIGHT), MAX_HEIGHT)
    bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    if target != height:
        width = round(image_rgb.shape[1] * target / height)
        bgr = cv2.resize(
            bgr,
            (width, target),
            interpolation=cv2.INTER_AREA if target < height else cv2.INTER_NEAREST,
        )
    return bgr


def _shade(canvas: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> None:
    roi = canvas[max(y0, 0) : y1, max(x0, 0) : x1]
    roi[:] = (roi.astype(np.uint16) * 2 // 5).astype(np.uint8)


def crop_box(shape: tuple[int, int], resize: int, imgsz: int) -> tuple[int, int, int, int]:
    """The region of an HxW frame that resize-shorter-side + centre-crop keeps."""
    height, width = shape
    side = imgsz * min(height, width) / resize
    x0, y0 = (width - side) / 2, (height - side) / 2
    return round(x0), round(y0), round(x0 + side), round(y0 + side)


def annotate(frame: Frame, prediction: Prediction, status: str | None = None) -> np.ndarray:
    """BGR canvas: the frame (top-k labels, model's crop outlined, ``status`` at the bottom)
    and the event mosaic beside it, same height."""
    panel = _panel(frame.image)
    height, width = panel.shape[:2]
    scale = height / frame.image.shape[0]
    font = max(0.45, height / 480 * 0.7)
    thick = 1 if font < 0.8 else 2
    line = int(28 * font / 0.7)
    if frame.events is None:  # image input: outline what the model actually sees
        card = prediction.card
        x0, y0, x1, y1 = crop_box(frame.image.shape[:2], card.resize, card.imgsz)
        cv2.rectangle(
            panel,
            (round(x0 * scale), round(y0 * scale)),
            (round(x1 * scale) - 1, round(y1 * scale) - 1),
            (0, 220, 255),
            1,
        )
    lines = [f"{label} {prob:.0%}" for label, prob in zip(prediction.labels, prediction.probs)]
    text_width = max(cv2.getTextSize(t, FONT, font, thick)[0][0] for t in lines) + 16
    _shade(panel, 0, 0, text_width, line * len(lines) + 10)
    for i, text in enumerate(lines):
        colour = (80, 255, 80) if i == 0 else (230, 230, 230)
        cv2.putText(panel, text, (8, line * (i + 1)), FONT, font, colour, thick, cv2.LINE_AA)
    if status:
        size = cv2.getTextSize(status, FONT, font * 0.8, 1)[0]
        _shade(panel, 0, height - size[1] - 14, size[0] + 16, height)
        cv2.putText(
            panel, status, (8, height - 8), FONT, font * 0.8, (255, 255, 255), 1, cv2.LINE_AA
        )
    mosaic = event_tiles(prediction.events, height // 2)
    canvas = np.full((height, width + mosaic.shape[1], 3), BACKGROUND, np.uint8)
    canvas[:, :width] = panel
    canvas[: mosaic.shape[0], width:] = mosaic
    return canvas


# BGR banner colours by status: amber while reconnecting, red when lost, grey when ended.
STATE_BGR = {"reconnecting": (0, 170, 255), "lost": (40, 40, 230), "ended": (150, 150, 150)}


def draw_source_state(canvas: np.ndarray, state: SourceState, now: float) -> np.ndarray:
    """Dim ``canvas`` (BGR, e.g. the source's last picture) in place and write across its
    middle what the source is doing, e.g. "reconnecting (attempt 3), last frame 4.2 s old";
    ``now`` is time.time(). Returns the canvas."""
    height, width = canvas.shape[:2]
    _shade(canvas, 0, 0, width, height)
    text = state.describe(now)
    font = max(0.4, min(height / 480 * 0.7, 1.2))
    thick = 1 if font < 0.8 else 2
    # Shrink until the phrase fits the width (a lost source's reason can be long).
    while font > 0.3 and cv2.getTextSize(text, FONT, font, thick)[0][0] > width - 16:
        font *= 0.9
    (text_w, text_h), _ = cv2.getTextSize(text, FONT, font, thick)
    top = (height - text_h) // 2 - 10
    cv2.rectangle(
        canvas,
        (0, top),
        (width - 1, top + text_h + 20),
        STATE_BGR.get(state.status, (90, 90, 90)),
        -1,
    )
    cv2.putText(
        canvas,
        text,
        (max(8, (width - text_w) // 2), top + text_h + 10),
        FONT,
        font,
        (255, 255, 255),
        thick,
        cv2.LINE_AA,
    )
    return canvas
