"""Typed prompts encoded on their own CUDA stream (core/interactive.py): the context the
generation stream reads after `take` is the finished one, while a long encode runs beside
kernels on the default stream."""

import queue
import time

import pytest
import torch

from core.interactive import BackgroundPrompts

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)


def test_side_stream_context_is_complete_when_the_generation_stream_reads_it():
    device = torch.device("cuda")
    weights = torch.randn(4096, 4096, device=device)
    typed: queue.Queue = queue.Queue()

    def encode(prompt: str) -> torch.Tensor:  # long enough to still run when take() returns
        x = torch.full((64, 4096), float(len(prompt)), device=device)
        for _ in range(200):
            x = torch.tanh(x @ weights * 1e-3)
        return x

    expected = encode("a storm begins")
    torch.cuda.synchronize()
    with BackgroundPrompts(lambda: None if typed.empty() else typed.get(), encode, device) as prompts:
        typed.put("a storm begins")
        deadline = time.monotonic() + 30
        taken = None
        while taken is None and time.monotonic() < deadline:
            busy = torch.randn(2048, 2048, device=device) @ torch.randn(2048, 2048, device=device)  # noqa: F841
            taken = prompts.take(0)
        assert taken is not None
        switch, context = taken
        got = (context * 1).cpu()  # a kernel on the default stream, ordered after the side stream
    assert switch.prompt == "a storm begins" and torch.equal(got, expected.cpu())
