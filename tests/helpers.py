"""Test helpers shared by several test modules (imported as `helpers`: pytest puts tests/ on sys.path)."""

import torch

from fastsft.data import Task
from fastsft.model import GPT


class ListTask(Task):
    """A task over conversations given as a list, for tests that plant a bad row at a known position."""

    def __init__(self, name: str, conversations: list):
        super().__init__()
        self.name, self.conversations = name, conversations

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return self.conversations[index]


def random_model(config, seed=0):
    """A model whose every parameter is random and non-zero, so no feature is silently a no-op."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("resid_lambdas",):
                p.uniform_(0.7, 1.3)
            elif name in ("x0_lambdas", "smear_lambda", "backout_lambda"):
                p.uniform_(0.2, 0.6)
            elif "wte" in name or "value_embeds" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, 1.5 / p.shape[-1] ** 0.5)
    return model.eval()
