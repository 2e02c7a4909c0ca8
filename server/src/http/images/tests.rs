use super::*;
use crate::http::wire::{ImageUrl, Role};
use image::{Rgb, RgbImage};

fn picture(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x * 40) as u8, (y * 40) as u8, 200]))
}

fn encode(img: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode");
    out.into_inner()
}

fn data_url(media_type: &str, bytes: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{media_type};base64,{b64}")
}

/// One user message: a text part, then an image part per URL.
fn message(urls: &[String]) -> Vec<WireMessage> {
    let text = ContentPart {
        kind: "text".into(),
        text: Some("What is this?".into()),
        image_url: None,
    };
    let images = urls.iter().map(|url| ContentPart {
        kind: "image_url".into(),
        text: None,
        image_url: Some(ImageUrl {
            url: url.clone(),
            detail: None,
        }),
    });
    vec![WireMessage {
        role: Role::User,
        content: Some(Content::Parts(
            std::iter::once(text).chain(images).collect(),
        )),
        name: None,
        tool_calls: None,
        tool_call_id: None,
    }]
}

fn config(limits: ImageLimits) -> ImageConfig {
    ImageConfig {
        limits,
        fetcher: None,
    }
}

async fn refused(urls: &[String], limits: ImageLimits) -> ApiError {
    decode_all(&message(urls), &config(limits))
        .await
        .expect_err("refused")
}

#[tokio::test]
async fn png_jpeg_and_webp_decode_to_their_pixels() {
    let img = picture(5, 3);
    let urls = [
        data_url("image/png", &encode(&img, ImageFormat::Png)),
        data_url("image/jpeg", &encode(&img, ImageFormat::Jpeg)),
        data_url("image/webp", &encode(&img, ImageFormat::WebP)),
    ];
    let got = decode_all(&message(&urls), &config(ImageLimits::default()))
        .await
        .expect("decoded");
    assert_eq!(got.len(), 3);
    for (j, image) in got.iter().enumerate() {
        assert_eq!(image.part, format!("messages[0].content[{}]", j + 1));
        assert_eq!((image.width, image.height), (5, 3));
        assert_eq!(image.rgb.len(), 5 * 3 * 3);
    }
    // PNG and lossless WebP keep every pixel; JPEG is lossy.
    assert_eq!(got[0].rgb, img.as_raw().clone());
    assert_eq!(got[2].rgb, img.as_raw().clone());
}

#[tokio::test]
async fn each_bad_image_is_a_400_naming_its_part() {
    let png = encode(&picture(4, 4), ImageFormat::Png);
    let ok = data_url("image/png", &png);
    let cases: Vec<(String, &str)> = vec![
        (
            data_url("image/png", b"not a png at all"),
            "not a image/png",
        ),
        (
            data_url("image/png", &png[..png.len() / 2]),
            "cannot decode",
        ),
        (
            data_url("image/jpeg", &png),
            "the data is image/png but the URL says image/jpeg",
        ),
        (data_url("image/gif", b"GIF89a"), "unsupported image type"),
        ("data:image/png;base64,@@@@".into(), "base64 is malformed"),
        ("data:image/png,rawbytes".into(), "must be base64"),
        (
            "https://example.com/cat.png".into(),
            "does not fetch image URLs",
        ),
        ("file:///etc/passwd".into(), "must be a data: URL"),
    ];
    for (url, says) in cases {
        let e = refused(&[ok.clone(), url.clone()], ImageLimits::default()).await;
        assert_eq!(e.status(), 400, "{url:.40}");
        assert_eq!(
            e.param.as_deref(),
            Some("messages[0].content[2]"),
            "{url:.40}"
        );
        assert!(e.message.contains(says), "{url:.40}: {}", e.message);
    }
}

#[tokio::test]
async fn limits_on_count_bytes_and_pixels_are_400s() {
    let png = encode(&picture(20, 20), ImageFormat::Png);
    let url = data_url("image/png", &png);
    let few = ImageLimits {
        max_images: 2,
        ..ImageLimits::default()
    };
    let e = refused(&[url.clone(), url.clone(), url.clone()], few).await;
    assert_eq!(e.param.as_deref(), Some("messages[0].content[3]"));
    assert!(e.message.contains("at most 2 images"), "{}", e.message);
    let small = ImageLimits {
        max_bytes: png.len() - 1,
        ..ImageLimits::default()
    };
    let e = refused(std::slice::from_ref(&url), small).await;
    assert!(e.message.contains("--max-image-bytes"), "{}", e.message);
    let tiny = ImageLimits {
        max_pixels: 399,
        ..ImageLimits::default()
    };
    let e = refused(std::slice::from_ref(&url), tiny).await;
    assert!(e.message.contains("20x20"), "{}", e.message);
    let exact = ImageLimits {
        max_images: 1,
        max_bytes: png.len(),
        max_pixels: 400,
    };
    assert_eq!(
        decode_all(&message(&[url]), &config(exact))
            .await
            .expect("fits")
            .len(),
        1
    );
}

#[tokio::test]
async fn detail_is_checked_and_kept() {
    let url = data_url("image/png", &encode(&picture(2, 2), ImageFormat::Png));
    let mut messages = message(&[url]);
    let Some(Content::Parts(parts)) = &mut messages[0].content else {
        panic!("parts")
    };
    let image = parts[1].image_url.as_mut().expect("image");
    image.detail = Some("low".into());
    let got = decode_all(&messages, &config(ImageLimits::default()))
        .await
        .expect("ok");
    assert_eq!(got[0].detail, Detail::Low);
    let Some(Content::Parts(parts)) = &mut messages[0].content else {
        panic!("parts")
    };
    parts[1].image_url.as_mut().expect("image").detail = Some("ultra".into());
    let e = decode_all(&messages, &config(ImageLimits::default()))
        .await
        .expect_err("bad");
    assert!(e.message.contains("auto, low or high"), "{}", e.message);
}

