"""The paraphrases `tools/bench_language.py` judges the language features by."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from bench_language import paraphrase  # noqa: E402

from edge_steer.sim.tasks import TASKS, tasks_by_split  # noqa: E402


def test_paraphrases_keep_only_colours_and_small_words_of_the_training_wording():
    """Every verb, shape, container and relation phrase is one no instruction of any task uses."""
    trained = {w for t in TASKS.values() for w in t.instruction.split()}
    allowed = {"the", "of", "left", "right", "on", "red", "green", "blue", "yellow", "white"}
    for t in tasks_by_split("base"):
        new = paraphrase(t.instruction)
        assert set(new.split()) & trained <= allowed, (t.instruction, new)
        assert new not in {u.instruction for u in TASKS.values()}


def test_a_rewritten_word_is_not_rewritten_again():
    assert paraphrase("put the red cube to the left of the blue plate") == \
        "place the red block on the left side of the blue dish"
    assert paraphrase("put the cube in the bowl") == "place the block into the basin"
