"""TextConditioning: rows selected, concatenated and split together in every part, and the
UNet's keyword arguments of each family."""

from __future__ import annotations

import pytest
import torch

from worker.engine.conditioning import TextConditioning
from worker.engine.rows import take


def xl(rows: int, offset: float = 0.0) -> TextConditioning:
    values = torch.arange(rows, dtype=torch.float32) + offset
    return TextConditioning(
        embeds=values.view(-1, 1, 1).expand(rows, 3, 4).clone(),
        pooled=values.view(-1, 1).expand(rows, 2).clone(),
        time_ids=values.view(-1, 1).expand(rows, 6).clone(),
    )


def row_values(text: TextConditioning) -> list[list[float]]:
    """Each part's per-row value (every element of a row is its value)."""
    return [part.flatten(1)[:, 0].tolist() for part in (text.embeds, text.pooled, text.time_ids)]


def test_rows_are_taken_concatenated_and_split_in_every_part():
    text = xl(4)
    assert row_values(text.select([2, 0])) == [[2.0, 0.0]] * 3
    (taken,) = take([text], [3, 1])
    assert row_values(taken) == [[3.0, 1.0]] * 3
    both = TextConditioning.cat([xl(2, 10.0), xl(2)])
    assert row_values(both) == [[10.0, 11.0, 0.0, 1.0]] * 3
    uncond, cond = both.chunk(2)
    assert row_values(uncond) == [[10.0, 11.0]] * 3 and row_values(cond) == [[0.0, 1.0]] * 3
    with pytest.raises(ValueError, match="equal chunks"):
        xl(3).chunk(2)


def test_sd_and_sdxl_conditioning_do_not_mix():
    sd = TextConditioning(torch.zeros(1, 3, 4))
    with pytest.raises(ValueError, match="SDXL"):
        TextConditioning.cat([sd, xl(1)])


def test_unet_kwargs_of_each_family_in_the_unet_dtype():
    sd = TextConditioning(torch.zeros(2, 3, 4)).unet_kwargs(torch.float16)
    assert set(sd) == {"encoder_hidden_states"}
    assert sd["encoder_hidden_states"].dtype == torch.float16
    kwargs = xl(2).unet_kwargs(torch.float16)
    assert set(kwargs) == {"encoder_hidden_states", "added_cond_kwargs"}
    added = kwargs["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 2) and added["time_ids"].shape == (2, 6)
    assert {t.dtype for t in added.values()} == {torch.float16}


def test_to_casts_like_a_tensor_and_with_embeds_keeps_the_time_ids():
    text = xl(2).to(torch.float64)
    assert text.embeds.dtype == text.pooled.dtype == text.time_ids.dtype == torch.float64
    swapped = text.with_embeds(torch.ones(2, 3, 4), torch.ones(2, 2))
    assert torch.equal(swapped.time_ids, text.time_ids)
    assert torch.equal(swapped.pooled, torch.ones(2, 2))
    assert torch.equal(text.with_embeds(torch.ones(2, 3, 4)).pooled, text.pooled)
