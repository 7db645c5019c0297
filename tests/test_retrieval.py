"""BM25 over words and word pairs: phrase matches beat repeated names."""

from lloco_index.retrieval import BM25


def test_phrase_beats_repeated_names():
    filler = [f"Essay {i} is about compilers, parsers and the work of writing them in {i} steps." for i in range(10)]
    docs = filler + [
        "What is the best city for founders? San Francisco. The thing is, in San Francisco rents are high; "
        "San Francisco, San Francisco, San Francisco. Startups do well there, and the weather is mild.",
        "Some essay text. The best thing to do in San Francisco is eat a sandwich in the park. More essay text here.",
    ]
    assert BM25(docs).top_k("What is the best thing to do in San Francisco?", 1)[0][0] == 11


def test_ranking_is_stable_and_scored():
    bm = BM25(["alpha beta", "beta gamma", "delta"])
    top = bm.top_k("beta", 3)
    assert [i for i, _ in top] == [0, 1, 2]  # ties keep document order; no match scores 0
    assert top[0][1] > 0 and top[2][1] == 0
