"""Text towers drop the columns that are padding in every row before the encoder
(``model.towers.trim_padding``): the same features as the encoder run over the full padded
context, for each family's attention and pooling, and the same gradients.

The reference is transformers' own encoder (``tower.model``) called on the untrimmed batch in
float64, pooled in the test: CLS for BERT, the masked mean for T5, the last real token for CLIP's
causal text model.
"""

from __future__ import annotations

import pytest
import torch

from tritower.model import build_text_tower
from tritower.model.towers import trim_padding

CASES = [("bert_test", "cls"), ("bert_test", "mean"), ("t5_test", "mean"), ("clip_text_test", "eot")]


def padded_batch(lengths: list[int], context: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (pad id 0) and mask: row i has lengths[i] real tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context, dtype=torch.int64)
    mask = torch.zeros(len(lengths), context, dtype=torch.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
        mask[row, :length] = 1
    return ids, mask


def reference(tower: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    hidden = tower.model(input_ids=ids, attention_mask=mask).last_hidden_state.double()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "eot":
        last = mask.sum(1) - 1
        return hidden[torch.arange(len(ids)), last]
    weights = mask.double().unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize(("name", "pooling"), CASES)
def test_trimmed_features_and_gradients_equal_the_full_context(name: str, pooling: str) -> None:
    torch.manual_seed(0)
    tower = build_text_tower(name, pooling=pooling).double().eval()
    context = tower.spec.context_length
    ids, mask = padded_batch([3, 7, 5], context, tower.vocab_rows)
    assert trim_padding(ids, mask)[0].shape == (3, 7)  # the case trims 16 -> 7 columns

    ours = tower(ids, mask)
    ours.pow(2).sum().backward()
    ours_grads = {k: p.grad.clone() for k, p in tower.named_parameters() if p.grad is not None}
    tower.zero_grad()
    full = reference(tower, ids, mask, pooling)
    full.pow(2).sum().backward()
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-10)
    for key, param in tower.named_parameters():
        if param.grad is None:
            assert key not in ours_grads
            continue
        torch.testing.assert_close(ours_grads[key], param.grad, rtol=1e-9, atol=1e-10, msg=key)


def test_only_columns_padded_in_every_row_go() -> None:
    ids = torch.tensor([[5, 6, 0, 0, 0], [0, 0, 7, 8, 0]])
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 1, 0]])  # the second row left-padded
    out_ids, out_mask = trim_padding(ids, mask)
    assert out_ids.tolist() == [[5, 6, 0, 0], [0, 0, 7, 8]]
    assert out_mask.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]
    full = torch.ones(2, 5, dtype=torch.int64)
    assert trim_padding(ids, full)[0] is ids  # nothing to trim: the same tensors
    empty = torch.zeros(2, 5, dtype=torch.int64)
    assert trim_padding(ids, empty)[0].shape == (2, 1)  # an all-padding batch keeps one column
