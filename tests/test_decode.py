"""Decoders and the video writer: rounding, ordering, bounded queues, errors surfacing, atomic output."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from core.decode import (
    DecodeMode,
    DeviceDecoder,
    SyncDecoder,
    VideoWriter,
    to_uint8_frames,
)
from core.errors import UserError


class FakeVAE(torch.nn.Module):
    """Decodes latent frame i of a chunk to 4 frames of constant value (first chunk: 1 frame for
    its first latent), like the real streaming decoder's frame counts."""

    def __init__(self, fail_on_call: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.fail_on_call = fail_on_call

    def streaming_decoder(self):
        vae = self

        class Decoder:
            calls = 0
            first = True

            def decode(self, z):
                Decoder.calls += 1
                if vae.fail_on_call == Decoder.calls:
                    raise RuntimeError("boom")
                values = z[0, 0, :, 0, 0]  # one value per latent frame
                frames = []
                for i, v in enumerate(values):
                    frames += [v] * (1 if (self.first and i == 0) else 4)
                self.first = False
                video = torch.stack(frames).view(1, 1, -1, 1, 1).expand(1, 3, -1, 16, 32)
                return video.clone()

        return Decoder()


def chunk(values):
    latents = torch.zeros(1, len(values), 48, 1, 2)
    latents[:, :, 0, 0, 0] = torch.tensor(values, dtype=torch.float32)
    return latents


def test_uint8_rounding_matches_the_official_writer():
    pixels = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0]).view(1, 1, -1, 1, 1).expand(1, 3, -1, 1, 1)
    frames = to_uint8_frames(pixels)
    expected = ((pixels[0, 0, :, 0, 0].clamp(-1, 1) * 0.5 + 0.5).clamp(0, 1) * 255).floor().to(torch.uint8)
    assert frames.shape == (7, 1, 1, 3) and torch.equal(frames[:, 0, 0, 0], expected)
    assert frames[3, 0, 0, 0] == 127  # 0 -> 127.5 -> truncated


@pytest.mark.parametrize("decoder_cls", [SyncDecoder, DeviceDecoder])
def test_decoders_deliver_frames_in_order(decoder_cls):
    got = []
    decoder = decoder_cls(FakeVAE(), lambda frames: got.append(frames[:, 0, 0, 0].copy()))
    for values in ([0.0, 0.1], [0.2, 0.3], [0.4, 0.5]):
        decoder.submit(chunk(values))
    decoder.finish()
    sequence = np.concatenate(got)
    assert len(sequence) == 4 * 6 - 3
    expected = to_uint8_frames(torch.tensor([0.0] + [0.1] * 4 + [0.2] * 4 + [0.3] * 4 + [0.4] * 4 + [0.5] * 4)
                               .view(1, 1, -1, 1, 1).expand(1, 3, -1, 1, 1))[:, 0, 0, 0].numpy()
    assert np.array_equal(sequence, expected)


def test_worker_error_surfaces_in_the_main_thread():
    decoder = DeviceDecoder(FakeVAE(fail_on_call=2), lambda frames: None)
    decoder.submit(chunk([0.0, 0.1]))
    with pytest.raises(RuntimeError, match="VAE decode on cpu failed: boom"):
        for _ in range(20):  # the error shows at a later submit or at finish
            decoder.submit(chunk([0.2, 0.3]))
        decoder.finish()


def write_video(path, chunks, crf=18, fail_after=None):
    with VideoWriter(path, 32, 16, crf=crf, metadata={"comment": "hello"}) as writer:
        for i, value in enumerate(chunks):
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt
            writer.write(np.full((4, 16, 32, 3), value, np.uint8))
    return writer


def test_writer_produces_h264_at_24_fps(tmp_path):
    path = tmp_path / "out.mp4"
    writer = write_video(path, [10, 120, 240])
    assert writer.frames_written == 12
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert stream.codec_context.name == "h264" and stream.average_rate == 24
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert container.metadata.get("comment") == "hello"
    assert len(frames) == 12
    assert abs(int(frames[5].mean()) - 120) <= 3  # decoded content follows the input
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.parametrize("thread_type", ["frame", "slice", "auto"])
def test_writer_threading_writes_every_frame(tmp_path, thread_type):
    """x264's frame threads (the default) hold frames back until the flush: none may be lost."""
    path = tmp_path / "out.mp4"
    with VideoWriter(path, 32, 16, thread_type=thread_type) as writer:
        assert writer._stream.codec_context.thread_type.name == thread_type.upper()
        for value in range(0, 250, 10):
            writer.write(np.full((3, 16, 32, 3), value, np.uint8))
    with av.open(str(path)) as container:
        means = [int(f.to_ndarray(format="rgb24").mean()) for f in container.decode(video=0)]
    assert len(means) == 75
    assert all(abs(m - 10 * (i // 3)) <= 3 for i, m in enumerate(means))  # in order


def test_interrupt_leaves_no_file(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(KeyboardInterrupt):
        write_video(path, [10, 120, 240], fail_after=2)
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_frames_and_quality(tmp_path):
    with pytest.raises(UserError, match="--crf 60"):
        VideoWriter(tmp_path / "x.mp4", 32, 16, crf=60)
    with pytest.raises(ValueError, match="thread_type must be frame, slice or auto"):
        VideoWriter(tmp_path / "x.mp4", 32, 16, thread_type="frames")
    with pytest.raises(ValueError, match=r"uint8 \[T, 16, 32, 3\]"):
        with VideoWriter(tmp_path / "x.mp4", 32, 16) as writer:
            writer.write(np.zeros((2, 16, 30, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode,needle", [("fast", "use sync, stream or device:N"),
                                          ("device:x", "use sync, stream or device:N")])
def test_bad_decode_modes(mode, needle):
    with pytest.raises(UserError, match=needle):
        DecodeMode.parse(mode)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("mode", ["stream", "device:1"])
def test_gpu_decode_modes_need_cuda(mode):
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        DecodeMode.parse(mode).vae_device(torch.device("cpu"))


@pytest.mark.parametrize("text,kind,gpu", [("sync", "sync", None), ("stream", "stream", None),
                                           ("device:3", "device", 3)])
def test_decode_modes_parse_once_and_print_back(text, kind, gpu):
    mode = DecodeMode.parse(text)
    assert (mode.kind, mode.gpu, str(mode)) == (kind, gpu, text)
    assert DecodeMode.parse(mode) is mode
