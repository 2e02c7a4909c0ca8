//! Tool calls out of generated text as it streams: the text between an opening and a closing
//! tag is a call, the rest is content.
//!
//! The same state machine serves streamed and whole replies (a whole reply is one `feed` and
//! a `finish`), so both give the same content and calls. Content is the text outside calls,
//! with the whitespace around calls dropped: text that may still become an opening tag or
//! whitespace before one is held back until the next piece decides. A block whose body does
//! not parse as a call stays content, exactly as generated.

/// What one piece of text added to the reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<ParsedCall>,
}

/// A call as the model wrote it; `arguments` is the arguments object's JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// How one format marks and writes a call.
#[derive(Debug, Clone, Copy)]
pub struct CallSyntax {
    pub open: &'static str,
    pub close: &'static str,
    /// The call in the text between the tags; `None` if it is not one.
    pub parse_body: fn(&str) -> Option<ParsedCall>,
}

/// One choice's reply so far.
#[derive(Debug)]
pub struct ToolCallStream {
    syntax: CallSyntax,
    /// Text not yet given out: inside a call, the call's text so far; outside, trailing
    /// whitespace and what may be the start of an opening tag.
    held: String,
    /// The whitespace dropped before the open call: given back if the call does not parse.
    before_call: String,
    in_call: bool,
    calls: usize,
    /// Nothing but whitespace since the last call (or the start): leading whitespace of
    /// content after a call is dropped.
    after_call: bool,
}

impl ToolCallStream {
    pub fn new(syntax: CallSyntax) -> Self {
        Self {
            syntax,
            held: String::new(),
            before_call: String::new(),
            in_call: false,
            calls: 0,
            after_call: false,
        }
    }

    /// How many calls the reply has made so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The content and calls `text`, appended to the reply, completes.
    pub fn feed(&mut self, text: &str) -> Parsed {
        self.held.push_str(text);
        let mut out = Parsed::default();
        loop {
            if self.in_call {
                let Some(at) = self.held.find(self.syntax.close) else {
                    break;
                };
                let rest = self.held.split_off(at + self.syntax.close.len());
                let block = std::mem::replace(&mut self.held, rest);
                let body = &block[..at];
                self.end_call(body, Some(self.syntax.close), &mut out);
            } else if let Some(at) = self.held.find(self.syntax.open) {
                let rest = self.held.split_off(at + self.syntax.open.len());
                let before = std::mem::replace(&mut self.held, rest);
                let text = before[..at].trim_end();
                self.content(text, &mut out);
                self.before_call = before[text.len()..at].to_string();
                self.in_call = true;
            } else {
                let keep = undecided_suffix(&self.held, self.syntax.open);
                let held = self.held.split_off(self.held.len() - keep);
                let decided = std::mem::replace(&mut self.held, held);
                self.content(&decided, &mut out);
                break;
            }
        }
        out
    }

    /// The end of the reply: what was held back. An unterminated call still counts if its
    /// text is a whole call (a model may stop right after it).
    pub fn finish(&mut self) -> Parsed {
        let mut out = self.feed("");
        let held = std::mem::take(&mut self.held);
        if self.in_call {
            self.end_call(&held, None, &mut out);
        } else if self.calls == 0 {
            out.content.push_str(&held);
        } else {
            self.content(held.trim_end(), &mut out);
        }
        out
    }

    fn end_call(&mut self, body: &str, close: Option<&str>, out: &mut Parsed) {
        self.in_call = false;
        match (self.syntax.parse_body)(body.trim()) {
            Some(call) => {
                out.calls.push(call);
                self.calls += 1;
                self.after_call = true;
            }
            None => {
                let raw = format!(
                    "{}{}{body}{}",
                    self.before_call,
                    self.syntax.open,
                    close.unwrap_or("")
                );
                self.content(&raw, out);
            }
        }
    }

    fn content(&mut self, text: &str, out: &mut Parsed) {
        let text = match self.after_call {
            true => text.trim_start(),
            false => text,
        };
        if !text.is_empty() {
            self.after_call = false;
            out.content.push_str(text);
        }
    }
}

/// The length of `text`'s end that cannot be given out yet: trailing whitespace, or
/// whitespace and a proper prefix of `open` (both may turn out to precede a call).
fn undecided_suffix(text: &str, open: &str) -> usize {
    let partial = (1..open.len())
        .rev()
        .find(|&n| text.ends_with(&open[..n]))
        .unwrap_or(0);
    let before = &text[..text.len() - partial];
    let spaces = before.len() - before.trim_end().len();
    partial + spaces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax() -> CallSyntax {
        CallSyntax {
            open: "<call>",
            close: "</call>",
            parse_body: |body| {
                let (name, arguments) = body.split_once(' ')?;
                Some(ParsedCall {
                    name: name.to_string(),
                    arguments: arguments.to_string(),
                })
            },
        }
    }

    fn whole(text: &str) -> Parsed {
        let mut s = ToolCallStream::new(syntax());
        let mut out = s.feed(text);
        let end = s.finish();
        out.content.push_str(&end.content);
        out.calls.extend(end.calls);
        out
    }

    fn by_char(text: &str) -> Parsed {
        let mut s = ToolCallStream::new(syntax());
        let mut out = Parsed::default();
        for c in text.chars().map(String::from).chain([String::new()]) {
            let piece = match c.is_empty() {
                true => s.finish(),
                false => s.feed(&c),
            };
            out.content.push_str(&piece.content);
            out.calls.extend(piece.calls);
        }
        out
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
            assert_eq!(whole(text).content, text);
            assert_eq!(by_char(text).content, text);
            assert!(whole(text).calls.is_empty());
        }
    }

    #[test]
    fn calls_are_parsed_and_whitespace_around_them_dropped() {
        let text = "Let me look.\n<call>f {\"a\": 1}</call>\n<call> g {} </call>\n";
        let expected = Parsed {
            content: "Let me look.".into(),
            calls: vec![call("f", "{\"a\": 1}"), call("g", "{}")],
        };
        assert_eq!(whole(text), expected);
        assert_eq!(by_char(text), expected);
    }

    #[test]
    fn streamed_pieces_give_the_whole_reply_whatever_the_split() {
        let text = "Sure. <call>f 1</call> and then\n<call>bad</call> done <call>g 2";
        let expected = whole(text);
        assert_eq!(expected.calls, vec![call("f", "1"), call("g", "2")]);
        assert_eq!(expected.content, "Sure.and then\n<call>bad</call> done");
        for split in 0..=text.len() {
            if !text.is_char_boundary(split) {
                continue;
            }
            let mut s = ToolCallStream::new(syntax());
            let mut got = s.feed(&text[..split]);
            for piece in [s.feed(&text[split..]), s.finish()] {
                got.content.push_str(&piece.content);
                got.calls.extend(piece.calls);
            }
            assert_eq!(got, expected, "split at {split}");
        }
        assert_eq!(by_char(text), expected);
    }

    #[test]
    fn content_is_given_out_as_soon_as_it_cannot_start_a_call() {
        let mut s = ToolCallStream::new(syntax());
        assert_eq!(s.feed("Hi <ca").content, "Hi");
        assert_eq!(s.feed("t").content, " <cat");
        assert_eq!(s.feed("<call>f").content, "");
        let end = s.feed(" 1</call>");
        assert_eq!(end.calls, vec![call("f", "1")]);
        assert_eq!(s.calls(), 1);
    }
}
