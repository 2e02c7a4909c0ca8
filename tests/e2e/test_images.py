"""Images in chat requests through the official openai client: the server decodes every
`image_url` part (data: URLs, PNG, JPEG, WebP) and answers each bad one with a 400 naming the
part; the default model reads text only, so a good image is refused by part too. The server
keeps serving after each.
"""
import base64
import struct
import zlib

import openai
import pytest

from conftest import MODEL_ID


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


def ask(client, *urls: str):
    parts = [{"type": "text", "text": "What colour is this?"}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": parts}], max_tokens=4
    )


def refused(client, *urls: str) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, *urls)
    assert e.value.status_code == 400
    return e.value.body


GOOD = data_url("image/png", png(8, 6))


def test_a_good_image_reaches_the_model_which_reads_text_only(client, server):
    err = refused(client, GOOD)
    assert err["param"] == "messages[0].content[1]", err
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
def test_a_bad_image_is_a_400_naming_its_part(client, server, url, says):
    err = refused(client, GOOD, url)
    assert err["param"] == "messages[0].content[2]", err
    assert says in err["message"], err
    server.assert_serving()


def test_too_many_images_is_a_400_at_the_first_one_too_many(client, server):
    err = refused(client, *[GOOD] * 9)
    assert err["param"] == "messages[0].content[9]", err
    assert "at most 8 images" in err["message"], err
    server.assert_serving()


def test_an_allowed_host_is_fetched_and_others_are_not(tmp_path):
    """With --allowed-media-domains, an http URL of that host is fetched (from a loopback
    server here) and decoded: the text-only model then refuses the image as it does an inline
    one. A host not on the list is refused without a fetch."""
    import http.server
    import threading

    from openai import OpenAI

    from conftest import Server

    (tmp_path / "red.png").write_bytes(png(8, 6))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    server = Server("--allowed-media-domains", "127.0.0.1", "--media-fetch-timeout", "5")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        port = httpd.server_address[1]
        err = refused(client, f"http://127.0.0.1:{port}/red.png")
        assert "reads text only" in err["message"], err
        err = refused(client, f"http://127.0.0.1:{port}/missing.png")
        assert "answered 404" in err["message"], err
        err = refused(client, f"http://localhost:{port}/red.png")
        assert "not in --allowed-media-domains" in err["message"], err
        assert err["param"] == "messages[0].content[1]", err
        server.assert_serving()
    finally:
        httpd.shutdown()
        assert server.stop() == 0


def test_a_vision_model_reads_each_image_of_a_batch(tmp_path):
    """A SmolVLM-layout model (models/tests/fixtures/idefics3_tiny: generated weights, a
    word-level tokenizer; its logits are checked against transformers in models/tests/vision.rs)
    served from its folder: an image adds its prompt tokens to `usage` (7 here: 4 image tokens
    and the processor's 3 markers), two images with the same tokens give different answers even
    with prefix caching on (a cached prefix holding one image's features never serves another),
    the same image gives the same answer, and requests with different images or none, all in
    flight at once, each get what they get alone (to 1e-4: the fixture's f32 weights run
    candle's dense matmul, whose blocking depends on the batch's rows; docs/ARCHITECTURE.md,
    "Numerics")."""
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from conftest import ROOT, Server

    server = Server("--model", str(ROOT / "models/tests/fixtures/idefics3_tiny"), "--model-id", "tiny-vlm")
    try:
        client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def answer(image: bytes | None):
            parts = [{"type": "text", "text": "w5 w6 w7"}]
            if image is not None:
                parts.append({"type": "image_url", "image_url": {"url": data_url("image/png", image)}})
            r = client.chat.completions.create(
                model="tiny-vlm", messages=[{"role": "user", "content": parts}],
                max_tokens=4, temperature=0, logprobs=True,
            )
            return r.usage.prompt_tokens, [t.logprob for t in r.choices[0].logprobs.content]

        small, large = png(8, 6), png(40, 30)
        text_only, a, b, a_again = answer(None), answer(small), answer(large), answer(small)
        assert a[0] == b[0] == text_only[0] + 7, (text_only, a, b)
        assert a == a_again, "the same image must give the same answer"
        assert max(abs(x - y) for x, y in zip(a[1], b[1])) > 1e-2, "different images must change the answer"
        assert max(abs(x - y) for x, y in zip(a[1], text_only[1])) > 1e-2
        with ThreadPoolExecutor(max_workers=6) as pool:
            together = list(pool.map(answer, [small, large, None, large, small, None]))
        for got, want in zip(together, [a, b, text_only, b, a, text_only]):
            assert got[0] == want[0]
            assert max(abs(x - y) for x, y in zip(got[1], want[1])) < 1e-4, (got, want)
    finally:
        assert server.stop() == 0