/// A loopback HTTP server that answers every connection with `response` (after `delay`).
async fn serve_once(response: Vec<u8>, delay: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let response = response.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                tokio::time::sleep(delay).await;
                let _ = socket.write_all(&response).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}/image")
}

fn http_response(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\nconnection: close\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Fetching allowed from the host and port of `url`.
fn fetching(limits: ImageLimits, timeout_ms: u64, url: &str) -> ImageConfig {
    let port = url
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .unwrap_or_default();
    let hosts = [format!("127.0.0.1:{port}")];
    let timeout = std::time::Duration::from_millis(timeout_ms);
    ImageConfig {
        limits,
        fetcher: ImageFetcher::new(&hosts, timeout).expect("client"),
    }
}

#[tokio::test]
async fn an_allowed_host_is_fetched_and_decoded() {
    let png = encode(&picture(6, 4), ImageFormat::Png);
    let length = format!("content-length: {}", png.len());
    let ok = http_response("200 OK", &["content-type: image/png", &length], &png);
    let url = serve_once(ok, std::time::Duration::ZERO).await;
    let config = fetching(ImageLimits::default(), 5_000, &url);
    let got = decode_all(&message(&[url]), &config)
        .await
        .expect("fetched");
    assert_eq!((got[0].width, got[0].height), (6, 4));
    assert_eq!(got[0].rgb, picture(6, 4).into_raw());
}

#[tokio::test]
async fn fetching_refuses_other_hosts_redirects_errors_and_oversized_or_slow_bodies() {
    let png = encode(&picture(6, 4), ImageFormat::Png);
    let quick = std::time::Duration::ZERO;
    let limits = ImageLimits::default();
    let cases: Vec<(Vec<u8>, ImageLimits, std::time::Duration, &str)> = vec![
        (
            http_response("302 Found", &["location: http://10.0.0.1/"], b""),
            limits,
            quick,
            "redirects are not followed",
        ),
        (
            http_response("404 Not Found", &[], b""),
            limits,
            quick,
            "answered 404",
        ),
        (
            http_response("200 OK", &["content-type: text/html"], b"<html>"),
            limits,
            quick,
            "unsupported image type \"text/html\"",
        ),
        // Declared too large, and too large as it streams (no Content-Length).
        (
            http_response(
                "200 OK",
                &["content-type: image/png", "content-length: 999999"],
                b"",
            ),
            ImageLimits {
                max_bytes: 1000,
                ..limits
            },
            quick,
            "--max-image-bytes",
        ),
        (
            http_response("200 OK", &["content-type: image/png"], &vec![7u8; 5000]),
            ImageLimits {
                max_bytes: 1000,
                ..limits
            },
            quick,
            "--max-image-bytes",
        ),
        (
            http_response("200 OK", &["content-type: image/png"], &png),
            limits,
            std::time::Duration::from_millis(1500),
            "--media-fetch-timeout",
        ),
    ];
    for (response, limits, delay, says) in cases {
        let url = serve_once(response, delay).await;
        let e = decode_all(
            &message(std::slice::from_ref(&url)),
            &fetching(limits, 300, &url),
        )
        .await
        .expect_err("refused");
        assert_eq!(e.param.as_deref(), Some("messages[0].content[1]"), "{says}");
        assert!(e.message.contains(says), "{says}: {}", e.message);
    }
    // A host that is not allowed is never contacted, nor an allowed host on another port; nor
    // is any URL when none is allowed.
    let allowed = fetching(limits, 300, "http://127.0.0.1:9/");
    let e = decode_all(&message(&["http://localhost:9/x.png".into()]), &allowed)
        .await
        .expect_err("refused");
    assert!(
        e.message.contains("\"localhost:9\" are not fetched"),
        "{}",
        e.message
    );
    let e = decode_all(&message(&["http://127.0.0.1:10/x.png".into()]), &allowed)
        .await
        .expect_err("refused");
    assert!(
        e.message.contains("\"127.0.0.1:10\" are not fetched"),
        "{}",
        e.message
    );
    let url = serve_once(http_response("200 OK", &[], b""), quick).await;
    let e = decode_all(&message(&[url]), &config(limits))
        .await
        .expect_err("off");
    assert!(
        e.message.contains("does not fetch image URLs"),
        "{}",
        e.message
    );
}

#[test]
fn allowed_entries_take_an_optional_port() {
    use super::fetch::host_and_port;
    assert_eq!(host_and_port("example.com"), ("example.com".into(), None));
    assert_eq!(
        host_and_port("example.com:8080"),
        ("example.com".into(), Some(8080))
    );
    assert_eq!(host_and_port("[::1]:8080"), ("[::1]".into(), Some(8080)));
    assert_eq!(host_and_port("[::1]"), ("[::1]".into(), None));
}

#[tokio::test]
async fn transparent_pixels_are_blended_over_white() {
    use image::{Rgba, RgbaImage};
    let img = RgbaImage::from_fn(3, 1, |x, _| match x {
        0 => Rgba([0, 0, 0, 0]),     // transparent black: white
        1 => Rgba([0, 0, 0, 255]),   // opaque black: black
        _ => Rgba([255, 0, 0, 128]), // half-transparent red: pink
    });
    let mut bytes = Cursor::new(Vec::new());
    img.write_to(&mut bytes, ImageFormat::Png).expect("encode");
    let url = data_url("image/png", &bytes.into_inner());
    let got = decode_all(&message(&[url]), &config(ImageLimits::default()))
        .await
        .expect("decoded");
    assert_eq!(got[0].rgb, vec![255, 255, 255, 0, 0, 0, 255, 127, 127]);
}
