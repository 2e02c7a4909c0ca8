"""Images in chat requests through the official openai client. The default model reads text
only: it refuses any image part by part, before fetching or decoding it. A vision-language
model (models/tests/fixtures/idefics3_tiny: SmolVLM's layout at a small size with generated
weights and a word-level tokenizer; its logits are checked against transformers in
models/tests/vision.rs) decodes every `image_url` part (data: URLs, PNG, JPEG, WebP; http URLs
of allowed hosts) and answers each bad one with a 400 naming the part. Servers keep serving
after each.
"""
import base64
import struct
import zlib

import openai
import pytest

from conftest import MODEL_ID, ROOT, Server

VLM = ROOT / "models/tests/fixtures/idefics3_tiny"
VLM_ID = "tiny-vlm"


def png(width: int, height: int) -> bytes:
    """A real RGB PNG, written by hand (no imaging library in the test environment)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    # Each row: filter type 0, then RGB triples.
    raw = b"".join(
        b"\x00" + b"".join(bytes((x * 30 % 256, y * 30 % 256, 90)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def ask(client, *urls: str, model: str = MODEL_ID):
    parts = [{"type": "text", "text": "w5 w6 w7"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": parts}], max_tokens=4, temperature=0
    )


def refused(client, *urls: str, model: str = MODEL_ID) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, *urls, model=model)
    assert e.value.status_code == 400
    return e.value.body


def openai_client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def vlm():
    server = Server("--model", str(VLM), "--model-id", VLM_ID)
    yield server
    assert server.stop() == 0


GOOD = data_url("image/png", png(8, 6))


def test_the_text_only_model_refuses_images_by_part_before_decoding_them(client, server):
    err = refused(client, GOOD)
    assert err["param"] == "messages[0].content[1]", err
    assert "reads text only" in err["message"], err
    # Not decoded first: a corrupt image gets the same answer.
    err = refused(client, data_url("image/png", b"not a png"))
    assert "reads text only" in err["message"], err
    server.assert_serving()


@pytest.mark.parametrize(
    "url,says",
    [
        (data_url("image/png", png(8, 6)[:40]), "cannot decode"),
        (data_url("image/png", b"plain text"), "not a image/png"),
        (data_url("image/webp", png(8, 6)), "the data is image/png but the URL says image/webp"),
        (data_url("image/gif", b"GIF89a"), "unsupported image type"),
        ("data:image/png;base64,%%%", "base64 is malformed"),
        ("https://169.254.169.254/latest/meta-data", "does not fetch image URLs"),
    ],
    ids=["truncated", "not-an-image", "wrong-type", "gif", "bad-base64", "http-url"],
)
def test_a_bad_image_is_a_400_naming_its_part(vlm, url, says):
    err = refused(openai_client(vlm), GOOD, url, model=VLM_ID)
    assert err["param"] == "messages[0].content[2]", err
    assert says in err["message"], err
    vlm.assert_serving(VLM_ID)


def test_too_many_images_is_a_400_at_the_first_one_too_many(vlm):
    err = refused(openai_client(vlm), *[GOOD] * 9, model=VLM_ID)
    assert err["param"] == "messages[0].content[9]", err
    assert "at most 8 images" in err["message"], err
    vlm.assert_serving(VLM_ID)


def test_an_allowed_host_and_port_is_fetched_and_nothing_else(tmp_path):
    """With --allowed-media-domains 127.0.0.1:PORT, an http URL there is fetched (from a
    loopback server) and read like an inline image: the same prompt tokens, the same answer.
    A missing file, another host or another port of the same host are 400s naming the part."""
    import http.server
    import threading

    (tmp_path / "red.png").write_bytes(png(8, 6))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    port = httpd.server_address[1]
    server = Server("--model", str(VLM), "--model-id", VLM_ID,
                    "--allowed-media-domains", f"127.0.0.1:{port}", "--media-fetch-timeout", "5")
    try:
        client = openai_client(server)
        fetched = ask(client, f"http://127.0.0.1:{port}/red.png", model=VLM_ID)
        inline = ask(client, GOOD, model=VLM_ID)
        assert fetched.usage.prompt_tokens == inline.usage.prompt_tokens
        assert fetched.choices[0].message.content == inline.choices[0].message.content
        err = refused(client, f"http://127.0.0.1:{port}/missing.png", model=VLM_ID)
        assert "answered 404" in err["message"], err
        err = refused(client, f"http://localhost:{port}/red.png", model=VLM_ID)
        assert "not in --allowed-media-domains" in err["message"], err
        assert err["param"] == "messages[0].content[1]", err
        err = refused(client, f"http://127.0.0.1:{port + 1}/red.png", model=VLM_ID)
        assert "not in --allowed-media-domains" in err["message"], err
        server.assert_serving(VLM_ID)
    finally:
        httpd.shutdown()
        assert server.stop() == 0


def test_a_vision_model_reads_each_image_of_a_batch(vlm):
    """An image adds its prompt tokens to `usage` (7 here: 4 image tokens and the processor's
    3 markers), two images with the same tokens give different answers even with prefix caching
    on (a cached prefix holding one image's features never serves another), the same image gives
    the same answer, and requests with different images or none, all in flight at once, each get
    what they get alone (to 1e-4: the fixture's f32 weights run candle's dense matmul, whose
    blocking depends on the batch's rows; docs/ARCHITECTURE.md, "Numerics")."""
    from concurrent.futures import ThreadPoolExecutor

    client = openai_client(vlm)

    def answer(image: bytes | None):
        parts = [{"type": "text", "text": "w5 w6 w7"}]
        if image is not None:
            parts.append({"type": "image_url", "image_url": {"url": data_url("image/png", image)}})
        r = client.chat.completions.create(
            model=VLM_ID, messages=[{"role": "user", "content": parts}],
            max_tokens=4, temperature=0, logprobs=True,
        )
        return r.usage.prompt_tokens, [t.logprob for t in r.choices[0].logprobs.content]

    small, large = png(8, 6), png(40, 30)
    text_only, a, b, a_again = answer(None), answer(small), answer(large), answer(small)
    assert a[0] == b[0] == text_only[0] + 7, (text_only, a, b)
    assert a == a_again, "the same image must give the same answer"
    assert max(abs(x - y) for x, y in zip(a[1], b[1])) > 1e-2, "different images must change the answer"
    assert max(abs(x - y) for x, y in zip(a[1], text_only[1])) > 1e-2
    # The n choices of one image request each read the image.
    parts = [{"type": "text", "text": "w5 w6 w7"},
             {"type": "image_url", "image_url": {"url": data_url("image/png", small)}}]
    two = client.chat.completions.create(
        model=VLM_ID, messages=[{"role": "user", "content": parts}],
        max_tokens=4, temperature=0, logprobs=True, n=2,
    )
    assert two.usage.prompt_tokens == a[0]
    for choice in two.choices:
        got = [t.logprob for t in choice.logprobs.content]
        assert max(abs(x - y) for x, y in zip(got, a[1])) < 1e-4, (got, a)
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(answer, [small, large, None, large, small, None]))
    for got, want in zip(together, [a, b, text_only, b, a, text_only]):
        assert got[0] == want[0]
        assert max(abs(x - y) for x, y in zip(got[1], want[1])) < 1e-4, (got, want)
