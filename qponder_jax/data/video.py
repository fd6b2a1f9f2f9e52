"""Video decoding and frame sampling on the host (PyAV).

The contract with the processor: a decoded, sampled clip is a `VideoClip`.

    sampling = VideoSampling(fps=2.0, max_frames=32, layout="two_stream")
    clip, crops = load_video_inputs("/data/KoNViD_1k_videos/3339962845.mp4", sampling)
    # clip.frames [F, h, w, 3] uint8 (F even), clip.fps = F / duration; crops: [c, c, 3] uint8 each

Time, not frame numbers, drives sampling. `probe_video` reads every packet's presentation timestamp (no
decoding; when a stream has none, e.g. a raw .h264 file, it decodes and uses frame index / average rate), so
variable-frame-rate files and files without duration metadata sample correctly. The clip covers
`duration = N * mean frame interval` (= N / fps for a constant-rate stream). Frame k of F shows the video at
`t_k = t_first + k * duration / F`: the last frame whose timestamp is <= t_k, so consecutive sampled frames are
exactly `1 / fps` apart with `fps = F / duration` (Qwen's effective `sample_fps`; for a constant-rate stream
these are transformers' `arange(0, N, N / F)` indices). When F exceeds the frame count, frames repeat.

F (Qwen's convention, `qwen_vl_utils.smart_nframes`): `num_frames` when set, else `round(duration * fps)`
clamped to [min_frames, max_frames]; then rounded to a multiple of 2 (the temporal patch), at least 2.

Layouts:
- "uniform": the F frames at their decoded resolution (the processor resizes them); no crops.
- "two_stream" (PreResQ-R1's global-temporal + local-spatial data flow): the F frames downscaled to at most
  `global_max_pixels` each (aspect kept) as the clip, plus `num_crops` full-resolution square crops, one per
  key frame. Key frames are the centers of `num_crops` equal time segments (`t_first + (j + 1/2) *
  duration / num_crops`), so they are deterministic and spread over the clip, away from the fades of its first
  and last frame. Crop side = min(crop_size, height, width). `crop_mode="detail"` (default) takes the window
  with the highest gradient energy (sum of squared luma differences; ties go to the first window in raster
  order): blur, noise and compression show most on textured regions, and a center crop is often flat sky or
  wall. `crop_mode="center"` takes the central window. (PreResQ-R1's public code packs the global frames into
  one mosaic image and adds 3 single frames; we give the global stream to the model as a video instead.)

Frames are RGB, rotated as the container's display matrix says (phone videos), at the storage aspect ratio
(non-square sample aspect ratios are not corrected). Decoding stops after the last sampled frame.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from collections.abc import Mapping

import av
import numpy as np
from PIL import Image

LAYOUTS = ("uniform", "two_stream")
CROP_MODES = ("detail", "center")
FRAME_FACTOR = 2  # sampled frame counts are multiples of the vision tower's temporal patch size


@dataclasses.dataclass(frozen=True)
class VideoClip:
    """Sampled frames of one video, in time order, at their decoded resolution."""

    frames: np.ndarray  # [F, H, W, 3] uint8 RGB
    fps: float  # sampled frames per second: frames[i + 1] is 1 / fps seconds after frames[i]
    path: str = ""  # names the source in error messages


class VideoError(ValueError):
    """A video that is missing, unreadable or corrupt; the message names the path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


@dataclasses.dataclass(frozen=True)
class VideoSampling:
    """How to sample a video (fields mirror a config's `data.video` section)."""

    fps: float = 2.0  # target sampled frames per second (used when num_frames == 0)
    num_frames: int = 0  # fixed number of sampled frames (rounded to a multiple of 2); 0 = from fps
    min_frames: int = 4  # fewest frames sampled from fps
    max_frames: int = 768  # most frames sampled from fps
    layout: str = "uniform"  # "uniform" or "two_stream" (global low-res clip + high-res key-frame crops)
    global_max_pixels: int = 224 * 224  # two_stream: each clip frame downscaled to at most this area (0 = keep)
    num_crops: int = 3  # two_stream: high-resolution crops, one per key frame
    crop_size: int = 448  # two_stream: crop side in pixels (clamped to the frame)
    crop_mode: str = "detail"  # two_stream: "detail" (highest gradient energy window) or "center"

    def __post_init__(self):
        def check(ok: bool, field: str, expected: str):
            if not ok:
                raise ValueError(f"VideoSampling.{field} = {getattr(self, field)!r}: expected {expected}")

        check(self.fps > 0, "fps", "> 0")
        check(self.num_frames >= 0, "num_frames", ">= 0 (0 = sample at fps)")
        check(self.min_frames >= 1, "min_frames", ">= 1")
        check(self.max_frames >= max(self.min_frames, FRAME_FACTOR), "max_frames", ">= min_frames and >= 2")
        check(self.layout in LAYOUTS, "layout", f"one of {LAYOUTS}")
        check(self.global_max_pixels >= 0, "global_max_pixels", ">= 0")
        check(self.num_crops >= 0, "num_crops", ">= 0")
        check(self.crop_size >= 1, "crop_size", ">= 1")
        check(self.crop_mode in CROP_MODES, "crop_mode", f"one of {CROP_MODES}")

    @classmethod
    def from_config(cls, config: VideoSampling | Mapping | object) -> VideoSampling:
        """From a VideoSampling, a dict or an ml_collections ConfigDict (e.g. `config.data.video`)."""
        if isinstance(config, cls):
            return config
        values = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # type: ignore[call-overload]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"video sampling config: unknown field(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learns about a video stream without decoding it all."""

    timestamps: np.ndarray  # [N] float64 seconds, ascending (presentation order)
    duration: float  # seconds covered by the N frames: N * mean frame interval
    width: int  # displayed size (after the display-matrix rotation)
    height: int
    rotation: int  # counter-clockwise degrees applied to decoded frames (0, 90, 180, 270)
    path: str

    @property
    def num_frames(self) -> int:
        return len(self.timestamps)

    @property
    def fps(self) -> float:
        """Average frame rate, N / duration."""
        return self.num_frames / self.duration


