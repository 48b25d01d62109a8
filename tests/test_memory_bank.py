"""MemoryBank: a device ring buffer of keys (MoCo's queue)."""

import pytest
import torch

from advfast.losses import MemoryBank


def _reference_queue(initial: torch.Tensor, batches: list[torch.Tensor]) -> torch.Tensor:
    """Slot-by-slot replay of a ring buffer: each key goes to the next slot, wrapping at the end."""
    queue = initial.clone()
    slot = 0
    for batch in batches:
        for key in batch:
            queue[slot] = key
            slot = (slot + 1) % queue.shape[0]
    return queue


def test_starts_normalised_noise_with_pointer_zero():
    bank = MemoryBank(10, 4)
    assert bank.queue.shape == (10, 4)
    torch.testing.assert_close(bank.queue.norm(dim=1), torch.ones(10))
    assert int(bank.ptr) == 0


@pytest.mark.parametrize("size,batches", [
    (8, [4, 4, 4]),          # batch divides K
    (10, [3, 3, 3, 3, 3]),   # ragged: writes wrap across the end
    (7, [1, 6, 2, 5]),       # mixed batch sizes
    (5, [12, 3]),            # batch larger than the queue: only the newest keys stay
    (6, [0, 2]),             # an empty batch is a no-op
])
def test_ring_buffer_wraps_and_holds_the_newest_keys(size, batches):
    bank = MemoryBank(size, 3)
    initial = bank.queue.clone()
    written = [torch.randn(b, 3) for b in batches]
    for keys in written:
        bank.enqueue(keys)
    torch.testing.assert_close(bank.queue, _reference_queue(initial, written), rtol=0, atol=0)
    assert int(bank.ptr) == sum(batches) % size


def test_enqueue_stores_detached_keys_in_queue_dtype():
    bank = MemoryBank(4, 2)
    keys = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    bank.enqueue(keys * 2)
    assert bank.queue.dtype == torch.float32 and not bank.queue.requires_grad
    torch.testing.assert_close(bank.queue[:2], (keys * 2).detach().float())


def test_pointer_stays_on_device_as_a_buffer_and_checkpoints_restore_it():
    bank = MemoryBank(6, 2)
    bank.enqueue(torch.randn(4, 2))
    state = bank.state_dict()
    assert set(state) == {"queue", "ptr"}
    other = MemoryBank(6, 2)
    other.load_state_dict(state)
    more = torch.randn(3, 2)
    bank.enqueue(more)
    other.enqueue(more)
    torch.testing.assert_close(other.queue, bank.queue, rtol=0, atol=0)
    assert int(other.ptr) == int(bank.ptr) == 1


def test_bad_input_raises_one_clear_error():
    with pytest.raises(ValueError, match="size"):
        MemoryBank(0, 4)
    with pytest.raises(ValueError, match="dim"):
        MemoryBank(4, -1)
    bank = MemoryBank(4, 3)
    with pytest.raises(ValueError, match=r"shape \(B, 3\)"):
        bank.enqueue(torch.randn(2, 5))
    with pytest.raises(TypeError, match="keys"):
        bank.enqueue([[0.0, 0.0, 0.0]])


@pytest.mark.gpu
def test_enqueue_on_cuda_needs_no_host_sync():
    bank = MemoryBank(10, 3).cuda()
    keys = torch.randn(7, 3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        bank.enqueue(keys)
        bank.enqueue(keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert int(bank.ptr) == 4
