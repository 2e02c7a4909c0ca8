"""POST /v1/embeddings through the official openai client on the real default model: unit
vectors of the model's width, float and base64 encodings agree, a batch equals its inputs one
by one, and a LoRA adapter in the chain changes the vectors."""
import math

import openai
import pytest

from conftest import ADAPTER, MODEL_ID

TEXTS = ["The cat sat on the mat.", "Stock markets fell sharply today.", "A kitten rested on a rug."]


def test_unit_vectors_of_the_models_width_in_either_encoding(client):
    floats = client.embeddings.create(model=MODEL_ID, input=TEXTS)
    assert [d.index for d in floats.data] == [0, 1, 2]
    for d in floats.data:
        assert len(d.embedding) == 576
        assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-4)
    # The SDK asks for base64 by default when no format is given and decodes it itself;
    # asking for floats explicitly must give the same numbers.
    explicit = client.embeddings.create(model=MODEL_ID, input=TEXTS, encoding_format="float")
    for a, b in zip(floats.data, explicit.data):
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) < 1e-6
    assert floats.usage.prompt_tokens > 0
    one = client.embeddings.create(model=MODEL_ID, input=TEXTS[1]).data[0].embedding
    assert max(abs(x - y) for x, y in zip(one, floats.data[1].embedding)) < 1e-5


def test_an_adapter_in_the_chain_changes_the_embedding(client):
    base = client.embeddings.create(model=MODEL_ID, input=TEXTS[0]).data[0].embedding
    adapted = client.embeddings.create(model=f"{MODEL_ID}::{ADAPTER}", input=TEXTS[0]).data[0].embedding
    assert max(abs(x - y) for x, y in zip(base, adapted)) > 1e-4


def test_other_dimensions_are_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=MODEL_ID, input="x", dimensions=64)
    assert e.value.response.json()["error"]["param"] == "dimensions"