def _open(source: str | os.PathLike | bytes):
    """(container, name for messages) of a path or encoded bytes; VideoError if it cannot be opened."""
    name = "<bytes>" if isinstance(source, bytes | bytearray) else str(source)
    try:
        container = av.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else str(source))
    except (av.FFmpegError, OSError) as e:
        raise VideoError(name, f"cannot open video ({type(e).__name__}: {e})") from e
    if not container.streams.video:
        container.close()
        raise VideoError(name, "no video stream")
    return container, name


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None


def _frame_time(frame, index: int, rate: float | None, name: str) -> float:
    """Presentation time of a decoded frame: its pts, else its index / the stream's average rate."""
    if frame.pts is not None and frame.time_base is not None:
        return float(frame.pts * frame.time_base)
    if rate is None:
        raise VideoError(name, "frames have no timestamps and the stream has no frame rate")
    return index / rate


def probe_video(source: str | os.PathLike | bytes) -> VideoInfo:
    """Frame timestamps, duration and size of the first video stream; VideoError if unreadable or empty."""
    container, name = _open(source)
    try:
        stream = container.streams.video[0]
        packet_times, first = [], None
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            packet_times.append(None if packet.pts is None else float(packet.pts * stream.time_base))
            if first is None:
                first = next(iter(stream.decode(packet)), None)  # validates that the stream decodes
        if first is None:
            first = next(iter(stream.decode(None)), None)  # decoders with a delay emit on flush
        if first is None:
            raise VideoError(name, f"no decodable frame in {len(packet_times)} packets")
        rotation, width, height, rate = _rotation(first), first.width, first.height, _rate(stream)
    except av.FFmpegError as e:
        raise VideoError(name, f"corrupt video ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    if None in packet_times:  # no packet timestamps (raw streams): decode every frame
        packet_times = _decoded_times(source)
    if not packet_times:
        raise VideoError(name, "no decodable frame")
    times = np.sort(np.asarray(packet_times, np.float64))  # [N]
    if len(times) > 1 and times[-1] > times[0]:
        duration = (times[-1] - times[0]) * len(times) / (len(times) - 1)
    elif rate:
        duration = len(times) / rate
    else:
        raise VideoError(name, "a single frame and no frame rate: duration unknown")
    if rotation % 180:
        width, height = height, width
    return VideoInfo(times, float(duration), width, height, rotation, name)


def _decoded_times(source: str | os.PathLike | bytes) -> list[float]:
    """Presentation times of every decoded frame (pts, else index / average rate)."""
    container, name = _open(source)
    try:
        stream = container.streams.video[0]
        rate = _rate(stream)
        return [_frame_time(frame, i, rate, name) for i, frame in enumerate(container.decode(stream))]
    except av.FFmpegError as e:
        raise VideoError(name, f"corrupt video ({type(e).__name__}: {e})") from e
    finally:
        container.close()


def _rotation(frame) -> int:
    return int(round(frame.rotation / 90.0)) % 4 * 90


def sampled_frame_count(duration: float, sampling: VideoSampling) -> int:
    """F: num_frames, or round(duration * fps) clamped to [min_frames, max_frames]; a multiple of 2, >= 2."""
    if sampling.num_frames:
        count = sampling.num_frames
    else:
        count = min(max(round(duration * sampling.fps), sampling.min_frames), sampling.max_frames)
    count = round(count / FRAME_FACTOR) * FRAME_FACTOR
    if not sampling.num_frames:
        low = math.ceil(sampling.min_frames / FRAME_FACTOR) * FRAME_FACTOR
        count = min(max(count, low), sampling.max_frames // FRAME_FACTOR * FRAME_FACTOR)
    return max(count, FRAME_FACTOR)


def sample_indices(info: VideoInfo, count: int, offset: float = 0.0) -> np.ndarray:
    """[count] int indices of the frames shown at t_first + (k + offset) * duration / count, k < count."""
    times = info.timestamps
    targets = times[0] + (np.arange(count) + offset) * info.duration / count  # [count]
    tolerance = 1e-3 * info.duration / len(times)  # absorbs float error in timestamps
    return np.clip(np.searchsorted(times, targets + tolerance, side="right") - 1, 0, len(times) - 1)


def decode_frames(source: str | os.PathLike | bytes, info: VideoInfo, indices: np.ndarray) -> np.ndarray:
    """[len(indices), H, W, 3] uint8 RGB frames (probe timestamps index them); decodes up to the last one."""
    wanted = np.unique(indices)  # ascending
    targets = info.timestamps[wanted]  # [U]
    tolerance = 1e-3 * info.duration / info.num_frames
    container, name = _open(source)
    frames: dict[int, np.ndarray] = {}
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate, previous, previous_rgb, j = _rate(stream), None, None, 0
        for i, frame in enumerate(container.decode(stream)):
            time = _frame_time(frame, i, rate, name)
            while j < len(targets) and time > targets[j] + tolerance:  # the previous frame is shown at target j
                if previous_rgb is None:
                    previous_rgb = _to_rgb(previous if previous is not None else frame, info)
                frames[int(wanted[j])], j = previous_rgb, j + 1
            if j == len(targets):
                break
            previous, previous_rgb = frame, None
        while j < len(targets):  # targets at or after the last frame
            if previous is None:
                raise VideoError(name, "no decodable frame")
            previous_rgb = _to_rgb(previous, info) if previous_rgb is None else previous_rgb
            frames[int(wanted[j])], j = previous_rgb, j + 1
    except av.FFmpegError as e:
        raise VideoError(name, f"corrupt video while decoding ({type(e).__name__}: {e})") from e
    finally:
        container.close()
    return np.stack([frames[int(i)] for i in indices])


def _to_rgb(frame, info: VideoInfo) -> np.ndarray:
    """[H, W, 3] uint8 displayed frame, resized to the probed size if the stream changed resolution mid-way."""
    rgb = frame.to_ndarray(format="rgb24")  # [h, w, 3]
    if info.rotation:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=info.rotation // 90))
    if rgb.shape[:2] != (info.height, info.width):
        rgb = np.asarray(Image.fromarray(rgb).resize((info.width, info.height), Image.Resampling.BICUBIC))
    return rgb


def downscale(frames: np.ndarray, max_pixels: int) -> np.ndarray:
    """[F, H, W, 3] -> [F, h, w, 3] with h * w <= max_pixels (aspect kept, bicubic); unchanged if small."""
    height, width = frames.shape[1:3]
    if not max_pixels or height * width <= max_pixels:
        return frames
    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))  # PIL (w, h)
    return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BICUBIC)) for f in frames])


