"""Head detection on the induction toy: its previous-token and induction heads come out on top."""

from __future__ import annotations

import pytest

from attncomm.analyses.head_detection import head_scores, top_heads
from tests.toolkit_helpers import induction_setup, load_toy


def test_toy_induction_heads() -> None:
    model = load_toy("toy-induction")
    _, prompts, _ = induction_setup(model, n=4)
    df = head_scores(model, prompts, seq_len=10, n_sequences=8)
    top = top_heads(df, k=1).set_index("type")
    assert (top.loc["previous_token", "layer"], top.loc["previous_token", "head"]) == (0, 0)
    assert (top.loc["induction", "layer"], top.loc["induction", "head"]) == (1, 1)
    # the "mul" score is the share of all attention on the pattern; the first half of a repeated sequence
    # has no earlier copy to attend to, so an ideal induction head scores about one half
    assert top.loc["previous_token", "value"] > 0.5 and top.loc["induction", "value"] > 0.3
    layer0_induction = df[(df.type == "induction") & (df.layer == 0)]["value"].max()
    assert top.loc["induction", "value"] > 3 * layer0_induction
    assert set(df["type"]) == {"previous_token", "duplicate_token", "induction", "bos"}
    bos = df[df.type == "bos"]["value"]
    assert ((bos >= 0) & (bos <= 1)).all()
    assert df.groupby("type").size().tolist() == [4] * 4
    assert pytest.approx(df[df.type == "previous_token"]["value"].max()) == top.loc["previous_token", "value"]
