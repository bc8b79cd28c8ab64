"""One Pipeline shared by many threads gives every request the answer it gets alone."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from runtime import Pipeline

THREADS, REQUESTS_PER_THREAD = 8, 4
QUESTIONS = ["What is shown in this image?", "What colors are visible?", "Is there an animal?"]
PHOTOS = ["cat.png", "coffee.png", "astronaut.png", "rocket.png", "coins.png"]


@pytest.fixture(scope="module")
def pipe(exported):
    return Pipeline.from_engine_dir(exported["pruned"])


@pytest.fixture(scope="module")
def requests(pipe, default_set):
    """THREADS x REQUESTS_PER_THREAD (image, prompt) pairs; neighbours differ, so interleaved runs differ too."""
    images = {s.image.name: s.image for s in default_set.samples}
    count = THREADS * REQUESTS_PER_THREAD
    return [(images[PHOTOS[i % len(PHOTOS)]], pipe.chat_prompt(QUESTIONS[i % len(QUESTIONS)])) for i in range(count)]


def answer(pipe, request):
    generation = pipe.generate(*request, max_new_tokens=6)
    return generation.text, generation.token_ids


def test_threads_sharing_one_pipeline_get_the_serial_answers(pipe, requests):
    serial = [answer(pipe, r) for r in requests]
    chunks = [requests[t::THREADS] for t in range(THREADS)]  # each thread runs its REQUESTS_PER_THREAD in order
    with ThreadPoolExecutor(THREADS) as pool:
        per_thread = list(pool.map(lambda chunk: [answer(pipe, r) for r in chunk], chunks))
    concurrent = [per_thread[i % THREADS][i // THREADS] for i in range(len(requests))]
    assert concurrent == serial
    assert len({tuple(ids) for _, ids in serial}) > 1  # the requests do not all get one answer
