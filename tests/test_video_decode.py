"""Video decoding and sampling (qponder_jax.data.video): frame counts, timestamps, effective fps, VFR, streams
without timestamps, rotation, the two-stream layout, and clear errors."""

import ml_collections
import numpy as np
import pytest

from qponder_jax.data import video as V
from qponder_jax.data.datasets.synthetic_video import write_video


def indexed_frames(n: int, h: int = 32, w: int = 48) -> np.ndarray:
    """[n, h, w, 3] flat frames whose gray level 8 i + 4 identifies frame i (survives lossy codecs)."""
    return np.stack([np.full((h, w, 3), 8 * i + 4, np.uint8) for i in range(n)])


def frame_ids(frames: np.ndarray) -> list[int]:
    return np.round((frames.reshape(len(frames), -1).mean(1) - 4) / 8).astype(int).tolist()


@pytest.fixture(scope="module")
def cfr(tmp_path_factory):
    """16 frames at 8 fps (2 s), mpeg4 in mp4."""
    return write_video(tmp_path_factory.mktemp("v") / "cfr.mp4", indexed_frames(16), fps=8, codec="mpeg4")


@pytest.mark.parametrize(("codec", "suffix"), [("mpeg4", ".mp4"), ("libx264", ".mp4"), ("ffv1", ".mkv")])
def test_fixed_count_matches_transformers_indices(tmp_path, codec, suffix):
    path = write_video(tmp_path / f"v{suffix}", indexed_frames(16), fps=8, codec=codec)  # libx264: B-frames
    info = V.probe_video(path)
    assert info.num_frames == 16 and info.duration == pytest.approx(2.0) and info.fps == pytest.approx(8.0)
    assert (info.width, info.height, info.rotation) == (48, 32, 0)
    clip, crops = V.load_video_inputs(path, V.VideoSampling(num_frames=6))
    # transformers' Qwen2VLVideoProcessor.sample_frames: arange(0, N, N / F).int()
    assert frame_ids(clip.frames) == np.arange(0, 16, 16 / 6).astype(int).tolist() == [0, 2, 5, 8, 10, 13]
    assert clip.frames.shape == (6, 32, 48, 3) and clip.frames.dtype == np.uint8
    assert clip.fps == pytest.approx(6 / 2.0) and clip.path == str(path) and crops == []


def test_sampled_frames_are_one_over_fps_apart(cfr):
    info = V.probe_video(cfr)
    for count in (2, 4, 8, 16):
        times = info.timestamps[V.sample_indices(info, count)]
        np.testing.assert_allclose(np.diff(times), info.duration / count, atol=1e-9)
    clip, _ = V.load_video_inputs(cfr, V.VideoSampling(fps=2.0))  # round(2 s * 2) = 4 frames
    assert frame_ids(clip.frames) == [0, 4, 8, 12] and clip.fps == pytest.approx(2.0)


def test_frame_count_rule():
    count = V.sampled_frame_count
    assert count(10.0, V.VideoSampling(fps=2.0)) == 20
    assert count(10.0, V.VideoSampling(fps=2.0, max_frames=15)) == 14  # clamped, then even
    assert count(0.5, V.VideoSampling(fps=1.0)) == 4  # min_frames
    assert count(1.0, V.VideoSampling(fps=2.0, min_frames=5)) == 6  # ceil(min_frames) to even
    assert count(3.4, V.VideoSampling(fps=1.0, min_frames=1)) == 4  # round(3.4) = 3 -> Qwen's round_by_factor: 4
    assert count(99.0, V.VideoSampling(num_frames=7)) == 8 and count(99.0, V.VideoSampling(num_frames=1)) == 2


def test_more_samples_than_frames_repeat_frames(cfr):
    clip, _ = V.load_video_inputs(cfr, V.VideoSampling(fps=16.0))  # 32 samples of 16 frames
    assert frame_ids(clip.frames) == np.repeat(np.arange(16), 2).tolist() and clip.fps == pytest.approx(16.0)


@pytest.mark.parametrize(("codec", "suffix"), [("ffv1", ".mkv"), ("mpeg4", ".mp4")])
def test_variable_frame_rate_samples_by_time(tmp_path, codec, suffix):
    times = [0.0, 0.1, 0.2, 0.3, 1.0, 1.1, 1.2, 1.3]  # the camera froze for 0.7 s
    path = write_video(tmp_path / f"vfr{suffix}", indexed_frames(8), timestamps=times, codec=codec)
    info = V.probe_video(path)
    np.testing.assert_allclose(info.timestamps, times, atol=1e-6)
    assert info.duration == pytest.approx(1.3 * 8 / 7)
    clip, _ = V.load_video_inputs(path, V.VideoSampling(num_frames=4))
    # shown at 0, D/4 = 0.37, 0.74 (still frame 3: the gap), 1.11 -- index-uniform sampling would give 0, 2, 4, 6
    assert frame_ids(clip.frames) == [0, 3, 3, 5] and clip.fps == pytest.approx(4 / info.duration)


def test_stream_without_timestamps_or_duration(tmp_path):
    path = write_video(tmp_path / "raw.h264", indexed_frames(10), fps=8, codec="libx264")  # elementary stream
    info = V.probe_video(path)  # no packet pts, no container duration: decoded frame index / average rate
    assert info.num_frames == 10 and info.duration == pytest.approx(10 / info.fps)
    np.testing.assert_allclose(np.diff(info.timestamps), 1 / info.fps)
    clip, _ = V.load_video_inputs(path, V.VideoSampling(num_frames=10))
    assert frame_ids(clip.frames) == list(range(10))


