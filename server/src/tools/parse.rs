//! Tool calls out of generated text as it streams: the text between an opening and a closing
//! tag is a call, the rest is content.
//!
//! The same state machine serves streamed and whole replies (a whole reply is one `feed` and
//! a `finish`), so both give the same content and calls. Content is the text outside calls,
//! with the whitespace around calls dropped: text that may still become an opening tag, or
//! whitespace before one, is held back until the next piece decides.
//!
//! A call streams as OpenAI streams them: its name once the call's head is written (for
//! Hermes, `{"name": "...", "arguments": {`), then its arguments piece by piece, holding back
//! only what may turn out to be the end of the call (the wrapper's closing brace, whitespace,
//! part of the closing tag). A call whose head never shows (another key order, say) comes
//! whole when it closes, if its body parses; otherwise the block stays content, exactly as
//! generated. Arguments are the model's own text: under a forced `tool_choice` the grammar
//! makes them valid JSON; under `auto` a model may write invalid JSON (OpenAI gives the same
//! warning).

/// What one piece of text added to the reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Parsed {
    pub content: String,
    pub calls: Vec<CallDelta>,
}

/// A piece of call `index`: its start (with `name`) or more of its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallDelta {
    pub index: usize,
    pub name: Option<String>,
    pub arguments: String,
}

/// A whole call as the model wrote it; `arguments` is the arguments object's JSON text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

impl CallDelta {
    /// Adds this piece to the calls so far (a start opens the next call).
    pub fn apply_to(self, calls: &mut Vec<ParsedCall>) {
        match (self.name, calls.get_mut(self.index)) {
            (Some(name), _) => calls.push(ParsedCall {
                name,
                arguments: self.arguments,
            }),
            (None, Some(call)) => call.arguments.push_str(&self.arguments),
            (None, None) => {}
        }
    }
}

/// How one format marks and writes a call.
#[derive(Debug, Clone, Copy)]
pub struct CallSyntax {
    pub open: &'static str,
    pub close: &'static str,
    /// The call's name and where its arguments start, once the text after the opening tag
    /// holds the whole head of a call; `None` while it does not (yet).
    pub head: fn(&str) -> Option<(String, usize)>,
    /// The end of a call after its arguments (the wrapper's `}`), stripped from the text
    /// before the closing tag.
    pub tail: char,
    /// A whole call in the text between the tags, for calls whose head never showed.
    pub parse_body: fn(&str) -> Option<ParsedCall>,
}

/// An open call: where its arguments start in `held`, and how much of them went out.
#[derive(Debug, Clone, Copy)]
struct Streaming {
    start: usize,
    sent: usize,
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
    streaming: Option<Streaming>,
    calls: usize,
    /// Nothing but whitespace since the last call: leading whitespace of content after a
    /// call is dropped.
    after_call: bool,
}

impl ToolCallStream {
    pub fn new(syntax: CallSyntax) -> Self {
        Self {
            syntax,
            held: String::new(),
            before_call: String::new(),
            in_call: false,
            streaming: None,
            calls: 0,
            after_call: false,
        }
    }

