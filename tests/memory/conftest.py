import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: torch's thread pool costs more than it saves, and far more on a busy machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
