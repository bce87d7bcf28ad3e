"""Detector signatures: bias structure, flat-field response, defects, and their master frames."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from apqa.sim.camera import CameraSpec


@dataclass
class DetectorCalibration:
    """The true detector signatures and the master frames a calibration pipeline would make."""

    bias: np.ndarray  # true bias structure, ADU
    response: np.ndarray  # true relative response (QE x vignetting), mean 1 over good pixels
    defects: pd.DataFrame  # x0, x1, y0, y1 (inclusive), kind
    master_bias: np.ndarray  # bias + the noise of a 20-frame stack
    master_flat: np.ndarray  # response + the noise of a high-S/N flat stack


def make_detector_calibration(camera: CameraSpec, detector: int, n_bad_columns: int,
                              rng: np.random.Generator) -> DetectorCalibration:
    """Simulate one detector's bias, flat-field response and bad columns."""
    height, width = camera.height, camera.width
    yy = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    columns = rng.normal(0.0, 2.0, width).astype(np.float32)[None, :]
    bias = (camera.bias_level + columns + 1.5 * yy + 0.5 * xx).astype(np.float32)
    bias = np.broadcast_to(bias, (height, width)).copy()

    off_x, off_y = camera.detector_offset(detector)
    # Vignetting: response falls smoothly with focal-plane radius.
    fx = (off_x + xx * width / 2) / 15000.0
    fy = (off_y + yy * height / 2) / 15000.0
    vignetting = 1.0 - 0.08 * (fx * fx + fy * fy)
    prnu = 1.0 + rng.normal(0.0, 0.008, (height, width)).astype(np.float32)
    response = (vignetting * prnu).astype(np.float32)

    rows = []
    for _ in range(n_bad_columns):
        col = int(rng.integers(20, width - 20))
        y0 = int(rng.integers(0, height // 2))
        y1 = height - 1 if rng.random() < 0.5 else int(rng.integers(y0 + 200, height))
        kind = str(rng.choice(["dead", "low"]))
        response[y0:y1 + 1, col] *= 0.0 if kind == "dead" else 0.5
        rows.append({"x0": col, "x1": col, "y0": y0, "y1": y1, "kind": kind})
    defects = pd.DataFrame(rows, columns=["x0", "x1", "y0", "y1", "kind"])

    good = response > 0.2
    response /= np.float32(response[good].mean())
    n_stack = 20
    master_bias = bias + rng.normal(0, camera.read_noise / camera.gain / np.sqrt(n_stack),
                                    bias.shape).astype(np.float32)
    master_flat = response * (1 + rng.normal(0, 0.001, response.shape).astype(np.float32))
    return DetectorCalibration(bias, response, defects, master_bias, master_flat)