    /// How many calls the reply has started so far.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// The content and call pieces `text`, appended to the reply, decides.
    pub fn feed(&mut self, text: &str) -> Parsed {
        self.held.push_str(text);
        let mut out = Parsed::default();
        loop {
            if self.in_call {
                let Some(at) = self.held.find(self.syntax.close) else {
                    self.stream_call(&mut out);
                    break;
                };
                let rest = self.held.split_off(at + self.syntax.close.len());
                let mut block = std::mem::replace(&mut self.held, rest);
                block.truncate(at);
                self.end_call(block, true, &mut out);
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

    /// [`ToolCallStream::feed`], and at the reply's end (`end`) [`ToolCallStream::finish`]'s
    /// pieces after it: what a piece of a stream, or a whole reply, adds.
    pub fn next(&mut self, text: &str, end: bool) -> Parsed {
        let mut parsed = self.feed(text);
        if end {
            let rest = self.finish();
            parsed.content.push_str(&rest.content);
            parsed.calls.extend(rest.calls);
        }
        parsed
    }

    /// The end of the reply: what was held back. An unterminated call still counts (a model
    /// may stop right after it, and one cut by `max_tokens` has started streaming).
    pub fn finish(&mut self) -> Parsed {
        let mut out = self.feed("");
        let held = std::mem::take(&mut self.held);
        if self.in_call {
            self.end_call(held, false, &mut out);
        } else if self.calls == 0 {
            out.content.push_str(&held);
        } else {
            self.content(held.trim_end(), &mut out);
        }
        out
    }

    /// An open call's next pieces: its start once the head is whole, then its arguments up
    /// to what may still be the call's end.
    fn stream_call(&mut self, out: &mut Parsed) {
        let streaming = match self.streaming {
            Some(s) => s,
            None => {
                let Some((name, start)) = (self.syntax.head)(&self.held) else {
                    return;
                };
                out.calls.push(self.start_call(name));
                let s = Streaming { start, sent: 0 };
                self.streaming = Some(s);
                s
            }
        };
        let arguments = &self.held[streaming.start..];
        let safe = self.settled(arguments);
        let index = self.calls - 1;
        send_arguments(&mut self.streaming, index, &arguments[..safe], out);
    }

    fn end_call(&mut self, body: String, closed: bool, out: &mut Parsed) {
        self.in_call = false;
        if self.streaming.is_none() {
            // A call that closes in the piece that opened it: as if it had streamed.
            if let Some((name, start)) = (self.syntax.head)(&body) {
                out.calls.push(self.start_call(name));
                self.streaming = Some(Streaming { start, sent: 0 });
            }
        }
        if let Some(s) = self.streaming {
            // Without its closing tag (the reply was cut), part of the tag may end the text.
            let arguments = &body[s.start..];
            let whole = match closed {
                true => self.without_tail(arguments),
                false => &arguments[..self.settled(arguments)],
            };
            send_arguments(&mut self.streaming, self.calls - 1, whole, out);
            self.streaming = None;
            self.after_call = true;
            return;
        }
        let complete = match closed {
            true => body.as_str(),
            false => &body[..body.len() - partial_suffix(&body, self.syntax.close)],
        };
        match (self.syntax.parse_body)(complete.trim()) {
            Some(call) => {
                let mut start = self.start_call(call.name);
                start.arguments = call.arguments;
                out.calls.push(start);
                self.after_call = true;
            }
            None => {
                let close = if closed { self.syntax.close } else { "" };
                let open = self.syntax.open;
                let raw = format!("{}{open}{body}{close}", self.before_call);
                self.content(&raw, out);
            }
        }
    }

    fn start_call(&mut self, name: String) -> CallDelta {
        self.calls += 1;
        CallDelta {
            index: self.calls - 1,
            name: Some(name),
            arguments: String::new(),
        }
    }

    /// How much of `arguments` cannot be the call's end: all but a partial closing tag,
    /// whitespace and one closing brace at the end.
    fn settled(&self, arguments: &str) -> usize {
        let partial = partial_suffix(arguments, self.syntax.close);
        self.without_tail(&arguments[..arguments.len() - partial])
            .len()
    }

    /// The arguments without the call's end (whitespace, the wrapper's brace, whitespace).
    fn without_tail<'a>(&self, text: &'a str) -> &'a str {
        let text = text.trim_end();
        text.strip_suffix(self.syntax.tail)
            .unwrap_or(text)
            .trim_end()
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

/// Sends the part of `arguments` (call `index`'s arguments so far, a prefix of its final
/// ones) that `streaming` has not sent yet.
fn send_arguments(
    streaming: &mut Option<Streaming>,
    index: usize,
    arguments: &str,
    out: &mut Parsed,
) {
    let Some(s) = streaming.as_mut() else {
        return;
    };
    let Some(new) = arguments.get(s.sent..).filter(|n| !n.is_empty()) else {
        return;
    };
    s.sent = arguments.len();
    match out.calls.last_mut().filter(|d| d.index == index) {
        Some(delta) => delta.arguments.push_str(new),
        None => out.calls.push(CallDelta {
            index,
            name: None,
            arguments: new.to_string(),
        }),
    }
}

/// The length of the longest proper prefix of `tag` (ASCII) that `text` ends with.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len())
        .rev()
        .find(|&n| text.ends_with(&tag[..n]))
        .unwrap_or(0)
}

/// The length of `text`'s end that cannot be given out yet: trailing whitespace, or
/// whitespace and a proper prefix of `open` (both may turn out to precede a call).
fn undecided_suffix(text: &str, open: &str) -> usize {
    let partial = partial_suffix(text, open);
    let before = &text[..text.len() - partial];
    let spaces = before.len() - before.trim_end().len();
    partial + spaces
}

#[cfg(test)]
mod tests;