def test_bytes_input_equals_path_input(cfr):
    sampling = V.VideoSampling(num_frames=4, layout="two_stream", num_crops=2, crop_size=16)
    from_path, crops_path = V.load_video_inputs(cfr, sampling)
    from_bytes, crops_bytes = V.load_video_inputs(cfr.read_bytes(), sampling)
    np.testing.assert_array_equal(from_path.frames, from_bytes.frames)
    assert all(np.array_equal(a, b) for a, b in zip(crops_path, crops_bytes)) and from_bytes.path == "<bytes>"


def test_rotation_from_the_display_matrix(tmp_path):
    import av

    marker = np.zeros((32, 48, 3), np.uint8)
    marker[:8, :8] = 255  # top-left corner as stored
    path = tmp_path / "rotated.mp4"
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=8)
    stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
    stream.set_display_rotation(90)  # display rotated 90 degrees counter-clockwise (a portrait phone video)
    for i in range(4):
        frame = av.VideoFrame.from_ndarray(marker, format="rgb24")
        frame.pts = i
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))
    container.close()
    info = V.probe_video(path)
    assert (info.width, info.height, info.rotation) == (32, 48, 90)
    clip, _ = V.load_video_inputs(path, V.VideoSampling(num_frames=2))
    assert clip.frames.shape == (2, 48, 32, 3)
    assert clip.frames[0, -8:, :8].mean() > 200 and clip.frames[0, :8, :8].mean() < 50  # marker now bottom-left


def test_two_stream_shapes_key_frames_and_determinism(tmp_path):
    rng = np.random.default_rng(0)
    frames = np.full((16, 60, 80, 3), 128, np.uint8)
    frames[:, 10:30, 44:64] = rng.integers(0, 256, size=(16, 20, 20, 3))  # the only textured region
    for i in range(16):
        frames[i, -4:, :4] = 16 * i  # frame id in a corner (lossless codec)
    path = write_video(tmp_path / "two.mkv", frames, fps=8)
    sampling = V.VideoSampling(num_frames=8, layout="two_stream", global_max_pixels=30 * 40, num_crops=2, crop_size=20)
    clip, crops = V.load_video_inputs(path, sampling)
    assert clip.frames.shape == (8, 30, 40, 3) and clip.fps == pytest.approx(4.0)  # downscaled, aspect kept
    assert len(crops) == 2 and all(c.shape == (20, 20, 3) and c.dtype == np.uint8 for c in crops)
    # key frames at the centers of 2 equal segments of the 2 s clip: 0.5 s and 1.5 s = frames 4 and 12;
    # "detail" finds the textured window exactly
    np.testing.assert_array_equal(crops[0], frames[4, 10:30, 44:64])
    np.testing.assert_array_equal(crops[1], frames[12, 10:30, 44:64])
    again, crops_again = V.load_video_inputs(path, sampling)
    np.testing.assert_array_equal(clip.frames, again.frames)
    assert all(np.array_equal(a, b) for a, b in zip(crops, crops_again))
    _, center = V.load_video_inputs(path, V.VideoSampling(**{**vars(sampling), "crop_mode": "center"}))
    np.testing.assert_array_equal(center[0], frames[4, 20:40, 30:50])
    _, big = V.load_video_inputs(path, V.VideoSampling(num_frames=2, layout="two_stream", crop_size=448))
    assert len(big) == 3 and big[0].shape == (60, 60, 3)  # crop side clamped to the frame
    uniform, none = V.load_video_inputs(path, V.VideoSampling(num_frames=8))
    assert uniform.frames.shape == (8, 60, 80, 3) and none == []  # uniform: decoded resolution, no crops


def test_sampling_config_validation_names_the_field():
    config = ml_collections.ConfigDict({"fps": 1.0, "max_frames": 8, "layout": "two_stream"})
    assert V.VideoSampling.from_config(config) == V.VideoSampling(fps=1.0, max_frames=8, layout="two_stream")
    assert V.VideoSampling.from_config({"num_frames": 4}).num_frames == 4
    with pytest.raises(ValueError, match="unknown field.*'fsp'"):
        V.VideoSampling.from_config({"fsp": 2.0})
    with pytest.raises(ValueError, match=r"VideoSampling.layout = 'mosaic'"):
        V.VideoSampling(layout="mosaic")
    with pytest.raises(ValueError, match=r"VideoSampling.fps"):
        V.VideoSampling(fps=0)
    with pytest.raises(ValueError, match=r"VideoSampling.crop_mode"):
        V.VideoSampling(crop_mode="random")


def test_unreadable_files_name_the_path(tmp_path, cfr):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(cfr.read_bytes()[:600])
    for path in (garbage, truncated, tmp_path / "missing.mp4"):
        with pytest.raises(V.VideoError, match=str(path)) as e:
            V.load_video_inputs(path)
        assert e.value.path == str(path)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(indexed_frames(1)[0]).save(image)
    clip, _ = V.load_video_inputs(image, V.VideoSampling(num_frames=2))  # a still image is a one-frame video
    assert clip.frames.shape == (2, 32, 48, 3)
