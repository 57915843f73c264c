import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors, many small ops: one intra-op thread is as fast and far less sensitive to a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
