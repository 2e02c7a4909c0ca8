use super::*;

/// Calls written `<call>(name {args})</call>`: the head is `(name ` before a `{`, the tail `)`.
fn syntax() -> CallSyntax {
    CallSyntax {
        open: "<call>",
        close: "</call>",
        head: |text| {
            let rest = text.trim_start().strip_prefix('(')?;
            let (name, after) = rest.split_once(' ')?;
            after.starts_with('{').then(|| {
                let start = text.len() - after.len();
                (name.to_string(), start)
            })
        },
        tail: ')',
        parse_body: |body| {
            let inner = body.strip_prefix('(')?.strip_suffix(')')?;
            let (arguments, name) = inner.rsplit_once(" as ")?;
            Some(ParsedCall {
                name: name.to_string(),
                arguments: arguments.to_string(),
            })
        },
    }
}

/// The reply as a client assembles it from the pieces of `splits` (byte offsets).
fn assembled(text: &str, splits: &[usize]) -> (String, Vec<ParsedCall>) {
    let mut s = ToolCallStream::new(syntax());
    let (mut content, mut calls) = (String::new(), Vec::new());
    let mut parsed = Vec::new();
    let mut last = 0;
    for &at in splits.iter().chain([text.len()].iter()) {
        parsed.push(s.feed(&text[last..at]));
        last = at;
    }
    parsed.push(s.finish());
    for piece in parsed {
        content.push_str(&piece.content);
        piece.calls.into_iter().for_each(|d| d.apply_to(&mut calls));
    }
    (content, calls)
}

fn whole(text: &str) -> (String, Vec<ParsedCall>) {
    assembled(text, &[])
}

fn by_char(text: &str) -> (String, Vec<ParsedCall>) {
    let splits: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
    assembled(text, &splits)
}

fn call(name: &str, arguments: &str) -> ParsedCall {
    ParsedCall {
        name: name.into(),
        arguments: arguments.into(),
    }
}

#[test]
fn text_without_calls_is_returned_exactly() {
    let texts = [
        "Hello, world.\n\n",
        "a <cal b",
        "  x < y  ",
        "<call",
        "",
        "a \n<call>bad</call> b <call></call>\n",
    ];
    for text in texts {
        assert_eq!(whole(text), (text.to_string(), vec![]));
        assert_eq!(by_char(text), (text.to_string(), vec![]));
    }
}

#[test]
fn calls_are_parsed_and_whitespace_around_them_dropped() {
    let text = "Let me look.\n<call>(f {\"a\": {\"b\": 1}})</call>\n<call> ({} as g) </call>\n";
    let expected = (
        "Let me look.".to_string(),
        vec![call("f", "{\"a\": {\"b\": 1}}"), call("g", "{}")],
    );
    assert_eq!(whole(text), expected);
    assert_eq!(by_char(text), expected);
}

#[test]
fn streamed_pieces_give_the_whole_reply_whatever_the_split() {
    let text = "Sure. <call>(f {\"x\": \"a}\"} )</call> and then\n<call>bad</call> done <call>(g {\"y\": 2}";
    let expected = whole(text);
    assert_eq!(
        expected.1,
        vec![call("f", "{\"x\": \"a}\"}"), call("g", "{\"y\": 2}")]
    );
    assert_eq!(expected.0, "Sure.and then\n<call>bad</call> done");
    for split in 0..=text.len() {
        if text.is_char_boundary(split) {
            assert_eq!(assembled(text, &[split]), expected, "split at {split}");
        }
    }
    assert_eq!(by_char(text), expected);
}

#[test]
fn arguments_stream_as_they_are_written() {
    let mut s = ToolCallStream::new(syntax());
    assert_eq!(s.feed("Hi <ca").content, "Hi");
    assert_eq!(s.feed("t").content, " <cat");
    assert!(
        s.feed("<call>(f").calls.is_empty(),
        "the head is not whole yet"
    );
    let start = s.feed(" {\"a\"").calls;
    let first = CallDelta {
        index: 0,
        name: Some("f".into()),
        arguments: "{\"a\"".into(),
    };
    assert_eq!(start, vec![first]);
    let more = |s: &mut ToolCallStream, text: &str| -> Vec<String> {
        s.feed(text)
            .calls
            .into_iter()
            .map(|d| d.arguments)
            .collect()
    };
    assert_eq!(more(&mut s, ": 1}"), vec![": 1}"]);
    assert!(more(&mut s, " )").is_empty(), "the tail may end the call");
    assert!(more(&mut s, "</ca").is_empty());
    assert!(more(&mut s, "ll>").is_empty());
    assert_eq!(s.calls(), 1);
}

#[test]
fn a_call_cut_inside_its_closing_tag_keeps_its_arguments() {
    for text in ["<call>(f {\"a\": 1})</ca", "<call>({\"a\": 1} as f)</c"] {
        let expected = (String::new(), vec![call("f", "{\"a\": 1}")]);
        assert_eq!(whole(text), expected, "{text}");
        assert_eq!(by_char(text), expected, "{text}");
    }
}
