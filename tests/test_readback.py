"""fastsft.readback: device values reach the host in order, without a wait unless asked for; and the driver's step
hands its loss over as a device value instead of reading it."""

import pytest
import torch

from fastsft.readback import Readback


def test_values_come_back_in_push_order():
    rb = Readback()
    rb.push("a", torch.tensor(1.5))
    rb.push("b", 2)
    rb.push("c", torch.tensor([3.0]))
    assert len(rb) == 3
    assert rb.ready() == [("a", 1.5), ("b", 2), ("c", 3.0)]
    assert len(rb) == 0 and rb.ready(wait=True) == []


def test_leave_keeps_the_newest_pending():
    rb = Readback()
    for i in range(3):
        rb.push(i, torch.tensor(float(i)))
    assert rb.ready(wait=True, leave=1) == [(0, 0.0), (1, 1.0)]
    assert len(rb) == 1
    assert rb.ready(leave=1) == []
    assert rb.ready() == [(2, 2.0)]


def test_a_pushed_value_is_a_copy():
    rb = Readback()
    t = torch.tensor(1.0)
    rb.push("t", t)
    t.add_(5)  # the step after goes on with its tensors
    (_, value), = rb.ready()
    assert value == 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_device_value_arrives_after_the_work_before_it():
    rb = Readback()
    x = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # long enough that the host gets ahead
        x = torch.tanh(x @ x.T / 64)
    want = x.sum()
    rb.push("sum", want)
    x.zero_()  # later work on the same stream must not change the value read
    (_, got), = rb.ready(wait=True)
    assert got == pytest.approx(want.item(), rel=1e-6)
