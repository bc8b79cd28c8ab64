"""The one token loop (runtime/generation.py): choosing tokens, stopping, and the pipeline's sampling, stop
strings and streaming on a real ONNX Runtime engine."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.generation import GREEDY, Sampling, iterate_tokens, run_tokens
from runtime.pipeline import Pipeline, held_back, stop_index
from visprune.errors import ConfigError

LOGITS = np.log(np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))  # [B=2, V=4]


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": -1.0}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
])
def test_bad_sampling_parameters_are_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        Sampling(**kwargs)


def draws(sampling: Sampling, n: int = 300) -> np.ndarray:
    """[n, B] tokens from one chooser (one seeded generator)."""
    choose = sampling.chooser()
    return np.stack([choose(LOGITS) for _ in range(n)])


def test_greedy_is_argmax_and_sampling_respects_top_k_top_p_and_seed():
    assert GREEDY.chooser()(LOGITS).tolist() == [0, 3]
    free = draws(Sampling(temperature=1.0, seed=3))
    assert set(free[:, 0]) == {0, 1, 2, 3}  # every token can come up at temperature 1
    assert set(draws(Sampling(temperature=1.0, top_k=2, seed=3))[:, 0]) == {0, 1}
    assert set(draws(Sampling(temperature=1.0, top_p=0.7, seed=3))[:, 1]) == {3, 2}  # 0.5 + 0.3 reaches 0.7
    assert set(draws(Sampling(temperature=5.0, top_k=1, seed=3)).ravel()) == {0, 3}  # top-1 is greedy
    again = draws(Sampling(temperature=1.0, seed=3))
    assert (again == free).all()  # the seed makes it repeatable
    assert not (draws(Sampling(temperature=1.0, seed=4)) == free).all()


def test_the_loop_stops_per_row_at_eos_and_at_the_budget():
    """Row 0 emits EOS (2) at its second step, row 1 at its fourth: the loop runs until both are done."""
    script = {0: [0, 3], 1: [2, 1], 2: [1, 1], 3: [1, 2]}  # step -> tokens the model prefers next

    def one_hot(tokens):
        logits = np.zeros((2, 4))
        logits[[0, 1], tokens] = 1.0
        return logits

    step = lambda tokens, index: one_hot(script[index + 1])  # noqa: E731
    loop = run_tokens(one_hot(script[0]), step, max_new_tokens=10, eos=2)
    assert [t.tolist() for t in loop.tokens] == [[0, 3], [2, 1], [1, 1], [1, 2]]
    assert loop.row_tokens(0, 2) == [0, 2] and loop.row_tokens(1, 2) == [3, 1, 1, 2]
    assert len(loop.step_seconds) == 3
    assert len(run_tokens(one_hot(script[0]), step, max_new_tokens=2, eos=2).tokens) == 2
    forced = list(iterate_tokens(one_hot(script[0]), step, 10, eos=2, forced=[3, 3, 3]))
    assert [int(t[0]) for t, _, _ in forced] == [3, 3, 3]


def test_stop_strings_and_what_streaming_holds_back():
    assert stop_index("a cat.\nNext", ("\n", "Next")) == 6 and stop_index("a cat", ("\n",)) is None
    assert held_back("a cat\n", ("\n\nUser",)) == 1 and held_back("a cat", ("\n\nUser",)) == 0


@pytest.fixture(scope="module")
def pipe(exported):
    return Pipeline.from_engine_dir(exported["pruned"])


def test_streamed_pieces_make_the_generated_text(pipe, default_set):
    image, prompt = default_set.samples[0].image, pipe.chat_prompt("What is in the picture?")
    whole = pipe.generate(image, prompt, max_new_tokens=12)
    pieces = list(pipe.stream(image, prompt, max_new_tokens=12))
    assert len(pieces) > 1 and "".join(pieces) == whole.text


def test_stop_strings_end_the_text_in_generate_and_stream(pipe, default_set):
    image, prompt = default_set.samples[0].image, pipe.chat_prompt("What is in the picture?")
    whole = pipe.generate(image, prompt, max_new_tokens=12).text
    cut = whole[len(whole) // 2:len(whole) // 2 + 2]
    stopped = pipe.generate(image, prompt, max_new_tokens=12, stop=(cut,))
    assert stopped.text == whole[:whole.index(cut)]
    assert "".join(pipe.stream(image, prompt, max_new_tokens=12, stop=(cut,))) == stopped.text


def test_sampled_generation_is_repeatable_with_a_seed(pipe, default_set):
    image, prompt = default_set.samples[1].image, pipe.chat_prompt("Describe it.")
    runs = [pipe.generate(image, prompt, max_new_tokens=8, sampling=Sampling(temperature=1.5, seed=s)).token_ids
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    greedy = pipe.generate(image, prompt, max_new_tokens=8).token_ids
    assert runs[0] != greedy or runs[2] != greedy  # temperature 1.5 on a random-weight model wanders
