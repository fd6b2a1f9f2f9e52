"""Video decoding and frame sampling on the host (PyAV).

The contract with the processor: a decoded, sampled clip is a `VideoClip`.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class VideoClip:
    """Sampled frames of one video, in time order, at their decoded resolution."""

    frames: np.ndarray  # [F, H, W, 3] uint8 RGB
    fps: float  # sampled frames per second: frames[i + 1] is 1 / fps seconds after frames[i]
    path: str = ""  # names the source in error messages
