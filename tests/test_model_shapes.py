"""GPTConfig.from_name: the named model shapes (nanochat master's depth rule) that bench scripts and the driver use."""

import pytest

from fastsft.model import GPTConfig


@pytest.mark.parametrize("name, n_embd, n_head", [("d12", 768, 6), ("d20", 1280, 10), ("d26", 1664, 13),
                                                  ("d32", 2048, 16), ("d1", 128, 1), ("d3", 256, 2)])
def test_from_name_follows_nanochat_depth_rule(name, n_embd, n_head):
    config = GPTConfig.from_name(name)
    assert (config.n_layer, config.n_embd, config.n_head, config.n_kv_head) == (int(name[1:]), n_embd, n_head, n_head)
    assert config.head_dim == 128 and config.vocab_size == 32768 and config.sequence_len == 2048
    assert config.window_pattern == "SSSL"  # the rest is nanochat master's architecture, the class defaults


def test_from_name_takes_overrides_and_rejects_other_names():
    assert GPTConfig.from_name("d20", sequence_len=512).sequence_len == 512
    for bad in ("20", "d", "dx", "d0", "d-3", "D12", 12, None):
        with pytest.raises(ValueError, match="d<depth>"):
            GPTConfig.from_name(bad)