def crop_window(frame: np.ndarray, side: int, mode: str) -> tuple[int, int]:
    """(top, left) of the side x side crop of `frame` [H, W, 3] (see the module docstring for the modes)."""
    height, width = frame.shape[:2]
    if mode == "center":
        return (height - side) // 2, (width - side) // 2
    luma = frame.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)  # [H, W]
    energy = np.zeros((height, width), np.float64)
    energy[:, 1:] += np.diff(luma, axis=1) ** 2
    energy[1:, :] += np.diff(luma, axis=0) ** 2
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # [H + 1, W + 1]
    sums = (
        integral[side:, side:] - integral[:-side, side:] - integral[side:, :-side] + integral[:-side, :-side]
    )  # [H - side + 1, W - side + 1]: energy of the window with that top-left corner
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left)


def key_frame_crops(frames: np.ndarray, sampling: VideoSampling) -> list[np.ndarray]:
    """One [c, c, 3] crop per key frame [K, H, W, 3], c = min(crop_size, H, W)."""
    side = min(sampling.crop_size, *frames.shape[1:3])
    crops = []
    for frame in frames:
        top, left = crop_window(frame, side, sampling.crop_mode)
        crops.append(np.ascontiguousarray(frame[top : top + side, left : left + side]))
    return crops


def load_video_inputs(
    source: str | os.PathLike | bytes, sampling: VideoSampling | Mapping | object | None = None
) -> tuple[VideoClip, list[np.ndarray]]:
    """Decodes and samples a video: (the clip, the key-frame crops; empty for layout "uniform")."""
    sampling = VideoSampling() if sampling is None else VideoSampling.from_config(sampling)
    info = probe_video(source)
    count = sampled_frame_count(info.duration, sampling)
    clip_indices = sample_indices(info, count)
    two_stream = sampling.layout == "two_stream" and sampling.num_crops > 0
    key_indices = sample_indices(info, sampling.num_crops, offset=0.5) if two_stream else np.zeros(0, int)
    frames = decode_frames(source, info, np.concatenate([clip_indices, key_indices]))  # [F + K, H, W, 3]
    clip_frames, key_frames = frames[:count], frames[count:]
    if sampling.layout == "two_stream":
        clip_frames = downscale(clip_frames, sampling.global_max_pixels)
    clip = VideoClip(frames=clip_frames, fps=count / info.duration, path=info.path)
    return clip, key_frame_crops(key_frames, sampling) if two_stream else []
