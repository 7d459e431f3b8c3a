"""Compatibility for `vbench2_beta_long` on current torchvision (runs in the VBench environment).

`vbench2_beta_long.utils` imports `torchvision.io.write_video`, which torchvision removed in 0.24
(torch >= 2.9). Where it is gone, this puts back an encoder with torchvision 0.23's behaviour
(PyAV, libx264, yuv420p, codec defaults, fps rounded to an int, `pict_type` NONE), so
VBench-Long's clip files (`--clip-source reencoded`) are written as VBench-Long writes them.
"""

from __future__ import annotations


def write_video(filename: str, video_array, fps: float, video_codec: str = "libx264", options=None) -> None:
    """Frames `[T, H, W, C]` uint8 -> an H.264 file, as torchvision 0.23's `write_video` (video only)."""
    import av
    import numpy as np
    import torch

    frames = torch.as_tensor(video_array, dtype=torch.uint8).numpy(force=True)
    if isinstance(fps, float):
        fps = int(np.round(fps))
    with av.open(filename, mode="w") as container:
        stream = container.add_stream(video_codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p" if video_codec != "libx264rgb" else "rgb24"
        stream.options = options or {}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pict_type = av.video.frame.PictureType.NONE
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def install() -> None:
    """Give `torchvision.io` its `write_video` back if this torchvision lacks it."""
    import torchvision.io

    if not hasattr(torchvision.io, "write_video"):
        torchvision.io.write_video = write_video
